"""`--format gguf`: the merged (or fully fine-tuned) model as a GGUF file, checked in llama.cpp.

The merge is `merge-lora`'s (the one model assembly's "merge" use); the merged tensors are
counted against the trained adapter before they are written. Then: archtune's writer
(export/gguf_file.py) in the outtype, the file loaded by llama.cpp through llama-cpp-python,
its tokenizer splitting each held-out prompt as the Hugging Face tokenizer does, its logits
against the trained model's; each `--quantize` type made from that file by llama.cpp's own
quantizer and checked the same way, within its own tolerance.
"""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Callable

from archtune.errors import UserError


FTYPE = "{ftype}"  # the placeholder of Axolotl's export.outfile

def gguf_spec(plan, model_type: str):
    spec = plan.family.gguf.get(model_type)
    if spec is None:
        known = sorted(plan.family.gguf) or ["none"]
        raise UserError.single("base_model", f"archtune writes no GGUF for model_type {model_type!r} "
                               f"(family {plan.family.name}: {', '.join(known)})",
                               "export --format merged and convert that with llama.cpp's convert_hf_to_gguf.py")
    return spec


def _gguf_package():
    try:
        import gguf  # noqa: F401
    except ImportError:
        from archtune.export.llama_runtime import INSTALL

        raise UserError.single("--format", "writing GGUF needs the gguf package, which is not installed",
                               INSTALL) from None


def export_gguf(plan, tokenizer, settings, expected, prompts, source, reference: Callable, *, log,
                noise: float = 0.0) -> object:
    from archtune.export.report import ExportReport
    from archtune.export.compare import verify
    from archtune.export.gguf_file import tokenizer_model, write_gguf
    from archtune.families import text_config
    from archtune.export.llama_runtime import LlamaModel, llama_cpp, quantize, version
    from archtune.export.merge_check import count_merged, rounding
    from archtune.train.assembly import assemble_model

    _gguf_package()
    llama_cpp()  # before the merge: a missing runtime is said at once
    spec = gguf_spec(plan, text_config(plan.model_config).get("model_type") or plan.model_type)
    tokenizer_model(tokenizer, spec)  # and a tokenizer llama.cpp would split otherwise
    adapter = bool(expected) or _has_adapter(plan)
    model = assemble_model(plan, tokenizer, "merge" if adapter else "generate").model
    count = None
    if adapter:
        tensors = dict(model.named_parameters())
        count = count_merged(expected, tensors.get, relative=rounding(next(iter(tensors.values())).dtype))
    out = settings.out or Path(plan.training.output_dir) / "export" / f"model-{settings.outtype}.gguf"
    if out.is_dir():
        out = out / f"model-{settings.outtype}.gguf"
    named = out  # Axolotl's `{ftype}` in the file name: each file's weight type
    out = Path(str(named).replace(FTYPE, settings.outtype))
    written = write_gguf(model, tokenizer, spec, plan.family.language_model_prefix if _wrapped(model, plan) else "",
                         out, settings.outtype, name=Path(plan.model.base_model).name)
    log(f"wrote {out} ({written.arch}, {written.tensors} tensors: "
        + ", ".join(f"{n} {k}" for k, n in sorted(written.types.items())) + ")")
    del model
    gc.collect()
    files = [out] + [Path(str(named).replace(FTYPE, q)) if FTYPE in str(named)
                     else out.with_name(f"{out.stem.removesuffix('-' + settings.outtype)}-{q}.gguf")
                     for q in settings.quantize]
    for q, path in zip(settings.quantize, files[1:]):
        quantize(out, path, q)
        log(f"quantized {path} ({q}, llama.cpp's quantizer)")
    checks = []
    runtime = version()
    for kind, path in zip((settings.outtype, *settings.quantize), files):
        loaded = LlamaModel(path, n_ctx=max(64, max(len(p) for p in prompts)))
        try:
            check = verify(runtime, kind, prompts, reference, loaded.logits, moe=plan.family.moe(plan.model_config),
                           noise=noise)
            check.tokenizer_mismatches = _tokenizer_mismatches(loaded, tokenizer, prompts)
        finally:
            loaded.close()
        if check.tokenizer_mismatches:
            check.notes.append(f"llama.cpp's tokenizer splits {check.tokenizer_mismatches} of {len(prompts)} prompts "
                               "differently from the Hugging Face tokenizer")
        checks.append(check)
    notes = []
    if written.dropped:
        notes.append(f"{len(written.dropped)} tensors outside the language model (towers, projectors) are not in the "
                     "GGUF file: it holds the text model (llama.cpp keeps vision in a separate mmproj file, not written)")
    chat = _chat_format_note(tokenizer)
    if chat:
        notes.append(chat)
    return ExportReport("gguf", str(out), count, checks, [str(f) for f in files], source, notes)


# A conversation to render both ways: what a chat client sends.
CHAT_PROBE = ({"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "blue"},
              {"role": "user", "content": "Another one."})


def _chat_format_note(tokenizer) -> str | None:
    """Whether llama.cpp without --jinja formats chats as the file's chat template does: it uses a
    built-in format it recognizes in the template (Gemma 3's, Llama 3's, ChatML, ...), not the template."""
    import jinja2

    from archtune.export.llama_runtime import builtin_chat

    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return None
    theirs = builtin_chat(template, list(CHAT_PROBE))
    if theirs is None:
        return ("llama.cpp has no built-in chat format for this chat template: run it with the file's template "
                "(llama-server --jinja; llama-cpp-python's chat handler reads it from the file)")
    try:
        ours = tokenizer.apply_chat_template(list(CHAT_PROBE), tokenize=False, add_generation_prompt=True)
    except (jinja2.TemplateError, ValueError):
        return None
    bos = tokenizer.bos_token or ""
    if bos and ours.startswith(bos) and not theirs.startswith(bos):
        ours = ours[len(bos):]  # llama.cpp adds BOS when it tokenizes the formatted chat
    if ours == theirs:
        return ("llama.cpp's built-in chat format (used without --jinja) formats a conversation as the chat "
                "template does")
    return ("llama.cpp's built-in chat format (used without --jinja) formats a conversation otherwise than the chat "
            "template: run it with --jinja (the file's template)")


def _has_adapter(plan) -> bool:
    from archtune.models.load import trained_weights_kind

    return trained_weights_kind(plan.training.output_dir) == "adapter"


def _wrapped(model, plan) -> bool:
    """The family's language-model path applies (a multimodal wrapper), not a text-only checkpoint."""
    prefix = plan.family.language_model_prefix
    return bool(prefix) and any(n.startswith(prefix + ".") for n, _ in model.named_parameters())


def _tokenizer_mismatches(loaded, tokenizer, prompts) -> int:
    """Prompts whose text llama.cpp's tokenizer splits otherwise than the Hugging Face tokenizer."""
    bad = 0
    for ids in prompts:
        text = tokenizer.decode(ids, skip_special_tokens=False)
        if loaded.tokenize(text) != tokenizer(text, add_special_tokens=False)["input_ids"]:
            bad += 1
    return bad


__all__ = ["export_gguf", "gguf_spec"]
