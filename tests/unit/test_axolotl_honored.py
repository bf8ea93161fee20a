"""Axolotl keys archtune honors (class 1): each has its Axolotl meaning, checked with numbers."""
from __future__ import annotations

import functools
import json

import pytest
import torch

from archtune.config import config_from_dict
from archtune.models.tiny import build_tiny_config
from archtune.plan import resolve
from tests.data_plan import data_plan


@functools.lru_cache(maxsize=None)
def _model_config(name: str) -> str:
    return json.dumps(build_tiny_config(name).to_dict())


def plan_for(name: str = "llama", world_size: int = 1, **keys):
    cfg = config_from_dict({"base_model": f"tiny:{name}", "datasets": [{"path": "data.jsonl"}], **keys})
    return resolve(cfg, json.loads(_model_config(name)), world_size=world_size)


def args_for(steps_per_epoch: int | None = None, has_eval: bool = True, **keys):
    from archtune.train.lifecycle import training_arguments

    plan = plan_for(**keys)
    assert not plan.errors, plan.errors
    return training_arguments(plan, has_eval=has_eval, steps_per_epoch=steps_per_epoch)


# ---------------------------------------------------------------- TrainingArguments meanings

@pytest.mark.parametrize("keys, attr, value", [
    ({"adam_beta1": 0.8}, "adam_beta1", 0.8),
    ({"adam_beta2": 0.95}, "adam_beta2", 0.95),
    ({"adam_epsilon": 1e-6}, "adam_epsilon", 1e-6),
    ({"eval_batch_size": 3}, "per_device_eval_batch_size", 3),
    ({"dataloader_num_workers": 2}, "dataloader_num_workers", 2),
    ({"dataloader_num_workers": 2, "dataloader_prefetch_factor": 4}, "dataloader_prefetch_factor", 4),
    ({"dataloader_drop_last": True}, "dataloader_drop_last", True),
    ({"remove_unused_columns": True}, "remove_unused_columns", True),
    ({"optim_args": {"amsgrad": True}}, "optim_args", "amsgrad=True"),
    ({"lr_scheduler_kwargs": {"num_cycles": 2}, "lr_scheduler": "cosine_with_restarts"}, "lr_scheduler_kwargs",
     {"num_cycles": 2}),
    ({"save_total_limit": 2, "save_steps": 3}, "save_total_limit", 2),
    ({"optimizer": "adamw_bnb_8bit"}, "optim", "adamw_bnb_8bit"),
    ({"optimizer": "paged_adamw_8bit"}, "optim", "paged_adamw_8bit"),
    ({"optimizer": "adamw_torch_fused"}, "optim", "adamw_torch_fused"),
    ({"optimizer": "lion_32bit"}, "optim", "lion_32bit"),
    ({"wandb_name": "run-7"}, "run_name", "run-7"),
    ({"full_determinism": True}, "full_determinism", True),
    ({}, "full_determinism", False),
])
def test_keys_reach_the_trainer_with_their_meaning(keys, attr, value):
    got = getattr(args_for(**keys), attr)
    assert (got.value if hasattr(got, "value") else got) == value


@pytest.mark.parametrize("keys, ld_alpha", [({"dpo_ld_alpha": 0.5}, 0.5), ({}, None)])
def test_dpo_ld_alpha_is_trls_ld_alpha(keys, ld_alpha):
    """Axolotl 0.21's LD-DPO weight reaches TRL's DPOConfig (unset: every answer token weighs 1)."""
    from archtune.train.lifecycle import training_arguments
    from archtune.train.preference import trl_arguments

    plan = plan_for(rl="dpo", datasets=[{"path": "pairs.jsonl", "type": "chat_template.default"}], **keys)
    assert not plan.errors, plan.errors
    config = trl_arguments(plan, training_arguments(plan, has_eval=False, steps_per_epoch=None))
    assert type(config).__name__ == "DPOConfig" and config.ld_alpha == ld_alpha


@pytest.mark.parametrize("keys, strategy, steps", [
    ({"saves_per_epoch": 4}, "steps", 5),  # 20 steps per epoch / 4
    ({"saves_per_epoch": 1}, "steps", 20),
    ({"save_strategy": "epoch"}, "epoch", None),
    ({"save_strategy": "no", "save_steps": 3}, "no", 3),
    ({"save_steps": 3}, "steps", 3),
    ({}, "no", None),
])
def test_saves_per_epoch_and_save_strategy(keys, strategy, steps):
    args = args_for(steps_per_epoch=20, **keys)
    assert args.save_strategy.value == strategy
    if steps is not None:
        assert args.save_steps == steps


@pytest.mark.parametrize("keys, strategy, steps", [
    ({"evals_per_epoch": 4}, "steps", 5),
    ({"eval_strategy": "epoch"}, "epoch", None),
    ({"eval_steps": 7}, "steps", 7),
    ({"evals_per_epoch": 100}, "steps", 1),  # at least every step
])
def test_evals_per_epoch_and_eval_strategy(keys, strategy, steps):
    args = args_for(steps_per_epoch=20, **keys)
    assert args.eval_strategy.value == strategy
    if steps is not None:
        assert args.eval_steps == steps
    assert args_for(steps_per_epoch=20, has_eval=False, **keys).eval_strategy.value == "no"


def test_per_epoch_and_steps_together_are_refused():
    assert [p.key for p in plan_for(saves_per_epoch=2, save_steps=5).errors] == ["saves_per_epoch"]
    assert [p.key for p in plan_for(evals_per_epoch=2, eval_steps=5).errors] == ["evals_per_epoch"]


def test_cosine_min_lr_ratio_ends_the_schedule_at_that_fraction():
    from transformers import get_scheduler

    args = args_for(cosine_min_lr_ratio=0.1, learning_rate=1.0, warmup_steps=0)
    assert args.lr_scheduler_type.value == "cosine_with_min_lr"
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=0, num_training_steps=10,
                          scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    for _ in range(10):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.1)


# ---------------------------------------------------------------- precision, compile, attention, checkpointing

def test_auto_precision_tf32_and_compile_resolve_for_this_machine():
    plan = plan_for(bf16="auto", fp16="auto", tf32=True, torch_compile=True)
    cuda = torch.cuda.is_available()
    assert plan.get("bf16") == (cuda and torch.cuda.is_bf16_supported())
    assert plan.settings["bf16"].source == "auto"
    if not cuda:
        assert plan.get("fp16") is False and plan.get("tf32") is False and plan.get("torch_compile") is False
        assert any(n.startswith("tf32:") for n in plan.info) and any(n.startswith("torch_compile:") for n in plan.info)
        args = args_for(bf16="auto", tf32=True, torch_compile=True)
        assert not args.bf16 and not args.torch_compile and not args.tf32


@pytest.mark.parametrize("keys, runs", [
    ({}, "sdpa"), ({"attn_implementation": "eager"}, "eager"), ({"sdp_attention": True}, "sdpa"),
    ({"eager_attention": True}, "eager"),
])
def test_attention_runs_as_asked(keys, runs):
    from archtune.models.load import set_attn_implementation
    from archtune.models.tiny import build_tiny_model

    plan = plan_for(**keys)
    assert plan.get("attn_implementation") == runs
    model, _ = build_tiny_model("llama", seed=0)
    set_attn_implementation(model, plan)
    assert model.config._attn_implementation == runs


@pytest.mark.parametrize("keys", [{"flash_attention": True}, {"attn_implementation": "flash_attention_2"},
                                  {"flex_attention": True}])
def test_kernels_missing_here_run_as_sdpa_with_an_info_line(keys):
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    plan = plan_for(**keys)
    assert plan.get("attn_implementation") == "sdpa" and plan.settings["attn_implementation"].source == "auto"
    assert any(n.startswith("attn_implementation:") and "packing stays exact" in n for n in plan.info)


def test_attention_typo_gets_did_you_mean():
    (p,) = plan_for(attn_implementation="sdpaa").errors
    assert p.key == "attn_implementation" and "sdpa" in p.fix


def test_gradient_checkpointing_offload_is_activation_offloading():
    plan = plan_for(gradient_checkpointing="offload")
    assert plan.get("activation_offloading") is True and plan.get("gradient_checkpointing") is False
    assert plan.get("use_cache") is False


# ---------------------------------------------------------------- optimizer and scheduler names

def test_optimizer_typo_is_a_check_error_with_did_you_mean():
    (p,) = plan_for(optimizer="adamw_torch_fuse").errors
    assert p.key == "optimizer" and "`optimizer: adamw_torch_fused`" in p.fix


def test_lion_is_answered_with_the_lion_optimizers():
    (p,) = plan_for(optimizer="lion").errors
    assert "lion_8bit" in p.fix or "lion_32bit" in p.fix


def test_scheduler_typo_is_a_check_error_with_did_you_mean():
    (p,) = plan_for(lr_scheduler="cosin").errors
    assert p.key == "lr_scheduler" and "`lr_scheduler: cosine`" in p.fix


@pytest.mark.parametrize("name", ["adamw_torch_8bit", "adamw_torch_4bit", "ao_adamw_8bit", "ao_adamw_4bit"])
def test_torchao_optimizers_run_or_are_refused_with_the_install_line(name):
    import importlib.util

    plan = plan_for(optimizer=name)
    transformers_name = name.replace("ao_adamw", "adamw_torch")
    if importlib.util.find_spec("torchao") is not None:
        assert not plan.errors and plan.get("optimizer") == transformers_name
    elif "8bit" in name:  # the same algorithm through bitsandbytes, recorded with the reason
        assert not plan.errors and plan.get("optimizer") == "adamw_bnb_8bit"
        assert "torchao is not installed" in plan.settings["optimizer"].reason
    else:  # bitsandbytes has no 4-bit optimizer
        (p,) = plan.errors
        assert p.key == "optimizer" and "pip install torchao" in p.fix


def test_axolotl_only_optimizer_is_refused_by_name():
    (p,) = plan_for(optimizer="came_pytorch").errors
    assert "Axolotl's own" in p.message


# ---------------------------------------------------------------- loggers

def test_wandb_and_mlflow_keys_select_the_trainer_integrations():
    plan = plan_for(wandb_project="p", wandb_entity="team", mlflow_experiment_name="e")
    assert set(plan.get("report_to")) <= {"wandb", "mlflow"}
    assert plan_for(use_wandb=False, wandb_project="p").get("report_to") is None
    assert plan_for(wandb_project="p", wandb_mode="disabled").get("report_to") is None


# ---------------------------------------------------------------- batches

def test_pad_to_sequence_len_pads_every_batch_and_leaves_the_loss_unchanged():
    from archtune.models.tiny import build_tiny_model
    from archtune.data.collate import DataCollator
    from archtune.train.recipe import padding

    def collator_for(plan, tok):
        return DataCollator(tok, drop_attention_mask=True, **padding(plan))

    model, tok = build_tiny_model("llama", seed=0)
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8]}, {"input_ids": [9, 10], "labels": [-100, 10]}]
    fixed = collator_for(plan_for(pad_to_sequence_len=True, sequence_len=32), tok)(rows)
    plain = collator_for(plan_for(), tok)(rows)
    multiple = collator_for(plan_for(pad_to_multiple_of=16), tok)(rows)
    assert fixed["input_ids"].shape == (2, 32) and plain["input_ids"].shape == (2, 4)
    assert multiple["input_ids"].shape == (2, 16)
    model.eval()
    with torch.no_grad():
        assert model(**fixed).loss.item() == pytest.approx(model(**plain).loss.item(), abs=1e-5)


# ---------------------------------------------------------------- adapters and trained weights

def test_unfrozen_parameters_train_only_the_matching_weights():
    from archtune.adapters.freeze import unfreeze_only
    from archtune.models.tiny import build_tiny_model

    model, _ = build_tiny_model("llama", seed=0)
    trained = unfreeze_only(model, ["model.layers.1.mlp.*", "lm_head.weight"])  # Axolotl's spelling: dots literal
    assert trained and all(n.startswith("model.layers.1.mlp.") or n == "lm_head.weight" for n in trained)
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads == set(trained)
    assert plan_for(unfrozen_parameters=["nothing_matches"]).errors[0].key == "unfrozen_parameters"
    with_adapter = plan_for(unfrozen_parameters=["model.*"], adapter="lora")
    assert not with_adapter.errors and with_adapter.get("unfrozen_parameters") is None
    assert any(n.startswith("unfrozen_parameters: no effect") for n in with_adapter.info)
    assert "index ranges" in plan_for(unfrozen_parameters=["model.embed_tokens.weight[:32]"]).errors[0].message


def test_bnb_config_kwargs_reach_bitsandbytes():
    pytest.importorskip("bitsandbytes")
    from archtune.models.quant import bnb_config

    plan = plan_for(adapter="qlora", load_in_4bit=True,
                    bnb_config_kwargs={"bnb_4bit_use_double_quant": False, "bnb_4bit_quant_type": "fp4"})
    config = bnb_config(plan)
    assert config.bnb_4bit_use_double_quant is False and config.bnb_4bit_quant_type == "fp4"


@pytest.mark.parametrize("keys, resolved, dtype", [
    ({}, None, torch.float32), ({"bf16": True}, None, torch.bfloat16),
    ({"bf16": "auto"}, False, torch.float32), ({"bf16": "auto"}, True, torch.bfloat16),
])
def test_weights_and_4bit_compute_dtype_follow_the_plans_bf16(keys, resolved, dtype):
    """`bf16: auto` as the plan resolved it (True on a GPU with bfloat16), never the raw "auto"."""
    from archtune.models.load import torch_dtype
    from archtune.models.quant import compute_dtype

    plan = plan_for(**keys)
    if resolved is not None:
        plan.set("bf16", resolved, "auto", "as on a machine where bf16: auto resolves so")
    assert torch_dtype(plan) == compute_dtype(plan) == dtype


def test_lora_model_dir_must_be_an_adapter(tmp_path):
    assert plan_for(adapter="lora", lora_model_dir=str(tmp_path)).errors[0].key == "lora_model_dir"
    (tmp_path / "adapter_config.json").write_text("{}")
    assert not plan_for(adapter="lora", lora_model_dir=str(tmp_path)).errors
    assert plan_for(lora_model_dir=str(tmp_path)).errors[0].key == "lora_model_dir"  # no adapter


# ---------------------------------------------------------------- chat templates, eot_tokens, datasets

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "See you"}]


@pytest.mark.parametrize("name, end", [
    ("chatml", "<|im_end|>"), ("qwen3_5", "<|im_end|>"), ("llama3", "<|eot_id|>"), ("gemma3", "<end_of_turn>"),
    ("gemma4", "<turn|>"),
])
def test_named_chat_templates_train_on_the_answers_with_their_end_token(name, end):
    from archtune.assets import load_tokenizer
    from archtune.config import DatasetConfig
    from archtune.families import chat_templates
    from archtune.data.formats import FormatContext, chat_template

    ctx = FormatContext(tokenizer=load_tokenizer(), chat_template=chat_templates()[name], special_tokens=(end,))
    ds = DatasetConfig(path="x", type="chat_template")
    out = chat_template({"messages": CHAT}, ds, ctx)
    trained = [out.text[s:e] for s, e in out.spans]
    assert len(trained) == 2 and trained[0].startswith("Hello there") and trained[1].endswith("See you" + end)
    assert all(t.endswith(end) for t in trained)
    assert "Hi" not in "".join(trained) and "Be brief" not in "".join(trained)
    none = chat_template({"messages": CHAT}, DatasetConfig(path="x", type="chat_template", train_on_eos="none"), ctx)
    assert [out.text[s:e] for s, e in none.spans] == [t[: -len(end)] for t in trained]
    last = chat_template({"messages": CHAT}, DatasetConfig(path="x", type="chat_template", train_on_eos="last"), ctx)
    assert [out.text[s:e] for s, e in last.spans] == [trained[0][: -len(end)], trained[1]]


@pytest.mark.parametrize("keys, expected", [
    ({"chat_template": "chatml"}, "chatml"), ({"chat_template": "{{ messages[0]['content'] }}"}, "as written"),
    ({"chat_template": "tokenizer_default"}, "own"), ({}, "own"),
])
def test_the_plan_resolves_the_chat_template_and_the_tokenizer_is_given_it(keys, expected):
    """The plan turns a template name into its text; models/ only sets that text on the tokenizer
    (saved with the weights), and a tokenizer as loaded keeps its own."""
    from archtune.families import chat_templates
    from archtune.models.load import load_tokenizer, set_chat_template

    plan = plan_for(**keys)
    own = load_tokenizer(plan.config).chat_template
    text = {"chatml": chat_templates()["chatml"], "as written": keys.get("chat_template"), "own": None}[expected]
    assert plan.chat_template == text and plan.data.chat_template == text
    assert set_chat_template(load_tokenizer(plan.config), plan).chat_template == (text or own)


@pytest.mark.parametrize("messages", [CHAT, CHAT[1:]], ids=["with_system", "without_system"])
def test_train_on_eos_all_adds_the_end_token_of_every_turn(messages):
    """Axolotl's `all`: the end-of-turn token of every turn gets loss, also after turns without loss
    (user, system), and nothing else changes; compared token by token with `turn`."""
    from archtune.assets import load_tokenizer
    from archtune.config import DatasetConfig
    from archtune.families import chat_templates
    from archtune.data.tokenize import RowEncoder, TokenizeSettings

    tok = load_tokenizer()
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    settings = TokenizeSettings(sequence_len=512, chat_template=chat_templates()["gemma3"])
    rows = {mode: RowEncoder(tok, DatasetConfig(path="x", type="chat_template", train_on_eos=mode), settings)
            .encode({"messages": messages}) for mode in ("turn", "all")}
    ids = rows["all"]["input_ids"]
    assert ids == rows["turn"]["input_ids"] and ids.count(end) == sum(m["role"] != "system" for m in messages)
    expected = [t if t == end else label for t, label in zip(ids, rows["turn"]["labels"])]
    assert rows["all"]["labels"] == expected
    assert sum(label == end for label in rows["turn"]["labels"]) == 2  # the answers' own ends only


def test_chat_template_names_are_checked_before_training():
    assert not plan_for(chat_template="gemma4").errors and not plan_for(chat_template="tokenizer_default").errors
    (p,) = plan_for(chat_template="gema3").errors
    assert p.key == "chat_template" and "gemma3" in p.fix
    (p,) = plan_for(chat_template="phi_3").errors
    assert "chat_template_jinja" in p.fix


def test_jinja_template_through_chat_template_jinja():
    cfg = config_from_dict({"base_model": "tiny:llama", "datasets": [{"path": "d.jsonl"}], "chat_template": "jinja",
                            "chat_template_jinja": "{% for m in messages %}{{ m['content'] }}{% endfor %}"})
    assert cfg.chat_template.startswith("{% for m in messages")


def test_eot_tokens_must_be_single_tokens():
    from archtune.assets import load_tokenizer
    from archtune.data.tokenize import check_eot_tokens
    from archtune.errors import UserError

    tok = load_tokenizer()
    check_eot_tokens(tok, ["<end_of_turn>"])
    with pytest.raises(UserError) as ei:
        check_eot_tokens(tok, ["<end_of_turn>", "<|not a token|>"])
    assert ei.value.problems[0].key == "eot_tokens" and "<|not a token|>" in ei.value.problems[0].message


def test_eot_tokens_that_are_not_single_tokens_are_refused_by_the_plan_check_and_train_share():
    from archtune.models.load import resolve_plan

    keys = {"base_model": "tiny:llama", "datasets": [{"path": "data.jsonl"}]}
    assert not resolve_plan(config_from_dict({**keys, "eot_tokens": ["<end_of_turn>"]})).errors
    (problem,) = resolve_plan(config_from_dict({**keys, "eot_tokens": ["<|im_end|>"]})).errors
    assert problem.key == "eot_tokens" and "'<|im_end|>'" in problem.message


@pytest.mark.parametrize("split, rows", [("train[:10%]", 4), ("train[:5]", 5), ("train[-3:]", 3), ("train", 40)])
def test_split_slices_apply_to_local_files(tmp_path, split, rows):
    from archtune.assets import load_tokenizer
    from archtune.data import prepare_data

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(40)))
    cfg = config_from_dict({"base_model": "tiny:llama", "dataset_prepared_path": str(tmp_path / "p"),
                            "datasets": [{"path": str(data), "type": "alpaca", "split": split}]})
    assert len(prepare_data(data_plan(cfg), load_tokenizer(), progress=False).train) == rows


def test_skip_prepare_dataset_writes_no_cache(tmp_path):
    from archtune.assets import load_tokenizer
    from archtune.data import prepare_data

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(8)))
    cfg = config_from_dict({"base_model": "tiny:llama", "dataset_prepared_path": str(tmp_path / "p"),
                            "skip_prepare_dataset": True, "datasets": [{"path": str(data), "type": "alpaca"}]})
    prepared = prepare_data(data_plan(cfg), load_tokenizer(), progress=False)
    assert len(prepared.train) == 8 and prepared.stats["cache"] == "skipped"
    assert not any((tmp_path / "p").glob("*/stats.json"))


def test_rows_of_another_type_get_one_message_naming_the_missing_field(tmp_path):
    from archtune.assets import load_tokenizer
    from archtune.data import prepare_data
    from archtune.errors import UserError

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n" * 1)
    data.write_text(data.read_text() * 30)
    for strict in (False, True):
        cfg = config_from_dict({"base_model": "tiny:llama", "dataset_prepared_path": str(tmp_path / "p"),
                                "strict_data": strict, "datasets": [{"path": str(data), "type": "alpaca"}]})
        with pytest.raises(UserError) as ei:
            prepare_data(data_plan(cfg), load_tokenizer(), progress=False)
        (p,) = ei.value.problems
        assert p.key == "datasets.0.type" and "'instruction' is missing" in p.message and '"output"' in p.fix


def test_text_only_checkpoint_of_a_multimodal_family_loads_as_a_causal_lm():
    """gemma-3-1b / 270m are Gemma3ForCausalLM checkpoints (model_type gemma3_text), which the
    image-text Auto class does not map (Axolotl's gemma3 1b/270m examples)."""
    from transformers import Gemma3TextConfig

    text = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16).to_dict()
    cfg = config_from_dict({"base_model": "tiny:gemma3", "datasets": [{"path": "d.jsonl"}]})
    plan = resolve(cfg, text)
    assert plan.family.name == "gemma3" and plan.auto_class == "AutoModelForCausalLM"
    assert plan_for("gemma3").auto_class == plan_for("gemma3").family.auto_class


# ---------------------------------------------------------------- model_config / model_kwargs

@pytest.mark.parametrize("where", ["tiny", "directory"])
def test_model_config_overrides_reach_the_built_model_and_the_plan(tmp_path, where):
    """Axolotl's `model_config`: set on the model's config before it is built (read back from the
    model's own modules), and the plan resolves on the overridden config."""
    from archtune.models.load import load_model, load_tokenizer, read_model_config, resolve_plan
    from archtune.models.tiny import write_tiny_model

    base = "tiny:llama"
    if where == "directory":
        base = str(write_tiny_model("llama", tmp_path / "llama"))
    keys = {"base_model": base, "datasets": [{"path": "data.jsonl"}]}
    plain = config_from_dict(keys)
    cfg = config_from_dict({**keys, "model_config": {"rms_norm_eps": 0.125, "use_cache": False}})
    assert cfg.overrides_of_model_config == {"rms_norm_eps": 0.125, "use_cache": False}
    assert read_model_config(cfg)["rms_norm_eps"] == 0.125 != read_model_config(plain)["rms_norm_eps"]
    model = load_model(resolve_plan(cfg), load_tokenizer(cfg))
    assert model.model.norm.variance_epsilon == 0.125 and model.config.use_cache is False
    reference = load_model(resolve_plan(plain), load_tokenizer(plain))
    assert reference.model.norm.variance_epsilon != 0.125
    torch.testing.assert_close(model.state_dict(), reference.state_dict())  # the same weights


def test_model_kwargs_reach_from_pretrained_and_own_arguments_are_refused(tmp_path):
    from archtune.errors import UserError
    from archtune.models.load import load_model, load_tokenizer, resolve_plan
    from archtune.models.tiny import write_tiny_model

    keys = {"base_model": str(write_tiny_model("llama", tmp_path / "llama")), "datasets": [{"path": "data.jsonl"}]}
    cfg = config_from_dict({**keys, "model_kwargs": {"use_cache": False, "output_attentions": True}})
    model = load_model(resolve_plan(cfg), load_tokenizer(cfg))
    assert model.config.use_cache is False and model.config.output_attentions is True
    with pytest.raises(UserError) as ei:
        config_from_dict({**keys, "model_kwargs": {"torch_dtype": "float16"}})
    assert "torch_dtype (use bf16 / fp16)" in str(ei.value)
