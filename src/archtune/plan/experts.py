"""The experts implementations a config may name (EXPERTS, the one registry idiom), and which one
`use_scattermoe` runs, by a rule on the shapes (no timing run).

    EXPERTS["grouped_mm"]      # ExpertsImplementation(name, doc, forward)
    EXPERTS["grouped"]         # KeyError: no experts implementation 'grouped'; known: eager, ... (add one in ...)

transformers' own implementations (eager, grouped_mm, batched_mm) and archtune's scattermoe are
registered below, each once; any other name transformers' registry holds when the registry is
first read (e.g. deepgemm, sonicmoe) is discovered then. The plan checks names here without
importing the implementations; archtune's own register with transformers when the model uses them
(archtune.moe).

    choose_experts_implementation(num_experts=8, top_k=2, hidden=64, intermediate=32,
                                  tokens=2048, expert_lora=True)
    -> Choice("grouped_mm", "8 experts of 64x32, top-2, ... grouped_mm measured faster")

On CPU both candidates run the same per-expert GEMMs (torch's grouped_mm kernel loops over
the groups in C++; scattermoe loops over the experts in Python, fusing gather, gate and
scatter per expert). They differ in two costs (bench/moe.py --sweep):

* scattermoe pays a fixed Python cost per expert and step (a few dozen dispatched ops,
  forward and backward), which only large expert matrices hide;
* with PEFT expert LoRA, the stock implementations run on W + BA, which PEFT materialises
  for every expert on every forward (and checkpoint recompute): E x (3 x hidden x intermediate)
  weights written and read again, plus a rank-r product per weight. scattermoe keeps the
  factors apart and never builds W + BA.

Measured (bench/moe.py --sweep, thread CPU time, forward + backward): scattermoe wins where
each expert has much work per step, i.e. many (token, expert) pairs per expert
(`tokens x top_k / experts`) or large expert matrices (`hidden x intermediate`), and, with
expert LoRA, wherever the materialisation is large; it loses up to 4x at 128 experts with 2-4
pairs per expert, and 1.2-1.8x on small experts (hidden 256) with few pairs. The rule:

* pairs per expert >= 1,024: scattermoe (1.04-1.6x faster at 2,048-8,192 pairs, any size);
* expert LoRA and hidden x intermediate >= 2^20 (e.g. 2048 x 512): scattermoe (1.9-3x);
* no LoRA, pairs per expert >= 256 and hidden x intermediate >= 2^20: scattermoe (1.03-1.08x);
* else grouped_mm.
"""
from __future__ import annotations

from dataclasses import dataclass

from archtune.registry import Registry

# Thresholds of the rule (see the module docstring), calibrated on bench/moe.py --sweep.
MANY_PAIRS = 1024  # (token, expert) pairs per expert and micro-batch
SOME_PAIRS = 256
LARGE_EXPERT = 1 << 20  # hidden x intermediate
STOCK = "grouped_mm"
SCATTERMOE = "scattermoe"


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


def experts_implementations() -> list[str]:
    """Valid `experts_implementation` names: archtune's registered ones, then transformers' others."""
    return EXPERTS.names()


@dataclass(frozen=True)
class Choice:
    name: str  # an experts_implementation name
    reason: str


def choose_experts_implementation(*, num_experts: int, top_k: int, hidden: int, intermediate: int,
                                  tokens: int, expert_lora: bool) -> Choice:
    """scattermoe or grouped_mm for these shapes (deterministic; see the module docstring).

    `tokens` is the tokens of one micro-batch (micro_batch_size x sequence_len); with `top_k` it
    only enters the reason: the measured winner did not change with it.
    """
    pairs = tokens * top_k / num_experts
    size = hidden * intermediate
    shape = (f"{num_experts} experts of {hidden}x{intermediate}, top-{top_k}, {tokens} tokens per micro-batch "
             f"({pairs:.0f} pairs per expert), expert LoRA {'on' if expert_lora else 'off'}")
    if pairs >= MANY_PAIRS:
        return Choice(SCATTERMOE, f"{shape}: with >= {MANY_PAIRS} pairs per expert scattermoe's per-expert fusion "
                                  f"measured faster than {STOCK}")
    if size >= LARGE_EXPERT and (expert_lora or pairs >= SOME_PAIRS):
        why = ("keeping the expert LoRA factored (no W + BA per expert and forward)" if expert_lora
               else f"experts this large with >= {SOME_PAIRS} pairs each")
        return Choice(SCATTERMOE, f"{shape}: {why}; scattermoe measured faster than {STOCK}")
    return Choice(STOCK, f"{shape}: scattermoe's per-expert loop costs more than it saves here; {STOCK} "
                         "measured faster")


__all__ = ["EXPERTS", "ExpertsImplementation", "register_experts_implementation", "experts_implementations",
           "Choice", "choose_experts_implementation", "MANY_PAIRS", "SOME_PAIRS", "LARGE_EXPERT"]
