"""`archtune check --probe`: does the model compute the same thing under the training settings
as it does in plain inference?

Bugs of the Gemma 4 E2B/E4B "loss ~12" class (a model that evaluates fine but trains from a loss near ln(vocab)) live in the paths only training
takes: cross-layer KV sharing computed wrongly with `use_cache=False` or under checkpointing,
reentrant or offloaded checkpointing handing a layer detached K/V, a recompute that sees
different inputs. Inference (eval mode, `use_cache=True`, no checkpointing) is the path the
model was released and tested with. So the probe loads the model exactly as training does
(`assemble_model(plan, tokenizer, "train")`: weights, weight-scale rules, freezing, LoRA), takes
ONE real batch of the configured data (the first `micro_batch_size` training rows, collated as training collates
them) and runs it twice:

* reference: eval mode, `use_cache=True`, no checkpointing, no gradients;
* training:  train mode with every dropout at p=0 (so the two are comparable), `use_cache` as
  the Plan says, the Plan's gradient checkpointing (`gradient_checkpointing_kwargs`) and
  activation-checkpointing wrappers (`activation_offloading`, FSDP activation checkpointing),
  gradients on, then a backward pass (the recompute runs there).

It reports the largest absolute logit difference over real (non-padding) tokens and the loss
difference. Above tolerance (relative, by dtype: PROBE_TOLERANCE) it is an error Problem with
key "probe": training-mode forward differs from inference. When that happens the probe reruns
the training forward without checkpointing, then also with `use_cache=True`, to say which
setting makes the difference. It also reports the initial loss against ln(vocab)
(diagnostics.loss_sanity), a backward that fails, and trainable tensors that get no gradient.

The model given to (or built by) the probe is left in eval mode with checkpointing off; wrappers
it applied stay (the probe's model is meant to be thrown away).
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from archtune.diagnostics.loss_sanity import LossSanity, classify_initial_loss
from archtune.errors import Problem, UserError

# Relative tolerance on logits (max |diff| / max(1, max |reference logit|)) and on the loss
# (|diff| / max(1, reference loss)), by the model's dtype. fp32 recompute and cache/no-cache
# paths agree to ~1e-6 on every tiny model; bugs of the class this catches are O(1).
PROBE_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-6,
    torch.float32: 1e-3,
    torch.float16: 1e-2,
    torch.bfloat16: 3e-2,
}
PROBE_KEY = "probe"
_MAX_LISTED = 5


def probe_tolerance(dtype: torch.dtype) -> float:
    return PROBE_TOLERANCE.get(dtype, PROBE_TOLERANCE[torch.float32])


@dataclass
class ProbeResult:
    """What the probe measured. Iterating over it yields its error Problems (like a list)."""

    max_logit_diff: float = math.nan  # max |training - reference| logit over real tokens
    logit_scale: float = math.nan  # max |reference logit| over real tokens
    rel_logit_diff: float = math.nan  # max_logit_diff / max(1, logit_scale)
    loss_train: float = math.nan
    loss_reference: float = math.nan
    loss_diff: float = math.nan  # |loss_train - loss_reference|
    tolerance: float = math.nan
    rows: int = 0
    tokens: int = 0  # real tokens in the batch
    dtype: str = ""
    training_settings: dict[str, Any] = field(default_factory=dict)
    reference_settings: dict[str, Any] = field(default_factory=dict)
    cause: str | None = None  # which training setting makes the difference (when one does)
    loss_sanity: LossSanity | None = None
    trainable_tensors: int = 0
    no_grad_tensors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def consistent(self) -> bool:
        """Logits and loss agree within tolerance (False when they could not be measured)."""
        return (math.isfinite(self.rel_logit_diff) and self.rel_logit_diff <= self.tolerance
                and math.isfinite(self.loss_diff) and self.loss_diff <= self.tolerance * max(1.0, abs(self.loss_reference)))

    def __iter__(self):
        return iter(self.problems)

    def to_dict(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return x if isinstance(x, (int, float)) and math.isfinite(x) else None

        return {
            "ok": self.ok,
            "max_logit_diff": num(self.max_logit_diff),
            "logit_scale": num(self.logit_scale),
            "rel_logit_diff": num(self.rel_logit_diff),
            "loss_train": num(self.loss_train),
            "loss_reference": num(self.loss_reference),
            "loss_diff": num(self.loss_diff),
            "tolerance": num(self.tolerance),
            "rows": self.rows,
            "tokens": self.tokens,
            "dtype": self.dtype,
            "training_settings": dict(self.training_settings),
            "reference_settings": dict(self.reference_settings),
            "cause": self.cause,
            "initial_loss": self.loss_sanity.to_dict() if self.loss_sanity else None,
            "trainable_tensors": self.trainable_tensors,
            "no_grad_tensors": list(self.no_grad_tensors),
            "warnings": list(self.warnings),
            "errors": [p.to_dict() for p in self.problems],
        }

    def render(self):
        """A rich Table of the measurements (problems and warnings are printed separately)."""
        from rich.markup import escape
        from rich.table import Table

        def fmt(x: float, spec: str = ".3g") -> str:
            return format(x, spec) if math.isfinite(x) else "-"

        table = Table(title="probe: training settings vs inference")
        table.add_column("measure")
        table.add_column("value", overflow="fold")
        settings = ", ".join(f"{k}={v}" for k, v in self.training_settings.items())
        table.add_row("batch", f"{self.rows} rows, {self.tokens} tokens, {self.dtype}")
        table.add_row("training settings", escape(settings) or "-")
        table.add_row("reference settings", escape(", ".join(f"{k}={v}" for k, v in self.reference_settings.items())))
        style = "" if self.consistent else "bold red"
        table.add_row("max |Δlogit|", f"{fmt(self.max_logit_diff)} (relative {fmt(self.rel_logit_diff)}, "
                      f"tolerance {fmt(self.tolerance)})", style=style)
        table.add_row("loss training / reference", f"{fmt(self.loss_train, '.6g')} / {fmt(self.loss_reference, '.6g')} "
                      f"(Δ {fmt(self.loss_diff)})", style=style)
        if self.cause:
            table.add_row("difference comes from", escape(self.cause), style="bold red")
        if self.loss_sanity is not None:
            table.add_row("initial loss", escape(self.loss_sanity.message),
                          style="bold yellow" if self.loss_sanity.warning else "")
        table.add_row("trainable tensors", f"{self.trainable_tensors} ({len(self.no_grad_tensors)} without gradient)")
        return table


# --------------------------------------------------------------------------- settings


@dataclass
class TrainingSettings:
    gradient_checkpointing: bool
    gradient_checkpointing_kwargs: dict[str, Any]
    wrapper: str | None  # None, "checkpoint" or "offload": torch checkpoint_wrapper on decoder layers
    wrap_cls: tuple[str, ...]  # decoder layer classes the wrapper goes on (empty: no wrapper)
    use_cache: bool

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mode": "train (dropout p=0)", "use_cache": self.use_cache,
                             "gradient_checkpointing": self.gradient_checkpointing}
        if self.gradient_checkpointing:
            d["gradient_checkpointing_kwargs"] = dict(self.gradient_checkpointing_kwargs)
        if self.wrapper:
            d["activation_checkpointing_wrapper"] = f"{self.wrapper} on {', '.join(self.wrap_cls)}"
        return d


def training_settings(plan, base_model) -> TrainingSettings:
    """The settings the training run applies, read from the Plan (nothing re-derived)."""
    gc = plan.training.gradient_checkpointing
    offload = plan.model.activation_offloading
    fsdp_ac = plan.distributed.fsdp_activation_checkpointing
    wrapper = "offload" if offload else ("checkpoint" if fsdp_ac else None)
    return TrainingSettings(gc, dict(plan.training.gradient_checkpointing_kwargs or {}), wrapper,
                            plan.decoder_layer_classes if wrapper else (), plan.use_cache)


REFERENCE_SETTINGS = {"mode": "eval", "use_cache": True, "gradient_checkpointing": False}


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _dropout_off(model: torch.nn.Module):
    """Every dropout at p=0 (nn.Dropout* modules and float `attention_dropout` attributes)."""
    saved: list[tuple[Any, str, float]] = []
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p:
            saved.append((module, "p", module.p))
            module.p = 0.0
        value = getattr(module, "attention_dropout", None)
        if isinstance(value, float) and value:
            saved.append((module, "attention_dropout", value))
            module.attention_dropout = 0.0
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def _checkpointing_on(base, settings: TrainingSettings) -> None:
    kwargs = dict(settings.gradient_checkpointing_kwargs)
    every_n_layers = kwargs.pop("every_n_layers", 1)
    offload = kwargs.pop("offload", False)
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None,
                                             every_n_layers=every_n_layers, offload=offload)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)


def _checkpointing_off(base) -> None:
    if getattr(base, "supports_gradient_checkpointing", False):
        if hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        elif hasattr(base, "gradient_checkpointing_disable"):
            base.gradient_checkpointing_disable()


def _apply_wrappers(model: torch.nn.Module, settings: TrainingSettings) -> int:
    """torch's checkpoint_wrapper (non-reentrant) around every `wrap_cls` module; returns how many."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    def is_layer(module: torch.nn.Module) -> bool:
        return type(module).__name__ in settings.wrap_cls

    count = sum(1 for m in model.modules() if is_layer(m))
    if count:
        apply_activation_checkpointing(
            model, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
            check_fn=is_layer)
    return count


def _move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _forward_logits(model, batch: dict, use_cache: bool) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs, use_cache=use_cache).logits


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-weighted mean cross-entropy, token t predicting label t+1 (as evaluation does)."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.size(-1))
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)


def _compare(train: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    t, r = train.detach().float()[mask], ref.detach().float()[mask]
    if t.numel() == 0:
        return math.nan, math.nan
    diff = (t - r).abs()
    # A NaN anywhere is a difference, not something max() may skip.
    max_diff = math.inf if not torch.isfinite(diff).all() else float(diff.max())
    return max_diff, float(r.abs().max())


def probe_batch(tokenizer, plan) -> dict:
    """The first micro_batch_size training rows of the configured data, collated as training does
    (rows with images: their image inputs too)."""
    from archtune.data import prepare_data
    from archtune.data.collate import DataCollator

    from archtune.train.recipe import media_setup

    media = media_setup(plan)
    data = prepare_data(plan, tokenizer, progress=False, media=media)
    n = min(plan.training.micro_batch_size, len(data.train))
    rows = data.train.select(range(n))
    features = [rows[i] for i in range(n)]
    batch = DataCollator(tokenizer, drop_attention_mask=plan.drop_attention_mask,
                         media=media.processor if media else None)(features)
    if "position_ids" in batch and plan.data.sample_packing and plan.drop_attention_mask:
        # The family's packing policy: no attention mask, position_ids restart per document.
        mask = batch.pop("attention_mask", None)
        batch["real_token_mask"] = mask if mask is not None else batch["input_ids"] != tokenizer.pad_token_id
    return batch


def _real_token_mask(batch: dict) -> torch.Tensor:
    mask = batch.get("real_token_mask", batch.get("attention_mask"))
    if mask is None:
        return torch.ones_like(batch["input_ids"], dtype=torch.bool)
    return mask.bool()


# --------------------------------------------------------------------------- the probe


def run_probe(cfg, plan, console=None, *, tokenizer=None, model=None, batch: dict | None = None,
              tolerance: float | None = None) -> ProbeResult:
    """Load the model as training does, run one real batch under training and reference
    settings, and compare. Returns a ProbeResult whose `.problems` are errors (key "probe", or the
    loading / data problems, e.g. missing or unexpected weight keys) and `.warnings` warnings.

    `tokenizer`, `model` (as `assemble_model(plan, tokenizer, "train").model`) and `batch` (collated, with labels)
    may be given to skip loading them. `tolerance` overrides PROBE_TOLERANCE.
    """
    from archtune.models.load import load_tokenizer, set_chat_template, tiny_name
    from archtune.train.assembly import assemble_model
    from archtune.patches.text_only import text_only_extras, unwrap_model

    result = ProbeResult(reference_settings=dict(REFERENCE_SETTINGS))
    try:
        if tokenizer is None:
            tokenizer = set_chat_template(load_tokenizer(cfg), plan)
        if batch is None:
            batch = probe_batch(tokenizer, plan)
        if model is None:
            model = assemble_model(plan, tokenizer, "train", console=console).model
    except UserError as exc:  # missing/unexpected weight keys, bad data: errors of the probe
        result.problems.extend(exc.problems)
        _report(result, console)
        return result

    base = unwrap_model(model)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    result.dtype = str(dtype).removeprefix("torch.")
    result.tolerance = float(tolerance) if tolerance is not None else probe_tolerance(dtype)
    batch = _move({**batch, **text_only_extras(model, batch)}, device)
    mask = _real_token_mask(batch)
    batch.pop("real_token_mask", None)
    labels = batch["labels"]
    result.rows, result.tokens = int(labels.size(0)), int(mask.sum())
    settings = training_settings(plan, base)
    result.training_settings = settings.describe()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    result.trainable_tensors = len(trainable)
    if not trainable:
        result.warnings.append("no trainable parameter: training would change nothing")

    # -- reference: eval, use_cache=True, no checkpointing, no gradients
    _checkpointing_off(base)
    model.eval()
    try:
        with torch.no_grad():
            # Packed rows: a KV cache makes transformers skip the per-document mask, so inference
            # on packed rows is only meaningful without it.
            ref_logits = _forward_logits(model, batch, use_cache="position_ids" not in batch)
            result.loss_reference = float(causal_lm_loss(ref_logits, labels))
    except Exception as exc:  # inference itself is broken: nothing to compare with
        result.problems.append(Problem(PROBE_KEY, f"the reference forward (eval mode, use_cache=true) failed: "
                                       f"{type(exc).__name__}: {exc}",
                                       "the model cannot run this batch even in inference; check the model "
                                       "files and the data (run with --debug for the traceback)"))
        return result
    result.loss_sanity = classify_initial_loss(result.loss_reference, ref_logits.size(-1),
                                               random_init=tiny_name(plan.model.base_model) is not None)
    if result.loss_sanity.warning:
        result.warnings.append(result.loss_sanity.warning)

    # -- training: train mode with dropout off, the Plan's checkpointing and use_cache, gradients on
    wrapped = 0
    with _dropout_off(model):
        model.train()
        if settings.gradient_checkpointing:
            _checkpointing_on(base, settings)
        if settings.wrapper:
            wrapped = _apply_wrappers(model, settings)
            if not wrapped:
                result.warnings.append(f"probe: no {', '.join(settings.wrap_cls)} module to wrap for activation "
                                       "checkpointing; the training forward ran without the wrappers")
        offload = (torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
                   if settings.wrapper == "offload" else contextlib.nullcontext())
        for p in model.parameters():
            p.grad = None
        described = ", ".join(f"{k}={v}" for k, v in result.training_settings.items())
        fix = ("training would crash the same way; use_cache: false, gradient_checkpointing_kwargs: "
               "{use_reentrant: false} and no activation_offloading are the settings to try")
        train_logits = None
        with torch.enable_grad(), offload:
            try:
                logits = _forward_logits(model, batch, use_cache=settings.use_cache)
                loss = causal_lm_loss(logits, labels)
                result.loss_train = float(loss.detach())
                train_logits = logits
            except Exception as exc:  # a failing forward under training settings is the finding
                result.problems.append(Problem(PROBE_KEY, f"the training forward failed ({described}): "
                                               f"{type(exc).__name__}: {exc}", fix))
            if train_logits is not None and loss.requires_grad:
                try:
                    loss.backward()  # the recompute of checkpointed layers runs here
                except Exception as exc:
                    result.problems.append(Problem(PROBE_KEY, f"the training backward failed ({described}); "
                                                   f"checkpointed layers are recomputed there: {type(exc).__name__}: {exc}", fix))
                else:
                    result.no_grad_tensors = [n for n, p in trainable if p.grad is None]
        for p in model.parameters():
            p.grad = None
        if train_logits is not None:
            result.max_logit_diff, result.logit_scale = _compare(train_logits, ref_logits, mask)
            result.rel_logit_diff = result.max_logit_diff / max(1.0, result.logit_scale)
            result.loss_diff = abs(result.loss_train - result.loss_reference)
            if not result.consistent:
                result.cause = _attribute(model, base, batch, ref_logits, mask, settings, result.tolerance, wrapped)
                result.problems.append(_inconsistency_problem(result))
        _checkpointing_off(base)
        model.eval()

    if result.no_grad_tensors and trainable:
        names = ", ".join(result.no_grad_tensors[:_MAX_LISTED])
        more = f" and {len(result.no_grad_tensors) - _MAX_LISTED} more" if len(result.no_grad_tensors) > _MAX_LISTED else ""
        result.warnings.append(
            f"{len(result.no_grad_tensors)} of {len(trainable)} trainable tensors got no gradient from the probe batch "
            f"({names}{more}): they do not train on text-only batches (freeze them), or checkpointing cut them off "
            "(use_reentrant: true does that)")
    _report(result, console)
    return result


def _attribute(model, base, batch, ref_logits, mask, settings: TrainingSettings, tol: float, wrapped: int) -> str:
    """Rerun the training forward without parts of the training settings to find the culprit."""

    def close(use_cache: bool) -> bool:
        with torch.no_grad():  # no gradients: checkpointing (HF's and the wrappers') is inactive
            logits = _forward_logits(model, batch, use_cache=use_cache)
        diff, scale = _compare(logits, ref_logits, mask)
        return math.isfinite(diff) and diff / max(1.0, scale) <= tol

    _checkpointing_off(base)
    checkpointing = settings.gradient_checkpointing or wrapped
    if close(settings.use_cache):
        if checkpointing:
            return (f"checkpointing: train mode with use_cache={settings.use_cache} and no checkpointing matches "
                    "inference, with checkpointing it does not")
        return "gradients: the same forward without gradients matches inference"
    if not settings.use_cache and close(True):
        return "use_cache=false: train mode matches inference with use_cache=true, not with use_cache=false"
    return "train mode itself (with dropout off and use_cache=true it still differs from eval mode)"


def _inconsistency_problem(result: ProbeResult) -> Problem:
    msg = (f"training-mode forward differs from inference: max |Δlogit| {result.max_logit_diff:.4g} "
           f"(relative {result.rel_logit_diff:.3g} > tolerance {result.tolerance:.3g}), loss "
           f"{result.loss_train:.6g} in training vs {result.loss_reference:.6g} in inference")
    if result.cause:
        msg += f"; the difference comes from {result.cause}"
    return Problem(PROBE_KEY, msg,
                   "the model would train on numbers it never computes at inference (the 'loss ~12' class): "
                   "change the setting named above (use_cache, gradient_checkpointing_kwargs.use_reentrant: false, "
                   "activation_offloading) or upgrade transformers; do not start the run until the probe passes")


def _report(result: ProbeResult, console) -> None:
    """Print the measurement table; warnings and errors are returned for the caller to show."""
    if console is None or not math.isfinite(result.loss_reference):
        return
    console.print(result.render())


__all__ = ["PROBE_KEY", "PROBE_TOLERANCE", "ProbeResult", "REFERENCE_SETTINGS", "TrainingSettings",
           "causal_lm_loss", "probe_batch", "probe_tolerance", "run_probe", "training_settings"]
