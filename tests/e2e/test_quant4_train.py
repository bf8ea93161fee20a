"""QLoRA with 4-bit experts (`quantize_moe_experts`), end to end on a 64-expert tiny Gemma 4 MoE.

* the plan turns it on for a 4-bit MoE base (and off, or refuses, elsewhere);
* model_bytes of the loaded model is <= 0.30x the bf16 model's;
* QLoRA + expert LoRA lowers the eval loss as much as LoRA on the dequantized model (same steps);
* merge-lora dequantizes, merges the expert LoRA, reloads with transformers alone and matches
  the unmerged 4-bit model's logits.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data" / "quickstart"
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


# 64 experts, as the MoE families' real checkpoints have 128-256, instead of the tiny models' 8.
WIDE = {"gemma4-moe": dict(num_experts=64, top_k_experts=4, moe_intermediate_size=128),
        "qwen3_5-moe": dict(num_experts=64, num_experts_per_tok=4, moe_intermediate_size=128)}


def write_wide(name: str, out: Path) -> Path:
    """A 64-expert tiny MoE written like a real checkpoint (config, safetensors, tokenizer)."""
    import transformers

    from archtune.assets import load_tokenizer
    from archtune.models.tiny import build_tiny_config

    tokenizer = load_tokenizer()
    config = build_tiny_config(name, tokenizer)
    for key, value in WIDE[name].items():
        setattr(config.text_config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForImageTextToText.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    return write_wide("gemma4-moe", tmp_path_factory.mktemp("wide-gemma4-moe"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    for name, n in (("train", 64), ("test", 16)):
        with open(DATA / f"{name}.jsonl") as f:
            (out / f"{name}.jsonl").write_text("".join(itertools.islice(f, n)))
    return out


def _config(tmp_path, data_dir, base, name, **keys):
    import yaml

    from archtune.config import load_config

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "base_model": str(base), "adapter": "qlora", "load_in_4bit": True, "lora_r": 4, "lora_alpha": 8,
        "lora_target_parameters": EXPERTS,
        "datasets": [{"path": str(data_dir / "train.jsonl"), "type": "alpaca"}],
        "test_datasets": [{"path": str(data_dir / "test.jsonl"), "type": "alpaca"}],
        "dataset_prepared_path": str(tmp_path / "prepared"), "sequence_len": 128, "micro_batch_size": 4,
        "max_steps": 8, "learning_rate": 0.005, "output_dir": str(tmp_path / name), **keys}))
    return load_config(path, [])


def test_the_plan_quantizes_experts_for_a_4bit_moe_base_only(tmp_path, data_dir, wide_dir):
    from archtune.errors import UserError
    from archtune.train.recipe import plan_for

    plan = plan_for(_config(tmp_path, data_dir, wide_dir, "a")).plan
    assert plan.get("quantize_moe_experts") is True and plan.source("quantize_moe_experts") == "auto"
    assert plan.get("experts_implementation") == "scattermoe"
    assert "bitsandbytes quantizes nn.Linear layers only" in plan.settings["quantize_moe_experts"].reason
    off = plan_for(_config(tmp_path, data_dir, wide_dir, "b", quantize_moe_experts=False)).plan
    assert off.get("quantize_moe_experts") is False and off.get("experts_implementation") is None
    lora = plan_for(_config(tmp_path, data_dir, wide_dir, "c", adapter="lora", load_in_4bit=False)).plan
    assert lora.get("quantize_moe_experts") is False
    with pytest.raises(UserError, match="quantize_moe_experts requires a 4-bit base"):
        plan_for(_config(tmp_path, data_dir, wide_dir, "d", adapter="lora", load_in_4bit=False,
                         quantize_moe_experts=True))
    dense = plan_for(_config(tmp_path, data_dir, "tiny:gemma4-dense", "e", lora_target_parameters=None)).plan
    assert dense.get("quantize_moe_experts") is False


@pytest.mark.parametrize("name", sorted(WIDE))
def test_loaded_4bit_model_is_at_most_0_30x_of_bf16(tmp_path, data_dir, name):
    """A bf16 QLoRA run of each MoE family: linears (bitsandbytes) and experts in 4 bits."""
    import transformers

    from archtune.moe import quant4
    from archtune.train.assembly import assemble_model
    from archtune.train.recipe import plan_for

    base = write_wide(name, tmp_path / name)
    cfg = _config(tmp_path, data_dir, base, name, bf16=True)
    setup = plan_for(cfg)
    model = assemble_model(setup.plan, setup.tokenizer, "train").model
    assert len(quant4.quantized_experts(model)) == 8
    bf16 = quant4.model_bytes(transformers.AutoModelForImageTextToText.from_pretrained(base, dtype=torch.bfloat16))
    ratio = quant4.model_bytes(model, adapters=False) / bf16
    print(json.dumps({"model": name, "bf16_bytes": bf16, "model_bytes": quant4.model_bytes(model, adapters=False),
                      "ratio": round(ratio, 4)}))
    assert ratio <= 0.30, ratio  # measured 0.275 (gemma4-moe), 0.294 (qwen3_5-moe)
    # expert LoRA trains in fp32 on the bf16 run
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}


def test_qlora_with_4bit_experts_shrinks_the_model_and_trains_like_lora_on_the_dequantized_one(
        tmp_path, data_dir, wide_dir):
    import transformers

    from archtune.models import quant
    from archtune.moe import quant4
    from archtune.train.assembly import assemble_model, quantize_moe_experts
    from archtune.train.recipe import plan_for, train

    cfg = _config(tmp_path, data_dir, wide_dir, "qlora")
    summary = train(cfg)
    assert summary["quantize_moe_experts"] is True and summary["steps"] == 8
    assert json.loads((Path(cfg.output_dir) / "train_summary.json").read_text())["model_bytes"] == summary["model_bytes"]
    bf16 = quant4.model_bytes(transformers.AutoModelForImageTextToText.from_pretrained(wide_dir, dtype=torch.bfloat16))
    ratio = summary["model_bytes"] / bf16  # an fp32 run: its unquantized weights are fp32 (measured 0.295)
    assert ratio < 0.32, ratio

    # The same weights, dequantized (linears and experts through 4 bits and back), trained with plain LoRA.
    setup = plan_for(cfg)
    model = quant.load_quantized(setup.plan, setup.tokenizer)
    quant.dequantize(model)
    quant4.quantize_experts(model, tuple(EXPERTS))
    quant4.dequantize_experts(model)
    dequantized = tmp_path / "dequantized"
    model.save_pretrained(dequantized)
    setup.tokenizer.save_pretrained(dequantized)
    lora = train(_config(tmp_path, data_dir, dequantized, "lora", adapter="lora", load_in_4bit=False,
                         experts_implementation="scattermoe"))
    assert lora["quantize_moe_experts"] is False
    # Same starting point (the 4-bit model computes with these weights) ...
    assert summary["eval_loss_initial"] == pytest.approx(lora["eval_loss_initial"], rel=1e-3)
    # ... and the same progress over the same steps, within 5%.
    drop_q = summary["eval_loss_initial"] - summary["eval_loss_final"]
    drop_l = lora["eval_loss_initial"] - lora["eval_loss_final"]
    assert drop_l > 0.05 and drop_q == pytest.approx(drop_l, rel=0.05), (drop_q, drop_l)

    # merge-lora: dequantized base + merged expert LoRA, a plain transformers model ...
    from peft import PeftModel

    base = quant.load_quantized(setup.plan, setup.tokenizer)
    unmerged = PeftModel.from_pretrained(base, cfg.output_dir)
    assert len(quantize_moe_experts(unmerged, setup.plan)) == 8
    unmerged.eval()
    merged = assemble_model(setup.plan, setup.tokenizer, "merge").model.eval()
    assert not quant4.quantized_experts(merged) and not quant.quantized_modules(merged)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    kwargs = {"mm_token_type_ids": torch.zeros_like(ids)}
    for m in (unmerged, reloaded):
        m.set_experts_implementation("scattermoe") if hasattr(m, "set_experts_implementation") else None
    with torch.no_grad():
        a = unmerged(input_ids=ids, **kwargs).logits
        b = reloaded(input_ids=ids, **kwargs).logits
    # ... matching the unmerged 4-bit model: measured max |diff| ~1e-5 (bitsandbytes' 4-bit matmul vs dense)
    diff = float((a - b).abs().max())
    print(json.dumps({"model_bytes": summary["model_bytes"], "bf16_bytes": bf16, "ratio": round(ratio, 4),
                      "eval_drop_qlora": drop_q, "eval_drop_lora_dequantized": drop_l,
                      "merged_vs_unmerged_max_abs_logit_diff": diff, "max_abs_logit": float(a.abs().max())}))
    assert diff < 1e-5 * a.abs().max(), diff  # measured 8.3e-7 (max |logit| 0.61): 1.4e-6 relative
