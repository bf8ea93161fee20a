"""Peak RSS of each rank while FSDP2, DDP and one process load and train a wide checkpoint.

    python bench/fsdp_load.py --cache /tmp/fsdp-load                # every case, one JSON line each
    python bench/fsdp_load.py --cache /tmp/fsdp-load --only fsdp_own_shards --only fsdp_whole_model

The checkpoint (written once into `--cache`): tiny:llama's config made wide (hidden 1024, MLP
4096, 6 layers, vocabulary 32,000, untied embeddings: 166 M parameters), random fp32 weights,
safetensors shards of at most 100 MB and an index, as hub checkpoints are. Each case trains it
(LoRA r 8 on every linear, sequence_len 64, micro batch 1, 2 SGD steps) as a subprocess tree
(OMP_NUM_THREADS=1 per rank) whose processes are sampled every 20 ms; a rank's peak is the
kernel's high-water mark of its process (VmHWM), the last value read before it exits.

- fsdp_own_shards: `archtune train --nproc 2` with FSDP2 and the default loading (each rank
  reads only its own rows of the checkpoint: fsdp_config.fsdp_cpu_ram_efficient_loading true)
- fsdp_whole_model: the same with fsdp_cpu_ram_efficient_loading false (each rank loads the
  whole model, then shards it)
- ddp: `--nproc 2` without FSDP (each rank holds a full replica by definition)
- single: one process
- ddp_bf16, single_bf16: the same in bf16 (each fp32 checkpoint tensor cast while loading)

Printed per case: each rank's peak once the model is loaded (and sharded), before any step
(train_summary.json's `rank_load_peak_rss_mb`), each rank's peak over the whole run (GiB), the weights' size (train_summary.json's model_bytes),
rank 0's RSS before the model (Python, torch, data: `rss_before_model_mb`) and the peak beyond
it, and the losses (equal between the FSDP2 cases).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "quickstart"
GIB = 2**30
WIDE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=6, num_attention_heads=16,
            num_key_value_heads=16, head_dim=64, vocab_size=32000, tie_word_embeddings=False)
FSDP = {"fsdp": ["full_shard", "auto_wrap"]}
CASES: dict[str, tuple[int, dict]] = {
    "fsdp_own_shards": (2, FSDP),
    "fsdp_whole_model": (2, {**FSDP, "fsdp_config": {"fsdp_cpu_ram_efficient_loading": False}}),
    "ddp": (2, {}),
    "single": (1, {}),
    # the fp32 checkpoint loaded in bf16: every tensor cast while loading
    "ddp_bf16": (2, {"bf16": True}),
    "single_bf16": (1, {"bf16": True}),
}


def build_checkpoint(cache: Path) -> Path:
    directory = cache / "wide_llama"
    if (directory / "model.safetensors.index.json").is_file():
        return directory
    import torch
    import transformers

    from archtune.assets import load_tokenizer
    from archtune.models.tiny import build_tiny_config

    config = build_tiny_config("llama")
    for key, value in WIDE.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    partial = directory.with_name(directory.name + ".partial")
    model.save_pretrained(partial, max_shard_size="100MB")
    load_tokenizer().save_pretrained(partial)
    partial.rename(directory)
    return directory


def case_config(work: Path, name: str, checkpoint: Path, keys: dict) -> Path:
    cfg = {"base_model": str(checkpoint), "datasets": [{"path": str(DATA / "train.jsonl"), "type": "alpaca"}],
           "dataset_prepared_path": str(work / "prepared"), "sequence_len": 64, "micro_batch_size": 1,
           "max_steps": 2, "optimizer": "sgd", "learning_rate": 0.1, "adapter": "lora", "lora_r": 8,
           "lora_alpha": 16, "lora_dropout": 0.0, "logging_steps": 1, "save_strategy": "no",
           "use_tensorboard": False, "seed": 7, "output_dir": str(work / name), "bf16": False, **keys}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_tree(args: list[str], src: Path) -> tuple[subprocess.CompletedProcess, dict[int, int]]:
    """(the finished process, {pid: peak RSS} of every process of its tree)."""
    import tempfile

    import psutil

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(src)}
    peaks: dict[int, int] = {}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=err, text=True, env=env)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:  # each process's high-water mark, read until it is gone
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                tree = []
            for p in tree:
                try:
                    peaks[p.pid] = max(peaks.get(p.pid, 0), _hwm(p.pid))
                except OSError:
                    pass
            time.sleep(0.02)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read()), peaks


def gib(n: float) -> float:
    return round(n / GIB, 3)


def one_case(cache: Path, work: Path, name: str, src: Path) -> dict:
    nproc, keys = CASES[name]
    checkpoint = build_checkpoint(cache)
    cfg = case_config(work, name, checkpoint, keys)
    shutil.rmtree(work / name, ignore_errors=True)  # a finished run there would be refused
    run, peaks = run_tree(["-m", "archtune", "train", str(cfg), "--nproc", str(nproc)], src)
    if run.returncode != 0:
        return {"case": name, "error": run.stderr[-2000:]}
    summary = json.loads((work / name / "train_summary.json").read_text())
    ranks = sorted(peaks.values(), reverse=True)[:nproc]  # the workers hold the model: the largest
    baseline = summary["rss_before_model_mb"] * 2**20
    return {"case": name, "rank_load_peaks_gib": [gib(m * 2**20) for m in summary["rank_load_peak_rss_mb"]],
            "rank_peaks_gib": [gib(p) for p in ranks], "model_bytes_gib": gib(summary["model_bytes"]),
            "rss_before_model_gib": gib(baseline), "peak_beyond_baseline_gib": gib(ranks[0] - baseline),
            "beyond_baseline_over_model_bytes": round((ranks[0] - baseline) / summary["model_bytes"], 2),
            "load_beyond_baseline_over_model_bytes": round(
                (max(summary["rank_load_peak_rss_mb"]) * 2**20 - baseline) / summary["model_bytes"], 2),
            "strategy": summary.get("strategy"), "loaded_own_shards": summary.get("loaded_own_shards"),
            "train_losses": summary["train_losses"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True, help="where the checkpoint is written (once)")
    parser.add_argument("--only", action="append", choices=sorted(CASES))
    parser.add_argument("--src", type=Path, default=REPO / "src", help="the archtune source to measure")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    work = args.cache / "runs"
    work.mkdir(parents=True, exist_ok=True)
    for name in args.only or list(CASES):
        print(json.dumps({**one_case(args.cache, work, name, args.src), "src": str(args.src)}), flush=True)


if __name__ == "__main__":
    main()
