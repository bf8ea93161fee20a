"""archtune and Axolotl side by side: one Axolotl config, run as written by both trainers.

    python bench/axolotl_side_by_side.py --peer-venv /tmp/peer-axolotl          # quickstart rows
    python bench/axolotl_side_by_side.py --peer-venv /tmp/peer-axolotl --data long --rounds 2

The config (bench/e2e.py's run plus AXOLOTL_KEYS below) is an Axolotl config for one epoch of alpaca rows on the tiny
gemma4-moe (written to disk by `archtune init-tiny`): LoRA r16 on the language model's attention
and MLP projections plus expert LoRA (`lora_target_parameters`), sample packing at 512, micro
batch 4, AdamW 2e-4, cosine with 3 warmup steps, non-reentrant gradient checkpointing, fp32,
seed 42. Three of its keys exist only so that Axolotl runs on a CPU at all: `processor_type:
AutoTokenizer` (gemma4 counts as multimodal there, and its processor needs torchvision), the
`lora_*_kernel: false` keys (Axolotl's fused LoRA kernels allocate on CUDA), and `--launcher
python` on its command line. archtune reads the same file unchanged.

The peer is Axolotl installed in its own virtual environment (`--peer-venv`, made on first use:
Axolotl >= 0.20 declares Python >= 3.12 but runs on 3.11, so it is installed with
`--ignore-requires-python`, CPU torch 2.13.0 pinned and numpy below 2.5). Each run is its own
process, the order alternating by round. Reported per run: the training loop's seconds (Axolotl's
`train_runtime`, archtune's `train_seconds`: the loop only, not loading or tokenizing), steps,
first and last loss, and the process's peak RSS; per round the ratio of loop seconds (Axolotl's
over archtune's: above 1 means archtune is faster). The machine may be shared: compare ratios
from the same round. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from e2e import CONFIG as RUN, TARGET_MODULES  # noqa: E402  (the same run as bench/e2e.py)

# What Axolotl needs on a CPU, and its spelling of settings archtune picks itself.
AXOLOTL_KEYS = """tokenizer_config: {model}
processor_type: AutoTokenizer
freeze_mm_modules: true
lora_mlp_kernel: false
lora_qkv_kernel: false
lora_o_kernel: false
lora_embedding_kernel: false
attn_implementation: sdpa
pad_to_sequence_len: true
gradient_accumulation_steps: 1
bf16: false
fp16: false
tf32: false
save_strategy: "no"
dataloader_num_workers: 0
dataloader_pin_memory: false
use_wandb: false
"""
TARGETS = TARGET_MODULES.replace(r"layers.[\d]+.", r"layers.[\d]+.(_checkpoint_wrapped_module.)?")


def config_text(model: Path, data: Path, work: Path) -> str:
    return (RUN.format(model=model, data=data, work=work, packing="true", targets=TARGETS)
            + AXOLOTL_KEYS.format(model=model))


def install_peer(venv: Path, version: str) -> None:
    print(f"installing axolotl {version} into {venv} (a few minutes) ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text("torch==2.13.0\nnumpy<2.5\n")
    subprocess.run([*pip, "--ignore-requires-python", "--only-binary=numpy,scipy,pandas",
                    f"axolotl=={version}", "-c", str(constraints)], check=True)


def measured(cmd: list[str], env: dict, cwd: Path, log: Path) -> float:
    """Run `cmd` (output to `log`) and return its peak RSS in MiB (this process tree's largest)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}; last lines of {log}:\n{tail}")
    return usage.ru_maxrss / 1024  # kilobytes on Linux


def axolotl_figures(log: Path) -> dict:
    text = log.read_text(errors="replace").replace("\r", "\n")
    steps = [ast.literal_eval(m) for m in re.findall(r"\{'loss': [^{}]*\}", text)]
    final = [ast.literal_eval(m) for m in re.findall(r"\{'train_runtime': [^{}]*\}", text)]
    if not steps or not final:
        raise SystemExit(f"no training log lines in {log}")
    return {"train_seconds": float(final[-1]["train_runtime"]), "steps": len(steps),
            "loss_first": float(steps[0]["loss"]), "loss_last": float(steps[-1]["loss"])}


def archtune_figures(out_dir: Path) -> dict:
    s = json.loads((out_dir / "train_summary.json").read_text())
    return {"train_seconds": s["train_seconds"], "steps": s["steps"],
            "loss_first": s["train_loss_first"], "loss_last": s["train_loss_last"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-venv", type=Path, required=True, help="Axolotl's virtual environment (made when missing)")
    parser.add_argument("--axolotl-version", default="0.21.0")
    parser.add_argument("--data", default="quickstart", help="quickstart, long (bench/long_rows.py), or a JSONL file of alpaca rows")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    axolotl = args.peer_venv / "bin" / "axolotl"
    if not axolotl.exists():
        install_peer(args.peer_venv, args.axolotl_version)
    work = Path(tempfile.mkdtemp(prefix="archtune-vs-axolotl-"))
    threads = os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "DO_NOT_TRACK": "1", "AXOLOTL_DO_NOT_TRACK": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the same OpenMP setting on both sides (archtune's choice on a shared machine)
    archtune = [sys.executable, "-m", "archtune"]
    archtune_env = {**env, "PYTHONPATH": str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")}
    peer_env = {**env, "PATH": f"{args.peer_venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"}
    peer_env.pop("PYTHONPATH", None)
    model = work / "tiny-gemma4-moe"
    subprocess.run([*archtune, "init-tiny", "gemma4-moe", str(model)], env=archtune_env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if args.data == "quickstart":
        data = ROOT / "examples/data/quickstart/train.jsonl"
    elif args.data == "long":
        data = work / "long.jsonl"
        subprocess.run([sys.executable, str(ROOT / "bench/long_rows.py"), str(data)], check=True)
    else:
        data = Path(args.data).resolve()

    commands = {"axolotl": [str(axolotl), "train", "{config}", "--launcher", "python"],
                "archtune": [*archtune, "train", "{config}"]}
    rounds = []
    started = time.perf_counter()
    for r in range(args.rounds):
        figures = {}
        for side in (("axolotl", "archtune") if r % 2 == 0 else ("archtune", "axolotl")):
            side_work = work / f"{side}-{r}"
            side_work.mkdir()
            config = side_work / "config.yaml"
            config.write_text(config_text(model, data, side_work))
            cmd = [part.format(config=config) for part in commands[side]]
            rss = measured(cmd, peer_env if side == "axolotl" else archtune_env, side_work, side_work / "log.txt")
            got = axolotl_figures(side_work / "log.txt") if side == "axolotl" else archtune_figures(side_work / "out")
            figures[side] = {**{k: round(v, 4) if isinstance(v, float) else v for k, v in got.items()},
                             "peak_rss_mb": round(rss, 1)}
        figures["loop_speedup"] = round(figures["axolotl"]["train_seconds"] / figures["archtune"]["train_seconds"], 3)
        figures["rss_ratio"] = round(figures["archtune"]["peak_rss_mb"] / figures["axolotl"]["peak_rss_mb"], 3)
        rounds.append(figures)
        print(json.dumps({"round": r + 1, **figures}), file=sys.stderr)
    speedups = [r["loop_speedup"] for r in rounds]
    result = {"bench": "archtune_vs_axolotl", "axolotl": args.axolotl_version, "data": args.data,
              "model": "tiny:gemma4-moe", "omp_num_threads": threads, "load_avg_1m": round(os.getloadavg()[0], 2),
              "loop_speedup_median": statistics.median(speedups), "loop_speedup_range": [min(speedups), max(speedups)],
              "rounds": rounds, "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
