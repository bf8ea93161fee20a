"""The loss: archtune's chunked cross-entropy (train/losses.py), on for large vocabularies and when
Axolotl's fused-loss keys ask for one."""
from __future__ import annotations

from typing import TYPE_CHECKING

from archtune.plan.shared import Rule
from archtune.plan.shared import and_join
# Plugin paths of other trainers' fused losses (archtune.plugins registers them as aliases).
from archtune.plugins import CUT_CROSS_ENTROPY_PLUGIN

if TYPE_CHECKING:  # pragma: no cover
    from archtune.plan import Plan

# The chunked cross-entropy (train/losses.py) is on by default from this vocabulary size up.
LARGE_VOCABULARY = 65_536


CHUNKED_CE_DEFAULT_CHUNKS = 8


def _chunked_cross_entropy(plan: "Plan") -> None:
    from archtune.families.base import text_config

    cfg, key = plan.config, "chunked_cross_entropy"
    asked = [f"{k}: true" for k in ("cut_cross_entropy", "liger_fused_linear_cross_entropy") if getattr(cfg, k)]
    if CUT_CROSS_ENTROPY_PLUGIN in (plan.get("plugins") or []) and cfg.cut_cross_entropy is None:
        asked.append(f"the plugin {CUT_CROSS_ENTROPY_PLUGIN}")
    text = text_config(plan.model_config)
    vocab = int(text.get("vocab_size") or 0)
    cap = text.get("final_logit_softcapping")
    inside = f"; final_logit_softcapping {cap} is applied inside" if cap else ""
    if plan.user_set(key):
        if plan.get(key) is False and [a for a in asked if a.endswith("true")]:
            plan.error(key, f"chunked_cross_entropy: false, but {and_join(asked)} asks for a fused loss",
                       "remove one of them (archtune's chunked cross-entropy is what those keys turn on)")
    elif asked:
        plan.set(key, True, "auto", f"{and_join(asked)} (Axolotl) maps to archtune's chunked cross-entropy: lm_head and "
                 f"the loss in chunks of tokens, the same loss and gradients without the full logits{inside}")
    elif vocab >= LARGE_VOCABULARY:
        gib = plan.config.sequence_len * vocab * 4 / 2**30
        plan.set(key, True, "auto", f"vocabulary of {vocab:,} tokens: the stock loss holds [tokens x vocab] logits "
                 f"({gib:.1f} GiB in fp32 per {plan.config.sequence_len:,}-token row) and as much again for their "
                 f"gradient; chunked, they never exist{inside}")
    else:
        plan.set(key, False, "default", f"vocabulary of {vocab:,} tokens (below {LARGE_VOCABULARY:,}): the full "
                 "logits are small")
    if plan.get(key):
        plan.default("chunked_cross_entropy_num_chunks", CHUNKED_CE_DEFAULT_CHUNKS, "default",
                     f"{CHUNKED_CE_DEFAULT_CHUNKS} chunks of label tokens per forward")
    elif plan.user_set("chunked_cross_entropy_num_chunks"):
        plan.warn("chunked_cross_entropy_num_chunks has no effect: chunked_cross_entropy is off")


LOSS_RULES: tuple[Rule, ...] = (
    Rule("chunked_cross_entropy",
         "`chunked_cross_entropy` (lm_head and the loss computed in chunks of tokens, so the [tokens x vocab] logits "
         f"never exist) is on for vocabularies of {LARGE_VOCABULARY:,} tokens or more, and when Axolotl's "
         "`cut_cross_entropy: true`, `liger_fused_linear_cross_entropy: true` or the Cut Cross Entropy plugin ask for "
         "a fused loss.",
         _chunked_cross_entropy),
)


__all__ = ["LOSS_RULES", "LARGE_VOCABULARY", "CHUNKED_CE_DEFAULT_CHUNKS"]
