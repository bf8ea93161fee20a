"""4-bit experts quantized while loading: a QLoRA base in several safetensors shards with an index
(Qwen 3.5 MoE's hub layout, one module per expert; Gemma 4's fused tensors). The expert tensors
are zero-byte stand-ins until `quantize_moe_experts` reads them from the shards one expert at a
time; the model equals the one loaded the old way (dense expert tensors, quantized whole) exactly:
the same quantized bytes and LoRA weights, the same logits, the same first training losses."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.e2e.conftest import QUICKSTART_DATA, write_config

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def _sharded_base(name: str, out: Path) -> Path:
    from archtune.models.tiny import build_tiny_model

    model, tokenizer = build_tiny_model(name, seed=0)
    model.save_pretrained(out, max_shard_size="300KB")  # several shards and an index, as hub checkpoints
    tokenizer.save_pretrained(out)
    return out


def _plan(tmp_path: Path, name: str):
    from archtune.config import load_config
    from archtune.train.recipe import plan_for

    base = _sharded_base(name, tmp_path / "base")
    assert len(list(base.glob("model-*.safetensors"))) >= 3 and (base / "model.safetensors.index.json").is_file()
    config = write_config(tmp_path / "run.yaml", base_model=str(base), adapter="qlora", load_in_4bit=True,
                          quantize_moe_experts=True, lora_target_parameters=EXPERTS, lora_r=4, lora_alpha=8,
                          lora_dropout=0.0, datasets=[{"path": str(QUICKSTART_DATA / "train.jsonl"), "type": "alpaca"}],
                          sequence_len=64, micro_batch_size=1, seed=0, output_dir=str(tmp_path / "out"))
    return plan_for(load_config(config))


def _loaded_whole(plan, tokenizer):
    """The old way: the experts loaded dense by from_pretrained, then quantized whole, in the
    assembly's order (experts implementation, k-bit preparation, adapters, 4 bits, use_cache)."""
    from archtune.models import quant
    from archtune.models.load import set_attn_implementation
    from archtune.train import assembly

    model = quant.load_quantized(plan, tokenizer)
    set_attn_implementation(model, plan)
    assembly.set_experts_implementation(model, plan)
    quant.prepare_for_training(model, plan, keep=assembly.quant4_targets(model, plan)
                               + quant.frozen_embeddings(model, plan))
    model = assembly.attach_adapters(model, plan, "base", assembly.USES["train"])
    assembly.quantize_moe_experts(model, plan)
    assembly.set_use_cache(model, plan.use_cache)
    return model


def _losses(model, ids: torch.Tensor, steps: int = 2) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name, fused", [("qwen3_5-moe", False), ("gemma4-moe", True)])
def test_experts_quantized_while_loading_equal_the_whole_tensor_way(name, fused, tmp_path):
    from archtune.models import quant
    from archtune.moe import quant4
    from archtune.train.assembly import assemble_model

    setup = _plan(tmp_path, name)
    plan, tokenizer = setup.plan, setup.tokenizer
    checkpoint = quant.checkpoint_experts(plan)
    assert checkpoint is not None and {t.fused for t in checkpoint.tensors.values()} == {fused}
    assert len(checkpoint.tensors) == 2 * plan.model_config["text_config"]["num_hidden_layers"]

    # Loaded with stand-ins: the expert tensors hold no dense storage (one element, expanded).
    try:
        stand_ins = quant.load_quantized(plan, tokenizer, experts=checkpoint)
    finally:
        checkpoint.close()
    experts = [getattr(m, leaf) for m, leaf, _ in quant4.expert_tensors(stand_ins, plan.expert_param_names)]
    assert len(experts) == len(checkpoint.tensors)
    assert all(p.untyped_storage().nbytes() == p.element_size() and p.numel() > 1000 for p in experts)
    del stand_ins

    new = assemble_model(plan, tokenizer, "train").model
    old = _loaded_whole(plan, tokenizer)
    assert len(quant4.quantized_experts(new)) == len(checkpoint.tensors)
    a, b = old.state_dict(), new.state_dict()
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not differ, differ[:5]

    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    with torch.no_grad():
        old.eval(), new.eval()
        assert torch.equal(old(input_ids=ids).logits, new(input_ids=ids).logits)
    old_losses, new_losses = _losses(old, ids), _losses(new, ids)
    assert old_losses == new_losses and old_losses[1] != old_losses[0]


def test_unknown_layout_loads_whole(tmp_path):
    """A checkpoint whose experts are neither fused nor in the family's per-expert parts (here: a
    part missing) is not read expert by expert: `checkpoint_experts` says why and the load is the old one."""
    from archtune.models.checkpoint_experts import CheckpointExperts

    setup = _plan(tmp_path, "qwen3_5-moe")
    structure = setup.plan.structure()
    params = {n: structure.parameters[n] for n in structure.parameters_matching("experts.gate_up_proj")}
    why = CheckpointExperts.find(tmp_path / "base", params, {"experts.gate_up_proj": ("gate_proj", "w3")})
    assert isinstance(why, str) and "experts.0.w3.weight is not in the checkpoint" in why
    why = CheckpointExperts.find(tmp_path / "base", params, {"experts.gate_up_proj": ("gate_proj",)})
    assert isinstance(why, str) and "do not make up its shape" in why
