"""Token-weighted evaluation loss: sum of per-token losses over all label tokens / their count.

transformers' Trainer reports a mean of per-batch means, which depends on batching (and so
differs between packed and unpacked evaluation of the same data); this does not.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def token_weighted_loss(model, dataset, collator, batch_size: int, device: torch.device | None = None) -> dict:
    """{"eval_loss", "eval_tokens", "eval_rows"} over `dataset` (columns input_ids, labels)."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    total, tokens, rows = 0.0, 0, 0
    try:
        for start in range(0, len(dataset), batch_size):
            features = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collator(features).items()}
            labels = batch["labels"]
            logits = model(**_model_inputs(batch)).logits.float()
            # Causal shift: token t predicts label t+1.
            shift_logits = logits[:, :-1].reshape(-1, logits.size(-1))
            shift_labels = labels[:, 1:].reshape(-1)
            total += F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum").item()
            tokens += int((shift_labels != -100).sum())
            rows += len(features)
    finally:
        model.train(was_training)
    loss = total / tokens if tokens else math.nan
    return {"eval_loss": loss, "eval_tokens": tokens, "eval_rows": rows}
