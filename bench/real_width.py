"""Real checkpoints at real width: peak memory of load, train and merge-lora, against the estimate.

    python bench/real_width.py --cache /tmp/real-width                 # every case, one JSON line each
    python bench/real_width.py --cache /tmp/real-width --only gemma4_qlora_experts
    python bench/real_width.py --cache /tmp/real-width --merge-only   # merge-lora again on the runs left there

Each model is the published text widths of a real MoE cut to 2 decoder layers, written once
into `--cache` as a hub checkpoint is: random bf16 weights (transformers' own initialisation),
safetensors shards of at most 1 GB and an index file (save_pretrained's layout, so Qwen 3.5's
experts are stored one module per expert and fused at load, as on the hub). The vision tower is
the tiny models' (a few MB): these runs train text.

- qwen3_5_moe: Qwen 3.5 35B-A3B (hidden 2048, 256 experts of width 512 top-8 plus a shared
  expert of 512, Gated DeltaNet 16 key / 32 value heads of 128, full attention 16 / 2 heads of
  256, vocabulary 248,320); layers: one DeltaNet, one full attention. 5.0 GiB on disk.
- gemma4_moe: Gemma 4 26B-A4B (hidden 2816, dense MLP 2112, 16 heads / 8 kv of 256, full
  attention 2 kv of 512 with k == v, 128 experts of width 704 top-8, vocabulary 262,144, window
  1024); layers: one sliding, one full. 4.4 GiB on disk.
- gemma4_moe_1layer: the same widths, one full-attention layer (for the full fine-tune).

Adapters: qlora_experts (QLoRA + expert LoRA, 4-bit experts), lora (fp32 on CPU: the bf16
checkpoint cast while loading), lora_bf16, full_bf16_sgd (a full fine-tune in bf16 with SGD).

Per case, as subprocesses (OMP_NUM_THREADS=2), each one's peak RSS (the kernel's high-water
mark, GNU time's %M, or the process tree sampled every 50 ms when that is larger):
`check --memory --json` (the estimate), a load-only process (`assemble_model(plan, tok, "train")`,
the load peak and `model_bytes`), `train` (sequence_len 256, micro batch 1, 2 steps) and
`merge-lora`. Printed: one JSON line per case with those peaks (GiB), the estimate's fields,
seconds per step and the checkpoint's size. Needs ~18 GiB of free RAM for the largest case; run
one at a time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "quickstart"
GIB = 2**30

# The published text configs' widths (config.json of each model), 2 layers.
MODELS: dict[str, tuple[str, dict]] = {
    "qwen3_5_moe": ("qwen3_5-moe", dict(
        hidden_size=2048, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
        num_attention_heads=16, num_key_value_heads=2, head_dim=256,
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
        shared_expert_intermediate_size=512, vocab_size=248320)),
    "gemma4_moe": ("gemma4-moe", dict(
        hidden_size=2816, intermediate_size=2112, num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"], num_attention_heads=16, num_key_value_heads=8,
        head_dim=256, global_head_dim=512, num_global_key_value_heads=2, attention_k_eq_v=True,
        enable_moe_block=True, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
        vocab_size=262144, vocab_size_per_layer_input=262144, sliding_window=1024)),
}
# Gemma 4 26B-A4B's widths cut to one (full attention) layer: a full fine-tune that fits this machine.
MODELS["gemma4_moe_1layer"] = ("gemma4-moe", {**MODELS["gemma4_moe"][1], "num_hidden_layers": 1,
                                              "layer_types": ["full_attention"]})
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
ADAPTERS: dict[str, dict] = {
    "qlora_experts": {"adapter": "qlora", "load_in_4bit": True, "quantize_moe_experts": True,
                      "lora_target_parameters": EXPERTS},
    "lora": {"adapter": "lora"},
    "lora_bf16": {"adapter": "lora", "bf16": True},
    # every weight but the towers trains; SGD (no optimizer state) keeps it within this machine's RAM
    "full_bf16_sgd": {"bf16": True, "optimizer": "sgd"},
}
CASES = {f"{m}_{a}": (m, a) for m in MODELS for a in ADAPTERS}


def model_config(model: str):
    """The transformers config of `model` (MODELS): the tiny family model's, at the published widths."""
    from archtune.models.tiny import build_tiny_config

    tiny, widths = MODELS[model]
    tiny_config = build_tiny_config(tiny)
    values = tiny_config.to_dict()
    values["text_config"].update(widths)
    values["text_config"].pop("per_layer_config", None)  # derived again from the layer types and widths
    if "out_hidden_size" in values["vision_config"]:  # Qwen's projector maps into the text width
        values["vision_config"]["out_hidden_size"] = widths["hidden_size"]
    return type(tiny_config).from_dict(values)


def build_checkpoint(cache: Path, model: str) -> Path:
    """The truncated real-width checkpoint of `model` in `cache` (written once)."""
    directory = cache / model
    if (directory / "model.safetensors.index.json").is_file():
        return directory
    import torch
    import transformers

    from archtune.assets import load_tokenizer

    config = model_config(model)
    torch.manual_seed(0)
    auto = transformers.AutoModelForImageTextToText
    built = auto.from_config(config, dtype=torch.bfloat16)
    partial = directory.with_name(directory.name + ".partial")
    built.save_pretrained(partial, max_shard_size="1GB")
    load_tokenizer().save_pretrained(partial)
    del built
    partial.rename(directory)
    return directory


def checkpoint_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def case_config(work: Path, name: str, checkpoint: Path, adapter: str) -> Path:
    cfg = {"base_model": str(checkpoint), "datasets": [{"path": str(DATA / "train.jsonl"), "type": "alpaca"}],
           "dataset_prepared_path": str(work / "prepared"), "sample_packing": False, "sequence_len": 256,
           "micro_batch_size": 1, "gradient_accumulation_steps": 1, "max_steps": 2, "optimizer": "adamw_torch",
           "learning_rate": 1e-4,
           **({"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0} if ADAPTERS[adapter].get("adapter") else {}),
           "gradient_checkpointing": True, "use_tensorboard": False, "logging_steps": 1,
           "save_strategy": "no", "output_dir": str(work / name), "freeze_mm_modules": True, **ADAPTERS[adapter]}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


_LOAD_ONLY = """
import json, sys, resource
from archtune.config.load import load_config
from archtune.train.recipe import plan_for
from archtune.train.assembly import assemble_model
from archtune.moe.quant4 import model_bytes
setup = plan_for(load_config(sys.argv[1]))
model = assemble_model(setup.plan, setup.tokenizer, "train").model
print(json.dumps({"model_bytes": model_bytes(model, adapters=False)}))
"""


MERGE = True  # --no-merge: leave merge-lora out
MERGE_ONLY = False  # --merge-only: merge-lora alone where the case's run already left its adapter
SRC = REPO / "src"  # the archtune source the subprocesses run (--src: e.g. another branch's, for a before/after)


def measured(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """(the finished process, its peak RSS in bytes): the larger of the kernel's high-water mark of
    the process (GNU time's %M) and the RSS of the process and its children sampled every 50 ms."""
    import tempfile

    import psutil

    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(SRC)}
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as hwm:
        proc = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", hwm.name, sys.executable, *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            parent = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    tree = parent.children(recursive=True)  # python and what it starts (not time itself)
                    peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree))
                except psutil.Error:
                    pass
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stdout, stderr = proc.communicate()
        done.set()
        sampler.join()
        text = Path(hwm.name).read_text().split()
        kernel = int(text[-1]) * 1024 if text and text[-1].isdigit() else 0
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), max(peak[0], kernel)


def archtune(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    return measured(["-m", "archtune", *args])


def gib(n: float | None) -> float | None:
    return None if n is None else round(n / GIB, 2)


def merge_case(checkpoint: Path, cfg: Path, work: Path, name: str) -> dict:
    merge, merge_peak = archtune("merge-lora", str(cfg), "--out", str(work / name / "merged"))
    if merge.returncode != 0:
        return {"error": "merge-lora: " + merge.stderr[-2000:]}
    return dict(merge_peak_gib=gib(merge_peak), merge_peak_over_checkpoint=round(merge_peak / checkpoint_bytes(checkpoint), 2),
                merge_said=" ".join(merge.stdout.split())[-300:])


def one_case(cache: Path, work: Path, name: str) -> dict:
    model, adapter = CASES[name]
    checkpoint = build_checkpoint(cache, model)
    cfg = case_config(work, name, checkpoint, adapter)
    out: dict = {"case": name, "checkpoint_gib": gib(checkpoint_bytes(checkpoint))}
    if MERGE_ONLY and (work / name / "adapter_model.safetensors").is_file():
        return {**out, **merge_case(checkpoint, cfg, work, name)}
    check, _ = archtune("check", str(cfg), "--memory", "--json")
    if check.returncode != 0:
        return {**out, "error": "check: " + (check.stdout[-1500:] + check.stderr[-1500:])}
    memory = json.loads(check.stdout.strip().splitlines()[-1])["memory"]
    out["estimate_gib"] = gib(memory["peak_bytes"])
    for key in ("load_peak_bytes", "host_peak_bytes", "device_peak_bytes"):  # check --memory's load-time figures
        if key in memory:
            out["estimate_" + key.replace("_bytes", "_gib")] = gib(memory[key])
    load, load_peak = measured(["-c", _LOAD_ONLY, str(cfg)])
    if load.returncode != 0:
        return {**out, "error": "load: " + load.stderr[-2000:]}
    out["load_peak_gib"] = gib(load_peak)
    out["model_bytes_gib"] = gib(json.loads(load.stdout.strip().splitlines()[-1])["model_bytes"])
    train, train_peak = archtune("train", str(cfg))
    if train.returncode != 0:
        return {**out, "error": "train: " + train.stderr[-2000:]}
    summary = json.loads((work / name / "train_summary.json").read_text())
    out.update(train_peak_gib=gib(train_peak), train_peak_over_model_bytes=round(train_peak / summary["model_bytes"], 2),
               estimate_over_train_peak=round(memory["peak_bytes"] / train_peak, 2),
               # what the estimate counts: the peak beyond the process before the model (Python, torch, data)
               train_peak_beyond_baseline_gib=gib(train_peak - summary["rss_before_model_mb"] * 2**20),
               host_estimate_over_that=round(memory.get("host_peak_bytes", memory["peak_bytes"])
                                             / (train_peak - summary["rss_before_model_mb"] * 2**20), 2),
               seconds_per_step=summary["seconds_per_step"], train_losses=summary["train_losses"])
    if not MERGE:
        return out
    return {**out, **merge_case(checkpoint, cfg, work, name)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True, help="where the checkpoints are written (once)")
    parser.add_argument("--work", type=Path, default=None, help="configs and run outputs (default: CACHE/runs)")
    parser.add_argument("--only", action="append", choices=sorted(CASES))
    parser.add_argument("--build-only", action="store_true", help="write the checkpoints and stop")
    parser.add_argument("--src", type=Path, default=None, help="the archtune source to measure (default: this checkout's src)")
    parser.add_argument("--no-merge", action="store_true", help="measure check, load and train only")
    parser.add_argument("--merge-only", action="store_true",
                        help="measure merge-lora alone where --work holds the case's trained adapter")
    args = parser.parse_args()
    global SRC, MERGE, MERGE_ONLY
    SRC = args.src or SRC
    MERGE = not args.no_merge
    MERGE_ONLY = args.merge_only
    args.cache.mkdir(parents=True, exist_ok=True)
    names = args.only or list(CASES)
    if args.build_only:
        for model in dict.fromkeys(CASES[n][0] for n in names):
            build_checkpoint(args.cache, model)
        return
    work = args.work or args.cache / "runs"
    work.mkdir(parents=True, exist_ok=True)
    for name in names:
        print(json.dumps({**one_case(args.cache, work, name), "src": str(SRC)}), flush=True)


if __name__ == "__main__":
    main()
