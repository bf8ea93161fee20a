"""FSDP2 ranks that load only what they keep (`fsdp_config.fsdp_cpu_ram_efficient_loading`, on by
default for a local safetensors base): the model is built from zero-byte stand-ins, sharded, and
each rank reads its own rows of the checkpoint. Checked against every rank loading the whole
model first (`false`): the same losses and final weights, on checkpoints in several shards with
an index: a dense family whose checkpoint keys transformers renames (Gemma 3), a MoE family whose
experts are stored one module per expert (Qwen 3.5 MoE), and one with fused expert tensors, tied
embeddings and checkpoint tensors that are buffers (Gemma 4's layer_scalar)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.dist.conftest import max_rel_diff

FSDP = {"fsdp": ["full_shard", "auto_wrap"]}
CASES = {
    # full fine-tune of the text model (towers frozen, untouched by text batches)
    "gemma3": {},
    # LoRA on the linears and on the 3D expert tensors; 4 experts over 2 ranks: 2 each
    "qwen3_5-moe": {"adapter": "lora", "lora_r": 4, "lora_alpha": 8,
                    "lora_target_parameters": ["experts.gate_up_proj", "experts.down_proj"]},
    "gemma4-moe": {},
}


def _sharded_checkpoint(name: str, out: Path) -> Path:
    from archtune.models.tiny import build_tiny_model

    if not (out / "model.safetensors.index.json").is_file():
        model, tokenizer = build_tiny_model(name, seed=3)
        model.save_pretrained(out, max_shard_size="300KB")
        tokenizer.save_pretrained(out)
    assert len(list(out.glob("model-*.safetensors"))) >= 3
    return out


def _ok(run):
    assert run.rc == 0, run.stderr[-4000:]
    return run


@pytest.mark.parametrize("name", list(CASES))
def test_each_rank_reading_its_own_rows_trains_as_loading_the_whole_model(train_run, name, tmp_path_factory):
    base = _sharded_checkpoint(name, train_run.root / f"base-{name}")
    keys = {"base_model": str(base), "max_steps": 2, **FSDP, **CASES[name]}
    own = _ok(train_run(f"own_shards_{name}", **keys))
    whole = _ok(train_run(f"whole_{name}", fsdp_config={"fsdp_cpu_ram_efficient_loading": False}, **keys))
    assert own.summary["loaded_own_shards"] is True and whole.summary["loaded_own_shards"] is False
    assert own.summary["sharded_params"] == whole.summary["sharded_params"] > 0
    assert own.summary["model_bytes"] == whole.summary["model_bytes"]
    assert own.summary["train_losses"] == pytest.approx(whole.summary["train_losses"], rel=1e-6)
    assert max_rel_diff(own.weights(), whole.weights()) < 1e-6
