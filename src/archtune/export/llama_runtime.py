"""llama.cpp, through llama-cpp-python (the `gguf` extra): load a GGUF file, its logits on token
ids, its tokenizer, and llama.cpp's own quantizer (k-quants without a llama.cpp checkout)."""
from __future__ import annotations

import ctypes
import gc
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from archtune.errors import UserError

INSTALL = "pip install 'archtune[gguf]' (llama-cpp-python builds llama.cpp from source: a C/C++ compiler and cmake)"


def llama_cpp():
    try:
        import llama_cpp as module
    except ImportError:
        raise UserError.single("--format", "checking a GGUF file needs llama-cpp-python, which is not installed",
                               INSTALL) from None
    return module


def version() -> str:
    return f"llama.cpp (llama-cpp-python {llama_cpp().__version__})"


class LlamaModel:
    """One GGUF file loaded by llama.cpp on the CPU, every position's logits kept."""

    def __init__(self, path: Path, n_ctx: int = 512):
        module = llama_cpp()
        release_freed_memory()
        try:
            with stdout_to_stderr():
                self.llm = module.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                        logits_all=True, n_gpu_layers=0, verbose=False, seed=0,
                                        type_k=0, type_v=0)  # f32 KV cache: the file is checked, not the cache
        except (ValueError, RuntimeError) as exc:
            raise UserError.single("--format", f"llama.cpp could not load {path}: {exc}",
                                   "export --format merged; report the architecture and this message") from None

    def logits(self, ids: list[int]) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(list(ids))
        return torch.from_numpy(np.array(self.llm.scores[:len(ids)], dtype=np.float32))

    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def close(self) -> None:
        self.llm.close()


def builtin_chat(template: str, messages: list[dict], add_generation_prompt: bool = True) -> str | None:
    """`messages` as llama.cpp renders them with the built-in chat format it recognizes in `template`
    (what llama.cpp and its servers use without --jinja), or None when it recognizes none."""
    module = llama_cpp()
    chat = (module.llama_chat_message * len(messages))(
        *[module.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in messages])
    size = module.llama_chat_apply_template(template.encode(), chat, len(messages), add_generation_prompt, None, 0)
    if size < 0:
        return None
    buffer = ctypes.create_string_buffer(size + 1)
    module.llama_chat_apply_template(template.encode(), chat, len(messages), add_generation_prompt, buffer, size + 1)
    return buffer.raw[:size].decode("utf-8")


def release_freed_memory() -> None:
    """Hand the heap Python has freed back to the system. glibc keeps what the merged model freed
    (bench/export_memory.py: 0.27 GiB of a 0.26 GiB checkpoint's export), and the pages of the file
    llama.cpp maps would come on top of it. Nothing to do where the C library is not glibc."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """llama.cpp's C code prints to the process's stdout: sent to stderr, so `--json` stays one object."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def quantize(src: Path, dst: Path, kind: str) -> None:
    """llama.cpp's quantizer: `src` (an f16/f32 GGUF file) as `kind` (Q4_K_M, Q5_K_M, Q8_0, ...) at `dst`."""
    module = llama_cpp()
    ftype = getattr(module, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}", None)
    if ftype is None:
        known = sorted(n.removeprefix("LLAMA_FTYPE_MOSTLY_") for n in dir(module) if n.startswith("LLAMA_FTYPE_MOSTLY_"))
        raise UserError.single("--quantize", f"llama.cpp has no quantization type {kind!r}", f"use one of: {', '.join(known)}")
    params = module.llama_model_quantize_default_params()
    params.ftype = ftype
    with stdout_to_stderr():
        code = module.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if code != 0:
        raise UserError.single("--quantize", f"llama.cpp's quantizer failed on {src} ({kind}, code {code})",
                               "try another type, or quantize the f16 file with llama.cpp's llama-quantize")


__all__ = ["INSTALL", "LlamaModel", "builtin_chat", "llama_cpp", "quantize", "release_freed_memory", "version"]
