#!/usr/bin/env bash
# archtune's checks on a CUDA machine, as one script with a time budget (bf16 unless noted):
#   1. `archtune train`: tiny gemma4-moe, LoRA r16 on attention/MLP + expert LoRA, packing at 512,
#      gradient checkpointing -- experts implementation by the plan's rule, then use_scattermoe,
#      then the same run in fp32 (bf16's losses must track fp32's);
#   2. FSDP2 (fully_shard over NCCL) on one GPU against the unsharded model (bench/gpu.py fsdp);
#   3. experts implementations at bench/moe.py's sweep shapes (bench/gpu.py moe);
#   4. exact document attention over packed rows (bench/gpu.py attention);
#   5. the packing and training tests, if time is left.
# Usage, from the project root: OUT=DIR BUDGET_S=420 bash bench/gpu_check.sh
# Results (8 files): DIR/train.jsonl, DIR/*.out (JSON lines of bench/gpu.py; the train runs' and
# the tests' output), DIR/check_bf16_rule.json and DIR/log.txt.
#
# WHAT=triton: the Triton experts kernels (experts_implementation scattermoe_triton) only, about
# 10 minutes on an H100 (needs the triton extra):
#   a. bench/moe_train_loop.py: bf16 LoRA + expert LoRA train loop on the 2-layer real-width Gemma 4
#      26B-A4B and Qwen 3.5 35B-A3B, grouped_mm vs scattermoe_triton side by side in one process:
#      tokens/s, peak memory, and the two's loss and gradients from the same weights (bf16, fp32);
#   b. bench/gpu.py moe: every cell of bench/moe.py's sweep, fp32 and bf16, with and without expert
#      LoRA: scattermoe_triton against grouped_mm and batched_mm (CUDA events, median of 5).
#   OUT=DIR WHAT=triton BUDGET_S=570 bash bench/gpu_check.sh   -> DIR/trainloop.out, DIR/moetriton.out
#   SMOKE=1 runs the same commands on CPU at tiny sizes under TRITON_INTERPRET=1 (tries the script).
set -u
OUT="${OUT:-/tmp/archtune-gpu}"
BUDGET_S="${BUDGET_S:-420}"
WORK="${WORK:-/tmp/archtune-gpu-work}"
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
LOG="$OUT/log.txt"
say() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET_S - SECONDS )); }
# run CAP_S NAME CMD...: at most CAP_S seconds (less when the budget is nearly spent)
run() {
  local cap=$1 name=$2; shift 2
  local t=$(( cap < $(left) ? cap : $(left) ))
  if [ "$t" -lt 15 ]; then say "skip $name (budget spent)"; return; fi
  say "start $name (cap ${t}s)"
  timeout --signal=INT --kill-after=10 "$t" "$@" >>"$OUT/${name%%_*}.out" 2>>"$LOG"
  say "end $name rc=$?"
}

say "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
python3 -c 'import torch, transformers, peft, accelerate, trl; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__, "trl", trl.__version__)' 2>&1 | tee -a "$LOG"

# ---- the Triton experts kernels (WHAT=triton)
if [ "${WHAT:-all}" = triton ]; then
  python3 -c 'import triton; print("triton", triton.__version__)' 2>&1 | tee -a "$LOG"
  if [ -n "${SMOKE:-}" ]; then
    export TRITON_INTERPRET=1
    LOOP_ARGS="--tiny --cpu-smoke --models gemma4_moe --seq 16 --steps 1 --rounds 1"
    SWEEP_ARGS="--cpu-smoke --quick --reps 1 --dtypes bfloat16"
  else
    LOOP_ARGS="--batch 2 --seq 2048 --steps 4 --rounds 2"
    SWEEP_ARGS="--reps 5"
  fi
  run 300 trainloop python3 bench/moe_train_loop.py --impls grouped_mm,scattermoe_triton $LOOP_ARGS
  run 600 moetriton python3 bench/gpu.py moe --impls grouped_mm,batched_mm,scattermoe_triton $SWEEP_ARGS
  say "done"
  exit 0
fi

# ---- 1. train
train_config() {  # NAME EXTRA-YAML
  cat >"$WORK/$1.yaml" <<EOF
base_model: tiny:gemma4-moe
datasets:
  - path: $PWD/examples/data/quickstart/train.jsonl
    type: alpaca
dataset_prepared_path: $WORK/prepared
val_set_size: 0
output_dir: $WORK/$1
adapter: lora
lora_r: 16
lora_alpha: 32
lora_dropout: 0
lora_target_modules: 'model.language_model.layers.[\d]+.(_checkpoint_wrapped_module.)?(mlp|self_attn).(up|down|gate|q|k|v|o)_proj'
lora_target_parameters:
  - experts.gate_up_proj
  - experts.down_proj
sequence_len: 512
sample_packing: true
micro_batch_size: 4
num_epochs: 1
learning_rate: 2e-4
lr_scheduler: cosine
warmup_steps: 3
gradient_checkpointing: true
logging_steps: 1
seed: 42
$2
EOF
}
summarize() {  # NAME: one JSON line from train_summary.json and the plan
  python3 - "$WORK/$1" "$1" >>"$OUT/train.jsonl" 2>>"$LOG" <<'PY'
import json, sys
from pathlib import Path
out, name = Path(sys.argv[1]), sys.argv[2]
s = json.loads((out / "train_summary.json").read_text())
keep = {k: s[k] for k in s if not isinstance(s[k], (dict, list)) or k in ("losses", "loss_history")}
print(json.dumps({"check": "train", "run": name, **keep}))
PY
}
train_config bf16_rule "bf16: true"
train_config bf16_scattermoe $'bf16: true\nuse_kernels: true\nuse_scattermoe: true'
train_config fp32 "bf16: false"
for name in bf16_rule bf16_scattermoe fp32; do
  run 70 "train_$name" python3 -m archtune train "$WORK/$name.yaml" && summarize "$name"
done
python3 -m archtune check "$WORK/bf16_rule.yaml" --json >"$OUT/check_bf16_rule.json" 2>>"$LOG"

# ---- 2. FSDP2 on one GPU
run 60 fsdp torchrun --nproc_per_node 1 bench/gpu.py fsdp --steps 5

# ---- 3 and 4. kernels
run 150 moe python3 bench/gpu.py moe --reps 5
run 100 attention python3 bench/gpu.py attention --reps 5

# ---- 5. tests (CUDA visible: the CLI tests train on the GPU); SKIP_TESTS=1 leaves them out
[ -n "${SKIP_TESTS:-}" ] || run 120 tests python3 -m pytest -q -p no:cacheprovider -n 8 --timeout 100 \
  tests/unit/test_packing_exact.py tests/e2e/test_packing_cli.py tests/e2e/test_train_cli.py
say "done"
