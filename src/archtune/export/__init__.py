"""`archtune export`: the trained model as a GGUF file, merged weights or a serving-ready adapter,
each loaded back in the runtime it is for and checked against the trained model.

One call, `export(plan, tokenizer, settings)`:

 1. the trained model as `evaluate` and `generate` see it (the one model assembly), and the
    held-out prompts (the run's evaluation data, else its last training rows);
 2. the artifact: merged weights through `merge-lora`'s merge (safetensors), the adapter (PEFT's
    files), or a GGUF file written from the merged model (archtune's writer on the `gguf`
    package), then each `quantize` type through llama.cpp's own quantizer;
 3. the check: every adapted tensor merged (or, for the adapter, applied by stock PEFT) with the
    trained value, and per prompt the max |logit difference| and greedy agreement of the
    artifact in its runtime (transformers alone, PEFT alone, llama.cpp through
    llama-cpp-python) against the trained model, within the outtype's tolerance.

`ExportReport.ok` is False when any check fails; the command then exits 2.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from archtune.errors import UserError
from archtune.export.compare import held_out_prompts, hf_logits, reference_noise, verify
from archtune.export.merge_check import adapted_tensors, count_merged
from archtune.export.report import ExportReport
from archtune.export.serving import vllm_3d_layout

FORMATS = ("gguf", "merged", "adapter")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_PROMPTS = 8
# PEFT recomputes the same delta the same way on reload: only float32 summation order differs.
RELOAD_RELATIVE = 1e-5


@dataclass(frozen=True)
class ExportSettings:
    format: str
    outtype: str
    quantize: tuple[str, ...] = ()
    out: Path | None = None
    prompts: int = DEFAULT_PROMPTS


def settings_from(plan, *, format: str | None = None, outtype: str | None = None,
                  quantize: list[str] | None = None, out: Path | None = None,
                  prompts: int = DEFAULT_PROMPTS) -> ExportSettings:
    """The command line's choices over the config's `export:` block (Axolotl 0.21's keys), over the defaults:
    gguf in f16 (llama.cpp's converter default); merged and adapter keep the model's dtype."""
    fmt = format or plan.export.format or "gguf"
    if fmt not in FORMATS:
        raise UserError.single("--format", f"unknown export format {fmt!r}", f"use one of: {', '.join(FORMATS)}")
    if fmt == "gguf" and plan.preference.method == "reward":
        raise UserError.single("--format", "a reward model's score head has no place in archtune's GGUF writer, "
                               "which writes the language model (its lm_head) for llama.cpp's generation",
                               "use --format merged or --format adapter (transformers / PEFT score it)")
    kind = outtype or plan.export.outtype
    if kind in (None, "auto"):
        kind = "f16" if fmt == "gguf" else {torch.float32: "f32", torch.float16: "f16",
                                            torch.bfloat16: "bf16"}[_model_dtype(plan)]
    allowed = OUTTYPES if fmt == "gguf" else OUTTYPES[:3]
    if kind not in allowed:
        raise UserError.single("--outtype", f"outtype {kind!r} is not one of {', '.join(allowed)} for --format {fmt}",
                               "pick one of those (k-quants such as Q4_K_M go in --quantize, GGUF only)")
    quants = tuple(quantize if quantize else plan.export.quantize)
    if quants and fmt != "gguf":
        raise UserError.single("--quantize", f"--quantize applies to GGUF files, not --format {fmt}",
                               "use --format gguf, or leave --quantize out")
    if quants and kind == "q8_0":
        raise UserError.single("--quantize", "llama.cpp's quantizer does not requantize a q8_0 file",
                               "use --outtype f16 (or f32, bf16) with --quantize, and add Q8_0 to --quantize")
    outfile = out or (Path(plan.export.outfile) if plan.export.outfile else None)
    if prompts < 1:
        raise UserError.single("--prompts", f"--prompts must be at least 1, not {prompts}", "use --prompts 1 or more")
    return ExportSettings(fmt, kind, quants, outfile, prompts)


def _model_dtype(plan) -> torch.dtype:
    from archtune.models.load import torch_dtype

    return torch_dtype(plan)


def export(plan, tokenizer, settings: ExportSettings, *, log: Callable[[str], None] = lambda _: None) -> ExportReport:
    """Write the artifact `settings` asks for and check it (the module's docstring)."""
    from archtune.train.assembly import assemble_model

    output_dir = Path(plan.training.output_dir)
    trained = assemble_model(plan, tokenizer, "generate")
    log(f"trained model: {trained.weights} weights of {output_dir}")
    prompts, source = held_out_prompts(plan, tokenizer, settings.prompts)
    if not prompts:
        raise UserError.single("datasets", "no row of the data is long enough to verify the export with",
                               "give the run rows of at least 2 tokens")
    cache: dict[tuple[int, ...], torch.Tensor] = {}

    def reference(ids: list[int]) -> torch.Tensor:
        key = tuple(ids)
        if key not in cache:
            cache[key] = hf_logits(trained.model, ids)
        return cache[key]

    for ids in prompts:  # the trained model's logits first: it can then be freed
        reference(ids)
    if settings.format == "merged" and trained.weights == "adapter":
        held = [trained]  # the only reference: _export_merged frees the trained model when it is done with it
        del trained
        streamed = _export_merged_streaming(plan, tokenizer, settings, held, prompts, source, reference)
        if streamed is not None:
            return streamed
        trained = held.pop()
    expected = list(adapted_tensors(trained.model)) if trained.weights == "adapter" else []
    noise = reference_noise(trained.model, prompts, reference)  # the last use of the trained model
    if settings.format == "adapter":
        return _export_adapter(plan, tokenizer, settings, trained, expected, prompts, source, reference, noise)
    del trained
    gc.collect()
    if settings.format == "merged":
        return _export_merged(plan, tokenizer, settings, expected, prompts, source, reference, noise)
    from archtune.export.gguf_export import export_gguf

    return export_gguf(plan, tokenizer, settings, expected, prompts, source, reference, log=log, noise=noise)


def _default_out(plan, name: str) -> Path:
    return Path(plan.training.output_dir) / "export" / name


def _export_merged_streaming(plan, tokenizer, settings, held: list, prompts, source, reference) -> ExportReport | None:
    """`--format merged` shard by shard (merge-lora's stream), None when it must merge in memory.

    The trained model (`held`'s one item) stays while the merge streams (a shard at a time) so that
    each adapted tensor is checked against the merged files one tensor at a time, then goes before
    transformers loads the merged model for the logits: at most one model in memory, not the
    trained one, the in-memory merge's and float32 copies of every adapted tensor."""
    import transformers

    from archtune.adapters.merge import MergedTensors
    from archtune.export import hf
    from archtune.train.assembly import merge_adapter, stream_plan_for

    stream, _ = stream_plan_for(plan)
    if isinstance(stream, str):
        return None
    out = settings.out or _default_out(plan, "merged")
    report = merge_adapter(plan, tokenizer, out, dtype=hf.DTYPES[settings.outtype])
    tokenizer.save_pretrained(str(out))
    trained = held.pop()
    count = count_merged(adapted_tensors(trained.model), MergedTensors(report.stream, out).get)
    noise = reference_noise(trained.model, prompts, reference)
    del trained
    gc.collect()
    reloaded = hf.load_merged(plan, out)
    check = verify(f"transformers {transformers.__version__}", settings.outtype, prompts, reference,
                   lambda ids: hf_logits(reloaded, ids), moe=plan.family.moe(plan.model_config), noise=noise)
    return ExportReport("merged", str(out), count, [check], [str(out)], source)


def _export_merged(plan, tokenizer, settings, expected, prompts, source, reference, noise) -> ExportReport:
    import transformers

    from archtune.export import hf
    from archtune.train.assembly import assemble_model

    out = settings.out or _default_out(plan, "merged")
    merged = assemble_model(plan, tokenizer, "merge").model  # merge-lora's merge (raises without an adapter)
    hf.save_merged(merged, tokenizer, out, settings.outtype)
    del merged
    gc.collect()
    reloaded = hf.load_merged(plan, out)
    tensors = dict(reloaded.named_parameters())
    count = count_merged(expected, tensors.get)
    check = verify(f"transformers {transformers.__version__}", settings.outtype, prompts, reference,
                   lambda ids: hf_logits(reloaded, ids), moe=plan.family.moe(plan.model_config), noise=noise)
    return ExportReport("merged", str(out), count, [check], [str(out)], source)


def _export_adapter(plan, tokenizer, settings, trained, expected, prompts, source, reference,
                    noise) -> ExportReport:
    import peft

    from archtune.export import hf
    from archtune.models import quant
    from archtune.models.load import load_model

    if trained.weights != "adapter":
        raise UserError.single("output_dir", f"{plan.training.output_dir} holds no LoRA adapter (adapter_config.json)",
                               "train with adapter: lora first, or use --format merged / gguf for a full fine-tune")
    del trained
    gc.collect()
    out = settings.out or _default_out(plan, "adapter")
    config = hf.save_adapter(Path(plan.training.output_dir), tokenizer, out, plan.model.base_model)
    base = quant.load_quantized(plan, tokenizer) if quant.is_quantized(plan) else load_model(plan, tokenizer)
    stock = hf.load_adapter_stock(base, out)
    reloaded = list(adapted_tensors(stock))
    applied = {t.name: t.expected for t in reloaded}
    count = count_merged(expected, applied.get, relative=RELOAD_RELATIVE)
    layout = vllm_3d_layout(out / hf.ADAPTER_FILES[1], config, reloaded)
    del reloaded, applied
    check = verify(f"peft {peft.__version__}", settings.outtype, prompts, reference, lambda ids: hf_logits(stock, ids),
                   moe=plan.family.moe(plan.model_config), noise=noise)
    notes = hf.serving_notes(config, plan.family.serving_notes)
    if layout is not None:
        notes.insert(0, layout.sentence())
    if plan.model.normalize_weight_scales:
        notes.append("normalize_weight_scales rescaled the base before training: a server that loads this adapter "
                     "on the original base computes something else; export --format merged instead")
    return ExportReport("adapter", str(out), count, [check], [str(out)], source, notes, layout)


__all__ = ["DEFAULT_PROMPTS", "ExportReport", "ExportSettings", "FORMATS", "OUTTYPES", "export", "settings_from"]
