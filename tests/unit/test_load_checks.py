"""Load-time checks: normalize_weight_scales on the base weights before adapters (rule 11), and
missing / unexpected weight keys as errors in `train` and `check --probe` (rule 12).

Loss-free: nothing here runs a training step; the checkpoints are real tiny models written to disk
(`write_tiny_model`, as `archtune init-tiny` does) and then edited.
"""
from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from archtune.config.schema import Config
from archtune.models.weight_scales import lower_median, tensor_std
from archtune.errors import UserError
from archtune.models.load import apply_weight_scale_rules, check_loading_info
from archtune.models.tiny import write_tiny_model

REPO = Path(__file__).resolve().parents[2]
CONV = r"linear_attn\.conv1d\.weight"
DRIFTED = "model.language_model.layers.1.linear_attn.conv1d.weight"
DRIFT = 3.0
GONE = "model.language_model.layers.1.self_attn.q_proj.weight"
EXTRA = "model.language_model.layers.0.mlp.extra_proj.weight"


def _edit_safetensors(model_dir: Path, edit) -> None:
    path = model_dir / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata=metadata)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("data")
    train = tmp / "train.jsonl"
    with open(REPO / "examples" / "data" / "quickstart" / "train.jsonl") as f:
        train.write_text("".join(itertools.islice(f, 8)))
    return {"datasets": [{"path": str(train), "type": "alpaca"}], "dataset_prepared_path": str(tmp / "prepared")}


@pytest.fixture(scope="module")
def drifted_qwen(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """tiny qwen3_5-moe on disk with layer 1's DeltaNet conv1d weight scaled by 3 (its 3 siblings: layers 0-2)."""
    out = write_tiny_model("qwen3_5-moe", tmp_path_factory.mktemp("qwen") / "model")
    _edit_safetensors(out, lambda t: t.__setitem__(DRIFTED, t[DRIFTED] * DRIFT))
    tensors = load_file(str(out / "model.safetensors"))
    return out, {k: v for k, v in tensors.items() if k.endswith("linear_attn.conv1d.weight")}


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> Path:
    return write_tiny_model("gemma4-moe", tmp_path_factory.mktemp("gemma") / "model")


def _config(base_model: Path, data: dict, tmp_path: Path, **keys) -> Config:
    return Config(base_model=str(base_model), output_dir=str(tmp_path / "out"), sequence_len=128,
                  micro_batch_size=2, max_steps=1, **data, **keys)


def _setup(cfg: Config):
    from archtune.train.recipe import plan_for

    setup = plan_for(cfg)
    return setup.plan, setup.tokenizer


def _conv_weights(model) -> dict[str, torch.Tensor]:
    """conv1d weights by their base-model name (PEFT's base_model.model. prefix removed)."""
    return {n.removeprefix("base_model.model."): p.detach().clone()
            for n, p in model.named_parameters() if n.endswith("linear_attn.conv1d.weight")}


# ------------------------------------------------------------------ normalize_weight_scales at load time

def test_drift_rescaled_at_load_before_lora(drifted_qwen, data, tmp_path, monkeypatch):
    from peft import PeftModel

    import archtune.train.assembly as assembly

    model_dir, on_disk = drifted_qwen
    assert len(on_disk) == 3
    stds = {n: tensor_std(t) for n, t in on_disk.items()}
    median = lower_median(list(stds.values()))
    assert stds[DRIFTED] / median > 2.5  # the injected drift is an outlier for threshold 1.3

    cfg = _config(model_dir, data, tmp_path, adapter="lora",
                  normalize_weight_scales=[{"name_pattern": CONV, "threshold": 1.3}])
    plan, tokenizer = _setup(cfg)
    seen_by_lora = {}
    real_apply_lora = assembly.apply_lora

    def spy(model, plan_):
        assert not isinstance(model, PeftModel)
        seen_by_lora.update(_conv_weights(model))
        return real_apply_lora(model, plan_)

    monkeypatch.setattr(assembly, "apply_lora", spy)
    console = Console(record=True, width=200)
    model = assembly.assemble_model(plan, tokenizer, "train", console=console).model

    assert isinstance(model, PeftModel)
    # The weights LoRA was attached to were already repaired ...
    assert seen_by_lora, "apply_lora was not called"
    assert tensor_std(seen_by_lora[DRIFTED]) == pytest.approx(median, rel=1e-5)
    # ... the siblings were not touched, and the trained model carries the repaired tensor.
    final = _conv_weights(model)
    for name, tensor in on_disk.items():
        if name != DRIFTED:
            assert torch.equal(final[name], tensor)
    assert torch.allclose(final[DRIFTED], on_disk[DRIFTED] * (median / stds[DRIFTED]), rtol=1e-6, atol=0)
    text = console.export_text()
    assert DRIFTED in text and "rescaled" in text and "1 tensor(s) rescaled" in text


def test_dry_run_reports_and_leaves_the_weights(drifted_qwen, data, tmp_path):
    from archtune.train.assembly import assemble_model

    model_dir, on_disk = drifted_qwen
    cfg = _config(model_dir, data, tmp_path, adapter="lora",
                  normalize_weight_scales=[{"name_pattern": CONV, "threshold": 1.3, "dry_run": True}])
    plan, tokenizer = _setup(cfg)
    console = Console(record=True, width=200)
    model = assemble_model(plan, tokenizer, "train", console=console).model
    for name, tensor in _conv_weights(model).items():
        assert torch.equal(tensor, on_disk[name])
    text = console.export_text()
    assert "outlier (dry run)" in text and "0 tensor(s) rescaled" in text


def test_every_rank_rescales_only_rank0_prints(drifted_qwen, data, tmp_path, monkeypatch):
    from archtune.models.load import load_model

    model_dir, on_disk = drifted_qwen
    cfg = _config(model_dir, data, tmp_path, normalize_weight_scales=[{"name_pattern": CONV, "threshold": 1.3}])
    plan, tokenizer = _setup(cfg)
    model = load_model(plan, tokenizer)
    monkeypatch.setenv("RANK", "1")
    console = Console(record=True, width=200)
    result = apply_weight_scale_rules(model, plan, console)
    assert console.export_text() == ""
    assert result.n_rescaled == 1 and set(result.scales) == {DRIFTED}
    assert not torch.equal(_conv_weights(model)[DRIFTED], on_disk[DRIFTED])


def test_no_rules_nothing_happens_and_few_matches_warn(drifted_qwen, data, tmp_path):
    from archtune.models.load import load_model

    model_dir, on_disk = drifted_qwen
    cfg = _config(model_dir, data, tmp_path)
    plan, tokenizer = _setup(cfg)
    model = load_model(plan, tokenizer)
    console = Console(record=True, width=200)
    assert apply_weight_scale_rules(model, plan, console) is None
    assert console.export_text() == ""

    cfg = _config(model_dir, data, tmp_path,
                  normalize_weight_scales=[{"name_pattern": r"layers\.[01]\.linear_attn\.conv1d\.weight", "threshold": 1.3}])
    plan, _ = _setup(cfg)
    result = apply_weight_scale_rules(model, plan, console)
    assert result.n_rescaled == 0 and result.warnings
    assert "warning:" in console.export_text()
    assert torch.equal(_conv_weights(model)[DRIFTED], on_disk[DRIFTED])


# ------------------------------------------------------------------ missing / unexpected weight keys

def test_check_loading_info_lists_every_kind():
    check_loading_info({"missing_keys": set(), "unexpected_keys": []}, "m")  # a clean load passes
    with pytest.raises(UserError) as info:
        check_loading_info({"missing_keys": {"a.weight"}, "unexpected_keys": {"b.weight", "c.weight"},
                            "mismatched_keys": [("d.weight", (2, 2), (3, 3))]}, "/models/x")
    problems = info.value.problems
    assert [p.key for p in problems] == ["base_model"] * 3
    assert "1 missing" in problems[0].message and "a.weight" in problems[0].message
    assert "re-initialise" in problems[0].message
    assert "2 unexpected" in problems[1].message and "b.weight, c.weight" in problems[1].message
    assert "d.weight" in problems[2].message


@pytest.mark.parametrize("kind", ["missing", "unexpected"])
def test_damaged_checkpoint_is_an_error_in_train_and_probe(kind, gemma_dir, data, tmp_path):
    from archtune.diagnostics.consistency import run_probe
    from archtune.train.recipe import train

    damaged = tmp_path / "damaged"
    shutil.copytree(gemma_dir, damaged)
    if kind == "missing":
        _edit_safetensors(damaged, lambda t: t.pop(GONE))
        name = GONE
    else:
        _edit_safetensors(damaged, lambda t: t.__setitem__(EXTRA, torch.zeros(4, 4)))
        name = EXTRA
    cfg = _config(damaged, data, tmp_path, adapter="lora")

    with pytest.raises(UserError) as info:
        train(cfg)
    [problem] = info.value.problems
    assert problem.key == "base_model" and f"1 {kind} weight key" in problem.message and name in problem.message
    assert not (tmp_path / "out" / "train_summary.json").exists()

    plan, tokenizer = _setup(cfg)
    result = run_probe(cfg, plan, tokenizer=tokenizer)
    assert not result.ok
    [problem] = list(result)
    assert problem.key == "base_model" and name in problem.message
    assert result.to_dict()["errors"][0]["message"] == problem.message


def test_intact_checkpoint_loads(gemma_dir, data, tmp_path):
    from archtune.models.load import load_model

    cfg = _config(gemma_dir, data, tmp_path)
    plan, tokenizer = _setup(cfg)
    model = load_model(plan, tokenizer)
    assert sum(p.numel() for p in model.parameters()) > 0
