"""Rule 12: `archtune check --probe` (diagnostics.consistency.run_probe) and the initial-loss
sanity classification (diagnostics.loss_sanity).

The probe must pass on every tiny model with LoRA and gradient checkpointing (use_reentrant
false), and must catch real bugs of the class it exists for: a kv-shared Gemma 4 E2B layer that
gets wrong K/V on the no-cache path (what the E2B "loss ~12" reports were), a module that behaves
differently in training mode, and checkpoint wrappers recomputing with the cache on (FINDINGS.md).
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from archtune.config.schema import Config
from archtune.diagnostics.consistency import PROBE_KEY, ProbeResult, run_probe
from archtune.diagnostics.loss_sanity import (
    ABOVE_UNIFORM,
    FAR_ABOVE,
    NON_FINITE,
    OK,
    UNIFORM,
    classify_initial_loss,
)

REPO = Path(__file__).resolve().parents[2]
TINY = ["gemma4-moe", "gemma4-dense", "gemma4-e2b", "gemma3", "qwen3_5-moe", "llama"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("probe-data")
    train = tmp / "train.jsonl"
    with open(REPO / "examples" / "data" / "quickstart" / "train.jsonl") as f:
        train.write_text("".join(itertools.islice(f, 8)))
    return {"datasets": [{"path": str(train), "type": "alpaca"}], "dataset_prepared_path": str(tmp / "prepared"),
            "output_dir": str(tmp / "out")}


def _setup(name: str, data: dict, **keys):
    from archtune.train.recipe import plan_for

    cfg = Config(base_model=f"tiny:{name}", adapter="lora", micro_batch_size=2, sequence_len=128, **data, **keys)
    setup = plan_for(cfg)
    return cfg, setup.plan, setup.tokenizer


CHECKPOINTING = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}


# ------------------------------------------------------------------ the probe passes on sound models

@pytest.mark.parametrize("name", TINY)
def test_probe_passes_with_lora_and_checkpointing(name, data):
    from rich.console import Console

    cfg, plan, tokenizer = _setup(name, data, **CHECKPOINTING)
    console = Console(record=True, width=160)
    result = run_probe(cfg, plan, console, tokenizer=tokenizer)
    assert result.ok, [str(p) for p in result]
    assert list(result) == [] and result.consistent
    assert result.rows == 2 and result.tokens > 20
    assert result.max_logit_diff <= 1e-4 and result.loss_diff <= 1e-4
    assert result.tolerance == 1e-3 and result.dtype == "float32"
    assert result.training_settings["gradient_checkpointing"] is True
    assert result.training_settings["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    assert result.training_settings["use_cache"] is False
    assert result.reference_settings == {"mode": "eval", "use_cache": True, "gradient_checkpointing": False}
    # Every LoRA tensor gets a gradient under checkpointing; the random tiny model starts uniform.
    assert result.trainable_tensors > 0 and result.no_grad_tensors == []
    assert result.loss_sanity.verdict == UNIFORM and result.loss_sanity.warning is None
    assert result.loss_sanity.vocab_size == len(tokenizer)
    json.dumps(result.to_dict())  # JSON-able for check --json
    assert "max |Δlogit|" in console.export_text()


# ------------------------------------------------------------------ the probe catches real bugs

def _zero_shared_kv_without_cache(model) -> int:
    """Inject the E2B bug class: on the no-cache path (use_cache=False, checkpointed layers), the
    kv-shared layers read zeroed K/V instead of the K/V their source layer stored."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextAttention

    patched = 0
    for module in model.modules():
        if isinstance(module, Gemma4TextAttention) and module.is_kv_shared_layer:
            original = module.forward

            def forward(*args, _original=original, **kwargs):
                if kwargs.get("cache") is None:
                    kwargs["shared_kv_states"] = {
                        kind: tuple(torch.zeros_like(t) for t in kv) for kind, kv in kwargs["shared_kv_states"].items()}
                return _original(*args, **kwargs)

            module.forward = forward
            patched += 1
    return patched


def test_probe_catches_broken_kv_sharing_on_gemma4_e2b(data):
    from archtune.train.assembly import assemble_model

    cfg, plan, tokenizer = _setup("gemma4-e2b", data, **CHECKPOINTING)
    model = assemble_model(plan, tokenizer, "train").model
    clean = run_probe(cfg, plan, tokenizer=tokenizer, model=model)
    assert clean.ok

    assert _zero_shared_kv_without_cache(model) == 2  # the last 2 of 4 layers share KV
    broken = run_probe(cfg, plan, tokenizer=tokenizer, model=model)
    assert not broken.ok and not broken.consistent
    [problem] = list(broken)
    assert problem.key == PROBE_KEY
    assert "training-mode forward differs from inference" in problem.message
    assert broken.max_logit_diff > 0.05 and broken.rel_logit_diff > broken.tolerance
    # Inference is untouched by the bug (the reference path has a cache) ...
    assert broken.loss_reference == clean.loss_reference
    # ... training is not, and the probe names the setting that makes the difference.
    assert broken.loss_train != pytest.approx(clean.loss_reference, abs=1e-3)
    assert broken.cause.startswith("use_cache=false")
    assert f"{broken.max_logit_diff:.4g}" in problem.message


def test_probe_catches_a_module_that_differs_in_training_mode(data):
    from archtune.train.assembly import assemble_model

    cfg, plan, tokenizer = _setup("llama", data, **CHECKPOINTING)
    model = assemble_model(plan, tokenizer, "train").model
    mlp = next(m for n, m in model.named_modules() if n.endswith("layers.1.mlp"))
    # Active only in training mode, so plain inference never shows it.
    mlp.register_forward_hook(lambda module, args, output: output * 1.5 if module.training else None)
    result = run_probe(cfg, plan, tokenizer=tokenizer, model=model)
    assert [p.key for p in result] == [PROBE_KEY]
    assert result.max_logit_diff > 1e-2
    assert result.cause.startswith("train mode itself")


def test_probe_catches_checkpoint_wrappers_recomputing_with_cache(data):
    """FINDINGS.md: checkpoint wrappers (activation offloading) with use_cache on fail in the
    recompute. The Plan forces use_cache false there; forced back on, the probe reports the crash."""
    cfg, plan, tokenizer = _setup("gemma4-moe", data, activation_offloading=True)
    sound = run_probe(cfg, plan, tokenizer=tokenizer)
    assert sound.ok and sound.training_settings["use_cache"] is False
    assert sound.training_settings["activation_checkpointing_wrapper"] == "offload on Gemma4TextDecoderLayer"

    plan.set("use_cache", True, "user", "test: what the Plan refuses")
    broken = run_probe(cfg, plan, tokenizer=tokenizer)
    [problem] = list(broken)
    assert problem.key == PROBE_KEY and "training backward failed" in problem.message
    assert "RuntimeError" in problem.message


def test_probe_result_is_a_list_of_problems():
    result = ProbeResult()
    assert list(result) == [] and result.ok and not result.consistent  # nothing measured
    d = result.to_dict()
    assert d["max_logit_diff"] is None and d["errors"] == [] and d["ok"] is True
    json.dumps(d)


# ------------------------------------------------------------------ initial loss vs ln(vocab)

def test_uniform_loss_is_a_prominent_warning_for_a_pretrained_model():
    # Gemma's vocabulary: ln(262144) = 12.48, so the reported "loss ~12" is uniform prediction.
    s = classify_initial_loss(12.0, 262144)
    assert s.verdict == UNIFORM
    assert s.ln_vocab == pytest.approx(12.4766, abs=1e-4) and s.ratio == pytest.approx(0.9618, abs=1e-4)
    assert "not loaded" in s.warning and "wrong place" in s.warning
    # A random model legitimately starts there: reported, not warned about.
    r = classify_initial_loss(7.70, 2048, random_init=True)
    assert r.verdict == UNIFORM and r.warning is None and "randomly initialised" in r.message


@pytest.mark.parametrize("loss, vocab, verdict", [
    (0.5, 262144, OK),  # a pretrained model on its own kind of data
    (6.0, 2048, OK),  # ln 2048 = 7.62; 0.79x
    (6.9, 2048, UNIFORM),  # 0.905x: inside 10 %
    (8.38, 2048, UNIFORM),  # 1.099x
    (8.5, 2048, ABOVE_UNIFORM),  # 1.115x
    (11.4, 2048, ABOVE_UNIFORM),  # 1.495x
    (11.5, 2048, FAR_ABOVE),  # 1.508x
    (20.0, 32000, FAR_ABOVE),  # ln 32000 = 10.37; 1.93x
    (math.nan, 2048, NON_FINITE),
    (math.inf, 2048, NON_FINITE),
])
def test_initial_loss_classification(loss, vocab, verdict):
    s = classify_initial_loss(loss, vocab)
    assert s.verdict == verdict
    assert (s.warning is None) == (verdict == OK)
    if math.isfinite(loss):
        assert s.ratio == pytest.approx(loss / math.log(vocab))


def test_far_above_warns_even_for_random_models():
    s = classify_initial_loss(20.0, 2048, random_init=True)
    assert s.verdict == FAR_ABOVE and "confidently wrong" in s.warning


def test_classification_thresholds_are_keywords():
    assert classify_initial_loss(8.5, 2048, uniform_tolerance=0.2).verdict == UNIFORM
    assert classify_initial_loss(10.0, 2048, far_above_factor=1.25).verdict == FAR_ABOVE
    with pytest.raises(ValueError):
        classify_initial_loss(1.0, 1)
