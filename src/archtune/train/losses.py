"""Chunked linear cross-entropy: the causal-LM loss without the [tokens x vocab] logits.

Gemma 3/4 have a 262,144-token vocabulary: one 4,096-token sequence's logits take 4.3 GB in
fp32, and the stock loss keeps them, their log-softmax and their gradient alive at once. Here the
output projection (lm_head, with its LoRA if any) and the cross-entropy run over chunks of
tokens: a chunk's logits exist only while that chunk is computed, in forward and in backward.

How it plugs in (`ChunkedCrossEntropy.install`, after adapters, when the Plan's
`chunked_cross_entropy` is on), without touching the model's own forward:

- The output embeddings module's `forward` is replaced on the instance. Outside a
  `with loss.labels(labels):` block it is the original forward (generation, probes). Inside, it
  computes the summed token loss from its input (the final hidden states) and the labels, and
  returns a tiny *probe* tensor instead of the logits.
- The model's `loss_function` (transformers' hook for the causal-LM loss) becomes
  `ChunkedCrossEntropy.loss_function`: it turns that sum into exactly what transformers'
  `ForCausalLMLoss` returns -- the sum over label tokens divided by `num_items_in_batch` (the
  Trainer's count over the whole accumulated batch and, with average_tokens_across_devices,
  over all processes), or the mean over label tokens when that count is not given. Gradient
  accumulation, packing (labels -100 at document starts) and the MoE router loss the model adds
  afterwards therefore stay exactly as without chunking.
- The model applies its logit post-processing (Gemma's `final_logit_softcapping`) to the probe.
  The probe's values are known, so `check_probe` verifies that this post-processing is the
  softcap this loss applied inside (or none); a model that transforms its logits any other way
  is refused instead of trained with a silently different loss.

The loss is computed inside the model's forward (in lm_head's call), so FSDP2's and DDP's hooks
see an ordinary forward: lm_head's parameters are gathered, the loss flows out through the
model's output. Gradients are computed chunk by chunk in forward (the logits' gradient,
softmax - one-hot, needs only that chunk) and handed out in backward scaled by the incoming
gradient: the head costs the same three matmuls as the stock loss, none repeated.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F

from archtune.errors import UserError
from archtune.plan.rules import CHUNKED_CE_DEFAULT_CHUNKS as DEFAULT_NUM_CHUNKS

IGNORE_INDEX = -100
# Values the probe carries through the model's logit post-processing (exact in bf16 and fp16).
PROBE_VALUES = (-48.0, -6.0, -0.5, 0.0, 0.25, 3.0, 20.0, 64.0)


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap), transformers' order of operations (`final_logit_softcapping`)."""
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def shifted_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Token t predicts label t+1: labels shifted left, the last position ignored (as transformers)."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _chunk_bounds(n: int, num_chunks: int) -> list[tuple[int, int]]:
    size = max(1, math.ceil(n / max(1, num_chunks)))
    return [(s, min(n, s + size)) for s in range(0, n, size)]


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum over rows of CE(softcap(project(hidden[i]).float()), targets[i]); rows whose target is
    the ignore index must be removed by the caller. `params` are the trainable tensors `project`
    uses: their gradients (and hidden's) are computed chunk by chunk here, in forward, and
    returned by backward times the incoming (scalar) gradient."""

    @staticmethod
    def forward(ctx, hidden, targets, project, cap, num_chunks, stats, *params):
        want_hidden = ctx.needs_input_grad[0]
        want = [want_hidden, *ctx.needs_input_grad[6:]]
        grad_params = [p for p, w in zip(params, want[1:]) if w]
        # Per-token losses summed in float64, as evaluation sums them: the total does not depend on
        # how tokens are chunked or batched. The result is float32, as transformers' loss.
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_acc: list[torch.Tensor | None] = [None] * len(grad_params)
        any_grad = want_hidden or bool(grad_params)
        for start, end in _chunk_bounds(hidden.shape[0], num_chunks):
            with torch.enable_grad() if any_grad else contextlib.nullcontext():
                h = hidden[start:end].detach().requires_grad_(want_hidden)
                logits = softcap(project(h).float(), cap)
                per_token = F.cross_entropy(logits, targets[start:end], reduction="none")
                del logits
                loss = per_token.sum()
            if any_grad:
                inputs = ([h] if want_hidden else []) + grad_params
                grads = torch.autograd.grad(loss, inputs, allow_unused=True)
                if want_hidden:
                    grad_hidden[start:end] = grads[0]
                    grads = grads[1:]
                for i, g in enumerate(grads):
                    if g is not None:
                        grad_acc[i] = g if grad_acc[i] is None else grad_acc[i].add_(g)
            total += per_token.detach().double().sum()
            del per_token, loss
        # Kept on ctx (not save_for_backward): they are results, not inputs to recompute from.
        ctx.grads = ([grad_hidden] if want_hidden else []) + grad_acc
        ctx.want = want
        stats["sum64"] = total
        return total.float()

    @staticmethod
    def backward(ctx, grad_output):
        want_hidden, *want_params = ctx.want
        it = iter(ctx.grads)

        def scaled(wanted: bool) -> torch.Tensor | None:
            if not wanted:
                return None
            g = next(it)
            return None if g is None else g * grad_output.to(g.dtype)

        return (scaled(want_hidden), None, None, None, None, None, *[scaled(w) for w in want_params])


class LossSum(NamedTuple):
    total: torch.Tensor  # float32 scalar, with the gradient
    count: torch.Tensor  # int64 scalar: label tokens
    sum64: float  # the same total summed in float64 (evaluation)


def linear_cross_entropy_sum(hidden: torch.Tensor, targets: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor],
                             params: list[torch.Tensor], cap: float | None = None,
                             num_chunks: int = DEFAULT_NUM_CHUNKS, ignore_index: int = IGNORE_INDEX) -> LossSum:
    """The summed per-token loss for hidden [..., H] and targets [...] (already shifted), the
    logits being softcap(project(hidden).float()) -- computed in `num_chunks` chunks of label
    tokens, never all at once. Tokens whose target is `ignore_index` are skipped (they have no
    loss and no gradient). `params`: the tensors `project` reads that may need gradients
    (lm_head's weight, its LoRA matrices)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).to(flat.device)
    keep = (flat_targets != ignore_index).nonzero().squeeze(-1)
    rows, row_targets = flat.index_select(0, keep), flat_targets.index_select(0, keep)
    stats: dict[str, torch.Tensor] = {}
    total = _LinearCrossEntropySum.apply(rows, row_targets, project, cap, num_chunks, stats, *params)
    if hidden.requires_grad and keep.numel() == 0:
        total = total + flat.sum() * 0  # keep the graph connected: the hidden states get a zero gradient
    return LossSum(total, torch.tensor(keep.numel(), device=flat.device), float(stats["sum64"]))


class ChunkedCrossEntropy:
    """Installed on one model (`install`); see the module docstring."""

    ATTRIBUTE = "_archtune_chunked_cross_entropy"

    def __init__(self, head: torch.nn.Module, stock_loss: Callable, cap: float | None, num_chunks: int) -> None:
        self.head = head
        self.project = head.forward  # the original forward (with its LoRA, if any)
        self.stock_loss = stock_loss
        self.cap = cap
        self.num_chunks = num_chunks
        self._labels: torch.Tensor | None = None
        self._result: LossSum | None = None

    # ------------------------------------------------------------------ installing

    @classmethod
    def install(cls, model: Any, num_chunks: int = DEFAULT_NUM_CHUNKS) -> "ChunkedCrossEntropy":
        """Put the chunked loss on `model` (a transformers model, possibly inside PEFT/DDP
        wrappers). Call it after adapters are added: PEFT must find lm_head's original forward."""
        from archtune.patches.text_only import unwrap_model

        base = unwrap_model(model)
        existing = getattr(base, cls.ATTRIBUTE, None)
        if existing is not None:
            return existing
        head = base.get_output_embeddings()
        if head is None:
            raise UserError.single("chunked_cross_entropy", f"{type(base).__name__} has no output embeddings (lm_head) "
                                   "to compute the loss from", "set `chunked_cross_entropy: false`")
        text_config = base.config.get_text_config()
        loss = cls(head, base.loss_function, getattr(text_config, "final_logit_softcapping", None), num_chunks)
        head.forward = loss._head_forward
        base.loss_function = loss.loss_function  # transformers' setter: kept on the instance
        setattr(base, cls.ATTRIBUTE, loss)
        return loss

    @classmethod
    def of(cls, model: Any) -> "ChunkedCrossEntropy | None":
        """The chunked loss installed on `model` (through its wrappers), or None."""
        from archtune.patches.text_only import unwrap_model

        return getattr(unwrap_model(model), cls.ATTRIBUTE, None)

    # ------------------------------------------------------------------ using

    @contextlib.contextmanager
    def labels(self, labels: torch.Tensor | None) -> Iterator["ChunkedCrossEntropy"]:
        """Within the block, a forward of the model computes its loss for `labels` ([B, T], -100 =
        no loss) in chunks: `result()` holds it, `loss_function` normalizes it, and the model's
        `logits` output is the probe. `labels=None` leaves the model as it is."""
        if labels is None:
            yield self
            return
        if self._labels is not None:
            raise RuntimeError("chunked cross-entropy: labels blocks do not nest")
        self._labels, self._result = labels, None
        try:
            yield self
        finally:
            self._labels, self._result = None, None

    def result(self) -> LossSum:
        """The summed token loss and label-token count of the forward that ran in this block."""
        if self._result is None:
            raise RuntimeError("chunked cross-entropy: the model's forward did not reach its output embeddings")
        return self._result

    def _params(self) -> list[torch.Tensor]:
        return [p for p in self.head.parameters() if p.requires_grad]

    def _head_forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._labels is None:
            return self.project(hidden, *args, **kwargs)
        if self._result is not None:
            raise RuntimeError("chunked cross-entropy: the output embeddings ran twice in one forward")
        targets = shifted_targets(self._labels)
        if tuple(targets.shape) != tuple(hidden.shape[:-1]):
            raise RuntimeError(f"chunked cross-entropy: hidden states {tuple(hidden.shape)} do not match labels "
                               f"{tuple(self._labels.shape)} (logits_to_keep must keep every position)")
        project = (lambda h: self.project(h, *args, **kwargs)) if (args or kwargs) else self.project
        self._result = linear_cross_entropy_sum(hidden, targets, project, self._params(), self.cap, self.num_chunks)
        return self.probe(hidden)

    @staticmethod
    def probe(like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(PROBE_VALUES, dtype=like.dtype, device=like.device).view(1, 1, -1)

    def check_probe(self, logits: torch.Tensor) -> None:
        """The model's post-processing of lm_head's output, seen on the probe, must be this loss's
        softcap (or nothing): else the chunked loss would differ from the model's own."""
        expected = softcap(torch.tensor(PROBE_VALUES, dtype=torch.float32), self.cap)
        got = logits.detach().float().reshape(-1).cpu()
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-2, atol=1e-2):
            what = f"final_logit_softcapping {self.cap}" if self.cap is not None else "no logit post-processing"
            raise UserError.single(
                "chunked_cross_entropy",
                f"the model transforms lm_head's output differently from what its config declares ({what}): probe "
                f"{list(PROBE_VALUES)} came back as {[round(v, 3) for v in got.tolist()[:8]]}, so the chunked loss "
                "would differ from the model's own", "set `chunked_cross_entropy: false`")

    def loss_function(self, logits, labels, vocab_size: int | None = None, num_items_in_batch=None,
                      ignore_index: int = IGNORE_INDEX, shift_labels=None, **kwargs) -> torch.Tensor:
        """transformers' causal-LM loss hook: the chunked sum, normalized as ForCausalLMLoss does."""
        if self._result is None or labels is not self._labels:
            return self.stock_loss(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                                   ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        if ignore_index != IGNORE_INDEX or (shift_labels is not None and not torch.equal(
                shift_labels.to(labels.device), shifted_targets(labels))):
            raise RuntimeError("chunked cross-entropy: the model asked for other targets than the labels' shift")
        self.check_probe(logits)
        total, count, _ = self._result
        if num_items_in_batch is None:
            return total / count  # mean over label tokens (nan when there are none, as F.cross_entropy)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch


__all__ = [
    "ChunkedCrossEntropy",
    "DEFAULT_NUM_CHUNKS",
    "IGNORE_INDEX",
    "LossSum",
    "linear_cross_entropy_sum",
    "shifted_targets",
    "softcap",
]
