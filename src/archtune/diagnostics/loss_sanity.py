"""Is the initial loss plausible? A pure classification against ln(vocab).

A model that predicts every token with equal probability has cross-entropy exactly
ln(vocab_size). So the first loss says a lot before any training:

* near ln(vocab) ("uniform"): the model predicts (almost) uniformly. A randomly initialised
  model legitimately starts there (archtune's tiny:NAME models do); a *pretrained* one does
  not: its weights were not loaded (re-initialised tensors), or adapters / a changed head sit
  in the wrong place. Shown as a prominent warning for a pretrained model. Gemma's vocabulary
  has 262144 tokens, ln = 12.48: the Gemma 4 "loss ~12" reports (E2B/E4B with broken KV
  sharing under checkpointing or use_cache=False; LoRA on the vision/audio towers) are this case.
* far above ln(vocab) ("far_above", > 1.5x): worse than guessing, confidently wrong (a
  tokenizer that does not belong to the model, a scrambled head, broken K/V). Always a warning,
  also for random models.
* between the two ("above_uniform"): worse than uniform, not by much. A warning.
* below ("ok"): the model knows something about the data, as a pretrained model should.
* NaN / inf ("non_finite"): a warning that names the usual causes.

Thresholds are module constants; `classify_initial_loss` takes them as keywords.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

UNIFORM_TOLERANCE = 0.10  # |loss / ln(V) - 1| <= 10 %: uniform
FAR_ABOVE_FACTOR = 1.5  # loss > 1.5 * ln(V): confidently wrong

OK = "ok"
UNIFORM = "uniform"
ABOVE_UNIFORM = "above_uniform"
FAR_ABOVE = "far_above"
NON_FINITE = "non_finite"
VERDICTS = (OK, UNIFORM, ABOVE_UNIFORM, FAR_ABOVE, NON_FINITE)


@dataclass(frozen=True)
class LossSanity:
    loss: float
    vocab_size: int
    ln_vocab: float
    ratio: float  # loss / ln(vocab) (nan when the loss is not finite)
    verdict: str  # one of VERDICTS
    message: str  # one line, always set
    warning: str | None  # the warning to show, or None when nothing is suspicious

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "vocab_size": self.vocab_size, "ln_vocab": self.ln_vocab,
                "ratio": self.ratio, "verdict": self.verdict, "message": self.message, "warning": self.warning}


def classify_initial_loss(loss: float, vocab_size: int, *, random_init: bool = False,
                          uniform_tolerance: float = UNIFORM_TOLERANCE,
                          far_above_factor: float = FAR_ABOVE_FACTOR) -> LossSanity:
    """Classify a first (untrained) loss against ln(vocab_size).

    `random_init`: the model has random weights on purpose (a tiny:NAME model), so a uniform
    start is expected and not warned about; every other verdict is judged the same way.
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    if not 0 < uniform_tolerance < 1 or far_above_factor <= 1 + uniform_tolerance:
        raise ValueError("need 0 < uniform_tolerance < 1 and far_above_factor > 1 + uniform_tolerance")
    loss = float(loss)
    ln_v = math.log(vocab_size)
    head = f"initial loss {loss:.4g} vs ln(vocab {vocab_size}) = {ln_v:.4g}"
    if not math.isfinite(loss):
        msg = f"{head}: not finite"
        return LossSanity(loss, vocab_size, ln_v, math.nan, NON_FINITE, msg,
                          f"{msg} - overflow in half precision, a broken mask (a row with no attended "
                          "token) or non-finite weights; try fp32 and check the data's attention masks")
    ratio = loss / ln_v
    if ratio > far_above_factor:
        msg = f"{head} ({ratio:.2f}x): far above uniform guessing"
        return LossSanity(loss, vocab_size, ln_v, ratio, FAR_ABOVE, msg,
                          f"{msg} - the model is confidently wrong. Usual causes: a tokenizer that does not "
                          "belong to the model, adapters on vision/audio towers (lora_target_linear on a "
                          "multimodal model), K/V sharing broken under checkpointing or use_cache=false "
                          "(`archtune check --probe` compares training with inference)")
    if abs(ratio - 1) <= uniform_tolerance:
        if random_init:
            msg = f"{head} ({ratio:.2f}x): uniform, as expected for randomly initialised weights"
            return LossSanity(loss, vocab_size, ln_v, ratio, UNIFORM, msg, None)
        msg = f"{head} ({ratio:.2f}x): the model predicts uniformly"
        return LossSanity(loss, vocab_size, ln_v, ratio, UNIFORM, msg,
                          f"{msg} - a pretrained model should start well below ln(vocab): its weights were "
                          "probably not loaded (re-initialised tensors), or adapters / the output head are in "
                          "the wrong place (e.g. LoRA on vision/audio towers), or training settings break the "
                          "forward (the Gemma 4 'loss ~12' class: run `archtune check --probe`)")
    if ratio > 1:
        msg = f"{head} ({ratio:.2f}x): worse than uniform guessing"
        return LossSanity(loss, vocab_size, ln_v, ratio, ABOVE_UNIFORM, msg,
                          f"{msg} - check that the tokenizer matches the model and that adapters target the "
                          "language model only")
    msg = f"{head} ({ratio:.2f}x): below uniform, the model knows the data's tokens"
    return LossSanity(loss, vocab_size, ln_v, ratio, OK, msg, None)


__all__ = ["ABOVE_UNIFORM", "FAR_ABOVE", "FAR_ABOVE_FACTOR", "LossSanity", "NON_FINITE", "OK", "UNIFORM",
           "UNIFORM_TOLERANCE", "VERDICTS", "classify_initial_loss"]
