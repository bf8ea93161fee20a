"""`archtune check --memory` against the measured memory of real CPU training runs.

    python bench/memory_estimate.py            # prints ONE JSON object (about 5 minutes on 2 busy cores)
    python bench/memory_estimate.py --only tiny_full_1p

Each case is a real `archtune train` (fp32, 4 steps, AdamW) on CPU, 1 or 2 processes, beside the
estimate `archtune check --memory --json` gives for the same config and process count (the
estimate reads config.json only). Measured = peak RSS of rank 0 (`peak_rss_mb`) minus its RSS
just before the model was built (`rss_before_model_mb`: Python, torch, the tokenizer, the data),
both from train_summary.json. Reported per case: estimate, measured and their ratio (target:
within 0.8-1.2).

Cases: the tiny Gemma 4 dense model (`tiny:gemma4-dense`) and a wider Gemma 4 MoE (hidden 256,
16 experts, written to a local model directory with random weights); LoRA and full fine-tune;
gradient checkpointing on and off; 1 process and 2 (DDP, FSDP2).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "quickstart"
WIDE_MOE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, num_experts=16, top_k_experts=4, moe_intermediate_size=256)

LORA = {"adapter": "lora", "lora_r": 16, "lora_alpha": 32}
FSDP = {"fsdp": ["full_shard", "auto_wrap"]}
# name -> (model, config keys, processes)
CASES: dict[str, tuple[str, dict, int]] = {
    "tiny_full_1p": ("tiny:gemma4-dense", {"micro_batch_size": 16, "sequence_len": 512}, 1),
    "tiny_lora_ckpt_1p": ("tiny:gemma4-dense", {**LORA, "micro_batch_size": 16, "sequence_len": 512,
                                                "gradient_checkpointing": True}, 1),
    "moe_full_1p": ("wide-moe", {"micro_batch_size": 8, "sequence_len": 512}, 1),
    "moe_lora_ckpt_1p": ("wide-moe", {**LORA, "micro_batch_size": 8, "sequence_len": 512,
                                      "gradient_checkpointing": True, "lora_dropout": 0,
                                      "lora_target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}, 1),
    "moe_full_ddp_2p": ("wide-moe", {"micro_batch_size": 4, "sequence_len": 512}, 2),
    "moe_full_fsdp2_2p": ("wide-moe", {**FSDP, "micro_batch_size": 4, "sequence_len": 512}, 2),
}


def write_wide_moe(directory: Path) -> Path:
    """A Gemma 4 MoE of WIDE_MOE's shape with random weights, saved like a checkpoint."""
    import torch
    import transformers

    from archtune.models.tiny import build_tiny_config

    from archtune.assets import load_tokenizer

    config = build_tiny_config("gemma4-moe")
    for key, value in WIDE_MOE.items():
        setattr(config.text_config, key, value)
    torch.manual_seed(0)
    model = transformers.Gemma4ForConditionalGeneration(config)
    model.save_pretrained(directory, safe_serialization=True)
    load_tokenizer().save_pretrained(directory)
    return directory


def case_config(tmp: Path, name: str, model: str, keys: dict) -> Path:
    cfg = {"base_model": model, "datasets": [{"path": str(DATA / "train.jsonl"), "type": "alpaca"}],
           "dataset_prepared_path": str(tmp / "prepared"), "sample_packing": True, "max_steps": 4,
           "optimizer": "adamw_torch", "learning_rate": 1e-4, "use_tensorboard": False, "logging_steps": 1,
           "output_dir": str(tmp / name), "freeze_mm_modules": True, **keys}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "archtune", *args], capture_output=True, text=True, env=env)


def one_case(tmp: Path, name: str, model: str, keys: dict, nproc: int) -> dict:
    cfg = case_config(tmp, name, model, keys)
    check = run(["check", str(cfg), "--memory", "--json", "--nproc", str(nproc)])
    if check.returncode != 0:
        return {"case": name, "error": check.stdout[-2000:] + check.stderr[-2000:]}
    memory = json.loads(check.stdout.strip().splitlines()[-1])["memory"]
    train = run(["train", str(cfg), "--nproc", str(nproc)])
    if train.returncode != 0:
        return {"case": name, "error": train.stderr[-3000:]}
    summary = json.loads((tmp / name / "train_summary.json").read_text())
    measured = (summary["peak_rss_mb"] - summary["rss_before_model_mb"]) * 2**20
    return {"case": name, "model": model, "processes": nproc, "strategy": summary["strategy"],
            "adapter": keys.get("adapter") or "full", "checkpointing": bool(keys.get("gradient_checkpointing")),
            "estimate_mib": round(memory["peak_bytes"] / 2**20, 1), "measured_mib": round(measured / 2**20, 1),
            "ratio": round(memory["peak_bytes"] / measured, 3),
            "parts_mib": {k: round(v / 2**20, 1) for k, v in memory["parts"].items()},
            "peak_rss_mib": summary["peak_rss_mb"], "rss_before_model_mib": summary["rss_before_model_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(CASES))
    args = parser.parse_args()
    names = args.only or list(CASES)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        wide = write_wide_moe(tmp / "wide-moe") if any(CASES[n][0] == "wide-moe" for n in names) else None
        results = []
        for name in names:
            model, keys, nproc = CASES[name]
            results.append(one_case(tmp, name, str(wide) if model == "wide-moe" else model, keys, nproc))
    ok = [r for r in results if "ratio" in r]
    print(json.dumps({"bench": "memory_estimate", "cases": results,
                      "within_20_percent": sum(0.8 <= r["ratio"] <= 1.2 for r in ok), "cases_run": len(ok),
                      "loadavg": os.getloadavg()}))


if __name__ == "__main__":
    main()
