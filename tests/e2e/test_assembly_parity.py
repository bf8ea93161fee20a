"""One model assembly for every command: what `train` measured is what `evaluate` and `merge-lora` get.

Per case (a tiny family x LoRA, QLoRA with 4-bit experts, normalize_weight_scales, use_scattermoe,
rows with images):

* `eval_loss_final` in train_summary.json equals `archtune evaluate --json`'s eval_loss on the
  saved output (rel 1e-5): the adapter is evaluated on the base it was trained on (4-bit experts,
  rescaled weights, the same experts implementation);
* the model `merge-lora` writes, loaded with transformers alone, gives the trained adapter's logits;
* the evaluated model runs the experts as training ran them (implementation, tensors in 4 bits).

Before train/assembly.py, the QLoRA-with-4-bit-experts cases evaluated on experts that were never
quantized, and the normalize_weight_scales cases on a base that was never rescaled.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.e2e.conftest import QUICKSTART_DATA, head_jsonl, read_json, run_cli, vision_rows, write_config

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]

# A drifted checkpoint (a tensor 3x its siblings' scale) and the rule that repairs it: Qwen 3.5 MoE's
# DeltaNet conv1d is the case seen in real checkpoints; a dense family's attention output the control.
DRIFTS = {"qwen3_5-moe": ("model.language_model.layers.1.linear_attn.conv1d.weight", r"linear_attn\.conv1d\.weight"),
          "llama": ("model.layers.1.self_attn.o_proj.weight", r"self_attn\.o_proj\.weight")}

VARIANTS = {
    "lora": {},
    "qlora_4bit_experts": {"adapter": "qlora", "load_in_4bit": True, "lora_target_parameters": EXPERTS},
    "normalize_weight_scales": {},  # the drifted checkpoint and its rule: `_drifted`
    "use_scattermoe": {"use_scattermoe": True, "lora_target_parameters": EXPERTS},
    # Rows with images (the bundled vision data), the projector trained beside the LoRA: evaluate
    # reads the same image rows through the same processor.
    "images": {"lora_modules_to_save": ["multi_modal_projector"], "sequence_len": 320},
}

CASES = [
    *[(family, "lora") for family in ("llama", "gemma3", "gemma4-moe", "qwen3_5", "qwen3_5-moe")],
    ("gemma4-moe", "qlora_4bit_experts"), ("qwen3_5-moe", "qlora_4bit_experts"),
    ("llama", "normalize_weight_scales"), ("qwen3_5-moe", "normalize_weight_scales"),
    ("gemma4-moe", "use_scattermoe"), ("qwen3_5-moe", "use_scattermoe"),
    ("gemma3", "images"), ("gemma4-moe", "images"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("data")
    train = head_jsonl(QUICKSTART_DATA / "train.jsonl", tmp / "train.jsonl", 32)
    test = head_jsonl(QUICKSTART_DATA / "test.jsonl", tmp / "test.jsonl", 8)
    return {"datasets": [{"path": str(train), "type": "alpaca"}],
            "test_datasets": [{"path": str(test), "type": "alpaca"}]}


def _image_data(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train.jsonl", 16), ("test.jsonl", 8)):
        (out / split).write_text("".join(json.dumps(r) + "\n" for r in vision_rows(split, n)))
    return {"datasets": [{"path": str(out / "train.jsonl"), "type": "chat_template"}],
            "test_datasets": [{"path": str(out / "test.jsonl"), "type": "chat_template"}]}


def _drifted(family: str, out: Path) -> dict:
    """The keys of the normalize_weight_scales case: tiny `family` on disk with one tensor drifted, and its rule."""
    from archtune.models.tiny import write_tiny_model

    name, pattern = DRIFTS[family]
    model_dir = write_tiny_model(family, out)
    path = model_dir / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors[name] = tensors[name] * 3.0
    save_file(tensors, str(path), metadata=metadata)
    return {"base_model": str(model_dir), "normalize_weight_scales": [{"name_pattern": pattern, "threshold": 1.3}]}


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    from archtune.patches.text_only import text_only_extras

    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model.eval()
    with torch.no_grad():
        return model(**batch, **text_only_extras(model, batch), use_cache=False).logits.float()


@pytest.mark.parametrize("family, variant", CASES, ids=[f"{f}-{v}" for f, v in CASES])
def test_evaluate_and_merge_see_the_model_training_saw(family, variant, data, tmp_path, capsys):
    import transformers

    from archtune.config import load_config
    from archtune.moe import quant4
    from archtune.train.assembly import assemble_model, experts_implementation_in_use
    from archtune.train.recipe import plan_for

    keys = {"base_model": f"tiny:{family}", "adapter": "lora", **VARIANTS[variant]}
    if variant == "normalize_weight_scales":
        keys.update(_drifted(family, tmp_path / "base"))
    rows = _image_data(tmp_path / "images") if variant == "images" else data
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", **{"sequence_len": 128, **keys}, **rows,
                          dataset_prepared_path=str(tmp_path / "prepared"), lora_r=4, lora_alpha=8,
                          micro_batch_size=4, max_steps=3, learning_rate=0.01, warmup_steps=0, seed=0,
                          output_dir=str(out), use_tensorboard=False)
    code, _, err = run_cli(capsys, "train", config)
    assert code == 0, err
    summary = read_json(out / "train_summary.json")

    code, stdout, err = run_cli(capsys, "evaluate", config, "--json")
    assert code == 0, err
    evaluated = json.loads(stdout.strip().splitlines()[-1])["eval_loss"]

    code, _, err = run_cli(capsys, "merge-lora", config)
    assert code == 0, err
    setup = plan_for(load_config(config))
    adapted = assemble_model(setup.plan, setup.tokenizer, "generate")
    assert adapted.weights == "adapter"
    merged = getattr(transformers, setup.plan.auto_class).from_pretrained(out / "merged")
    ids = torch.tensor([setup.tokenizer("### Instruction:\nName the colour of the sky.\n\n### Response:\n")["input_ids"]])
    a, b = _logits(adapted.model, ids), _logits(merged, ids)
    diff = float((a - b).abs().max())
    print(json.dumps({"case": f"{family}-{variant}", "eval_loss_final": summary["eval_loss_final"],
                      "evaluate_eval_loss": evaluated, "merged_vs_adapter_max_abs_logit_diff": diff,
                      "max_abs_logit": float(a.abs().max())}))

    assert evaluated == pytest.approx(summary["eval_loss_final"], rel=1e-5)
    assert diff < 1e-4 * max(1.0, float(a.abs().max())), diff
    # The experts run as they ran in training: the same implementation, the same tensors in 4 bits.
    if summary["experts_load"] is not None:  # a mixture-of-experts model
        assert experts_implementation_in_use(adapted.model) == summary["experts_implementation"]
    assert bool(quant4.quantized_experts(adapted.model)) == summary["quantize_moe_experts"]
    if variant == "qlora_4bit_experts":
        assert summary["quantize_moe_experts"] is True and summary["experts_implementation"] == "scattermoe"
    if variant == "use_scattermoe":
        assert summary["experts_implementation"] == "scattermoe"
