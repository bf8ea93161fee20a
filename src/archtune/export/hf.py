"""`--format merged` and `--format adapter`: safetensors directories for transformers, vLLM, SGLang.

merged: the adapter merged into the base exactly as `archtune merge-lora` merges it (the one
model assembly's "merge" use), saved with the tokenizer and chat template, then loaded back
with transformers alone (no archtune code between the files and the logits).

adapter: the trained PEFT adapter (adapter_config.json + adapter_model.safetensors) with the
tokenizer and chat template, its config pointing at the base model; loaded back with PEFT
alone (stock `PeftModel.from_pretrained`, none of archtune's patches) on a base that
transformers loaded, as a serving engine would.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from archtune.errors import UserError

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def save_merged(merged, tokenizer, out: Path, outtype: str) -> None:
    """The merged model in `outtype`'s dtype, with the tokenizer (its chat template included)."""
    merged.to(DTYPES[outtype]).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def load_merged(plan, out: Path):
    """The merged directory through transformers alone."""
    import transformers

    return getattr(transformers, plan.auto_class).from_pretrained(str(out), dtype="auto")


def save_adapter(output_dir: Path, tokenizer, out: Path, base_model: str) -> dict:
    """The run's adapter files copied to `out` (its config's base model named), with the tokenizer.
    Returns the adapter's config."""
    missing = [name for name in ADAPTER_FILES if not (output_dir / name).is_file()]
    if missing:
        raise UserError.single("output_dir", f"{output_dir} has no trained adapter ({', '.join(missing)} missing)",
                               "train with adapter: lora first, or point output_dir at the run")
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != output_dir.resolve():
        shutil.copyfile(output_dir / ADAPTER_FILES[1], out / ADAPTER_FILES[1])
    config = json.loads((output_dir / ADAPTER_FILES[0]).read_text())
    config["base_model_name_or_path"] = base_model
    (out / ADAPTER_FILES[0]).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(str(out))
    return config


def load_adapter_stock(base, out: Path):
    """`out`'s adapter on `base` through stock PEFT (no archtune patch), for inference."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(out))
    model.eval()
    return model


def adapter_tensor_names(out: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(out / ADAPTER_FILES[1]), framework="pt") as f:
        return list(f.keys())


def serving_notes(config: dict, family_notes: tuple[str, ...] = ()) -> list[str]:
    """What the serving engines are known to do with this adapter's layout (the family's own facts after)."""
    notes = []
    if config.get("target_parameters"):
        notes.append("the adapter trains 3D expert tensors in PEFT's target_parameters layout (gate_up_proj the "
                     "inner wrapper, down_proj the outer; lora_A [experts*r, in], lora_B [out, r*experts]), the "
                     "layout vLLM loads for models that declare is_3d_moe_weight (a model whose vLLM class does "
                     "not declare it wants per-expert experts.N.{gate,up,down}_proj tensors instead; vLLM's "
                     "--enable-mixed-moe-lora-format with is_3d_lora_weight: true serves it there). vLLM is not "
                     "installed here: the layout is checked from the files, not by serving them")
        notes.extend(family_notes)
    return notes


__all__ = ["ADAPTER_FILES", "DTYPES", "adapter_tensor_names", "load_adapter_stock", "load_merged", "save_adapter",
           "save_merged", "serving_notes"]
