"""`scattermoe_triton`: scattermoe's algorithm on Triton kernels (archtune.moe.triton_kernels).

Registered in transformers' experts registry by `archtune.moe.register()`, beside `scattermoe`;
a config names it with `experts_implementation: scattermoe_triton` (the optional `triton`
extra). It runs on a CUDA device, or on CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1` in the environment before the kernels are first imported); `unavailable`
says why not otherwise. triton is imported here only when the forward first runs.

Gated experts without biases or a post-expert norm (Gemma 4, Qwen 3.5 MoE, Aria) run as
    routing = sort_by_expert(...)                       pairs sorted by expert, no capacity
    h   = hidden[token_idx] @ R(W1)_e (+ s1 (x A1_e) B1_e)   kernel 1, gather in its prologue
    act = gate(h)                                        the module's own gate, in PyTorch
    out = sum_k  w * (act @ R(W2)_e (+ s2 (act A2_e) B2_e))  kernel 2, routing weight and
                                                          unpermute in its epilogue
Each product is one `ExpertsGemm` (a torch.autograd.Function); its backward runs the same row
kernel on R(W)^T for the input gradient (the LoRA factors again kept apart) with the routing
weights' gradient as a row dot in its epilogue, and `weight_grad_kernel` for the gradients of
the expert tensors (only when they train) and of the LoRA factors. 4-bit experts
(`quantize_moe_experts`) are dequantized per tile inside the row kernel. Experts with biases, a
post-expert norm or no gate (gpt-oss) use the same two kernels without the fused epilogue; the
biases, the norm, the routing weight and the scatter are PyTorch steps around them.

fp32 products run in IEEE fp32 unless torch allows TF32 for CUDA matmuls (as torch's own GEMMs);
bf16/fp16 tiles accumulate in fp32.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from archtune.moe.scattermoe import Routing, apply_gate, compute_dtype, experts_weight, sort_by_expert
from archtune.patches.expert_lora import ExpertWeight

INTERPRET_ENV = "TRITON_INTERPRET"


def unavailable(device: torch.device | str) -> str | None:
    """Why `scattermoe_triton` cannot run on `device` in this process (None when it can)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'archtune[triton]')"
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type != "cpu":
        return f"the Triton kernels run on CUDA devices (or on CPU under {INTERPRET_ENV}=1), not on {device.type}"
    if not _interpreted():
        if os.environ.get(INTERPRET_ENV) == "1":
            return (f"{INTERPRET_ENV}=1 was set after the kernels were compiled for a GPU in this process: set it "
                    "before archtune starts")
        return f"on CPU the Triton kernels run only under Triton's interpreter: set {INTERPRET_ENV}=1"
    return None


@functools.cache
def _kernels():
    from archtune.moe import triton_kernels

    return triton_kernels


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_kernels().rows_kernel, InterpretedFunction)


def _next_pow2(n: int, low: int = 16, high: int | None = None) -> int:
    p = max(low, 1 << max(0, (int(n) - 1).bit_length()))
    return p if high is None else min(p, high)


# ---- operands: an expert tensor in its right form ---------------------------------------------


@dataclass(frozen=True)
class Right:
    """R(M)_e for every expert e, as element strides: R(M)_e[k, n] = M[e*se + k*sk + n*sn].

    `quant` holds the NF4 state (archtune.moe.quant4.NF4Experts) when M is stored in 4 bits: `se`
    is then the packed codes' bytes per expert, `sk` and `sn` the logical (dense, contiguous)
    tensor's element strides."""

    tensor: torch.Tensor
    se: int
    sk: int
    sn: int
    k: int  # rows of R(M)_e (in)
    n: int  # columns (out)
    quant: object = None

    @classmethod
    def of(cls, m: torch.Tensor, transposed: bool, quant=None, shape=None) -> "Right":
        """R(M) of an [E, out, in] tensor (transposed: [E, in, out])."""
        shape = tuple(m.shape if shape is None else shape)
        # 4-bit: bytes per expert of the packed codes, then the logical tensor's element strides
        strides = (m.stride(0), shape[2], 1) if quant is not None else m.stride()
        if transposed:
            return cls(m, strides[0], strides[1], strides[2], shape[1], shape[2], quant)
        return cls(m, strides[0], strides[2], strides[1], shape[2], shape[1], quant)

    def t(self) -> "Right":
        """R(M)^T: the input gradient's operand."""
        return Right(self.tensor, self.se, self.sn, self.sk, self.n, self.k, self.quant)


@dataclass(frozen=True)
class Projection:
    """One expert product: the weight's right form, the trained weight (None for 4-bit), and the
    LoRA factors (A maps in -> r, B maps r -> out, in the weight's layout) with their scaling."""

    weight: Right
    transposed: bool
    a: torch.Tensor | None
    b: torch.Tensor | None
    scaling: float

    @classmethod
    def of(cls, w: ExpertWeight, transposed: bool, dtype: torch.dtype) -> "Projection":
        a, b, scaling = w.in_out_factors(transposed, dtype) or (None, None, 0.0)
        weight = w.weight
        if hasattr(weight, "per_expert"):  # 4-bit experts (archtune.moe.quant4.ExpertSlices)
            right = Right.of(weight.packed, transposed, quant=weight.state, shape=weight.shape)
        else:
            right = Right.of(weight.to(dtype), transposed)
        return cls(right, transposed, a, b, scaling)

    @property
    def lora(self) -> bool:
        return self.a is not None

    @property
    def rank(self) -> int:
        if self.a is None:
            return 0
        return self.a.shape[-1] if self.transposed else self.a.shape[-2]

    def dense_weight(self) -> torch.Tensor | None:
        return None if self.weight.quant is not None else self.weight.tensor


# ---- launches ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """Row blocks of the sorted pairs: block b is rows block_row[b] .. of expert block_expert[b]."""

    block_m: int
    block_expert: torch.Tensor  # int32 [B]
    block_row: torch.Tensor  # int32 [B]
    ends: torch.Tensor  # int32 [E]: cumulative pair counts (grouped_mm's `offs`)

    @classmethod
    def of(cls, routing: Routing, device: torch.device) -> "Schedule":
        # On a GPU always 64 rows (one compiled kernel per product shape, whatever the routing); the
        # interpreter's programs run one after another, so there tiles shrink to the largest segment.
        largest = max(routing.counts, default=0)
        block_m = 64 if device.type == "cuda" else _next_pow2(largest, 16, 64)
        experts, rows, start = [], [], 0
        for e, n in enumerate(routing.counts):
            experts += [e] * -(-n // block_m)
            rows += range(start, start + n, block_m)
            start += n
        as_int = functools.partial(torch.tensor, dtype=torch.int32, device=device)
        return cls(block_m, as_int(experts), as_int(rows), routing.offsets.to(device=device, dtype=torch.int32))

    @property
    def blocks(self) -> int:
        return self.block_expert.numel()


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _launch_options(device: torch.device) -> dict:
    return {"num_warps": 4, "num_stages": 3} if device.type == "cuda" else {}


_NONE = None  # a pointer argument the kernel does not read (its flag is off)


def _rows(x: torch.Tensor, right: Right, y: torch.Tensor, schedule: Schedule, *, x_rows=None, y_rows=None,
          scale=None, lora: tuple[Right, Right, float] | None = None, z_out=None, row_dot=None) -> None:
    """y[dst] = scale * (x[src] @ R(W)_e (+ s (x[src] @ R(A)_e) @ R(B)_e)) for every sorted row (rows_kernel);
    z_out[rows] = x[src] @ R(A)_e; row_dot = (src_rows, out [N, tiles]): per-tile row dots before the scale."""
    k = _kernels()
    if schedule.blocks == 0:
        return
    n_out = right.n
    block_n = _next_pow2(n_out, 16, 128 if x.element_size() < 4 else 64)
    block_k = _next_pow2(right.k, 16, 64 if x.element_size() < 4 else 32)
    grid = (schedule.blocks, triton_cdiv(n_out, block_n))
    q = right.quant
    dummy = y  # stands in for pointers whose flag is off (never read)
    la, lb, s = lora if lora is not None else (None, None, 0.0)
    rank = la.n if la is not None else 0
    k.rows_kernel[grid](
        x, dummy if x_rows is None else x_rows, x.stride(0),
        right.tensor, right.se, right.sk, right.sn,
        *((q.absmax_q, q.absmax2, q.offset, q.code, q.code2, q.absmax_q.stride(0), q.absmax2.stride(0),
           q.offset.stride(0)) if q is not None else (dummy,) * 5 + (0, 0, 0)),
        *((la.tensor, la.se, la.sk, la.sn, lb.tensor, lb.se, lb.sk, lb.sn) if la is not None
          else (dummy, 0, 0, 0, dummy, 0, 0, 0)),
        float(s),
        dummy if z_out is None else z_out, 0 if z_out is None else z_out.stride(0),
        y, dummy if y_rows is None else y_rows, y.stride(0),
        dummy if scale is None else scale,
        *((row_dot[0], row_dot[0].stride(0), row_dot[1], row_dot[1].stride(0)) if row_dot is not None
          else (dummy, 0, dummy, 0)),
        schedule.block_expert, schedule.block_row, schedule.ends,
        right.k, n_out, rank,
        BLOCK_M=schedule.block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=_next_pow2(rank),
        GATHER=x_rows is not None, SCATTER=y_rows is not None, SCALE=scale is not None, LORA=la is not None,
        WRITE_Z=z_out is not None, ROW_DOT=row_dot is not None, QUANT=q is not None,
        UPCAST=_interpreted(), PRECISION=_precision(x.dtype), **_launch_options(x.device),
    )


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _row_tiles(n_out: int, dtype: torch.dtype) -> int:
    return triton_cdiv(n_out, _next_pow2(n_out, 16, 128 if dtype.itemsize < 4 else 64))


def _weight_grad(left: torch.Tensor, right_rows: torch.Tensor, grad: torch.Tensor, grad_right: Right,
                 schedule: Schedule, *, l_rows=None, r_rows=None, r_scale=None, alpha: float = 1.0,
                 fp32: bool = False) -> None:
    """grad's R-form [P, Q] per expert e = alpha * left[l_rows]^T @ (r_scale * right_rows[r_rows]) over e's rows."""
    k = _kernels()
    p, q = grad_right.k, grad_right.n
    num_experts = schedule.ends.numel()
    block_p = _next_pow2(p, 16, 64)
    block_q = _next_pow2(q, 16, 64)
    grid = (num_experts, triton_cdiv(p, block_p), triton_cdiv(q, block_q))
    dummy = grad
    k.weight_grad_kernel[grid](
        left, dummy if l_rows is None else l_rows, left.stride(0),
        right_rows, dummy if r_rows is None else r_rows, dummy if r_scale is None else r_scale, right_rows.stride(0),
        grad, grad_right.se, grad_right.sk, grad_right.sn,
        schedule.ends, p, q, float(alpha),
        BLOCK_P=block_p, BLOCK_Q=block_q, BLOCK_K=32,
        L_GATHER=l_rows is not None, R_GATHER=r_rows is not None, R_SCALE=r_scale is not None, FP32=fp32,
        UPCAST=_interpreted(), PRECISION=_precision(left.dtype), **_launch_options(left.device),
    )


# ---- the autograd Function ----------------------------------------------------------------------


@dataclass(frozen=True)
class Pairs:
    """What a product needs of the routing: the sorted pairs' tokens and flat positions."""

    routing: Routing
    schedule: Schedule
    token_idx: torch.Tensor  # int32 [N]
    perm: torch.Tensor  # int32 [N]: each sorted pair's row in the [tokens * top_k] layout
    tokens: int
    top_k: int

    @classmethod
    def of(cls, routing: Routing, tokens: int, top_k: int, device: torch.device) -> "Pairs":
        return cls(routing, Schedule.of(routing, device), routing.token_idx.to(torch.int32),
                   routing.perm.to(torch.int32), tokens, top_k)

    @property
    def count(self) -> int:
        return self.perm.numel()


class ExpertsGemm(torch.autograd.Function):
    """One expert product over the sorted pairs, both ends optionally fused:
    gather=True:  input rows are hidden[token_idx] of a [tokens, in] tensor (else sorted [N, in]);
    scatter=True: output is sum over each token's pairs of weight * product, [tokens, out]
                  (else the sorted products [N, out], and `weights` is None)."""

    @staticmethod
    def forward(ctx, x, weights, weight, a, b, proj: Projection, pairs: Pairs, gather: bool, scatter: bool):
        n_out = proj.weight.n
        lora = _lora_rights(proj)
        z = torch.empty(pairs.count, proj.rank, dtype=_accumulation(x.dtype), device=x.device) if proj.lora else None
        with torch.autocast(x.device.type, enabled=False):
            if scatter:
                buf = torch.zeros(pairs.tokens * pairs.top_k, n_out, dtype=_accumulation(x.dtype), device=x.device)
                _rows(x, proj.weight, buf, pairs.schedule, x_rows=pairs.token_idx if gather else None,
                      y_rows=pairs.perm, scale=weights, lora=lora, z_out=z)
                y = buf.view(pairs.tokens, pairs.top_k, n_out).sum(1).to(x.dtype)
            else:
                y = x.new_empty(pairs.count, n_out)
                _rows(x, proj.weight, y, pairs.schedule, x_rows=pairs.token_idx if gather else None,
                      lora=lora, z_out=z)
        ctx.save_for_backward(x, weights, z)
        ctx.proj, ctx.pairs, ctx.gather, ctx.scatter = proj, pairs, gather, scatter
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, weights, z = ctx.saved_tensors
        proj, pairs, gather, scatter = ctx.proj, ctx.pairs, ctx.gather, ctx.scatter
        need_x, need_weights, need_w, need_a, need_b = ctx.needs_input_grad[:5]
        gy = gy.contiguous().to(x.dtype)
        g_rows = pairs.token_idx if scatter else None  # each pair's output-gradient row
        g_scale = weights if scatter else None
        gx = g_weights = gw = ga = gb = None
        schedule = pairs.schedule
        with torch.autocast(x.device.type, enabled=False):
            zb = None
            if need_x or need_weights or need_a:
                # input side: gx = scale * (G @ R(W)^T + s (G @ R(B)^T) @ R(A)^T), zb = G @ R(B)^T
                lora_t = None
                if proj.lora:
                    a_r, b_r, s = _lora_rights(proj)
                    lora_t = (b_r.t(), a_r.t(), s)
                    zb = torch.empty(pairs.count, proj.rank, dtype=_accumulation(x.dtype), device=x.device)
                dots = None
                if need_weights:
                    dots = (x, torch.empty(pairs.count, _row_tiles(proj.weight.k, x.dtype), dtype=torch.float32,
                                           device=x.device))
                if gather:  # one row per pair, summed per token after
                    buf = torch.zeros(pairs.tokens * pairs.top_k, proj.weight.k, dtype=_accumulation(x.dtype),
                                      device=x.device)
                    _rows(gy, proj.weight.t(), buf, schedule, x_rows=g_rows, y_rows=pairs.perm, scale=g_scale,
                          lora=lora_t, z_out=zb, row_dot=dots)
                    gx = buf.view(pairs.tokens, pairs.top_k, -1).sum(1).to(x.dtype)
                else:
                    gx = x.new_empty(pairs.count, proj.weight.k)
                    _rows(gy, proj.weight.t(), gx, schedule, x_rows=g_rows, scale=g_scale, lora=lora_t, z_out=zb,
                          row_dot=dots)
                if need_weights:
                    g_weights = dots[1].sum(1).to(weights.dtype)
            x_rows = pairs.token_idx if gather else None
            if need_w:
                weight = proj.dense_weight()
                gw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
                _weight_grad(x, gy, gw, Right.of(gw, proj.transposed), schedule, l_rows=x_rows, r_rows=g_rows,
                             r_scale=g_scale)
            if need_a:
                ga = torch.empty(proj.a.shape, dtype=proj.a.dtype, device=x.device)
                _weight_grad(x, zb, ga, Right.of(ga, proj.transposed), schedule, l_rows=x_rows, r_scale=g_scale,
                             alpha=proj.scaling, fp32=True)
            if need_b:
                gb = torch.empty(proj.b.shape, dtype=proj.b.dtype, device=x.device)
                _weight_grad(z, gy, gb, Right.of(gb, proj.transposed), schedule, r_rows=g_rows, r_scale=g_scale,
                             alpha=proj.scaling, fp32=True)
        if not need_x:
            gx = None
        return gx, g_weights, gw, ga, gb, None, None, None, None


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    """Where the top_k rows of a token are summed: fp32, or the inputs' dtype when wider."""
    return torch.promote_types(dtype, torch.float32)


def _lora_rights(proj: Projection) -> tuple[Right, Right, float] | None:
    if not proj.lora:
        return None
    return Right.of(proj.a, proj.transposed), Right.of(proj.b, proj.transposed), proj.scaling


def _product(x, weights, proj: Projection, pairs: Pairs, gather: bool, scatter: bool) -> torch.Tensor:
    return ExpertsGemm.apply(x, weights, proj.dense_weight(), proj.a, proj.b, proj, pairs, gather, scatter)


# ---- the experts forward ------------------------------------------------------------------------


def triton_experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers experts forward (`experts_implementation: scattermoe_triton`)."""
    why_not = unavailable(hidden_states.device)
    if why_not is not None:
        raise RuntimeError(f"experts_implementation scattermoe_triton cannot run: {why_not}")
    transposed = bool(getattr(self, "is_transposed", False))
    has_gate = getattr(self, "has_gate", True)
    has_bias = getattr(self, "has_bias", False)
    post_norm = getattr(self, "has_post_expert_norm", False)

    routing = sort_by_expert(top_k_index, self.num_experts)
    pairs = Pairs.of(routing, hidden_states.shape[0], top_k_index.shape[-1], hidden_states.device)
    weights = top_k_weights.reshape(-1)[routing.perm]  # [N]
    up = experts_weight(self, "gate_up_proj" if has_gate else "up_proj")
    down = experts_weight(self, "down_proj")
    dtype = compute_dtype(hidden_states, up.weight)
    p1, p2 = Projection.of(up, transposed, dtype), Projection.of(down, transposed, dtype)
    x = hidden_states.to(dtype)

    if has_gate and not has_bias and not post_norm:
        h = _product(x, None, p1, pairs, gather=True, scatter=False)
        act = apply_gate(self, h).to(dtype)
        return _product(act, weights, p2, pairs, gather=False, scatter=True).to(hidden_states.dtype)

    # Biases, a post-expert norm or no gate: the fused ends only where nothing sits between.
    h = _product(x, None, p1, pairs, gather=True, scatter=False)
    if has_bias:
        h = h + getattr(self, "gate_up_proj_bias" if has_gate else "up_proj_bias")[routing.expert_idx]
    act = (apply_gate(self, h) if has_gate else self.act_fn(h)).to(dtype)
    out = _product(act, None, p2, pairs, gather=False, scatter=False)
    if has_bias:
        out = out + self.down_proj_bias[routing.expert_idx]
    if post_norm:
        out = self.post_expert_norm(out)
    out = (out * weights.unsqueeze(-1)).to(hidden_states.dtype)
    final = hidden_states.new_zeros(hidden_states.shape)
    return final.index_add_(0, routing.token_idx, out)


__all__ = ["ExpertsGemm", "Projection", "Right", "Schedule", "Pairs", "triton_experts_forward", "unavailable",
           "INTERPRET_ENV"]
