"""The experts implementations a config may name (EXPERTS, the one registry idiom), and which one
`use_scattermoe` runs, by a rule on the shapes (no timing run).

    EXPERTS["grouped_mm"]      # ExpertsImplementation(name, doc, forward)
    EXPERTS["grouped"]         # KeyError: no experts implementation 'grouped'; known: eager, ... (add one in ...)

transformers' own implementations (eager, grouped_mm, batched_mm) and archtune's scattermoe are
registered below, each once; any other name transformers' registry holds when the registry is
first read (e.g. deepgemm, sonicmoe) is discovered then. The plan checks names here without
importing the implementations; archtune's own register with transformers when the model uses them
(archtune.moe).

    choose_experts_implementation(num_experts=128, top_k=8, hidden=2048, intermediate=512,
                                  tokens=4096, expert_lora=True, dtype="bfloat16")
    -> Choice("scattermoe", "128 experts of 2048x512, top-8, ...: keeping the expert LoRA factored ...")

The choice is a rule on the shapes, the dtype and the device, calibrated by the benchmark
(`python bench/moe.py --sweep` on CPU, `python bench/gpu.py moe` on CUDA): nothing is timed at
start. The measured tables and the rule's choice at each cell are in docs/experts_sweep.md.

On CPU scattermoe and transformers' grouped_mm run the same per-expert GEMMs (scattermoe
either loops over the experts in Python, fusing gather, gate and scatter per expert, or runs
each product for all experts with torch's grouped GEMM: archtune.moe.scattermoe picks). They
differ in three costs:

* scattermoe pays a fixed cost per expert and step, which only enough work per expert hides;
  transformers' grouped_mm path pays per (token, expert) pair (sorting, gathering and
  scattering hidden-size rows);
* with PEFT expert LoRA, the stock implementations run on W + BA, which PEFT materialises
  for every expert on every forward (and checkpoint recompute): E x (3 x hidden x intermediate)
  weights written and read again. scattermoe keeps the factors apart and never builds W + BA;
* in bf16 each per-expert product is a oneDNN call whose kernel is compiled per shape and kept
  in a cache of 1,024 kernels. With expert LoRA, scattermoe's products per expert times the
  distinct per-expert row counts overflow it beyond 64 experts with many pairs each, and kernels
  are recompiled every step.

Measured on CPU (bench/moe.py --sweep: experts 8-128, top-k 2-8, tokens 256-8,192, hidden
256-2,048 with intermediate = hidden / 4, with and without expert LoRA, fp32 and bf16; thread
CPU time, forward + backward), the rule, first match wins:

* bf16, expert LoRA, more than 64 experts, >= 64 (token, expert) pairs per expert (tokens x
  top-k / experts) and experts under 2^20 weights: grouped_mm (scattermoe 0.32-0.56x, the
  oneDNN kernel cache);
* expert LoRA: scattermoe, 1.02-8.9x faster than the best stock implementation (5-9x where
  hidden x intermediate >= 2^20);
* bf16: scattermoe, 1.01-2.0x;
* fp32 with >= 64 pairs per expert: scattermoe, 1.02-1.9x;
* fp32 with >= 16 pairs per expert and at most 4 MiB of gate/up activations (pairs x 2 x
  intermediate x 4 bytes), where scattermoe runs its grouped products: scattermoe, 1.07-1.11x;
* else (fp32, 4-16 pairs per expert) grouped_mm: scattermoe 0.80-1.03x.

In two passes of the sweep (60 cells each) the rule picked the fastest implementation, or one
within 3% of it, at every cell.

On CUDA (bench/gpu.py moe on an H200, CUDA-event time) scattermoe lost at every cell
(0.02-0.93x), so the rule picks a stock implementation there: batched_mm where its per-pair
copy of the expert weights (pairs x hidden x 3 x intermediate) is at most 512 MiB, where it
measured up to 7x faster than grouped_mm at 256 tokens of hidden 256; grouped_mm elsewhere.
Those CUDA rows timed scattermoe's per-expert loop; its grouped strategy, now the CUDA default,
is not measured there yet.

`scattermoe_triton` (archtune.moe.triton_experts: Triton grouped GEMMs, exact against eager under
Triton's interpreter on CPU) is chosen only by name: it has no GPU measurement yet, so the rule
never picks it (`bash bench/gpu_check.sh` measures it against grouped_mm and batched_mm).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from archtune.registry import Registry

# Thresholds of the rule (see the module docstring), calibrated on bench/moe.py --sweep (CPU) and
# bench/gpu.py moe (CUDA).
FEW_PAIRS = 64  # (token, expert) pairs per expert and micro-batch: from here scattermoe measured faster in fp32
LARGE_EXPERT = 1 << 20  # hidden x intermediate: with expert LoRA, W + BA outweighs even the bf16 cache overflow
BF16_LORA_MAX_EXPERTS = 64  # bf16 + expert LoRA: more experts overflow oneDNN's 1,024-kernel cache
BATCHED_MM_COPY_BYTES = 1 << 29  # CUDA: batched_mm's per-pair weight copy up to this size
# fp32 gate/up activations (pairs x 2 x intermediate x 4 bytes) up to which scattermoe runs its grouped
# products on CPU (archtune.moe.scattermoe.CPU_FP32_GROUPED_MAX_BYTES, the same measured boundary; a test
# keeps them equal): there scattermoe measured faster from 16 pairs per expert.
GROUPED_FP32_MAX_BYTES = 4 << 20
GROUPED_PAIRS = 16
STOCK = "grouped_mm"
SCATTERMOE = "scattermoe"
SCATTERMOE_TRITON = "scattermoe_triton"
BATCHED = "batched_mm"


@dataclass(frozen=True)
class ExpertsImplementation:
    name: str
    doc: str
    # Where archtune's own forward lives ("module:function"), registered with transformers'
    # ALL_EXPERTS_FUNCTIONS when a model uses it; "" for transformers' own implementations.
    forward: str = ""
    discovered: bool = False  # found in transformers' registry, not registered here


def _discover() -> None:
    """transformers' registered implementations not registered here (read once, on first use)."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:  # pragma: no cover - older transformers
        return
    for name in ALL_EXPERTS_FUNCTIONS.keys():
        if name not in EXPERTS:
            EXPERTS.register(name, ExpertsImplementation(name, "registered in transformers' ALL_EXPERTS_FUNCTIONS",
                                                         discovered=True))


EXPERTS: Registry[ExpertsImplementation] = Registry("experts implementation", "src/archtune/plan/experts.py",
                                                    discover=_discover)


def register_experts_implementation(impl: ExpertsImplementation) -> ExpertsImplementation:
    return EXPERTS.register(impl.name, impl)


register_experts_implementation(ExpertsImplementation(
    "eager", "the experts module's own forward: a Python loop over the experts (transformers)"))
register_experts_implementation(ExpertsImplementation(
    STOCK, "torch's grouped GEMM over the experts' token groups (transformers' default)"))
register_experts_implementation(ExpertsImplementation(
    "batched_mm", "one batched matmul over gathered expert weights per token (transformers)"))
register_experts_implementation(ExpertsImplementation(
    SCATTERMOE, "archtune's ScatterMoE: tokens sorted by expert, gather-GEMM-scatter per expert, expert LoRA kept "
                "factored (run through the kernels plugin)",
    forward="archtune.moe.scattermoe:scattermoe_experts_forward"))
register_experts_implementation(ExpertsImplementation(
    SCATTERMOE_TRITON, "archtune's ScatterMoE on Triton kernels: two grouped GEMMs over the expert-sorted pairs, "
                       "permute and unpermute fused into them, expert LoRA kept factored, 4-bit experts dequantized "
                       "per tile; a CUDA device, or CPU under TRITON_INTERPRET=1 (the optional triton extra); "
                       "chosen only by name until it is measured on a GPU",
    forward="archtune.moe.triton_experts:triton_experts_forward"))


TRITON_INTERPRET_ENV = "TRITON_INTERPRET"


def triton_unavailable(cuda: bool) -> tuple[str, str] | None:
    """(message, fix) when `scattermoe_triton` cannot run on this machine (`cuda`: it has a CUDA
    device); None when it can. Read by check and train alike, before any model is loaded."""
    if importlib.util.find_spec("triton") is None:
        return (f"{SCATTERMOE_TRITON} runs Triton kernels, and triton is not installed",
                "install the triton extra (`pip install 'archtune[triton]'`), or use `experts_implementation: "
                f"{SCATTERMOE}`")
    if not cuda and os.environ.get(TRITON_INTERPRET_ENV) != "1":
        return (f"{SCATTERMOE_TRITON} runs its Triton kernels on a CUDA GPU, and this machine has none",
                f"on CPU set {TRITON_INTERPRET_ENV}=1 in the environment (Triton's interpreter: exact but slow, for "
                f"testing), or use `experts_implementation: {SCATTERMOE}`")
    return None


def experts_implementations() -> list[str]:
    """Valid `experts_implementation` names: archtune's registered ones, then transformers' others."""
    return EXPERTS.names()


@dataclass(frozen=True)
class Choice:
    name: str  # an experts_implementation name
    reason: str


def choose_experts_implementation(*, num_experts: int, top_k: int, hidden: int, intermediate: int,
                                  tokens: int, expert_lora: bool, dtype: str = "float32",
                                  device: str = "cpu") -> Choice:
    """The experts implementation `use_scattermoe` runs for these shapes (deterministic; see the
    module docstring): scattermoe where it measured faster, else the fastest stock one.

    `tokens` is the tokens of one micro-batch (micro_batch_size x sequence_len); `dtype` the
    compute dtype ("float32" or "bfloat16"), `device` "cpu" or "cuda".
    """
    pairs = tokens * top_k
    per_expert = pairs / num_experts
    size = hidden * intermediate
    shape = (f"{num_experts} experts of {hidden}x{intermediate}, top-{top_k}, {tokens} tokens per micro-batch "
             f"({per_expert:.0f} pairs per expert), {dtype}, expert LoRA {'on' if expert_lora else 'off'}")
    if device == "cuda":
        copy = pairs * hidden * 3 * intermediate * (2 if dtype in ("bfloat16", "float16") else 4)
        if copy <= BATCHED_MM_COPY_BYTES:
            return Choice(BATCHED, f"{shape}, CUDA: a per-pair weight copy of {copy / 2**20:.0f} MiB (<= "
                                   f"{BATCHED_MM_COPY_BYTES >> 20} MiB); {BATCHED} measured faster than {STOCK} and "
                                   "the loop-based scattermoe")
        return Choice(STOCK, f"{shape}, CUDA: {STOCK}'s grouped kernel measured faster than scattermoe's loop over "
                             "the experts at every measured shape")
    if expert_lora and dtype == "bfloat16" and num_experts > BF16_LORA_MAX_EXPERTS and per_expert >= FEW_PAIRS \
            and size < LARGE_EXPERT:
        return Choice(STOCK, f"{shape}: in bf16 scattermoe's per-expert LoRA products outgrow oneDNN's kernel cache "
                             f"beyond {BF16_LORA_MAX_EXPERTS} experts with >= {FEW_PAIRS} pairs each (kernels "
                             f"recompiled every step); {STOCK} measured faster")
    if expert_lora:
        return Choice(SCATTERMOE, f"{shape}: keeping the expert LoRA factored (no W + BA for each of the "
                                  f"{num_experts} experts at every forward); scattermoe measured faster than {STOCK}")
    if dtype != "float32":
        return Choice(SCATTERMOE, f"{shape}: scattermoe's grouped products in {dtype} measured faster than {STOCK}")
    if per_expert >= FEW_PAIRS:
        return Choice(SCATTERMOE, f"{shape}: with >= {FEW_PAIRS} pairs per expert scattermoe's fused per-expert "
                                  f"products measured faster than {STOCK}")
    if per_expert >= GROUPED_PAIRS and pairs * 2 * intermediate * 4 <= GROUPED_FP32_MAX_BYTES:
        return Choice(SCATTERMOE, f"{shape}: scattermoe's grouped products (gate/up activations <= "
                                  f"{GROUPED_FP32_MAX_BYTES >> 20} MiB) with >= {GROUPED_PAIRS} pairs per expert "
                                  f"measured faster than {STOCK}")
    return Choice(STOCK, f"{shape}: with fewer than {FEW_PAIRS} pairs per expert ({GROUPED_PAIRS} for small batches) "
                         f"scattermoe's per-expert work costs more than it saves in fp32; {STOCK} measured faster")


__all__ = ["EXPERTS", "ExpertsImplementation", "register_experts_implementation", "experts_implementations",
           "Choice", "choose_experts_implementation", "FEW_PAIRS", "LARGE_EXPERT", "BF16_LORA_MAX_EXPERTS",
           "BATCHED_MM_COPY_BYTES", "GROUPED_FP32_MAX_BYTES", "GROUPED_PAIRS", "SCATTERMOE", "SCATTERMOE_TRITON",
           "triton_unavailable"]
