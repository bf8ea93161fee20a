"""Does the exported artifact compute what the trained model computes? Logits, prompt by prompt.

The prompts are held-out rows of the run's own data (the evaluation split, else the last
training rows), cut to their first tokens. Per prompt: the max |logit difference| over every
position and the vocabulary, that difference relative to the reference's largest |logit|, and
whether the greedy (argmax) token agrees at every position where the reference's choice is
clear: a position whose top-2 margin is below the outtype's tolerance is a near-tie that any
rounding may flip, so it is reported (`near_ties`) but never counted as a disagreement.

Tolerances (max |diff| / max |logit|) per outtype were set from what the tiny models of every
family measure, with margin: a genuine export bug (a norm offset missed, a tensor transposed,
a delta dropped) gives relative differences of 0.1 to 10, far above them.

The trained model computes in its own dtype too: a bf16 model's logits are themselves off exact
arithmetic, more so the wider and deeper it is (a 12-layer, 1024-wide random Llama: 0.073 of its
max |logit| against the same weights in float32, whatever the artifact). That is measured on the
prompts (`reference_noise`: the trained model once more in float32) and allowed on top of the
outtype's tolerance: |artifact - reference| <= |artifact - exact| + |exact - reference|.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

# outtype -> allowed max |logit diff| relative to the reference's max |logit|
TOLERANCES: dict[str, float] = {
    # llama.cpp's float32 path takes GELU from a float16 table: tiny Gemma 3 measures 5e-4, tiny
    # Gemma 4 (more GELUs, unscaled attention) 1.7e-3, and 1.6e-4 once the reference takes GELU from
    # the same table: what is left of the writer's own rounding.
    "f32": 3e-3,
    "f16": 1e-2,
    "bf16": 4e-2,
    "q8_0": 6e-2,
    "Q8_0": 6e-2,
    "Q6_K": 0.12,
    "Q5_K_M": 0.2,
    "Q5_K_S": 0.2,
    "Q4_K_M": 0.3,
    "Q4_K_S": 0.3,
}
LOW_BIT_TOLERANCE = 0.5  # Q3_K_*, Q2_K, IQ*: greedy agreement is what such files promise, barely
PROMPT_TOKENS = 48
# Mixture-of-experts models, any type but f32: rounding moves a near-tie router choice to another
# expert, a jump in that position's logits (tiny Qwen 3.5 MoE: bf16 0.049, llama.cpp's Q8_0 0.105,
# greedy tokens all agreeing). f32 keeps its tolerance there: it is the writer's exactness check.
MOE_FACTOR = 3.0


def tolerance(outtype: str, moe: bool = False) -> float:
    base = TOLERANCES.get(outtype, LOW_BIT_TOLERANCE)
    return base * MOE_FACTOR if moe and outtype != "f32" else base


@dataclass
class PromptResult:
    tokens: int
    max_abs_logit_diff: float
    max_rel_logit_diff: float
    greedy_agree: bool
    near_ties: int  # positions whose reference top-2 margin is within the tolerance (not judged)
    disagreements: int  # judged positions whose argmax differs
    positions_agree: int  # positions whose argmax agrees, judged or not


@dataclass
class Verification:
    runtime: str
    outtype: str
    tolerance: float  # the outtype's
    prompts: list[PromptResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tokenizer_mismatches: int | None = None  # prompts the artifact's own tokenizer splits otherwise (GGUF)
    reference_noise: float = 0.0  # the trained model's own dtype against float32, relative (0: not 16-bit)

    @property
    def allowed(self) -> float:
        return self.tolerance + self.reference_noise

    @property
    def max_abs_logit_diff(self) -> float:
        return max((p.max_abs_logit_diff for p in self.prompts), default=0.0)

    @property
    def max_rel_logit_diff(self) -> float:
        return max((p.max_rel_logit_diff for p in self.prompts), default=0.0)

    @property
    def greedy_agree(self) -> int:
        return sum(p.greedy_agree for p in self.prompts)

    @property
    def ok(self) -> bool:
        return bool(self.prompts) and self.max_rel_logit_diff <= self.allowed \
            and self.greedy_agree == len(self.prompts) and not self.tokenizer_mismatches

    def to_json(self) -> dict:
        return {"runtime": self.runtime, "outtype": self.outtype, "prompts": len(self.prompts),
                "max_abs_logit_diff": self.max_abs_logit_diff, "max_rel_logit_diff": self.max_rel_logit_diff,
                "greedy_agree": self.greedy_agree, "tolerance": self.tolerance,
                "reference_noise": self.reference_noise, "allowed": self.allowed, "ok": self.ok,
                "tokenizer_mismatches": self.tokenizer_mismatches,
                "per_prompt": [asdict(p) for p in self.prompts], "notes": list(self.notes)}


def held_out_prompts(plan, tokenizer, count: int, length: int = PROMPT_TOKENS) -> tuple[list[list[int]], str]:
    """Up to `count` prompts (token ids, the row's first `length` tokens) and where they came from."""
    from archtune.data import prepare_data
    from archtune.data.preference import prepare_preference_data

    preference = plan.data.preference_rows is not None
    data = (prepare_preference_data if preference else prepare_data)(plan, tokenizer, progress=False)
    rows, source = (data.eval, "evaluation data") if data.eval is not None and len(data.eval) else \
        (data.train, "training data (last rows; the run has no evaluation data)")
    n = min(count, len(rows))
    picked = range(n) if rows is data.eval else range(len(rows) - n, len(rows))
    sequences = [_sequence(rows[i]) for i in picked] if preference else [rows[i]["input_ids"] for i in picked]
    prompts = [list(ids[:length]) for ids in sequences]
    return [p for p in prompts if len(p) >= 2], source


def _sequence(row: dict) -> list[int]:
    """A preference row's preferred sequence: its prompt and chosen (or only) answer; a reward pair's
    chosen conversation."""
    answer = row["chosen_ids"] if "chosen_ids" in row else row["completion_ids"]
    return list(row.get("prompt_ids") or []) + list(answer)


def hf_logits(model, ids: Sequence[int]) -> torch.Tensor:
    """[tokens, vocab] float32 logits of a transformers model (any wrapper) on one unpadded prompt."""
    from archtune.patches.text_only import text_only_extras

    input_ids = torch.tensor([list(ids)])
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    model.eval()
    with torch.no_grad():
        return model(**batch, **text_only_extras(model, batch), use_cache=False).logits[0].float()


def compare_prompt(reference: torch.Tensor, candidate: torch.Tensor, tol: float) -> PromptResult:
    reference, candidate = reference.float(), candidate.float()
    if reference.dim() == 1:  # a reward model's score of the whole sequence: no tokens to choose
        max_abs = float((reference - candidate).abs().max())
        # relative to the score, or to 1 for a score near 0 (scores are logits, of order 1)
        rel = max_abs / max(float(reference.abs().max()), 1.0)
        return PromptResult(tokens=0, max_abs_logit_diff=max_abs, max_rel_logit_diff=rel,
                            greedy_agree=rel <= tol, near_ties=0, disagreements=int(rel > tol), positions_agree=0)
    vocab = min(reference.shape[-1], candidate.shape[-1])  # a GGUF drops out-of-vocabulary padding rows
    extra = reference[..., vocab:]
    reference, candidate = reference[..., :vocab], candidate[..., :vocab]
    diff = (reference - candidate).abs()
    scale = max(float(reference.abs().max()), 1e-6)
    max_abs = float(diff.max())
    top2 = reference.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    decisive = margin > 2 * tol * scale
    differs = reference.argmax(-1) != candidate.argmax(-1)
    disagreements = int((differs & decisive).sum())
    if extra.numel() and bool((extra.max(-1).values > reference.max(-1).values).any()):
        disagreements += 1  # the reference would pick a token the artifact cannot emit
    return PromptResult(tokens=int(reference.shape[0]), max_abs_logit_diff=max_abs, max_rel_logit_diff=max_abs / scale,
                        greedy_agree=disagreements == 0, near_ties=int((~decisive).sum()),
                        disagreements=disagreements, positions_agree=int((~differs).sum()))


def reference_noise(model, prompts: list[list[int]], reference: Callable[[list[int]], torch.Tensor]) -> float:
    """How far the trained model's 16-bit logits (`reference`) are from the same model computing
    in float32, relative to their max |logit|, worst prompt. Casts `model` to float32 in place
    (call it when nothing else needs the 16-bit model); 0.0 for a model that is not 16-bit."""
    dtypes = {p.dtype for p in model.parameters()}
    if not dtypes & {torch.bfloat16, torch.float16} or not dtypes <= {torch.bfloat16, torch.float16, torch.float32}:
        return 0.0
    model.float()
    return max((compare_prompt(reference(ids), hf_logits(model, ids), 0.0).max_rel_logit_diff for ids in prompts),
               default=0.0)


def verify(runtime: str, outtype: str, prompts: list[list[int]], reference: Callable[[list[int]], torch.Tensor],
           candidate: Callable[[list[int]], torch.Tensor], moe: bool = False, noise: float = 0.0) -> Verification:
    """Each prompt through the trained model (`reference`) and the artifact (`candidate`); `noise`:
    `reference_noise` of the trained model."""
    result = Verification(runtime=runtime, outtype=outtype, tolerance=tolerance(outtype, moe), reference_noise=noise)
    for ids in prompts:
        result.prompts.append(compare_prompt(reference(ids), candidate(ids), result.allowed))
    return result


__all__ = ["LOW_BIT_TOLERANCE", "MOE_FACTOR", "PROMPT_TOKENS", "PromptResult", "TOLERANCES", "Verification", "compare_prompt",
           "held_out_prompts", "hf_logits", "reference_noise", "tolerance", "verify"]
