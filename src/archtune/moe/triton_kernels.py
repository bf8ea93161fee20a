"""The Triton kernels behind `scattermoe_triton` (archtune.moe.triton_experts): two grouped GEMMs
over (token, expert) pairs sorted by expert, with no padding to a capacity.

This module imports triton at the top: only archtune.moe.triton_experts imports it, lazily, so
archtune never needs triton. Triton decides when a kernel is decorated whether it is compiled for
the GPU or run by its interpreter (TRITON_INTERPRET=1, numpy on CPU tensors), so that variable
must be set before this module is first imported.

Notation: a projection's right form R(M)_e is the [in, out] matrix with y = x @ R(M)_e; any
layout is passed as two element strides (k along `in`, n along `out`), so one kernel serves
[E, out, in] and [E, in, out] tensors, and their transposes (the backward's R(M)_e^T).

`rows_kernel` (forward of both products, and both input gradients): one program per BLOCK_M sorted
rows of one expert and BLOCK_N output columns,
    acc = X[src] @ R(W)_e  (+ s * (X[src] @ R(A)_e) @ R(B)_e)         fp32 accumulation
  prologue: the rows are gathered by index while loading (the token permute, fused);
  LoRA:     z = X A_e accumulates beside acc over the same loaded X tiles, then acc += s z B_e
            (z in fp32): the low-rank product is never formed as A_e B_e; z is written out (fp32)
            for the backward;
  4-bit:    R(W) tiles are dequantized from quant4's NF4 storage while loading (codes, absmax
            codes, nested scales: archtune.moe.quant4's format), never a dense expert;
  epilogue: an optional row dot with another tensor (the routing weights' gradient), the routing
            weight per row, and the store to a row index (the unpermute: each pair has its own
            row of a [tokens * top_k, out] buffer, so there is no write conflict and no atomic;
            the top_k rows of a token are summed afterwards, in a fixed order).
`weight_grad_kernel`: dM_e = L[rows_e]^T @ Rg[rows_e] per expert and tile (the gradient of the
expert tensors and of the LoRA factors), rows gathered and scaled while loading, stored in the
parameter's own layout; an expert with no rows gets zeros. FP32 multiplies in IEEE fp32 whatever
the inputs' dtype: for the LoRA factors, whose products are rank-sized (a few percent of the
work), so that the routing-weighted rows are not rounded to bf16 once more before them.

Triton 3.9's interpreter multiplies bf16 tiles as their raw 16-bit integers in `tl.dot`
(numpy has no bfloat16: `create_dot` runs np.matmul on the uint16 storage). Under the
interpreter (UPCAST) tiles go to fp32 before `tl.dot`; on a GPU bf16 tiles go to the tensor
cores with fp32 accumulation, which computes the same exact bf16 x bf16 products.

The kernels call triton.language builtins only, never its library functions written in Triton
(`tl.sum`, `tl.zeros` and the like are decorated when triton is imported, so they are compiled for the GPU if
triton was imported before TRITON_INTERPRET=1 was set, e.g. by bitsandbytes): the interpreter then
only needs the variable when this module is imported.
"""
from __future__ import annotations

import triton
import triton.language as tl

NF4_BLOCK = 64  # elements per absmax (quant4's BLOCKSIZE)
NF4_NESTED = 256  # absmaxes per nested fp32 scale (quant4's NESTED_BLOCKSIZE)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _row_index(index, rows, mask, INDEXED: tl.constexpr):
    """The tensor rows that sorted rows `rows` read or write: index[rows] (gather / scatter), else rows."""
    if INDEXED:
        out = tl.load(index + rows, mask=mask, other=0).to(tl.int64)
    else:
        out = rows.to(tl.int64)
    return out


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _load_w(W, e, stride_we, ks, cols, stride_wk, stride_wn, mask,
            QA, QA2, QOFF, CODE, CODE2, stride_qe, stride_q2e, stride_q2ae, dtype: tl.constexpr,
            QUANT: tl.constexpr):
    """A [BK, BN] tile of R(W)_e: dense, or dequantized from NF4 (two codes per byte, high first)."""
    flat = ks[:, None].to(tl.int64) * stride_wk + cols[None, :].to(tl.int64) * stride_wn
    if QUANT:
        byte = tl.load(W + e.to(tl.int64) * stride_we + flat // 2, mask=mask, other=0).to(tl.int32)
        nibble = tl.where(flat % 2 == 0, byte >> 4, byte & 15)
        value = tl.load(CODE + nibble, mask=mask, other=0.0)
        block = flat // 64
        code = tl.load(QA + e.to(tl.int64) * stride_qe + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(QA2 + e.to(tl.int64) * stride_q2e + block // 256, mask=mask, other=0.0)
        offset = tl.load(QOFF + e * stride_q2ae)
        absmax = tl.load(CODE2 + code, mask=mask, other=0.0) * scale + offset
        w = (value * absmax).to(dtype)
    else:
        w = tl.load(W + e.to(tl.int64) * stride_we + flat, mask=mask, other=0.0)
    return w


@triton.jit
def rows_kernel(
    X, x_rows, stride_x,
    W, stride_we, stride_wk, stride_wn,
    QA, QA2, QOFF, CODE, CODE2, stride_qe, stride_q2e, stride_q2ae,
    LA, stride_ae, stride_ak, stride_ar,
    LB, stride_be, stride_br, stride_bn,
    scaling,
    Z, stride_z,
    Y, y_rows, stride_y,
    row_scale,
    DOT_SRC, stride_ds, DOT_OUT, stride_do,
    block_expert, block_row, ends,
    K, N, R,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GATHER: tl.constexpr, SCATTER: tl.constexpr, SCALE: tl.constexpr, LORA: tl.constexpr,
    WRITE_Z: tl.constexpr, ROW_DOT: tl.constexpr, QUANT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert + pid_m)
    start = tl.load(block_row + pid_m)
    end = tl.load(ends + e)
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    src = _row_index(x_rows, rows, row_ok, GATHER)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rr = tl.arange(0, BLOCK_R)
    dtype = X.dtype.element_ty

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    z = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(X + src[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = _load_w(W, e, stride_we, ks, cols, stride_wk, stride_wn, k_ok[:, None] & col_ok[None, :],
                    QA, QA2, QOFF, CODE, CODE2, stride_qe, stride_q2e, stride_q2ae, dtype, QUANT)
        acc = _dot(x, w, acc, UPCAST, PRECISION)
        if LORA:
            a = tl.load(LA + e.to(tl.int64) * stride_ae + ks[:, None] * stride_ak + rr[None, :] * stride_ar,
                        mask=k_ok[:, None] & (rr[None, :] < R), other=0.0)
            z = _dot(x, a, z, UPCAST, PRECISION)
    if LORA:
        if WRITE_Z:
            if pid_n == 0:
                tl.store(Z + rows[:, None].to(tl.int64) * stride_z + rr[None, :], z.to(Z.dtype.element_ty),
                         mask=row_ok[:, None] & (rr[None, :] < R))
        b = tl.load(LB + e.to(tl.int64) * stride_be + rr[:, None] * stride_br + cols[None, :] * stride_bn,
                    mask=(rr[:, None] < R) & col_ok[None, :], other=0.0)
        # z stays fp32 for its rank-sized second product (IEEE fp32 whatever the inputs' dtype: a few
        # percent of the work), so the low-rank term is not rounded to bf16 before it is added.
        acc = tl.dot(z * scaling, b.to(tl.float32), acc, input_precision="ieee")
    out_ok = row_ok[:, None] & col_ok[None, :]
    if ROW_DOT:
        other = tl.load(DOT_SRC + rows[:, None].to(tl.int64) * stride_ds + cols[None, :], mask=out_ok, other=0.0)
        part = tl.reduce(acc * other.to(tl.float32), 1, _add)
        tl.store(DOT_OUT + rows.to(tl.int64) * stride_do + pid_n, part, mask=row_ok)
    if SCALE:
        acc = acc * tl.load(row_scale + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    dst = _row_index(y_rows, rows, row_ok, SCATTER)
    tl.store(Y + dst[:, None] * stride_y + cols[None, :], acc.to(Y.dtype.element_ty), mask=out_ok)


@triton.jit
def weight_grad_kernel(
    L, l_rows, stride_l,
    RG, r_rows, r_scale, stride_r,
    G, stride_ge, stride_gp, stride_gq,
    ends, P, Q, alpha,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    L_GATHER: tl.constexpr, R_GATHER: tl.constexpr, R_SCALE: tl.constexpr, FP32: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    e = tl.program_id(0)
    pid_p = tl.program_id(1)
    pid_q = tl.program_id(2)
    end = tl.load(ends + e)
    start = tl.load(ends + e - 1, mask=e > 0, other=0)
    ps = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = ps < P
    q_ok = qs < Q
    dtype = L.dtype.element_ty
    acc = tl.full((BLOCK_P, BLOCK_Q), 0.0, tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        ok = rows < end
        lsrc = _row_index(l_rows, rows, ok, L_GATHER)
        rsrc = _row_index(r_rows, rows, ok, R_GATHER)
        lt = tl.load(L + lsrc[None, :] * stride_l + ps[:, None], mask=p_ok[:, None] & ok[None, :], other=0.0)
        rg = tl.load(RG + rsrc[:, None] * stride_r + qs[None, :], mask=ok[:, None] & q_ok[None, :], other=0.0)
        if R_SCALE:
            rg = rg.to(tl.float32) * tl.load(r_scale + rows, mask=ok, other=0.0).to(tl.float32)[:, None]
        if FP32:
            acc = tl.dot(lt.to(tl.float32), rg.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = _dot(lt, rg.to(dtype), acc, UPCAST, PRECISION)
    acc = acc * alpha
    tl.store(G + e.to(tl.int64) * stride_ge + ps[:, None] * stride_gp + qs[None, :] * stride_gq,
             acc.to(G.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])
