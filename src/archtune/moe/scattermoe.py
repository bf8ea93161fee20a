"""`scattermoe`: a sort-by-expert experts implementation for transformers' experts registry.

Registered as `ALL_EXPERTS_FUNCTIONS["scattermoe"]` by `archtune.moe.register()` (run when
`archtune.moe` is imported), so `model.set_experts_implementation("scattermoe")` and
`from_pretrained(..., experts_implementation="scattermoe")` work. It has the experts' forward
signature `(self, hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]`
and reads the same attributes as transformers' `grouped_mm` (`num_experts`, `gate_up_proj` /
`up_proj`, `down_proj`, `_apply_gate`, `act_fn`, `has_gate`, `has_bias`, `is_transposed`,
`has_post_expert_norm`), so it serves every class decorated with `use_experts_implementation`:
Gemma 4 (experts beside the dense MLP; the router's renormalised, per-expert-scaled weights
arrive as `top_k_weights`) and Qwen 3.5 MoE (the shared expert and its sigmoid gate are
applied by `Qwen3_5MoeSparseMoeBlock` outside the experts module).

Algorithm (ScatterMoE's, in PyTorch):
1. flatten the T*K (token, expert) pairs and stable-sort them by expert;
2. count pairs per expert (segment lengths);
3. per expert with a non-empty segment: gather its tokens' hidden states, gate/up product,
   the model's gate (`_apply_gate`: act(gate) * up for Gemma 4's gelu_pytorch_tanh and
   Qwen 3.5's silu, both [gate; up] concatenated), routing weight, down product;
4. `index_add_` the results back into token positions (per token the contributions are
   added in ascending expert order, the order of the eager loop).

Gated experts without biases or a post-expert norm (Gemma 4, Qwen 3.5, Aria, most MoEs) run
as ONE autograd Function (`_FusedExperts`) that does steps 3-4 a segment at a time, so the
gather, the gate and the scatter stay in cache; its backward recomputes the gather and the
gate and computes only the gradients autograd asks for (no weight gradient for frozen
experts). Other experts (biases, post-expert norm, no gate: gpt-oss) take the general path:
the same algorithm as autograd steps around a per-expert product Function (`_ExpertLinear`).
Both compute PEFT's expert LoRA as a low-rank product per segment instead of materialising
W + BA (see `archtune.patches.expert_lora`). The routing weight is applied to the down product's input
(its [N, I] rows) rather than its output ([N, H]): the same value, half the element-wise work.

Two execution strategies (`STRATEGIES`), the same sort and the same results (tested against
each other and eager, fp32, 1e-5):
* "loop": steps 3-4 per expert from Python, as above (`_FusedExperts` / `_ExpertLinear`);
* "grouped": each product ONE `torch.nn.functional.grouped_mm` over all experts (`offs` = the
  cumulative segment ends), expert LoRA kept factored as two more grouped products
  (x @ A_e^T, then @ B_e^T), gate and routing weight element-wise on all sorted rows, one
  `index_add`; backward is autograd through grouped_mm (no base weight gradient when frozen).
`scattermoe_experts_forward(..., strategy=None)` takes `default_strategy`, a deterministic
rule from the device, dtype and shapes:
* CUDA: "grouped". The loop would launch a few dozen small kernels per expert and step
  (thousands at 64-128 experts; on an H200 the loop measured 3-40x slower than transformers'
  grouped_mm at bench/moe.py's sweep shapes); torch runs each grouped product as one CUTLASS
  kernel (bf16, sm90+; other dtypes loop over the groups in C++).
* CPU: grouped_mm's CPU kernel runs one GEMM per group, as the loop does, so the strategies
  differ in cache locality (the loop runs every op of one expert on its rows while they are
  in cache) and in Python overhead per expert. bench/moe_strategies.py (one thread, forward + backward,
  with and without expert LoRA) measured "grouped" 1.04-5.1x faster in bf16 at every shape,
  and in fp32 1.2-3.6x faster while the gate/up activations (pairs x 2I x 4 bytes) stay
  within 4 MiB, about even (0.88-1.34x) at 8 MiB and 0.76-1.17x at 16-32 MiB (0.78-0.86x with
  expert LoRA), where the loop's per-expert fusion keeps each expert's rows in cache:
  "grouped" for bf16/fp16 and for fp32 up to 4 MiB (`CPU_FP32_GROUPED_MAX_BYTES`), else "loop".
* other devices: "loop".
`resolve_strategy` says which strategy runs and why: "grouped" falls back to "loop"
for 4-bit experts (the grouped products would dequantize every expert at once), dtypes other
than fp32, bf16 and fp16 (grouped_mm's), expert sizes
whose rows are not a multiple of 16 bytes (grouped_mm's layout rule; a LoRA rank is padded
with zeros instead) and calls with no pair to compute. No Triton kernel is required; neither
strategy is torch.compile-friendly (data-dependent segment lengths): compiled models
graph-break here.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from archtune.patches.expert_lora import ExpertWeight, expert_weight
from archtune.moe.quant4 import expert_weight_4bit


# ---- routing: sort (token, expert) pairs by expert ------------------------------------------


@dataclass(frozen=True)
class Routing:
    """The (token, expert) pairs of one forward, sorted by expert.

    Example: top_k_index = [[1, 0], [1, 2]] (T=2, K=2, E=3) flattens to experts [1, 0, 1, 2];
    a stable sort gives perm = [1, 0, 2, 3] (pairs in expert order), token_idx = perm // K =
    [0, 0, 1, 1], expert_idx = [0, 1, 1, 2], counts = [1, 2, 1].
    Pairs routed to an expert id >= E (expert-parallel sentinels) are dropped.
    """

    perm: torch.Tensor  # [N] index into the flattened [T*K] pairs
    token_idx: torch.Tensor  # [N] token of each sorted pair
    expert_idx: torch.Tensor  # [N] expert of each sorted pair (non-decreasing)
    counts: list[int]  # [E] pairs per expert; sum(counts) == N
    offsets: torch.Tensor  # [E] int32 on the device: cumulative counts, grouped_mm's `offs`


def sort_by_expert(top_k_index: torch.Tensor, num_experts: int) -> Routing:
    num_top_k = top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)
    expert_sorted, perm = torch.sort(expert_ids, stable=True)
    per_expert = torch.bincount(expert_ids.clamp(0, num_experts), minlength=num_experts + 1)[:num_experts]
    offsets = per_expert.cumsum(0, dtype=torch.int32)
    # One host sync for the segment lengths; the per-expert loop needs them on the host anyway.
    counts = per_expert.tolist()
    kept = sum(counts)
    if kept != perm.numel():  # sentinels (id >= E) sort to the tail
        perm, expert_sorted = perm[:kept], expert_sorted[:kept]
    return Routing(perm=perm, token_idx=perm // num_top_k, expert_idx=expert_sorted, counts=counts, offsets=offsets)


# ---- per-expert products, LoRA fused --------------------------------------------------------
#
# A projection is W [E, out, in] (transformers' usual layout; `transposed=True`: [E, in, out])
# plus, optionally, PEFT's factors: effective W = W + s * lhs @ rhs. The low-rank update is two
# more projections in the same layout: "A" maps in -> r and "B" maps r -> out, so
#   y = x @ R(W) + s * (x @ R(A)) @ R(B),    R(M)_e = M_e^T (or M_e when transposed),
# with (A, B) = (rhs, lhs), or (lhs, rhs) when transposed (see archtune.patches.expert_lora).


def _segments(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


@dataclass
class _Proj:
    weight: torch.Tensor
    a: torch.Tensor | None
    b: torch.Tensor | None
    scaling: float
    transposed: bool

    @classmethod
    def of(cls, w: ExpertWeight, transposed: bool, dtype: torch.dtype) -> "_Proj":
        factors = w.in_out_factors(transposed, dtype)
        if factors is None:
            return cls(w.weight.to(dtype), None, None, 0.0, transposed)
        a, b, scaling = factors
        # Contiguous per-expert factors: PEFT's are permuted views of lora_B / lora_A.
        return cls(w.weight.to(dtype), a.contiguous(), b.contiguous(), scaling, transposed)

    @property
    def lora(self) -> bool:
        return self.a is not None

    @property
    def out_features(self) -> int:
        return self.weight.shape[-1] if self.transposed else self.weight.shape[-2]

    @property
    def rank(self) -> int:
        return 0 if self.a is None else (self.a.shape[-1] if self.transposed else self.a.shape[-2])

    # Per-expert operands, built once per call with one `unbind` each: indexing and transposing
    # inside the expert loop costs a dispatcher round trip per use, which adds up at 64 experts.
    def right(self, name: str) -> tuple[torch.Tensor, ...]:
        """R(M)_e for every expert: y = x @ R(M)_e."""
        m = getattr(self, name)
        if hasattr(m, "per_expert"):  # per-expert weight provider (4-bit experts): one expert per index
            return m.per_expert(right=True, transposed=self.transposed)
        return (m if self.transposed else m.transpose(-2, -1)).unbind(0)

    def left(self, name: str) -> tuple[torch.Tensor, ...]:
        """R(M)_e^T for every expert: gx = gy @ R(M)_e^T."""
        m = getattr(self, name)
        if hasattr(m, "per_expert"):
            return m.per_expert(right=False, transposed=self.transposed)
        return (m.transpose(-2, -1) if self.transposed else m).unbind(0)

    def forward_loop(self):
        """A function (x, e, y, z) writing y = x @ R(W)_e (+ LoRA, z = x @ R(A)_e)."""
        w_r = self.right("weight")
        if not self.lora:
            return lambda x, e, y, z: torch.mm(x, w_r[e], out=y)
        a_r, b_r, s = self.right("a"), self.right("b"), self.scaling

        def step(x, e, y, z):
            torch.mm(x, w_r[e], out=y)
            torch.mm(x, a_r[e], out=z)
            y.addmm_(z, b_r[e], alpha=s)

        return step

    def grad_buffers(self, need_w: bool, need_a: bool, need_b: bool, counts: list[int]) -> list:
        """Gradient buffers for (W, A, B); None where not needed. `finish` turns them into grads."""
        bufs = [_grad_buffer(self.weight, need_w, counts), _grad_buffer(self.a, need_a, counts), None]
        if self.b is not None and need_b:
            # B's gradient s * gy^T z ([out, r]) is computed as (z^T gy)^T: the [r, out] product is
            # the faster GEMM for a rank-r z, so the buffer holds it transposed.
            shape = self.b.shape if self.transposed else (*self.b.shape[:-2], self.b.shape[-1], self.b.shape[-2])
            bufs[2] = _grad_buffer(self.b, True, counts, shape)
        return bufs

    def backward_loop(self, bufs, need_x: bool):
        """A function (e, x, z, gy, gx) writing gx (when need_x) and expert e's rows of the
        `grad_buffers`; call `finish(bufs)` after the loop."""
        gw, ga, gb = (None if g is None else g.unbind(0) for g in bufs)
        w_l = self.left("weight")
        lora = self.lora
        if lora:
            a_l = self.left("a")
            b_scaled = self.b * self.scaling
            b_l_scaled = (b_scaled.transpose(-2, -1) if self.transposed else b_scaled).unbind(0)
        need_gz = lora and (need_x or ga is not None)
        transposed = self.transposed

        def grad_into(out, x, gy):  # d(x @ R(M_e))/dM_e in M's own layout
            if transposed:
                torch.mm(x.t(), gy, out=out)
            else:
                torch.mm(gy.t(), x, out=out)

        def step(e, x, z, gy, gx):
            gz = torch.mm(gy, b_l_scaled[e]) if need_gz else None  # s * gy @ R(B)_e^T
            if need_x:
                torch.mm(gy, w_l[e], out=gx)
                if gz is not None:
                    gx.addmm_(gz, a_l[e])
            if gw is not None:
                grad_into(gw[e], x, gy)
            if ga is not None:
                grad_into(ga[e], x, gz)
            if gb is not None:
                torch.mm(z.t(), gy, out=gb[e])  # [r, out]; scaled once, in finish()

        return step

    def finish(self, bufs) -> tuple:
        gw, ga, gb = bufs
        if gb is not None:
            gb.mul_(self.scaling)
            if not self.transposed:
                gb = gb.transpose(-2, -1)
        return gw, ga, gb


def _grad_buffer(like: torch.Tensor | None, needed: bool, counts: list[int], shape=None) -> torch.Tensor | None:
    """A contiguous [E, ...] gradient shaped like `like` (or `shape`), zero for experts without tokens."""
    if like is None or not needed:
        return None
    buf = torch.empty(like.shape if shape is None else shape, dtype=like.dtype, device=like.device)
    for e, n in enumerate(counts):
        if n == 0:
            buf[e].zero_()
    return buf


class _ExpertLinear(torch.autograd.Function):
    """y[seg_e] = x[seg_e] @ R(W)_e (+ LoRA) for each expert: one projection, rows sorted by expert.

    The general path (experts with biases, a post-expert norm, or no gate); Gemma 4 and
    Qwen 3.5 take `_FusedExperts`.
    """

    @staticmethod
    def forward(ctx, x, weight, a, b, proj: _Proj, counts: list[int]):
        y = x.new_empty(x.shape[0], proj.out_features)
        z = x.new_empty(x.shape[0], proj.rank) if proj.lora else None
        with torch.autocast(x.device.type, enabled=False):
            step = proj.forward_loop()
            for e, s, t in _segments(counts):
                step(x[s:t], e, y[s:t], None if z is None else z[s:t])
        ctx.save_for_backward(x, z)
        ctx.proj, ctx.counts = proj, counts
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, z = ctx.saved_tensors
        proj, counts = ctx.proj, ctx.counts
        need_x, need_w, need_a, need_b = ctx.needs_input_grad[:4]
        gy = gy.contiguous()
        gx = x.new_empty(x.shape) if need_x else None
        bufs = proj.grad_buffers(need_w, need_a, need_b, counts)
        with torch.autocast(x.device.type, enabled=False):
            step = proj.backward_loop(bufs, need_x)
            for e, s, t in _segments(counts):
                step(e, x[s:t], None if z is None else z[s:t], gy[s:t], None if gx is None else gx[s:t])
        return (gx, *proj.finish(bufs), None, None)


def expert_linear(x: torch.Tensor, w: ExpertWeight, counts: list[int], transposed: bool) -> torch.Tensor:
    """Per-expert linear over expert-sorted rows, LoRA factors fused when `w.lora` is set."""
    proj = _Proj.of(w, transposed, compute_dtype(x, w.weight))
    return _ExpertLinear.apply(x.to(proj.weight.dtype), proj.weight, proj.a, proj.b, proj, counts)


class _FusedExperts(torch.autograd.Function):
    """The whole gated expert MLP, one expert segment at a time (ScatterMoE's fusion, on CPU).

    Per expert e with rows s:t of the sorted pairs (tokens idx = token_idx[s:t]):
        h   = hidden[idx] @ R(W1)_e (+ LoRA)            gather fused in, h saved
        mw  = gate(h) * routing_weight                   the weight is folded in before the
        out[idx] += mw @ R(W2)_e (+ LoRA)                down product ([N, I], not [N, H])
    The backward recomputes the gather, gate(h) (with autograd, so any `_apply_gate` works) and
    the LoRA inner products, so only h [N, 2I] and the rank-r activations are kept. Working on
    one segment at a time keeps the element-wise work in cache: on CPU it costs as much as the
    products otherwise.
    """

    @staticmethod
    def forward(ctx, hidden, weights, w1, a1, b1, w2, a2, b2, token_idx, p1: _Proj, p2: _Proj,
                gate, counts: list[int]):
        dtype = p1.weight.dtype
        n_pairs = token_idx.shape[0]
        h = hidden.new_empty(n_pairs, p1.out_features, dtype=dtype)
        z1 = hidden.new_empty(n_pairs, p1.rank, dtype=dtype) if p1.lora else None
        z2 = hidden.new_empty(n_pairs, p2.rank, dtype=dtype) if p2.lora else None
        out = torch.zeros_like(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            step1, step2 = p1.forward_loop(), p2.forward_loop()
            for e, s, t in _segments(counts):
                idx = token_idx[s:t]
                x = hidden.index_select(0, idx).to(dtype)
                step1(x, e, h[s:t], None if z1 is None else z1[s:t])
                mw = (gate(h[s:t]) * weights[s:t, None]).to(dtype)
                y = x.new_empty(t - s, p2.out_features)
                step2(mw, e, y, None if z2 is None else z2[s:t])
                out.index_add_(0, idx, y.to(out.dtype))
        ctx.save_for_backward(hidden, weights, token_idx, h, z1, z2)
        ctx.p1, ctx.p2, ctx.gate, ctx.counts = p1, p2, gate, counts
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weights, token_idx, h, z1, z2 = ctx.saved_tensors
        p1, p2, gate, counts = ctx.p1, ctx.p2, ctx.gate, ctx.counts
        need = ctx.needs_input_grad
        need_hidden, need_weights = need[0], need[1]
        dtype = p1.weight.dtype
        g1 = p1.grad_buffers(need[2], need[3], need[4], counts)
        g2 = p2.grad_buffers(need[5], need[6], need[7], counts)
        # gradient needed at the gate/up output h (for anything in or before the first product)
        need_h = need_hidden or any(g is not None for g in g1)
        need_mw = need_h or need_weights
        g_hidden = torch.zeros_like(hidden) if need_hidden else None
        g_weights = torch.zeros_like(weights) if need_weights else None
        grad_out = grad_out.contiguous()
        step1, step2 = p1.backward_loop(g1, need_hidden), p2.backward_loop(g2, need_mw)
        for e, s, t in _segments(counts):
            idx = token_idx[s:t]
            gy = grad_out.index_select(0, idx).to(dtype)
            # recompute the gate and the routing scale with autograd, in cache
            with torch.enable_grad():
                hh = h[s:t].detach().requires_grad_(need_h)
                ww = weights[s:t].detach().requires_grad_(need_weights)
                mw = (gate(hh) * ww[:, None]).to(dtype)
            with torch.autocast(hidden.device.type, enabled=False):
                g_mw = gy.new_empty(t - s, mw.shape[1]) if need_mw else None
                step2(e, mw.detach(), None if z2 is None else z2[s:t], gy, g_mw)
                if not (need_h or need_weights):
                    continue
                inputs = [x for x, needed in ((hh, need_h), (ww, need_weights)) if needed]
                grads = torch.autograd.grad(mw, inputs, g_mw)
                gh = grads[0] if need_h else None
                if need_weights:
                    g_weights[s:t] = grads[-1]
                if not need_h:
                    continue
                x = hidden.index_select(0, idx).to(dtype) if any(g is not None for g in g1) else None
                gx = gy.new_empty(t - s, hidden.shape[1]) if need_hidden else None
                step1(e, x, None if z1 is None else z1[s:t], gh.to(dtype).contiguous(), gx)
                if need_hidden:
                    g_hidden.index_add_(0, idx, gx.to(g_hidden.dtype))
        return (g_hidden, g_weights, *p1.finish(g1), *p2.finish(g2), None, None, None, None, None)


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    # Under autocast, F.linear in the eager loop runs in the autocast dtype: do the same.
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


# ---- the grouped strategy: every product for all experts in one grouped GEMM -----------------
#
# The same sorted rows, but each product is ONE `torch.nn.functional.grouped_mm` call over all
# experts (`offs` = cumulative segment ends) instead of one GEMM per expert from Python: on a GPU
# the loop would launch a few dozen kernels per expert and step. Expert LoRA stays factored as two
# more grouped products, z = x @ R(A)_e and s * z @ R(B)_e; the gate, the routing weight and the
# scatter are element-wise ops on all rows at once. Backward is autograd through grouped_mm (it
# differentiates both operands with grouped GEMMs; a frozen base weight gets no gradient).
#
# grouped_mm's kernels (CPU and CUDA alike) want every row stride a multiple of 16 bytes: the
# LoRA rank is padded with zeros to that (a padded factor row or column contributes 0 and its
# gradient is dropped by the pad's backward); hidden and intermediate sizes that are not aligned
# take the loop instead (`grouped_unsupported`).

_ALIGN_BYTES = 16


def _right_operand(m: torch.Tensor, transposed: bool) -> torch.Tensor:
    """R(M) for all experts, [E, in, out]: a view (column-major per expert when M is [E, out, in])."""
    return m if transposed else m.transpose(-2, -1)


def _pad_rank(m: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    missing = -m.shape[dim] % multiple
    if not missing:
        return m
    pad = [0, 0] * (-dim)  # F.pad lists (left, right) from the last dimension backwards
    pad[-1] = missing
    return torch.nn.functional.pad(m, pad)


def _grouped_linear(x: torch.Tensor, proj: _Proj, offsets: torch.Tensor) -> torch.Tensor:
    """y[seg_e] = x[seg_e] @ R(W)_e (+ s * (x[seg_e] @ R(A)_e) @ R(B)_e), all experts per call."""
    grouped_mm = torch.nn.functional.grouped_mm
    y = grouped_mm(x, _right_operand(proj.weight, proj.transposed), offs=offsets)
    if not proj.lora:
        return y
    # The rank is A's output dimension and B's input dimension, in the layout of each (see _Proj).
    multiple = _ALIGN_BYTES // x.element_size()
    a = _pad_rank(proj.a, -1 if proj.transposed else -2, multiple)
    b = _pad_rank(proj.b, -2 if proj.transposed else -1, multiple)
    z = grouped_mm(x, _right_operand(a, proj.transposed), offs=offsets)
    # s scales the small factor, not the [N, out] product (nor, in backward, its gradient); the
    # in-place add is safe: grouped_mm saves its inputs, not its output.
    return y.add_(grouped_mm(z, _right_operand(b * proj.scaling, proj.transposed), offs=offsets))


def grouped_unsupported(hidden_states: torch.Tensor, up: ExpertWeight, down: ExpertWeight, dtype: torch.dtype,
                        pairs: int) -> str | None:
    """Why the grouped strategy cannot run these experts on `pairs` sorted rows (None when it can)."""
    grouped_mm = getattr(torch.nn.functional, "grouped_mm", None)
    if grouped_mm is None:
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"
    device = hidden_states.device
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return "grouped_mm needs a CUDA device of compute capability 8.0 or newer"
    if device.type not in ("cpu", "cuda"):
        return f"grouped_mm is not known to run on {device.type}"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"grouped_mm takes float32, bfloat16 and float16, not {str(dtype).removeprefix('torch.')}"
    if pairs == 0:  # every pair went to another rank's experts: grouped_mm's backward refuses 0 rows
        return "no (token, expert) pair for these experts"
    for w in (up, down):
        if hasattr(w.weight, "per_expert"):
            return ("4-bit experts are dequantized one expert at a time by the loop; all experts at once would "
                    "hold the whole dense tensor")
        if w.weight.data_ptr() % _ALIGN_BYTES:
            return "an expert tensor is not 16-byte aligned in memory (grouped_mm needs it)"
        sizes = w.weight.shape[-2:]
        if any(n * dtype.itemsize % _ALIGN_BYTES for n in sizes):
            return (f"expert matrices of {sizes[0]}x{sizes[1]} in {str(dtype).removeprefix('torch.')} have rows "
                    f"that are not a multiple of {_ALIGN_BYTES} bytes (grouped_mm needs it)")
    return None


def _grouped_gated(hidden, weights, routing: Routing, p1: _Proj, p2: _Proj, gate) -> torch.Tensor:
    """The gated expert MLP with the grouped strategy: gather, 2 (or 6 with LoRA) grouped GEMMs, gate
    and routing weight on all rows, one index_add."""
    dtype = p1.weight.dtype
    with torch.autocast(hidden.device.type, enabled=False):
        x = hidden.index_select(0, routing.token_idx).to(dtype)
        h = _grouped_linear(x, p1, routing.offsets)
        mw = (gate(h) * weights[:, None]).to(dtype)  # the weight on the down product's input
        y = _grouped_linear(mw, p2, routing.offsets)
    return torch.zeros_like(hidden).index_add(0, routing.token_idx, y.to(hidden.dtype))


def _grouped_expert_linear(x: torch.Tensor, w: ExpertWeight, routing: Routing, transposed: bool) -> torch.Tensor:
    proj = _Proj.of(w, transposed, compute_dtype(x, w.weight))
    with torch.autocast(x.device.type, enabled=False):
        return _grouped_linear(x.to(proj.weight.dtype), proj, routing.offsets)


# ---- execution strategies -------------------------------------------------------------------

LOOP = "loop"
GROUPED = "grouped"
STRATEGIES = {
    LOOP: "one GEMM per expert from Python, gather/gate/scatter fused per expert (_FusedExperts)",
    GROUPED: "each product one torch grouped_mm over all experts; LoRA as two more grouped products",
}


# On CPU, grouped_mm runs one GEMM per group, as the loop does: the strategies differ in where
# the data is when each op runs (bench/moe_strategies.py, one thread, forward + backward, with
# and without expert LoRA). In fp32 the loop's per-expert fusion wins once the gate/up
# activations (pairs x 2I x 4 bytes) outgrow the cache: "grouped" measured 1.2-3.6x faster up
# to 4 MiB, about even at 8 MiB (0.88-1.34x) and 0.76-1.17x at 16-32 MiB (slower with LoRA);
# in bf16 it measured 1.04-5.1x faster at every shape.
CPU_FP32_GROUPED_MAX_BYTES = 4 << 20


def default_strategy(device: torch.device, dtype: torch.dtype, pairs: int, gate_up_features: int) -> tuple[str, str]:
    """(strategy, reason) for `pairs` sorted rows whose gate/up product has `gate_up_features`
    outputs, computed in `dtype` on `device` (a rule from the shapes; see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return GROUPED, "CUDA: one grouped GEMM per product instead of a few dozen kernels per expert"
    if device.type != "cpu":
        return LOOP, f"{device.type}: grouped_mm is measured on CUDA and CPU only"
    if dtype.itemsize < 4:
        return GROUPED, f"CPU, {str(dtype).removeprefix('torch.')}: grouped measured faster at every shape"
    activations = pairs * gate_up_features * dtype.itemsize
    mib = f"{activations / 2**20:.1f} MiB of gate/up activations"
    if activations <= CPU_FP32_GROUPED_MAX_BYTES:
        return GROUPED, f"CPU, {mib} (<= {CPU_FP32_GROUPED_MAX_BYTES >> 20} MiB): grouped measured faster"
    return LOOP, (f"CPU, {mib} (> {CPU_FP32_GROUPED_MAX_BYTES >> 20} MiB): the loop's per-expert fusion keeps "
                  "them in cache, measured faster")


def _resolve(strategy: str | None, hidden_states: torch.Tensor, up: ExpertWeight, down: ExpertWeight,
             dtype: torch.dtype, pairs: int, transposed: bool) -> tuple[str, str]:
    if strategy is None:
        features = up.weight.shape[-1] if transposed else up.weight.shape[-2]
        strategy, reason = default_strategy(hidden_states.device, dtype, pairs, features)
    elif strategy in STRATEGIES:
        reason = "asked for"
    else:
        raise KeyError(f"no scattermoe strategy {strategy!r}; known: {', '.join(STRATEGIES)} "
                       "(src/archtune/moe/scattermoe.py)")
    if strategy == GROUPED:
        why_not = grouped_unsupported(hidden_states, up, down, dtype, pairs)
        if why_not is not None:
            return LOOP, f"grouped unavailable: {why_not}"
    return strategy, reason


def resolve_strategy(module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     strategy: str | None = None) -> tuple[str, str]:
    """(strategy, reason) that `scattermoe_experts_forward` runs for these arguments: `strategy`
    (None: `default_strategy`); GROUPED falls back to LOOP, with the reason, for experts
    grouped_mm cannot take (`grouped_unsupported`)."""
    up = experts_weight(module, "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj")
    pairs = int((top_k_index < module.num_experts).sum())
    return _resolve(strategy, hidden_states, up, experts_weight(module, "down_proj"), compute_dtype(hidden_states, up.weight),
                    pairs, bool(getattr(module, "is_transposed", False)))


# ---- the experts forward --------------------------------------------------------------------


def apply_gate(module: torch.nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """The experts' gate on [N, 2I] gate/up rows: the module's `_apply_gate`, else act(gate) * up."""
    own_gate = getattr(module, "_apply_gate", None)
    if own_gate is not None:
        return own_gate(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return module.act_fn(gate) * up


def experts_weight(module: torch.nn.Module, name: str) -> ExpertWeight:
    """`module.<name>` as the experts' forward multiplies with it (4-bit storage, LoRA factors)."""
    # Hook: a 4-bit expert tensor (quantize_moe_experts) comes as a per-expert weight provider.
    return expert_weight_4bit(module, name) or expert_weight(module, name)


def scattermoe_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    strategy: str | None = None,
) -> torch.Tensor:
    """transformers experts forward: sort pairs by expert, per-segment products, scatter back.

    `strategy`: LOOP or GROUPED (`STRATEGIES`); None (what transformers passes) is the device's
    default (`default_strategy`). `resolve_strategy` says which one runs and why.
    """
    transposed = bool(getattr(self, "is_transposed", False))
    has_gate = getattr(self, "has_gate", True)
    has_bias = getattr(self, "has_bias", False)
    post_norm = getattr(self, "has_post_expert_norm", False)

    routing = sort_by_expert(top_k_index, self.num_experts)
    weights = top_k_weights.reshape(-1)[routing.perm]  # [N]
    up = experts_weight(self, "gate_up_proj" if has_gate else "up_proj")
    down = experts_weight(self, "down_proj")
    dtype = compute_dtype(hidden_states, up.weight)
    grouped = _resolve(strategy, hidden_states, up, down, dtype, len(routing.perm), transposed)[0] == GROUPED

    if has_gate and not has_bias and not post_norm:
        p1, p2 = _Proj.of(up, transposed, dtype), _Proj.of(down, transposed, dtype)
        gate = functools.partial(apply_gate, self)
        if grouped:
            return _grouped_gated(hidden_states, weights, routing, p1, p2, gate)
        return _FusedExperts.apply(hidden_states, weights, p1.weight, p1.a, p1.b, p2.weight, p2.a, p2.b,
                                   routing.token_idx, p1, p2, gate, routing.counts)

    # General path: the same algorithm as separate autograd steps.
    def linear(x, w):
        if grouped:
            return _grouped_expert_linear(x, w, routing, transposed)
        return expert_linear(x, w, routing.counts, transposed)

    num_tokens, hidden_dim = hidden_states.shape
    x = hidden_states[routing.token_idx]  # [N, H]
    proj = linear(x, up)
    if has_bias:
        proj = proj + getattr(self, "gate_up_proj_bias" if has_gate else "up_proj_bias")[routing.expert_idx]
    proj = apply_gate(self, proj) if has_gate else self.act_fn(proj)
    out = linear(proj, down)
    if has_bias:
        out = out + self.down_proj_bias[routing.expert_idx]
    if post_norm:
        out = self.post_expert_norm(out)
    # As the eager loop: scale in the weights' precision, cast, accumulate in the states' dtype.
    out = (out * weights.unsqueeze(-1)).to(hidden_states.dtype)
    final = hidden_states.new_zeros(num_tokens, hidden_dim)
    return final.index_add_(0, routing.token_idx, out)


__all__ = ["Routing", "sort_by_expert", "expert_linear", "apply_gate", "experts_weight", "compute_dtype", "scattermoe_experts_forward", "STRATEGIES", "LOOP",
           "GROUPED", "default_strategy", "resolve_strategy", "grouped_unsupported", "CPU_FP32_GROUPED_MAX_BYTES"]
