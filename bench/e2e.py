"""archtune against the stock baseline a user would write: transformers' Trainer + PEFT.

    python bench/e2e.py                        # quickstart rows, 2 rounds; ONE JSON line
    python bench/e2e.py --data long --rounds 3 # 100-400 token rows (bench/long_rows.py)

Both sides train the same tiny gemma4-moe (written to disk by `archtune init-tiny`) on the same
tokenized rows (archtune's alpaca template and masking) for one epoch with the same settings:
LoRA r16 / alpha 32 on the language model's attention and MLP projections plus expert LoRA
(`experts.gate_up_proj`, `experts.down_proj`), micro batch 4, AdamW 2e-4, cosine with 3 warmup
steps, non-reentrant gradient checkpointing, fp32, seed 42.

* stock: `AutoModelForImageTextToText` + `peft.get_peft_model` + `transformers.Trainer`, rows
  padded per batch (`DataCollatorForSeq2Seq`), default experts implementation and attention;
* archtune: `archtune train` with sample packing at 512 (its defaults otherwise).

Each side runs in its own process (rounds interleaved, the order alternating). Reported per
side: real (non-padding) tokens per second of the training loop (the loop only: not loading or
tokenizing) and the process's peak RSS, plus the ratios. The machine may be shared: ratios from
the same round are what to compare; `rounds` lists each round's figures for the spread.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_MODULES = r"model.language_model.layers.[\d]+.(mlp|self_attn).(up|down|gate|q|k|v|o)_proj"
CONFIG = """base_model: {model}
datasets:
  - path: {data}
    type: alpaca
dataset_prepared_path: {work}/prepared
val_set_size: 0
output_dir: {work}/out
adapter: lora
lora_r: 16
lora_alpha: 32
lora_dropout: 0
lora_target_modules: '{targets}'
lora_target_parameters:
  - experts.gate_up_proj
  - experts.down_proj
sequence_len: 512
sample_packing: {packing}
micro_batch_size: 4
num_epochs: 1
learning_rate: 2e-4
optimizer: adamw_torch
lr_scheduler: cosine
warmup_steps: 3
weight_decay: 0.0
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
logging_steps: 1
seed: 42
"""


def stock_worker(config_path: str, out_path: str) -> None:
    """The stock loop (run in its own process): Trainer + PEFT on archtune's tokenized rows."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForImageTextToText, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                              TrainingArguments)

    from archtune.config import load_config
    from archtune.data import prepare_data
    from archtune.models.load import load_tokenizer, resolve_plan, set_chat_template

    cfg = load_config(config_path)
    plan = resolve_plan(cfg)
    tokenizer = set_chat_template(load_tokenizer(cfg), plan)
    rows = prepare_data(plan, tokenizer, progress=False).train  # unpacked (sample_packing: false)
    rows = rows.select_columns(["input_ids", "labels"])
    model = AutoModelForImageTextToText.from_pretrained(cfg.base_model, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGET_MODULES,
        target_parameters=["experts.gate_up_proj", "experts.down_proj"]))

    clock = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["start"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            clock["seconds"] = time.perf_counter() - clock["start"]

    args = TrainingArguments(
        output_dir=str(Path(out_path).parent / "stock-out"), per_device_train_batch_size=4, num_train_epochs=1,
        learning_rate=2e-4, optim="adamw_torch", lr_scheduler_type="cosine", warmup_steps=3, weight_decay=0.0,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=1,
        save_strategy="no", report_to=[], seed=42, data_seed=42, use_cpu=True, remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding", dataloader_num_workers=0, disable_tqdm=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokenizer.pad_token_id = pad
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[Clock()],
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    trainer.train()
    tokens = int(trainer.state.num_input_tokens_seen)
    Path(out_path).write_text(json.dumps({"train_seconds": clock["seconds"], "train_tokens": tokens,
                                          "steps": trainer.state.global_step}))


def _measured(cmd: list[str], env: dict, work: Path) -> float:
    """Run under GNU time for the peak RSS (MiB) of that process alone."""
    timefile = work / "time.txt"
    proc = subprocess.run(["/usr/bin/time", "-v", "-o", str(timefile), *cmd], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    for line in timefile.read_text().splitlines():
        if "Maximum resident set size" in line:
            return int(line.rsplit(":", 1)[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="quickstart", help="quickstart, long, or a JSONL file of alpaca rows")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stock-worker", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stock_worker:
        stock_worker(*args.stock_worker)
        return {}

    work = Path(tempfile.mkdtemp(prefix="archtune-e2e-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the same OpenMP setting on both sides (archtune sets it)
    archtune = [sys.executable, "-m", "archtune"]
    model = work / "tiny-gemma4-moe"
    subprocess.run([*archtune, "init-tiny", "gemma4-moe", str(model)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if args.data == "quickstart":
        data = ROOT / "examples/data/quickstart/train.jsonl"
    elif args.data == "long":
        data = work / "long.jsonl"
        subprocess.run([sys.executable, str(ROOT / "bench/long_rows.py"), str(data)], env=env, check=True)
    else:
        data = Path(args.data).resolve()
    configs = {}
    for side, packing in (("archtune", "true"), ("stock", "false")):
        (work / side).mkdir()
        configs[side] = work / side / "config.yaml"
        configs[side].write_text(CONFIG.format(model=model, data=data, work=work / side, packing=packing,
                                               targets=TARGET_MODULES.replace(r"layers.[\d]+.", r"layers.[\d]+.(_checkpoint_wrapped_module.)?")))
    rounds = []
    started = time.perf_counter()
    for r in range(args.rounds):
        figures = {}
        order = ("archtune", "stock") if r % 2 == 0 else ("stock", "archtune")
        for side in order:
            if side == "archtune":
                rss = _measured([*archtune, "train", str(configs[side])], env, work)
                s = json.loads((work / side / "out" / "train_summary.json").read_text())
            else:
                out = work / side / "result.json"
                rss = _measured([sys.executable, __file__, "--stock-worker", str(configs[side]), str(out)], env, work)
                s = json.loads(out.read_text())
            figures[side] = {"tokens_per_second": round(s["train_tokens"] / s["train_seconds"], 1),
                             "train_seconds": round(s["train_seconds"], 2), "steps": s["steps"],
                             "train_tokens": s["train_tokens"], "peak_rss_mb": round(rss, 1)}
        figures["speedup"] = round(figures["archtune"]["tokens_per_second"] / figures["stock"]["tokens_per_second"], 3)
        figures["rss_ratio"] = round(figures["archtune"]["peak_rss_mb"] / figures["stock"]["peak_rss_mb"], 3)
        rounds.append(figures)
    speedups = [r["speedup"] for r in rounds]
    result = {
        "bench": "e2e_vs_trainer_peft", "data": args.data, "model": "tiny:gemma4-moe",
        "settings": "LoRA r16 (+ expert LoRA), micro batch 4, gradient checkpointing, fp32, 1 epoch",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_avg_1m": round(os.getloadavg()[0], 2),
        "tokens_per_second": {side: statistics.median(r[side]["tokens_per_second"] for r in rounds)
                              for side in ("archtune", "stock")},
        "peak_rss_mb": {side: statistics.median(r[side]["peak_rss_mb"] for r in rounds) for side in ("archtune", "stock")},
        "speedup_median": statistics.median(speedups), "speedup_range": [min(speedups), max(speedups)],
        "rss_ratio_median": statistics.median(r["rss_ratio"] for r in rounds),
        "rounds": rounds, "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
