"""`merge-lora` shard by shard: a base in several safetensors shards with an index, a trained LoRA,
the merge streamed one shard at a time; its tensors equal the in-memory merge's
(`assemble_model(plan, tokenizer, "merge")`, PEFT's merge_and_unload) exactly, the shard files and
index keep the base's layout, the printed count is the number of LoRA'd weights, and the merged
model loaded with transformers alone gives the adapter's logits. The same for expert LoRA
(`lora_target_parameters`) on both checkpoint layouts of expert tensors (Gemma 4's fused [E, ...]
tensors, Qwen 3.5 MoE's one module per expert) and for QLoRA bases (4-bit linears and 4-bit
experts: the in-memory merge adds the deltas to the values training computed with, the tensors
through 4 bits and back)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.conftest import QUICKSTART_DATA, head_jsonl, run_cli, write_config


def _sharded_base(family: str, out: Path) -> Path:
    from archtune.models.tiny import build_tiny_model

    model, tokenizer = build_tiny_model(family, seed=0)
    model.save_pretrained(out, max_shard_size="200KB")  # several shards and an index, as hub checkpoints
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("family, dtype", [("llama", "bf16"), ("qwen3_5", "fp32")])
def test_streamed_merge_equals_the_in_memory_merge(family, dtype, tmp_path, capsys):
    import transformers

    from archtune.adapters.merge import INDEX
    from archtune.config import load_config
    from archtune.train.assembly import assemble_model, stream_plan_for
    from archtune.train.recipe import plan_for

    base = _sharded_base(family, tmp_path / "base")
    shards = sorted(p.name for p in base.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (base / INDEX).is_file()
    train = head_jsonl(QUICKSTART_DATA / "train.jsonl", tmp_path / "train.jsonl", 16)
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", base_model=str(base), adapter="lora", lora_r=4, lora_alpha=8,
                          datasets=[{"path": str(train), "type": "alpaca"}], bf16=dtype == "bf16",
                          dataset_prepared_path=str(tmp_path / "prepared"), sequence_len=128, micro_batch_size=4,
                          max_steps=2, learning_rate=0.05, warmup_steps=0, seed=0, output_dir=str(out),
                          use_tensorboard=False)
    code, _, err = run_cli(capsys, "train", config)
    assert code == 0, err
    setup = plan_for(load_config(config))
    assert stream_plan_for(setup.plan)[1] is not None  # it streams

    code, stdout, err = run_cli(capsys, "merge-lora", config)
    assert code == 0, err
    merged_dir = out / "merged"
    adapter_keys = load_file(str(out / "adapter_model.safetensors"))
    n_lora = sum(1 for k in adapter_keys if ".lora_A." in k)
    assert n_lora > 0
    assert f"merged {n_lora} of {n_lora} adapted tensors, 0 of them expert tensors, shard by shard" in " ".join(stdout.split())

    # The layout: the base's shard files and index, every tensor in the plan's dtype.
    assert sorted(p.name for p in merged_dir.glob("model-*.safetensors")) == shards
    index = json.loads((merged_dir / INDEX).read_text())
    assert index["weight_map"] == json.loads((base / INDEX).read_text())["weight_map"]
    streamed = {}
    for shard in shards:
        streamed.update(load_file(str(merged_dir / shard)))

    # Exactly the in-memory merge (the path merge-lora took before it streamed).
    in_memory = assemble_model(setup.plan, setup.tokenizer, "merge").model
    expected = in_memory.state_dict()
    want = torch.bfloat16 if dtype == "bf16" else torch.float32
    changed = 0
    base_tensors = {}
    for shard in shards:
        base_tensors.update(load_file(str(base / shard)))
    for name, tensor in streamed.items():
        assert tensor.dtype == want, name
        assert torch.equal(tensor, expected[name]), name
        changed += not torch.equal(tensor, base_tensors[name].to(want))
    assert changed == n_lora  # every LoRA'd weight moved, nothing else did

    # Loaded with transformers alone: the adapter's logits.
    reloaded = getattr(transformers, setup.plan.auto_class).from_pretrained(merged_dir)
    assert reloaded.dtype == want
    adapted = assemble_model(setup.plan, setup.tokenizer, "generate").model
    ids = torch.tensor([setup.tokenizer("### Instruction:\nName the colour of the sky.\n\n### Response:\n")["input_ids"]])
    with torch.no_grad():
        a = adapted(input_ids=ids, use_cache=False).logits.float()
        b = reloaded(input_ids=ids, use_cache=False).logits.float()
        c = in_memory(input_ids=ids, use_cache=False).logits.float()
    assert torch.equal(b, c)
    assert float((a - b).abs().max()) < 1e-2 * max(1.0, float(a.abs().max()))


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


@pytest.mark.parametrize("family, fused", [("qwen3_5-moe", False), ("gemma4-moe", True)])
@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_expert_lora_streams_and_equals_the_in_memory_merge(family, fused, adapter, tmp_path, capsys):
    from archtune.adapters.merge import INDEX
    from archtune.config import load_config
    from archtune.train.assembly import assemble_model, stream_plan_for
    from archtune.train.recipe import plan_for

    base = _sharded_base(family, tmp_path / "base")
    shards = sorted(p.name for p in base.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (base / INDEX).is_file()
    train = head_jsonl(QUICKSTART_DATA / "train.jsonl", tmp_path / "train.jsonl", 16)
    out = tmp_path / "out"
    four_bit = {"load_in_4bit": True, "quantize_moe_experts": True} if adapter == "qlora" else {}
    config = write_config(tmp_path / "run.yaml", base_model=str(base), adapter=adapter, lora_r=4, lora_alpha=8,
                          lora_dropout=0.0, lora_target_modules=["q_proj", "o_proj"],
                          lora_target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                          datasets=[{"path": str(train), "type": "alpaca"}], bf16=True,
                          dataset_prepared_path=str(tmp_path / "prepared"), sequence_len=128, micro_batch_size=4,
                          max_steps=2, learning_rate=0.05, warmup_steps=0, seed=0, output_dir=str(out),
                          use_tensorboard=False, **four_bit)
    code, _, err = run_cli(capsys, "train", config)
    assert code == 0, err
    setup = plan_for(load_config(config))
    stream, _ = stream_plan_for(setup.plan)
    assert {t.fused for t in stream.experts.tensors.values()} == {fused}  # the layout this case is about

    code, stdout, err = run_cli(capsys, "merge-lora", config)
    assert code == 0, err
    adapter_keys = load_file(str(out / "adapter_model.safetensors"))
    n_lora = sum(1 for k in adapter_keys if ".lora_A." in k)
    n_expert = 2 * setup.plan.model_config["text_config"]["num_hidden_layers"]  # gate_up_proj and down_proj per layer
    assert n_lora > n_expert
    said = " ".join(stdout.split())
    assert f"merged {n_lora} of {n_lora} adapted tensors, {n_expert} of them expert tensors, shard by shard" in said

    merged_dir = out / "merged"
    assert sorted(p.name for p in merged_dir.glob("model-*.safetensors")) == shards
    assert json.loads((merged_dir / INDEX).read_text())["weight_map"] == json.loads((base / INDEX).read_text())["weight_map"]
    streamed = _tensors(merged_dir)

    # Exactly the in-memory merge, as transformers saves it (per-expert modules for Qwen 3.5 MoE).
    in_memory = assemble_model(setup.plan, setup.tokenizer, "merge").model
    in_memory.save_pretrained(tmp_path / "in_memory")
    expected = _tensors(tmp_path / "in_memory")
    assert set(streamed) == set(expected)
    for name, tensor in streamed.items():
        assert tensor.dtype == expected[name].dtype == torch.bfloat16, name
        assert torch.equal(tensor, expected[name]), name
    base_tensors = _tensors(base)
    moved = {n for n, t in streamed.items() if not torch.equal(t, base_tensors[n].to(t.dtype))}
    expert_moved = {n for n in moved if ".experts." in n}
    text = setup.plan.model_config["text_config"]
    # every expert of every expert tensor: 2 fused tensors per layer, or gate, up and down of each expert
    assert len(expert_moved) == text["num_hidden_layers"] * (2 if fused else 3 * text["num_experts"])
    if adapter == "lora":
        assert len(moved - expert_moved) == n_lora - n_expert  # the linear LoRA weights, nothing else
