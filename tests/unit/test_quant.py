"""QLoRA on CPU: bitsandbytes 4-bit base, experts unquantized, LoRA trains, merge dequantizes."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data" / "quickstart"


def _config(tmp_path, **keys):
    from archtune.config import load_config

    for name, n in (("train", 48), ("test", 8)):
        with open(DATA / f"{name}.jsonl") as f:
            (tmp_path / f"{name}.jsonl").write_text("".join(itertools.islice(f, n)))
    path = tmp_path / "qlora.yaml"
    import yaml

    path.write_text(yaml.safe_dump({
        "base_model": "tiny:gemma4-moe", "adapter": "qlora", "load_in_4bit": True, "lora_r": 4, "lora_alpha": 8,
        "datasets": [{"path": str(tmp_path / "train.jsonl"), "type": "alpaca"}],
        "test_datasets": [{"path": str(tmp_path / "test.jsonl"), "type": "alpaca"}],
        "dataset_prepared_path": str(tmp_path / "prepared"), "sequence_len": 128, "micro_batch_size": 4,
        "max_steps": 6, "learning_rate": 0.01, "output_dir": str(tmp_path / "out"),
        # the linear layers' path alone (4-bit experts: tests/e2e/test_quant4_train.py)
        "quantize_moe_experts": False, **keys}))
    return load_config(path, [])


def test_4bit_base_quantizes_linears_and_leaves_expert_tensors(tmp_path):
    from archtune.models import quant
    from archtune.train.recipe import plan_for

    cfg = _config(tmp_path)
    setup = plan_for(cfg)
    assert quant.is_quantized(setup.plan)
    model = quant.load_quantized(setup.plan, setup.tokenizer)
    names = quant.quantized_modules(model)
    assert any("language_model.layers.0.self_attn.q_proj" in n for n in names)
    assert not any(n.endswith("lm_head") for n in names)
    experts = {n: p for n, p in model.named_parameters() if n.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    assert experts and all(p.dim() == 3 and p.dtype == torch.float32 for p in experts.values())
    # Dequantizing gives plain linears computing the same outputs as the 4-bit layers.
    x = torch.randn(2, 5, model.config.text_config.hidden_size)
    layer = model.get_submodule(next(n for n in names if "language_model.layers.0.self_attn.q_proj" in n))
    with torch.no_grad():
        before = layer(x)
    assert quant.dequantize(model) == len(names) and not quant.quantized_modules(model)
    layer = model.get_submodule(next(n for n in names if "language_model.layers.0.self_attn.q_proj" in n))
    assert type(layer) is torch.nn.Linear
    with torch.no_grad():
        assert torch.allclose(layer(x), before, rtol=1e-4, atol=1e-5)


def test_qlora_trains_and_merges_on_cpu(tmp_path):
    from peft import PeftModel

    from archtune.models import quant
    from archtune.train.assembly import assemble_model
    from archtune.train.recipe import plan_for, train

    cfg = _config(tmp_path)
    summary = train(cfg)
    assert summary["adapter"] == "qlora" and summary["steps"] == 6
    assert summary["eval_loss_final"] < summary["eval_loss_initial"]
    out = Path(cfg.output_dir)
    assert (out / "adapter_model.safetensors").is_file()

    setup = plan_for(cfg)
    # The trained adapter on the 4-bit base (what training saw) ...
    base = quant.load_quantized(setup.plan, setup.tokenizer)
    ref = PeftModel.from_pretrained(base, str(out)).eval()
    merged = assemble_model(setup.plan, setup.tokenizer, "merge").model.eval()
    # ... equals the merged, dequantized model: a plain transformers model, no bitsandbytes layer.
    assert not quant.quantized_modules(merged)
    assert not hasattr(merged.config, "quantization_config")
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    kwargs = {"mm_token_type_ids": torch.zeros_like(ids)}
    with torch.no_grad():
        a = ref(input_ids=ids, **kwargs).logits
        b = merged(input_ids=ids, **kwargs).logits
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), float((a - b).abs().max())
    merged.save_pretrained(str(tmp_path / "merged"))
    from transformers import AutoModelForImageTextToText

    reloaded = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids, **kwargs).logits, b, atol=1e-5)
