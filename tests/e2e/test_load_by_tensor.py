"""A bf16/fp32 base whose checkpoint is stored in another dtype than the run's is read one tensor at
a time (pread) and cast, instead of through from_pretrained's mapped shards (whose pages stay
resident until the load ends: the checkpoint held twice). The model equals from_pretrained's
exactly, on bf16 checkpoints in several shards with an index loaded in fp32: renamed keys (Gemma 3),
experts stored one module per expert and fused at load (Qwen 3.5 MoE), fused experts, tied
embeddings and checkpoint buffers (Gemma 4)."""
from __future__ import annotations

import pytest
import torch

from tests.e2e.conftest import QUICKSTART_DATA, write_config


def _plan(tmp_path, name: str, bf16: bool):
    from archtune.config import load_config
    from archtune.models.tiny import build_tiny_model
    from archtune.train.recipe import plan_for

    base = tmp_path / "base"
    model, tokenizer = build_tiny_model(name, seed=1)
    model.to(torch.bfloat16).save_pretrained(base, max_shard_size="150KB")
    tokenizer.save_pretrained(base)
    assert len(list(base.glob("model-*.safetensors"))) >= 3
    config = write_config(tmp_path / "run.yaml", base_model=str(base), bf16=bf16, sequence_len=64,
                          datasets=[{"path": str(QUICKSTART_DATA / "train.jsonl"), "type": "alpaca"}],
                          output_dir=str(tmp_path / "out"))
    return plan_for(load_config(config)), base


@pytest.mark.parametrize("name", ["gemma3", "qwen3_5-moe", "gemma4-moe"])
def test_a_checkpoint_cast_while_loading_is_read_tensor_by_tensor_into_the_same_model(name, tmp_path):
    import transformers

    from archtune.models.load import checkpoint_to_cast, load_model, torch_dtype

    setup, base = _plan(tmp_path, name, bf16=False)
    assert checkpoint_to_cast(setup.plan, torch_dtype(setup.plan)) is not None
    model = load_model(setup.plan, setup.tokenizer)
    reference = getattr(transformers, setup.plan.structure().model_class).from_pretrained(base, dtype=torch.float32)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in theirs)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight \
        or not reference.config.get_text_config().tie_word_embeddings


def test_a_checkpoint_stored_in_the_run_dtype_loads_through_from_pretrained(tmp_path):
    from archtune.models.load import checkpoint_to_cast, torch_dtype

    setup, _ = _plan(tmp_path, "gemma3", bf16=True)
    assert checkpoint_to_cast(setup.plan, torch_dtype(setup.plan)) is None
