"""Adapters on real tiny models: tower freezing, LoRA target resolution, the Gemma4ClippableLinear
redirect, expert-parameter LoRA. Numbers (requires_grad, gradients, adapter names, logits), not mocks.

Rules of issue 3 covered here (model side): 1 (towers frozen, no adapter in a tower), 4 (targets
confined to the language model), 5 (LoRA into a tower lands on the wrapper's inner linear), 6
(expert LoRA trains and round-trips through save/reload).
"""
from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from archtune.adapters.freeze import (
    canonical_name,
    check_towers_frozen,
    freeze_enabled,
    freeze_multimodal,
    under_prefix,
)
from archtune.adapters.lora import (
    apply_lora,
    lora_module_names,
    lora_parameter_names,
    resolve_lora_parameters,
    resolve_lora_targets,
)
from archtune.config.schema import Config
from archtune.errors import UserError
from archtune.families import find_tiny
from archtune.models.tiny import build_tiny_model
from archtune.plan import Plan, resolve

MULTIMODAL = ["gemma4-moe", "gemma4-e2b", "gemma3", "qwen3_5-moe"]


# ---------------------------------------------------------------- helpers

def make_plan(name: str, model, family=None, **settings) -> Plan:
    """The Plan resolved for tiny model `name` (a config without adapter), then exactly the given
    settings on top (set as the user's, after the rules ran: no rule rewrites them)."""
    cfg = Config(base_model=f"tiny:{name}", datasets=[{"path": "unused.jsonl"}], seed=0)
    plan = resolve(cfg, model.config.to_dict())
    if family is not None:
        plan.family = family
    for key, value in settings.items():
        plan.set(key, value, "user", "test")
    return plan


def towers(name: str) -> tuple[str, ...]:
    return find_tiny(name)[0].mm_module_prefixes


def tower_params(model, name: str) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if under_prefix(n, towers(name))}


def lora_tensors(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def text_batch(model, batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(seed)
    return torch.randint(32, vocab, (batch, seq), generator=g)  # above the special / multimodal ids


def text_loss(model, x: torch.Tensor) -> torch.Tensor:
    model.train()
    return model(input_ids=x, labels=x).loss


def image_batch(model, seed: int = 2) -> dict:
    """One 16x16 image (4x4 patches of 4x4 px, pooled 2x2 -> 4 soft tokens) inside 12 text tokens,
    as Gemma4ForConditionalGeneration takes it."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    patch = cfg.vision_config.patch_size
    pixel_values = torch.rand(1, 16, patch * patch * 3, generator=g)
    grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="xy"), -1)
    text = torch.randint(32, cfg.get_text_config().vocab_size, (1, 12), generator=g)
    ids = torch.cat([text[:, :4], torch.full((1, 4), cfg.image_token_id), text[:, 4:]], dim=1)
    labels = torch.where(ids == cfg.image_token_id, -100, ids)
    return dict(input_ids=ids, labels=labels, pixel_values=pixel_values, image_position_ids=grid.reshape(1, 16, 2))


def sgd_step(model, lr: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.grad is not None:
                p -= lr * p.grad
    model.zero_grad(set_to_none=True)


def under_towers(names, name: str) -> list[str]:
    return [n for n in names if under_prefix(n, towers(name))]


# ---------------------------------------------------------------- names

@pytest.mark.parametrize("raw, canon", [
    ("model.vision_tower.encoder.layers.0.mlp.up_proj.linear.weight",
     "model.vision_tower.encoder.layers.0.mlp.up_proj.linear.weight"),
    ("base_model.model.model.vision_tower.encoder.layers.0.mlp.up_proj.linear.lora_A.default.weight",
     "model.vision_tower.encoder.layers.0.mlp.up_proj.linear.lora_A.default.weight"),
    ("model.language_model.layers.3._checkpoint_wrapped_module.self_attn.q_proj.weight",
     "model.language_model.layers.3.self_attn.q_proj.weight"),
    ("_orig_mod.model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"),
    # torch.compile of a PeftModel, with checkpoint wrappers inside
    ("_orig_mod.base_model.model.model.language_model.layers.0._checkpoint_wrapped_module.mlp.up_proj",
     "model.language_model.layers.0.mlp.up_proj"),
    ("base_model.model.lm_head", "lm_head"),
    ("lm_head.weight", "lm_head.weight"),
])
def test_canonical_name(raw, canon):
    assert canonical_name(raw) == canon


def test_under_prefix_respects_name_boundaries():
    prefixes = ("model.vision_tower", "model.embed_vision")
    assert under_prefix("model.vision_tower", prefixes)
    assert under_prefix("base_model.model.model.vision_tower.encoder.x", prefixes)
    assert under_prefix("model.embed_vision._checkpoint_wrapped_module.embedding_projection.weight", prefixes)
    assert not under_prefix("model.vision_tower_extra.weight", prefixes)
    assert not under_prefix("model.language_model.vision_tower.weight", prefixes)


def test_freeze_default_is_the_familys():
    model, _ = build_tiny_model("llama")
    assert freeze_enabled(make_plan("llama", model)) is False
    gemma, _ = build_tiny_model("gemma3")
    assert freeze_enabled(make_plan("gemma3", gemma)) is True  # unset -> the family has towers
    assert freeze_enabled(make_plan("gemma3", gemma, freeze_mm_modules=False)) is False
    # The stage reads the plan's decision and never guesses one: a plan without it is a bug.
    cfg = Config(base_model="tiny:gemma3", datasets=[{"path": "unused.jsonl"}])
    bare = Plan(config=cfg, family=find_tiny("gemma3")[0], model_type="gemma3", model_config={})
    with pytest.raises(KeyError, match="freeze_mm_modules"):
        freeze_enabled(bare)


# ---------------------------------------------------------------- rule 1: full fine-tuning

@pytest.mark.parametrize("name", MULTIMODAL)
def test_full_fine_tune_freezes_exactly_the_towers(name):
    model, _ = build_tiny_model(name)
    tower = tower_params(model, name)
    assert tower, "the tiny model must have towers for this test to mean anything"
    frozen = freeze_multimodal(model, make_plan(name, model, freeze_mm_modules=True))

    assert frozen == sorted(tower)
    assert [n for n, p in tower.items() if p.requires_grad] == []
    language = {n: p for n, p in model.named_parameters() if n not in tower}
    assert language and all(p.requires_grad for p in language.values())

    loss = text_loss(model, text_batch(model))
    loss.backward()
    assert math.isfinite(loss.item())
    assert [n for n, p in tower.items() if p.grad is not None] == []
    # The language model does train: most of its tensors get a nonzero gradient.
    nonzero = [n for n, p in language.items() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(nonzero) > 0.8 * len(language)
    check_towers_frozen(model, make_plan(name, model, freeze_mm_modules=True))


def test_full_fine_tune_with_freezing_off_trains_the_towers():
    model, _ = build_tiny_model("gemma4-moe")
    plan = make_plan("gemma4-moe", model, freeze_mm_modules=False)
    assert freeze_multimodal(model, plan) == []
    assert all(p.requires_grad for p in model.parameters())
    check_towers_frozen(model, plan)  # nothing to check when freezing is off


def test_generic_family_freezes_nothing():
    model, _ = build_tiny_model("llama")
    assert freeze_multimodal(model, make_plan("llama", model)) == []
    assert all(p.requires_grad for p in model.parameters())


def test_the_check_catches_an_unfrozen_tower():
    """What a do-nothing freeze would leave behind is an error naming the tensors."""
    model, _ = build_tiny_model("gemma4-moe")
    with pytest.raises(UserError) as info:
        check_towers_frozen(model, make_plan("gemma4-moe", model, freeze_mm_modules=True))
    problem = info.value.problems[0]
    assert problem.key == "freeze_mm_modules"
    tower = sorted(tower_params(model, "gemma4-moe"))
    assert f"{len(tower)} parameters are trainable" in problem.message and tower[0] in problem.message
    assert "freeze_mm_modules: false" in problem.fix


def test_freeze_handles_checkpoint_wrapped_modules():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    model, _ = build_tiny_model("gemma4-moe")
    reference = sorted(tower_params(model, "gemma4-moe"))
    wrap = {"Gemma4TextDecoderLayer", "Gemma4VisionEncoderLayer"}
    apply_activation_checkpointing(model, check_fn=lambda m: type(m).__name__ in wrap)
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters() if "vision_tower" in n)
    plan = make_plan("gemma4-moe", model, freeze_mm_modules=True,
                     lora_target_modules=find_tiny("gemma4-moe")[0].lora_target_regex)
    assert freeze_multimodal(model, plan) == reference
    targets = resolve_lora_targets(model, plan)
    assert len(targets) == 26 and all("._checkpoint_wrapped_module." in t for t in targets)
    peft_model = apply_lora(model, plan)
    assert lora_module_names(peft_model) == sorted(canonical_name(t) for t in targets)


# ---------------------------------------------------------------- rule 1 + 4: LoRA

# Adapters the family's regex places on each tiny model (gemma4-moe: 4 layers x 7 projections, but the
# two full-attention layers have k == v, no v_proj; e2b: the 2 kv-shared layers lack k_proj/v_proj).
FAMILY_REGEX_COUNT = {"gemma4-moe": 26, "gemma4-e2b": 24, "gemma3": 28, "qwen3_5-moe": 25}


@pytest.mark.parametrize("name", MULTIMODAL)
def test_lora_with_the_family_default_stays_in_the_language_model(name):
    model, _ = build_tiny_model(name)
    cfg = Config(base_model=f"tiny:{name}", datasets=[{"path": "unused.jsonl"}], adapter="lora", seed=0)
    plan = resolve(cfg, model.config.to_dict())
    assert freeze_enabled(plan)
    tower = tower_params(model, name)
    freeze_multimodal(model, plan)
    targets = resolve_lora_targets(model, plan)
    assert len(targets) == FAMILY_REGEX_COUNT[name]
    assert under_towers(targets, name) == []

    peft_model = apply_lora(model, plan)
    assert lora_module_names(peft_model) == targets
    lora = lora_tensors(peft_model)
    assert lora and under_towers(lora, name) == []
    assert [n for n, p in tower.items() if p.requires_grad] == []

    text_loss(peft_model, text_batch(peft_model)).backward()
    assert [n for n, p in tower.items() if p.grad is not None] == []
    b_grads = {n: p.grad for n, p in lora.items() if "lora_B" in n}
    assert all(g is not None and torch.isfinite(g).all() for g in b_grads.values())
    assert all(g.abs().sum() > 0 for g in b_grads.values())  # every adapter is on the loss's path


def test_all_linear_with_freezing_places_no_adapter_in_a_tower():
    from peft import LoraConfig, get_peft_model

    # PEFT's own all-linear on the tiny Gemma 4 MoE: part of the adapters land in the vision tower.
    raw, _ = build_tiny_model("gemma4-moe")
    raw_names = lora_module_names(get_peft_model(raw, LoraConfig(target_modules="all-linear")))
    raw_towers = under_towers(raw_names, "gemma4-moe")
    assert len(raw_towers) >= 5, raw_towers  # the "loss ~12" trap

    model, _ = build_tiny_model("gemma4-moe")
    plan = make_plan("gemma4-moe", model, freeze_mm_modules=True, lora_target_modules="all-linear")
    freeze_multimodal(model, plan)
    targets = resolve_lora_targets(model, plan)
    # Exactly PEFT's all-linear, minus the towers (lm_head excluded by both).
    assert targets == sorted(set(raw_names) - set(raw_towers))
    assert "lm_head" not in targets and under_towers(targets, "gemma4-moe") == []
    peft_model = apply_lora(model, plan)
    assert under_towers(lora_tensors(peft_model), "gemma4-moe") == []
    assert len(lora_module_names(peft_model)) == len(raw_names) - len(raw_towers)


@pytest.mark.parametrize("name", ["gemma4-e2b", "gemma3", "qwen3_5-moe"])
def test_all_linear_is_every_language_model_linear(name):
    model, _ = build_tiny_model(name)
    plan = make_plan(name, model, freeze_mm_modules=True, lora_target_modules="all-linear")
    expected = sorted(n for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and n != "lm_head" and not under_prefix(n, towers(name)))
    assert resolve_lora_targets(model, plan) == expected
    # With freezing off the towers' linears come in too (Gemma 4: the inner `.linear` of each wrapper).
    plan_off = make_plan(name, model, freeze_mm_modules=False, lora_target_modules="all-linear")
    assert len(under_towers(resolve_lora_targets(model, plan_off), name)) > 0


def test_a_name_list_is_confined_to_the_language_model():
    # Gemma 3's Siglip tower has its own (plain nn.Linear) q_proj and v_proj.
    model, _ = build_tiny_model("gemma3")
    on = make_plan("gemma3", model, freeze_mm_modules=True, lora_target_modules=["q_proj", "v_proj"])
    off = make_plan("gemma3", model, freeze_mm_modules=False, lora_target_modules=["q_proj", "v_proj"])
    expected = sorted(f"model.language_model.layers.{i}.self_attn.{p}" for i in range(4) for p in ("q_proj", "v_proj"))
    assert resolve_lora_targets(model, on) == expected
    assert sorted(set(resolve_lora_targets(model, off)) - set(expected)) == [
        "model.vision_tower.encoder.layers.0.self_attn.q_proj", "model.vision_tower.encoder.layers.0.self_attn.v_proj"]
    freeze_multimodal(model, on)
    peft_model = apply_lora(model, on)
    assert lora_module_names(peft_model) == expected


def test_full_names_hit_exactly_one_module_each():
    """PEFT matches list entries by dotted suffix: a short entry can hit a tower too, a full name only itself."""
    model, _ = build_tiny_model("gemma4-moe")
    short = make_plan("gemma4-moe", model, freeze_mm_modules=False, lora_target_modules=["layers.0.self_attn.q_proj"])
    assert resolve_lora_targets(model, short) == [
        "model.language_model.layers.0.self_attn.q_proj",
        "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear"]
    full = make_plan("gemma4-moe", model, freeze_mm_modules=False,
                     lora_target_modules=["model.language_model.layers.0.self_attn.q_proj"])
    assert resolve_lora_targets(model, full) == ["model.language_model.layers.0.self_attn.q_proj"]
    peft_model = apply_lora(model, full)
    assert lora_module_names(peft_model) == ["model.language_model.layers.0.self_attn.q_proj"]
    assert len(lora_tensors(peft_model)) == 2


def test_targets_matching_nothing_are_a_user_error():
    model, _ = build_tiny_model("gemma4-moe")
    plan = make_plan("gemma4-moe", model, freeze_mm_modules=True, lora_target_modules=["qq_proj"])
    with pytest.raises(UserError) as info:
        resolve_lora_targets(model, plan)
    problem = info.value.problems[0]
    assert problem.key == "lora_target_modules" and "qq_proj" in problem.message
    assert "q_proj" in problem.fix

    # A regex reaching only into a frozen tower: the message says why and how to train the tower.
    plan = make_plan("gemma4-moe", model, freeze_mm_modules=True, lora_target_modules=r"model\.vision_tower\..*\.q_proj")
    with pytest.raises(UserError) as info:
        apply_lora(model, plan)
    problem = info.value.problems[0]
    assert problem.key == "lora_target_modules" and "freeze_mm_modules" in problem.message + problem.fix


def test_modules_to_save_in_a_frozen_tower_is_refused():
    model, _ = build_tiny_model("gemma4-moe")
    plan = make_plan("gemma4-moe", model, freeze_mm_modules=True, lora_target_modules=["q_proj"],
                     lora_modules_to_save=["embedding_projection"])
    freeze_multimodal(model, plan)
    with pytest.raises(UserError) as info:
        apply_lora(model, plan)
    assert "model.embed_vision.embedding_projection" in info.value.problems[0].message


def test_freezing_a_peft_model_with_tower_adapters_names_them():
    from peft import LoraConfig, get_peft_model

    model, _ = build_tiny_model("gemma4-moe")
    peft_model = get_peft_model(model, LoraConfig(target_modules="all-linear"))
    with pytest.raises(UserError) as info:
        freeze_multimodal(peft_model, make_plan("gemma4-moe", model, freeze_mm_modules=True))
    misplaced = sorted(canonical_name(n) for n in under_towers(lora_tensors(peft_model), "gemma4-moe"))
    message = info.value.problems[0].message
    assert misplaced and f"{len(misplaced)} adapter tensors landed" in message and misplaced[0] in message


# ---------------------------------------------------------------- rule 5: Gemma4ClippableLinear

TOWER_Q = r"model\.vision_tower\..*\.q_proj"


def test_peft_alone_rejects_gemma4_clippable_linear():
    from peft import LoraConfig, get_peft_model

    model, _ = build_tiny_model("gemma4-moe")
    with pytest.raises(ValueError, match=r"(?s)Target module Gemma4ClippableLinear\(.*is not supported"):
        get_peft_model(model, LoraConfig(target_modules=TOWER_Q))

    # The same through archtune with the family's redirect removed: the patch is what makes it work.
    family = dataclasses.replace(find_tiny("gemma4-moe")[0], lora_target_redirects={})
    model, _ = build_tiny_model("gemma4-moe")
    plan = make_plan("gemma4-moe", model, family=family, freeze_mm_modules=False, lora_target_modules=TOWER_Q)
    with pytest.raises(UserError, match="Gemma4ClippableLinear"):
        apply_lora(model, plan)


def test_lora_into_the_vision_tower_lands_on_the_inner_linear_and_trains():
    model, _ = build_tiny_model("gemma4-moe")
    plan = make_plan("gemma4-moe", model, freeze_mm_modules=False, lora_target_modules=TOWER_Q)
    assert freeze_multimodal(model, plan) == []
    target = "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear"
    assert resolve_lora_targets(model, plan) == [target]

    peft_model = apply_lora(model, plan)
    assert lora_module_names(peft_model) == [target]
    wrapper = peft_model.get_submodule("base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj")
    assert type(wrapper).__name__ == "Gemma4ClippableLinear"  # the clipping wrapper stays in place
    lora = lora_tensors(peft_model)
    assert sorted(canonical_name(n).split(".lora_")[0] for n in lora) == [target, target]

    batch = image_batch(peft_model)
    peft_model.train()
    loss0 = peft_model(**batch).loss
    loss0.backward()
    grads = {n.split(".lora_")[1][0]: p.grad for n, p in lora.items()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["B"].abs().sum() > 0  # B is zero-initialised: its gradient is the one that moves first
    sgd_step(peft_model, lr=1.0)

    loss1 = peft_model(**batch).loss
    loss1.backward()
    assert all(p.grad.abs().sum() > 0 for p in lora.values())  # now A gets a gradient too
    assert abs(loss1.item() - loss0.item()) > 1e-5  # the tower adapter changes the text loss


# ---------------------------------------------------------------- rule 6: expert LoRA

def _expert_names(model, name: str) -> list[str]:
    suffixes = find_tiny(name)[0].expert_param_names
    return sorted(n for n, _ in model.named_parameters() if n.endswith(suffixes))


def family_experts(model) -> int:
    """LoRA on a 3D expert tensor [E, ...] has rank r per expert: lora_A has r * E rows."""
    text = model.config.get_text_config()
    return getattr(text, "num_experts", None) or text.num_local_experts


@pytest.mark.parametrize("name, with_modules", [("gemma4-moe", True), ("qwen3_5-moe", False)])
def test_expert_lora_trains_and_reloads(name, with_modules, tmp_path):
    from peft import PeftModel

    family = find_tiny(name)[0]
    model, _ = build_tiny_model(name)
    x = text_batch(model)
    with torch.no_grad():
        model.eval()
        base_logits = model(input_ids=x).logits
    experts = _expert_names(model, name)
    assert len(experts) == 2 * model.config.get_text_config().num_hidden_layers

    settings = dict(freeze_mm_modules=True, lora_target_parameters=list(family.expert_param_names),
                    lora_target_modules=family.lora_target_regex if with_modules else None)
    plan = make_plan(name, model, **settings)
    freeze_multimodal(model, plan)
    assert resolve_lora_parameters(model, plan) == experts
    peft_model = apply_lora(model, plan)
    assert lora_parameter_names(peft_model) == experts
    assert (len(lora_module_names(peft_model)) > 0) == with_modules

    expert_lora = {n: p for n, p in peft_model.named_parameters() if "lora_" in n and ".experts." in n}
    assert len(expert_lora) == 2 * len(experts)  # an A and a B per expert tensor
    assert all(p.requires_grad for p in expert_lora.values())
    assert {p.shape[0] for n, p in expert_lora.items() if "lora_A" in n} == {plan.config.lora_r * family_experts(model)}

    text_loss(peft_model, x).backward()
    b = {n: p.grad for n, p in expert_lora.items() if "lora_B" in n}
    assert all(g is not None and g.abs().sum() > 0 for g in b.values()), [n for n, g in b.items() if g is None]
    sgd_step(peft_model, lr=5.0)
    text_loss(peft_model, x).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in expert_lora.values())
    peft_model.zero_grad(set_to_none=True)

    peft_model.eval()
    with torch.no_grad():
        trained_logits = peft_model(input_ids=x).logits
    assert (trained_logits - base_logits).abs().max() > 1e-4  # the expert adapters do something

    peft_model.save_pretrained(tmp_path / "adapter")
    fresh, _ = build_tiny_model(name)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    assert lora_parameter_names(reloaded) == experts
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=x).logits, trained_logits)


def test_expert_lora_refuses_dropout_and_unknown_names():
    model, _ = build_tiny_model("gemma4-moe")
    plan = make_plan("gemma4-moe", model, lora_target_parameters=["experts.gate_up_proj"], lora_dropout=0.1)
    with pytest.raises(UserError) as info:
        apply_lora(model, plan)
    assert info.value.problems[0].key == "lora_dropout"

    llama, _ = build_tiny_model("llama")
    plan = make_plan("llama", llama, lora_target_parameters=["experts.gate_up_proj"])
    with pytest.raises(UserError) as info:
        resolve_lora_parameters(llama, plan)
    assert info.value.problems[0].key == "lora_target_parameters"


# ---------------------------------------------------------------- the recipe

def test_assemble_model_freezes_then_adds_lora():
    from archtune.train.assembly import assemble_model
    from archtune.train.recipe import plan_for

    for adapter in ("lora", None):
        cfg = Config(base_model="tiny:gemma4-moe", datasets=[{"path": "unused.jsonl"}], adapter=adapter, seed=0)
        setup = plan_for(cfg)
        model = assemble_model(setup.plan, setup.tokenizer, "train").model
        tower = {n: p for n, p in model.named_parameters() if under_prefix(n, towers("gemma4-moe"))}
        assert tower and not any(p.requires_grad for p in tower.values())
        assert under_towers(lora_tensors(model), "gemma4-moe") == []
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        if adapter == "lora":
            assert trainable and all("lora_" in n for n in trainable)
        else:
            assert trainable == [n for n, _ in model.named_parameters() if n not in tower]
            assert re.search(r"language_model\.layers\.0\.", " ".join(trainable))
