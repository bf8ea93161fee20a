"""Compile every variant of the scattermoe_triton kernels for a GPU, on a machine without one.

    python bench/triton_compile.py                 # sm_90 (H100/H200), fp32 and bf16, LoRA and 4-bit
    python bench/triton_compile.py --arch 80       # A100

The interpreter (TRITON_INTERPRET=1, what the tests run) executes the kernels' Python; it does not
type-check them as the compiler does (it upcasts every tl.dot, ignores constexpr rules). This runs
tiny forward + backward passes under the interpreter, records each kernel launch's argument types
and constexprs, and compiles each distinct variant down to PTX with triton's own compiler for the
given CUDA target (triton's bundled ptxas; no GPU or driver needed). One JSON line: the variants,
how many compiled, the compile seconds, and the errors.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["TRITON_INTERPRET"] = "1"  # the recording runs: before the kernels are first imported

DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
          torch.int64: "i64", torch.uint8: "u8"}


class Recorder:
    """Stands in for the kernel module: records each launch, then runs the interpreted kernel."""

    def __init__(self, module):
        self.module, self.launches = module, []

    def __getattr__(self, name):
        kernel = getattr(self.module, name)
        recorder = self

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    recorder.launches.append((name, args, kwargs))
                    return kernel[grid](*args, **kwargs)
                return launch

        return Launcher()


def signature_of(kernel, args, kwargs) -> tuple[dict, dict]:
    names = kernel.arg_names
    sig, constexprs = {}, {}
    for name, value in zip(names, args):
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + DTYPES[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: {type(value)}")
    for name, value in kwargs.items():
        if name in ("num_warps", "num_stages"):
            continue
        sig[name] = "constexpr"
        constexprs[name] = value
    return sig, constexprs


def record() -> list:
    import archtune.moe  # noqa: F401
    from archtune.moe import triton_experts
    from tests.unit.test_scattermoe import run_block
    from tests.unit.test_triton_experts import _block, _inputs

    recorder = Recorder(triton_experts._kernels())
    assert triton_experts._interpreted()
    triton_experts._kernels = lambda: recorder  # this script's stand-ins
    triton_experts._interpreted = lambda: True
    for kind in ("gemma4", "aria", "gpt_oss"):
        for dtype in (torch.float32, torch.bfloat16):
            for lora in (False, True):
                block, config = _block(kind, lora, base_trainable=not lora)
                block.to(dtype)
                run_block(block, config, "scattermoe_triton", *_inputs(dtype=dtype))
    try:
        from tests.unit.test_quant4 import quantized_pair

        for lora in (False, True):
            block, _, config = quantized_pair("gemma4", lora)
            run_block(block, config, "scattermoe_triton", *_inputs(allowed=[0, 1, 2, 4, 5, 6]))
    except ImportError:  # bitsandbytes absent: no 4-bit variants
        pass
    return recorder.launches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    launches = record()
    # the same kernels compiled for a GPU: a second copy of the module, imported without the interpreter
    os.environ["TRITON_INTERPRET"] = "0"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import archtune.moe.triton_kernels as interpreted

    spec = importlib.util.spec_from_file_location("triton_kernels_compiled", interpreted.__file__)
    compiled = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compiled)
    target = GPUTarget("cuda", args.arch, 32)
    variants, errors = {}, {}
    for name, a, kw in launches:
        kernel = getattr(compiled, name)
        sig, constexprs = signature_of(kernel, a, kw)
        constexprs["UPCAST"] = False  # recorded under the interpreter; on a GPU tiles go to tl.dot as they are
        key = (name, json.dumps(sig, sort_keys=True), json.dumps(constexprs, sort_keys=True, default=str))
        if key in variants:
            continue
        options = {k: kw[k] for k in ("num_warps", "num_stages") if k in kw} or {"num_warps": 4, "num_stages": 3}
        t0 = time.perf_counter()
        try:
            out = triton.compile(ASTSource(kernel, sig, constexprs), target=target, options=options)
            variants[key] = (time.perf_counter() - t0, len(out.asm.get("ptx", "")))
        except Exception as exc:  # noqa: BLE001 (reported, every variant tried)
            variants[key] = (time.perf_counter() - t0, 0)
            errors[f"{name} {constexprs}"] = f"{type(exc).__name__}: {str(exc)[:600]}"
    print(json.dumps({"check": "triton_compile", "arch": args.arch, "triton": triton.__version__,
                      "launches": len(launches), "variants": len(variants),
                      "compiled": sum(1 for _, n in variants.values() if n), "errors": errors,
                      "compile_seconds": round(sum(t for t, _ in variants.values()), 1)}))


if __name__ == "__main__":
    main()
