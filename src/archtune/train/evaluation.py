"""Token-weighted evaluation loss: sum of per-token losses over all label tokens / their count.

transformers' Trainer reports a mean of per-batch means, which depends on batching (and so
differs between packed and unpacked evaluation of the same data); this does not. Packed rows
(data/packing.py) give the same eval_loss and eval_tokens as the documents unpacked: the first
label of every packed document is -100, so each document contributes exactly the targets it
has on its own. eval_rows counts documents (a packed row's `num_docs`), not packed rows.

The forward runs with `use_cache=False`: a loss needs no KV cache, and with a cache
transformers skips its packed-sequence detection (documents of a packed row would see each
other; e.g. Llama, whose config defaults to use_cache=True).

With the chunked cross-entropy installed (train/losses.py) the same sum is computed without the
[tokens x vocab] logits.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def _documents(dataset) -> int:
    if "num_docs" in getattr(dataset, "column_names", ()):
        import pyarrow.compute as pc

        return int(pc.sum(dataset.select_columns(["num_docs"]).with_format("arrow")[:].column("num_docs")).as_py() or 0)
    return len(dataset)


@torch.no_grad()
def token_weighted_loss(model, dataset, collator, batch_size: int, device: torch.device | None = None) -> dict:
    """{"eval_loss", "eval_tokens", "eval_rows"} over `dataset` (columns input_ids, labels).

    eval_loss = sum of the per-token cross-entropies over every label token (token t predicts
    label t+1) / eval_tokens, the number of those label tokens; eval_rows = documents.
    """
    from archtune.train.losses import ChunkedCrossEntropy

    chunked = ChunkedCrossEntropy.of(model)
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    total, tokens = 0.0, 0
    try:
        for start in range(0, len(dataset), batch_size):
            features = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collator(features).items()}
            labels = batch["labels"]
            if chunked is not None:  # the same sum without the [tokens x vocab] logits
                with chunked.labels(labels):
                    chunked.check_probe(model(**_model_inputs(batch), use_cache=False).logits)
                    result = chunked.result()
                total += result.sum64
                tokens += int(result.count)
                continue
            logits = model(**_model_inputs(batch), use_cache=False).logits.float()
            # Causal shift: token t predicts label t+1.
            shift_logits = logits[:, :-1].reshape(-1, logits.size(-1))
            shift_labels = labels[:, 1:].reshape(-1)
            # Per-token losses summed in float64: the total does not depend on how tokens are batched.
            per_token = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="none")
            total += float(per_token.double().sum())
            tokens += int((shift_labels != -100).sum())
    finally:
        model.train(was_training)
    loss = total / tokens if tokens else math.nan
    return {"eval_loss": loss, "eval_tokens": tokens, "eval_rows": _documents(dataset)}


@torch.no_grad()
def greedy_exact_match(model, dataset, collator, batch_size: int, device: torch.device | None = None) -> dict:
    """{"exact_match", "rows"}: the fraction of rows whose every label token is the model's most
    likely next token. For an answer that ends the row (with its end-of-turn token) this is
    exactly "greedy generation from the prompt returns the answer", computed in one forward per
    batch instead of a decoding loop. Unpacked rows only (one document per row).
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    hits = 0
    try:
        for start in range(0, len(dataset), batch_size):
            features = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collator(features).items()}
            labels = batch["labels"][:, 1:]
            predicted = model(**_model_inputs(batch), use_cache=False).logits[:, :-1].argmax(-1)
            wrong = ((predicted != labels) & (labels != -100)).any(dim=1)
            hits += int((~wrong).sum())
    finally:
        model.train(was_training)
    return {"exact_match": hits / len(dataset) if len(dataset) else math.nan, "rows": len(dataset)}
