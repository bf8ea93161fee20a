"""GRPO's loss variants (`trl.loss_type` grpo / bnpo / dr_grpo / dapo, DAPO's `epsilon_high`, GSPO's
`importance_sampling_level: sequence`) reach TRL's trainer and compute what their papers write.

1. On one fixed batch (4 completions of 1 to 6 tokens, fixed advantages, old log-probabilities
   shifted so the ratios leave [1 - epsilon, 1 + epsilon]) the loss of the trainer archtune builds
   from the config (plan -> GRPOConfig -> trainer, tiny Llama with LoRA) equals the formula written
   here for each variant; the formulas' values differ pairwise, so a variant that is dropped on the
   way (the trainer computing another one) fails.
2. Each variant trains through `archtune train` (3 steps, tiny Llama with LoRA; num_iterations 2 and
   4 steps for the clipped variants, so the second pass on a batch is off-policy and the clipping
   acts: a clip ratio above 0): finite losses, every LoRA parameter changed, and the adapters of
   grpo, bnpo and dr_grpo differ from one another (completions end at different lengths: tests/e2e/stop_tokens_plugin.py).
"""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import yaml

from tests.e2e.conftest import REPO, read_json, run_cli
from tests.e2e.test_grpo_guards import BASE as GUARDS, REWARDS

# The guards' run (tiny Llama, LoRA, 2 prompts x 4 completions, the distinct-characters reward), with
# longer completions, no dropout and no checkpoints.
BASE = {**{k: v for k, v in GUARDS.items() if k not in ("plugins", "save_steps")},
        "trl": {**GUARDS["trl"], "max_completion_length": 8}, "max_steps": 3, "learning_rate": 0.05,
        "lora_dropout": 0.0}
VARIANTS = {
    "grpo": {"loss_type": "grpo"},
    "bnpo": {"loss_type": "bnpo"},
    "dr_grpo": {"loss_type": "dr_grpo"},
    "dapo": {"loss_type": "dapo"},
    "dapo_clip_higher": {"loss_type": "dapo", "epsilon_high": 0.28, "num_iterations": 2},
    "gspo": {"loss_type": "grpo", "importance_sampling_level": "sequence", "num_iterations": 2},
}


def write_config(root, name: str, **keys):
    (root / "rewards_distinct.py").write_text(REWARDS)
    (root / "rewards.py").write_text((REPO / "examples/grpo/rewards.py").read_text())
    cfg = {**BASE, **keys, "trl": {**BASE["trl"], **keys.get("trl", {})}, "output_dir": str(root / name)}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("grpo_losses")


# ---------------------------------------------------------------- 1. one fixed batch, the formulas

def build_trainer(root, name: str, trl: dict):
    """The trainer `archtune train` builds for this config, without training."""
    from archtune.config import load_config
    from archtune.data.grpo import prepare_grpo_data
    from archtune.train.assembly import assemble_model
    from archtune.train.grpo import build_trainer as build, grpo_arguments, load_reward_functions
    from archtune.train.lifecycle import training_arguments
    from archtune.train.recipe import plan_for

    setup = plan_for(load_config(write_config(root, name, trl=trl), []))
    plan, tokenizer = setup.plan, setup.tokenizer
    data = prepare_grpo_data(plan, tokenizer, progress=False)
    model = assemble_model(plan, tokenizer, "train").model
    args = grpo_arguments(plan, training_arguments(plan, has_eval=False))
    return build(plan, model, tokenizer, data, load_reward_functions(plan), args, [])


def fixed_batch(vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, vocab, (4, 5), generator=g)
    prompt_mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [1] * 5])
    completion_ids = torch.randint(3, vocab, (4, 6), generator=g)
    lengths = torch.tensor([6, 2, 4, 1])
    completion_mask = (torch.arange(6)[None, :] < lengths[:, None]).long()
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": torch.tensor([1.0, -0.5, 0.8, -1.3]),
            "num_items_in_batch": completion_mask.sum()}


def completion_logps(model, batch: dict) -> torch.Tensor:
    """log p(token) of each completion token under `model`, by a plain forward and log_softmax."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    c = batch["completion_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -c - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, batch["completion_ids"][..., None])[..., 0]


def expected_loss(logps, old, batch: dict, *, loss_type: str, epsilon: float, epsilon_high: float,
                  sequence: bool, max_completion_length: int) -> float:
    """GRPO's clipped objective, written out: -min(r A, clip(r, 1 - eps, 1 + eps_high) A) per token
    (r the token's probability ratio) or per sequence (GSPO: r = exp(mean log-ratio over the
    sequence's tokens)), then averaged as `loss_type` says."""
    m = batch["completion_mask"].double()
    adv = batch["advantages"].double()[:, None]
    log_ratio = (logps - old).double()
    if sequence:
        log_ratio = ((log_ratio * m).sum(1) / m.sum(1))[:, None].expand_as(m)
    r = log_ratio.exp()
    per_token = -torch.minimum(r * adv, r.clamp(1 - epsilon, 1 + epsilon_high) * adv)
    if loss_type == "grpo":
        return float(((per_token * m).sum(1) / m.sum(1)).mean())
    if loss_type == "bnpo":
        return float((per_token * m).sum() / m.sum())
    if loss_type == "dr_grpo":
        return float((per_token * m).sum() / (m.shape[0] * max_completion_length))
    assert loss_type == "dapo"  # the tokens of the whole generation batch: this batch, one process
    return float((per_token * m).sum() / m.sum())


def test_each_variants_loss_equals_its_formula_on_a_fixed_batch(root):
    values = {}
    for name, trl in VARIANTS.items():
        trainer = build_trainer(root, f"batch_{name}", trl)
        model = trainer.model
        model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop; one micro-batch here
        batch = fixed_batch(model.config.vocab_size)
        with torch.no_grad():
            logps = completion_logps(model, batch)
        # Ratios from 0.55 to 1.8: outside both clipping bounds for some tokens, inside for others.
        shift = torch.linspace(-0.6, 0.6, logps.numel()).reshape(logps.shape)
        old = logps + shift
        loss = float(trainer.compute_loss(model, {**batch, "old_per_token_logps": old}).detach())
        want = expected_loss(logps, old, batch, loss_type=trl["loss_type"], epsilon=0.2,
                             epsilon_high=trl.get("epsilon_high", 0.2),
                             sequence=trl.get("importance_sampling_level") == "sequence",
                             max_completion_length=BASE["trl"]["max_completion_length"])
        print(f"{name}: trainer loss {loss:.6f}, formula {want:.6f}")
        assert loss == pytest.approx(want, rel=1e-5, abs=1e-7), name
        values[name] = want
    for a, b in itertools.combinations(values, 2):
        if {a, b} != {"bnpo", "dapo"}:  # one process, one micro-batch: both divide by this batch's tokens
            assert abs(values[a] - values[b]) > 1e-3 * abs(values[a]), (a, b, values)


def test_dapo_divides_by_the_generation_batchs_tokens_not_the_micro_batchs(root):
    """bnpo and dapo differ when the generation batch is larger than the micro-batch: dapo divides by
    every token generated for the step (`num_items_in_batch`, gathered over processes), bnpo by
    those of the micro-batch."""
    trainer = build_trainer(root, "batch_dapo", VARIANTS["dapo"])
    model = trainer.model
    trainer.current_gradient_accumulation_steps = 1
    batch = fixed_batch(model.config.vocab_size)
    with torch.no_grad():
        logps = completion_logps(model, batch)
    old = logps + torch.linspace(-0.6, 0.6, logps.numel()).reshape(logps.shape)
    tokens = batch["completion_mask"].sum()
    loss = float(trainer.compute_loss(model, {**batch, "old_per_token_logps": old,
                                             "num_items_in_batch": 3 * tokens}).detach())
    want = expected_loss(logps, old, batch, loss_type="dapo", epsilon=0.2, epsilon_high=0.2, sequence=False,
                         max_completion_length=8) / 3
    assert loss == pytest.approx(want, rel=1e-5, abs=1e-7)


# ---------------------------------------------------------------- 2. each variant trains

@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_trains_through_archtune_train(root, capsys, monkeypatch, name):
    watch = root / f"{name}.params.json"
    monkeypatch.setenv("ARCHTUNE_TEST_PARAM_WATCH", str(watch))
    # The clipped variants: 4 steps (2 generations, each trained on twice) and steps large enough for
    # the second pass's ratios to leave the clipping range.
    more = {"max_steps": 4, "learning_rate": 0.3} if VARIANTS[name].get("num_iterations", 1) > 1 else {}
    path = write_config(root, f"train_{name}", trl=VARIANTS[name], **more,
                        plugins=["tests.e2e.param_watch_plugin.ParamWatchPlugin",
                                 "tests.e2e.stop_tokens_plugin.StopTokensPlugin"])
    code, out, err = run_cli(capsys, "train", path)
    assert code == 0, (out + err)[-3000:]
    s = read_json(root / f"train_{name}" / "train_summary.json")
    plan = read_json(root / f"train_{name}" / "run_record.json")["plan"]["settings"]
    for key, value in VARIANTS[name].items():
        assert plan[f"trl.{key}"]["value"] == value, key
    print(f"{name}: losses {s['train_losses']}, rewards {s['train_rewards']}, clip ratio "
          f"{s.get('clip_ratio/region_mean')}, completion lengths {s['completions/min_length']}.."
          f"{s['completions/max_length']}")
    assert s["steps"] == more.get("max_steps", 3) and all(math.isfinite(v) for v in s["train_losses"])
    params = json.loads(watch.read_text())
    trainable = [n for n, p in params.items() if p["trainable"]]
    assert trainable and all(params[n]["changed"] and params[n]["finite"] for n in trainable)
    if VARIANTS[name].get("num_iterations", 1) > 1:  # step 4 trains again on step 3's rollouts: ratios clipped
        assert s["clip_ratio/region_mean"] > 0


def test_the_normalizations_train_different_adapters(root):
    from safetensors.torch import load_file

    adapters = {}
    for name in ("grpo", "bnpo", "dr_grpo"):
        path = root / f"train_{name}" / "adapter_model.safetensors"
        if not path.exists():
            pytest.skip("needs the training runs above")
        adapters[name] = load_file(str(path))
    for a, b in itertools.combinations(adapters, 2):
        worst = max(float((adapters[a][k] - adapters[b][k]).abs().max()) for k in adapters[a])
        assert worst > 1e-6, (a, b)


def test_what_a_user_looks_at_reaches_tensorboard_the_bar_and_the_summary(root, capsys):
    """beta 0.01 (a KL term: LoRA's reference is the adapter disabled), num_iterations 2: per step the
    rewards' mean and spread, completion length, KL, clip ratio and the rollout / update split."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = write_config(root, "board", trl={**VARIANTS["dapo_clip_higher"], "beta": 0.01}, max_steps=4,
                        learning_rate=0.3, use_tensorboard=True)
    code, out, err = run_cli(capsys, "train", path)
    assert code == 0, (out + err)[-3000:]
    (events,) = (root / "board" / "runs").glob("events.out.tfevents.*")
    board = EventAccumulator(str(events))
    board.Reload()
    steps = {tag: [e.step for e in board.Scalars(tag)] for tag in board.Tags()["scalars"]}
    for tag in ("kl", "clip_ratio/region_mean", "clip_ratio/high_mean", "timing/rollout_seconds",
                "timing/update_seconds", "loss"):
        assert steps[f"train/{tag}"] == [1, 2, 3, 4], tag
    for tag in ("reward", "reward_std", "rewards/distinct/mean", "rewards/distinct/std", "completions/mean_length"):
        assert steps[f"train/{tag}"] == [1, 3], tag  # the steps that generate (num_iterations 2)
    # The bar's last render (step 4 reuses step 3's rollouts, so logs no reward) still shows the rewards.
    bar = " ".join((out + err).split()).rsplit("it/s", 1)[1]
    for shown in ("reward=", "reward_std=", "mean_length=", "kl=", "region_mean=", "rollout_seconds=",
                  "update_seconds="):
        assert shown in bar, (shown, bar)
    s = read_json(root / "board" / "train_summary.json")
    assert s["reference_model"] == "adapter_disabled" and s["kl"] > 0 and s["clip_ratio/region_mean"] > 0
    assert s["rollout_seconds"] > 0 and s["update_seconds"] > 0 and len(s["train_rewards"]) == 2
