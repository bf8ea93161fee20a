"""Packing for models with linear-attention / recurrent layers: state restarts at each document.

A packed row (data/packing.py) keeps its documents apart in attention layers through
position_ids: with no attention mask and no cache, transformers builds a block-diagonal mask.
Layers that carry state along the sequence never see that mask. Qwen 3.5's Gated DeltaNet
(`Qwen3_5MoeGatedDeltaNet`, `linear_attn` in 3 of every 4 layers) runs a short causal
convolution (kernel 4) over its q/k/v projections and a gated delta-rule recurrence whose
state `S` [k_dim, v_dim] is carried from token to token; packed, the first tokens of a document
would read the previous document's last three inputs and its whole state (transformers#46093,
ms-swift#9565, axolotl#3453). transformers passes `cu_seq_lens_q` / `seq_idx` only to the
CUDA kernels of flash-linear-attention and causal-conv1d, and its PyTorch path (the one that
runs on CPU, and on GPUs without those packages) raises on them.

Qwen3-Next's Gated DeltaNet (`Qwen3NextGatedDeltaNet`) is the same layer with its projections fused
(`in_proj_qkvz`, `in_proj_ba`, split per key head by its `fix_query_key_value_ordering`); its
convolution and chunked rule are Qwen 3.5's (the same source).

`patch_gated_deltanet_for_packing(model)` makes every such layer exact on packed rows:

- a forward pre-hook on the layer that owns it (the decoder layer, which receives
  position_ids) turns the position_ids into document indices with transformers' own rule
  (`find_packed_sequence_indices`, the one that builds the attention masks) and hands them to
  the DeltaNet as a keyword argument. Being a keyword argument of the layer's forward, it is
  replayed as is when activation checkpointing recomputes the layer;
- the DeltaNet's forward is replaced, for that instance, by one that computes the same thing
  with the document indices: the convolution only mixes inputs of the same document
  (`segmented_causal_conv1d`), and the recurrence starts from a zero state at every document
  (`segmented_chunk_gated_delta_rule`, the chunked form, exact: no large negative decay is
  injected, pairs across a boundary are masked out). Without document indices (unpacked rows,
  generation) the original forward runs, untouched.

A family declares it with `patches=[GATED_DELTANET_PACKING]`; `prepare_model_for_packing`
applies a family's packing patches, switches the KV cache off, and refuses a model that still
has a state-carrying layer no patch covers (never a silent leak).

Softmax attention needs no patch to be exact, but it can be made cheaper. sdpa over a packed
row computes all L x L scores and masks most of them away (on CPU the masked kernel skips
nothing). `document_sdpa_attention`, registered with transformers as the attention
implementation "sdpa_packed", skips most of what the very mask transformers built forbids
(and keeps what it allows, so sliding windows and any overlay inside a document are kept), in one of two layouts, chosen
once per mask by the scores each computes: a band (chunks of C queries over the 2C keys before
and in them, one call; for sliding windows and rows of short documents) or per-document blocks
(documents over 64 tokens). The result is the same as over the whole row because transformers'
packed mask allows nothing outside them (checked, once per mask; anything else falls back to
plain sdpa). `prepare_model_for_packing` switches a text config from "sdpa" to it.
"""
from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable

import torch
import torch.nn.functional as F

from archtune.patches import PATCHES, Patch, register_patch
# Which layers carry state along the sequence, and which patch covers which, is the plan's
# knowledge (it refuses packing that no patch makes exact before any weight is loaded).
from archtune.plan.packing import PACKING_PATCH_LAYERS, STATEFUL_LAYER_SUFFIXES, carries_state

SEQ_IDX_KWARG = "packed_seq_idx"
_PATCHED = "_archtune_packing_patch"

# ================================================================ document indices

def packed_sequence_index(position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """[batch, seq] document index of every token, or None when no row holds two documents.

    The same rule transformers uses for the attention mask (`find_packed_sequence_indices`): a
    document starts wherever a position is not the previous position + 1. For 3 documents of
    2, 3 and 1 tokens, position_ids [[0, 1, 0, 1, 2, 0]] -> [[0, 0, 1, 1, 1, 2]].
    """
    if position_ids is None:
        return None
    from transformers.masking_utils import find_packed_sequence_indices

    if position_ids.ndim == 3:  # multimodal rope (sections, batch, seq): the text positions come first
        position_ids = position_ids[0]
    return find_packed_sequence_indices(position_ids)


# ================================================================ the exact kernels

def segmented_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            seq_idx: torch.Tensor, activation: str | None = None) -> torch.Tensor:
    """Depthwise causal convolution that never mixes tokens of different documents.

    x: [batch, channels, seq]; weight: [channels, kernel] (an nn.Conv1d's weight, squeezed);
    seq_idx: [batch, seq]. out[t] = sum_j weight[:, K-1-j] * x[t-j] over the j < K whose x[t-j]
    lies in t's document: what the convolution gives on the document alone (zero left padding).
    """
    from transformers.activations import ACT2FN

    dtype = x.dtype
    x = x.to(weight.dtype)
    length = x.shape[-1]
    kernel = weight.shape[-1]
    out = x * weight[:, kernel - 1, None]
    for j in range(1, min(kernel, length)):
        same = (seq_idx[:, j:] == seq_idx[:, :-j]).to(x.dtype)  # token t and t-j share a document
        out[..., j:] += x[..., :-j] * same[:, None, :] * weight[:, kernel - 1 - j, None]
    if bias is not None:
        out = out + bias[:, None]
    if activation is not None:
        out = ACT2FN[activation](out)
    return out.to(dtype)


def _l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # As transformers' (and flash-linear-attention's) l2norm: x / sqrt(sum x^2 + eps).
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def segmented_chunk_gated_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                                     beta: torch.Tensor, seq_idx: torch.Tensor, *, chunk_size: int = 64,
                                     use_qk_l2norm: bool = True) -> torch.Tensor:
    """The gated delta rule over packed rows, its state zeroed at the start of every document.

    Shapes as transformers' `torch_chunk_gated_delta_rule`: query/key [B, T, Hk, dk], value
    [B, T, Hv, dv], g (log decay, <= 0) and beta [B, T, Hv]; seq_idx [B, T]. Returns [B, T, Hv, dv].

    Per document the recurrence is, token by token (S: [dk, dv], zero at the document's start):
        S <- exp(g_t) S;  u_t = beta_t (v_t - S^T k_t);  S <- S + k_t u_t^T;  o_t = S^T q_t.
    Chunked: inside a chunk of C tokens, with G_i the cumulative log decay from the chunk's start
    and S0 the state entering the chunk,
        u = (I + A)^-1 (beta v) - (I + A)^-1 (c * beta exp(G) k) S0,
              A_ij = beta_i exp(G_i - G_j) k_i.k_j  for j < i in the same document,
        o_i = c_i exp(G_i) q_i.S0 + sum_{j <= i, same document} exp(G_i - G_j) (q_i.k_j) u_j,
        S_next = c_last exp(G_last) S0 + sum_{j in the last token's document} exp(G_last - G_j) k_j u_j^T,
    where c_i = 1 when token i's document is the one running at the end of the previous chunk
    (it may read S0), else 0. Pairs across a boundary are masked, never decayed by a large
    number, so every document gets exactly its own computation.
    """
    out_dtype = query.dtype
    batch, length, k_heads, k_dim = key.shape
    v_heads, v_dim = value.shape[-2:]
    if v_heads != k_heads:  # grouped value heads: each q/k head serves v_heads // k_heads of them
        query = query.repeat_interleave(v_heads // k_heads, dim=2)
        key = key.repeat_interleave(v_heads // k_heads, dim=2)
    # [B, H, T, d] / [B, H, T], float32
    q, k, v = (x.transpose(1, 2).to(torch.float32) for x in (query, key, value))
    beta, g = (x.transpose(1, 2).to(torch.float32) for x in (beta, g))
    if use_qk_l2norm:
        q, k = _l2_normalize(q), _l2_normalize(k)
    q = q * k_dim ** -0.5

    size = chunk_size
    pad = (-length) % size
    seg = seq_idx.to(torch.long)
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        beta, g = (F.pad(x, (0, pad)) for x in (beta, g))
        # Padding tokens: documents of their own, after every real token.
        fresh = seg.amax(dim=1, keepdim=True) + 1 + torch.arange(pad, device=seg.device)
        seg = torch.cat([seg, fresh], dim=1)
    chunks = (length + pad) // size
    q, k, v = (x.reshape(batch, v_heads, chunks, size, -1) for x in (q, k, v))
    beta, g = (x.reshape(batch, v_heads, chunks, size) for x in (beta, g))
    seg = seg.reshape(batch, 1, chunks, size)

    same_doc = seg.unsqueeze(-1) == seg.unsqueeze(-2)  # [B, 1, N, C(i), C(j)]
    causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    cum = g.cumsum(dim=-1)  # G: [B, H, N, C]
    # exp(G_i - G_j) for j <= i in i's document, else 0 (-inf before exp: no overflow, no NaN)
    decay = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~(same_doc & causal), float("-inf")).exp()

    before = torch.full_like(seg[..., :1, -1], -1)  # no document runs into the first chunk
    running = torch.cat([before, seg[..., :-1, -1]], dim=-1)  # [B, 1, N]: document at each chunk's entry
    carries = (seg == running.unsqueeze(-1)).to(torch.float32)  # c_i: [B, 1, N, C]
    from_start = cum.exp() * carries  # c_i exp(G_i)

    k_beta, v_beta = k * beta.unsqueeze(-1), v * beta.unsqueeze(-1)
    # I + A: solve_triangular reads the lower triangle only and takes the diagonal as 1.
    system = (k_beta @ k.transpose(-1, -2)) * decay
    u_own = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    u_state = torch.linalg.solve_triangular(system, k_beta * from_start.unsqueeze(-1), upper=False,
                                            unitriangular=True)
    scores = (q @ k.transpose(-1, -2)) * decay
    q_state = q * from_start.unsqueeze(-1)
    last = cum[..., -1:]
    in_last = (seg == seg[..., -1:]).to(torch.float32)  # j in the chunk's last document
    k_state = k * ((last - cum).exp() * in_last).unsqueeze(-1)
    carry_over = last.squeeze(-1).exp() * carries[..., -1]  # c_last exp(G_last): [B, H, N]

    state = q.new_zeros(batch, v_heads, k_dim, v_dim)
    out = []
    for n in range(chunks):
        u = u_own[:, :, n] - u_state[:, :, n] @ state
        out.append(q_state[:, :, n] @ state + scores[:, :, n] @ u)
        state = state * carry_over[:, :, n, None, None] + k_state[:, :, n].transpose(-1, -2) @ u
    o = torch.stack(out, dim=2).reshape(batch, v_heads, chunks * size, v_dim)[:, :, :length]
    return o.transpose(1, 2).contiguous().to(out_dtype)


# ================================================================ the Gated DeltaNet patch

# What the replacement forward reads from a Gated DeltaNet: the projections of one of two layouts
# (Qwen 3.5's separate ones, Qwen3-Next's fused ones) and the rest, which both share.
_SPLIT_PROJECTIONS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")
_FUSED_PROJECTIONS = ("in_proj_qkvz", "in_proj_ba", "fix_query_key_value_ordering")
_DELTANET_ATTRS = ("conv1d", "A_log", "dt_bias", "norm", "out_proj", "key_dim", "value_dim", "head_k_dim",
                   "head_v_dim", "activation")


def _projection_layout(module: torch.nn.Module) -> tuple[str, ...] | None:
    for layout in (_SPLIT_PROJECTIONS, _FUSED_PROJECTIONS):
        if all(hasattr(module, a) for a in layout):
            return layout
    return None


def _deltanet_projections(self, hidden_states: torch.Tensor):
    """(q|k|v concatenated, channels first [B, C, L]; z [B, L, H, dv]; b; a) as the original forward
    computes them before its convolution."""
    batch, length, _ = hidden_states.shape
    if hasattr(self, "in_proj_qkvz"):
        query, key, value, z, b, a = self.fix_query_key_value_ordering(self.in_proj_qkvz(hidden_states),
                                                                      self.in_proj_ba(hidden_states))
        mixed = torch.cat([x.reshape(batch, length, -1) for x in (query, key, value)], dim=-1)
        return mixed.transpose(1, 2), z, b, a
    z = self.in_proj_z(hidden_states).reshape(batch, length, -1, self.head_v_dim)
    return (self.in_proj_qkv(hidden_states).transpose(1, 2), z, self.in_proj_b(hidden_states),
            self.in_proj_a(hidden_states))


def _is_gated_deltanet(module: torch.nn.Module) -> bool:
    return type(module).__name__.endswith(PACKING_PATCH_LAYERS["gated_deltanet_packing"])


def _packed_deltanet_forward(original: Callable) -> Callable:
    def forward(self, hidden_states: torch.Tensor, cache: Any = None, attention_mask: torch.Tensor | None = None,
                **kwargs):
        seq_idx = kwargs.pop(SEQ_IDX_KWARG, None)
        if seq_idx is None:
            return original(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
        if cache is not None:
            raise ValueError(
                f"{type(self).__name__} got packed sequences together with a cache: packed rows need use_cache=False "
                "(the recurrent state of a cache cannot be split by document)")
        if attention_mask is not None:  # padding, as the original zeroes it
            hidden_states = (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)
        batch, length, _ = hidden_states.shape
        mixed, z, b, a = _deltanet_projections(self, hidden_states)
        mixed = segmented_causal_conv1d(mixed, self.conv1d.weight.squeeze(1), self.conv1d.bias, seq_idx,
                                        self.activation).transpose(1, 2)
        query, key, value = torch.split(mixed, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        query = query.reshape(batch, length, -1, self.head_k_dim)
        key = key.reshape(batch, length, -1, self.head_k_dim)
        value = value.reshape(batch, length, -1, self.head_v_dim)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # log decay, as the original
        core = segmented_chunk_gated_delta_rule(query, key, value, g, beta, seq_idx, use_qk_l2norm=True)
        core = self.norm(core.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
        return self.out_proj(core.reshape(batch, length, -1))

    try:  # fire accelerate's offload hooks of conv1d, whose weight is read directly (as the original does)
        from transformers.integrations.accelerate import force_accelerate_hooks

        forward = force_accelerate_hooks("conv1d")(forward)
    except ImportError:  # pragma: no cover - older transformers
        pass
    return forward


def _pass_document_index(module: torch.nn.Module, args: tuple, kwargs: dict):
    seq_idx = packed_sequence_index(kwargs.get("position_ids"))
    if seq_idx is None:
        return None
    return args, {**kwargs, SEQ_IDX_KWARG: seq_idx}


def patch_gated_deltanet_for_packing(model: torch.nn.Module) -> int:
    """Make every Gated DeltaNet of `model` restart its conv and recurrent state at each packed document.

    Returns the number of DeltaNet layers patched now (0 when there are none or all already are).
    Idempotent. Raises NotImplementedError for a DeltaNet whose layout the exact forward does not
    know (it reads _DELTANET_ATTRS), so packing is refused rather than run wrong.
    """
    patched = 0
    for parent in list(model.modules()):
        for child in parent.children():
            if not _is_gated_deltanet(child) or getattr(child, _PATCHED, False):
                continue
            missing = [a for a in _DELTANET_ATTRS if not hasattr(child, a)]
            if _projection_layout(child) is None:
                missing.append(f"{'/'.join(_SPLIT_PROJECTIONS)} or {'/'.join(_FUSED_PROJECTIONS)}")
            if missing:
                raise NotImplementedError(
                    f"{type(child).__name__} has no {', '.join(missing)}: archtune's packed forward for Gated DeltaNet "
                    "does not know this layout, so packing cannot be made exact for it")
            child.forward = types.MethodType(_packed_deltanet_forward(child.forward), child)
            # The owner receives position_ids (the DeltaNet does not) and passes its keyword
            # arguments on to it; checkpointing replays them.
            parent.register_forward_pre_hook(_pass_document_index, with_kwargs=True)
            setattr(child, _PATCHED, "gated_deltanet")
            patched += 1
    return patched


# ================================================================ document attention

DOCUMENT_SDPA = "sdpa_packed"
_BLOCKS = "_archtune_document_blocks"
_LAYOUT = "_archtune_attention_layout"
_BAND_ALIGN = 16  # tokens: a band's chunk is a multiple of this
# What one more sdpa call costs (dispatch, views, autograd nodes), in scores: ~50 us on the tiny
# gemma4-moe, whose scores cost ~25 ns each (4 heads of 16); negligible for real head sizes.
_CALL_SCORES = 2048
# Per-document attention pays a Python loop over documents; when one document fills most of the
# rows anyway (sum of squared lengths above this share of L^2) plain sdpa is as cheap.
_DENSE_SHARE = 0.75
_MIN_BLOCK = 64  # tokens: documents are grouped into blocks of at least this many (see _document_blocks)


def _document_blocks(attention_mask, position_ids, q_len: int, kv_len: int) -> list[list[tuple[int, int, bool]]] | None:
    """Per row, the (start, end, causal) blocks to run attention on, or None (use plain sdpa).

    Blocks never cut a document; consecutive documents are grouped until a block has at least
    _MIN_BLOCK tokens. `causal` marks a block whose mask slice is exactly the causal triangle
    (one document, no sliding window cutting into it): sdpa's causal kernel runs it with no mask
    at all. Given only when `attention_mask` allows nothing outside the blocks (a packed mask:
    nothing across documents) and the blocks save work: all of them
    causal, or their squared sizes under _DENSE_SHARE of L^2. Computed once per mask tensor: all
    layers of a type share it, and checkpointing replays it.
    """
    if (position_ids is None or attention_mask is None or not torch.is_tensor(attention_mask)
            or attention_mask.dtype != torch.bool or attention_mask.ndim != 4 or q_len != kv_len
            or attention_mask.shape[-2:] != (q_len, kv_len) or attention_mask.shape[1] != 1):
        return None
    cached = getattr(attention_mask, _BLOCKS, None)
    if cached is not None and cached[0] is position_ids:
        return cached[1]
    blocks = None
    seq_idx = packed_sequence_index(position_ids)
    if seq_idx is not None and seq_idx.shape[-1] == q_len:
        seq_idx = seq_idx.expand(attention_mask.shape[0], -1) if seq_idx.shape[0] == 1 else seq_idx
        starts = torch.diff(seq_idx, dim=-1, prepend=seq_idx[:, :1] - 1) != 0
        triangles: dict[int, torch.Tensor] = {}
        blocks = []
        for b, row in enumerate(starts):
            # Consecutive short documents (and padding, one "document" per token) share a block:
            # the mask's slice keeps them apart, and one sdpa call costs less than many tiny ones.
            spans, begin, docs = [], 0, 0
            for end in row.nonzero().flatten().tolist()[1:] + [q_len]:
                docs += 1
                if end - begin >= _MIN_BLOCK or end == q_len:
                    n = end - begin
                    causal = docs == 1 and torch.equal(
                        attention_mask[b, 0, begin:end, begin:end],
                        triangles.setdefault(n, torch.ones(n, n, dtype=torch.bool, device=attention_mask.device).tril()))
                    spans.append((begin, end, causal))
                    begin, docs = end, 0
            blocks.append(spans)
        # Exact only if the mask allows nothing outside the diagonal blocks: every allowed pair of
        # a row lies inside one of its blocks (a count, cheaper than comparing document ids).
        inside = torch.stack([sum(attention_mask[b, 0, s:e, s:e].sum() for s, e, _ in row)
                              for b, row in enumerate(blocks)])
        if not torch.equal(inside, attention_mask[:, 0].sum(dim=(-2, -1))):
            blocks = None
        else:
            all_causal = all(c for row in blocks for _, _, c in row)
            work = sum((e - s) ** 2 for row in blocks for s, e, _ in row)
            if not all_causal and work > _DENSE_SHARE * len(blocks) * q_len * q_len:
                blocks = None
    try:
        setattr(attention_mask, _BLOCKS, (position_ids, blocks))
    except (AttributeError, RuntimeError):  # a tensor subclass that takes no attributes
        pass
    return blocks


def _window_band(attention_mask: torch.Tensor, q_len: int) -> tuple[int, torch.Tensor] | None:
    """(chunk, band) when every allowed pair of the mask lies within `chunk` tokens, else None.

    Rows are cut into chunks of C tokens (C = the farthest any query looks back, +1); a query of
    chunk c can only see keys of chunks c-1 and c, so the [B, 1, L, L] mask is kept as its band
    [B, 1, Lp, 2C] (Lp = L rounded up to chunks): band[b, 0, i, j] = mask[b, 0, i, (i // C - 1) * C + j].
    Sliding-window layers (C = the window) and rows of short documents (C = the longest) fit a
    narrow band. Padding queries past L see only themselves (no fully masked row, no NaN).
    """
    batch, length = attention_mask.shape[0], q_len
    rows = attention_mask[:, 0]
    first = rows.to(torch.uint8).argmax(dim=-1)  # first allowed key of every query
    reach = int((torch.arange(length, device=first.device) - first).max()) + 1
    chunk = min(length, -(-reach // _BAND_ALIGN) * _BAND_ALIGN)  # aligned to the kernels' blocks
    chunks = -(-length // chunk)
    padded = chunks * chunk
    wide = F.pad(rows, (chunk, padded - length, 0, padded - length), value=False)  # [B, Lp, Lp + C]
    starts = torch.arange(padded, device=rows.device) // chunk * chunk
    index = starts[:, None] + torch.arange(2 * chunk, device=rows.device)[None, :]
    band = wide.gather(-1, index.expand(batch, padded, 2 * chunk))
    # Exact only if the band holds every allowed pair (a count per row of the batch).
    if not torch.equal(band[:, :length].sum(dim=(-2, -1)), rows.sum(dim=(-2, -1))):
        return None
    if padded > length:
        pad_rows = torch.arange(length, padded, device=rows.device)
        band[:, pad_rows, chunk + pad_rows % chunk] = True
    return chunk, band[:, None]


def _attention_layout(attention_mask, position_ids, q_len: int, kv_len: int):
    """How `document_sdpa_attention` runs on this mask: ("band", chunk, band), ("blocks", blocks)
    or None (plain sdpa), by the work each does: scores computed (a causal block half its
    square), and _CALL_SCORES for each sdpa call.

    Computed once per mask tensor (all layers of a type share it; checkpointing replays it).
    """
    if (attention_mask is None or not torch.is_tensor(attention_mask) or attention_mask.dtype != torch.bool
            or attention_mask.ndim != 4 or q_len != kv_len or attention_mask.shape[-2:] != (q_len, kv_len)
            or attention_mask.shape[1] != 1):
        return None
    cached = getattr(attention_mask, _LAYOUT, None)
    if cached is not None and cached[0] is position_ids:
        return cached[1]
    blocks = _document_blocks(attention_mask, position_ids, q_len, kv_len)
    band = _window_band(attention_mask, q_len)
    layout = ("blocks", blocks) if blocks is not None else None
    if band is not None:
        chunk = band[0]
        band_work = attention_mask.shape[0] * band[1].shape[2] * 2 * chunk
        block_work = (sum((e - s) ** 2 / (2 if causal else 1) + _CALL_SCORES for row in blocks for s, e, causal in row)
                      if blocks is not None else attention_mask.shape[0] * q_len * q_len)
        if band_work <= block_work:
            layout = ("band",) + band
    try:
        setattr(attention_mask, _LAYOUT, (position_ids, layout))
    except (AttributeError, RuntimeError):  # a tensor subclass that takes no attributes
        pass
    return layout


def _band_attention(query, key, value, chunk: int, band: torch.Tensor, dropout: float, scaling):
    """sdpa over each chunk of C queries and the 2C keys before and in it: one call for the batch."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    padded = band.shape[2]
    chunks = padded // chunk
    q = F.pad(query.transpose(1, 2), (0, 0, 0, 0, 0, padded - length))  # [B, Lp, H, d]
    q = q.reshape(batch * chunks, chunk, heads, dim).transpose(1, 2)

    def windows(x):  # [B, Hkv, L, d] -> [B * n, Hkv, 2C, d]: chunk c's keys are (c-1)C .. (c+1)C-1
        x = F.pad(x.transpose(1, 2), (0, 0, 0, 0, chunk, padded - length))  # [B, C + Lp, Hkv, d]
        return x.unfold(1, 2 * chunk, chunk).permute(0, 1, 2, 4, 3).reshape(batch * chunks, kv_heads, 2 * chunk, dim)

    mask = band.reshape(batch * chunks, 1, chunk, 2 * chunk)
    out = F.scaled_dot_product_attention(q, windows(key), windows(value), attn_mask=mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=kv_heads != heads)
    out = out.transpose(1, 2).reshape(batch, padded, heads, dim)
    return out[:, :length].contiguous()


def _block_attention(query, key, value, blocks, attention_mask, dropout: float, scaling):
    """sdpa per block: the rows split into their blocks at once (one split, one cat in autograd)."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    sizes = [e - s for row in blocks for s, e, _ in row]
    qs, ks, vs = (x.transpose(1, 2).reshape(batch * length, x.shape[1], dim).split(sizes)
                  for x in (query, key, value))
    parts, i = [], 0
    for b, row in enumerate(blocks):
        for s, e, causal in row:
            mask = None if causal else attention_mask[b:b + 1, :, s:e, s:e]
            out = F.scaled_dot_product_attention(qs[i].transpose(0, 1)[None], ks[i].transpose(0, 1)[None],
                                                 vs[i].transpose(0, 1)[None], attn_mask=mask, dropout_p=dropout,
                                                 is_causal=causal, scale=scaling, enable_gqa=kv_heads != heads)
            parts.append(out[0].transpose(0, 1))  # [n, H, d]
            i += 1
    return torch.cat(parts).view(batch, length, heads, dim)


def document_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' sdpa, run on the parts of a packed row's mask that allow anything
    (attention implementation "sdpa_packed").

    Same signature and result as `sdpa_attention_forward`: query [B, H, L, d], key/value
    [B, Hkv, L, d], attention_mask the [B, 1, L, L] boolean mask transformers built; returns
    ([B, L, H, d], None). One of two exact layouts, whichever computes fewer scores:

    * band: when every query looks back at most C tokens (a sliding window; rows of short
      documents), chunks of C queries attend to the 2C keys before and in them, all in one call;
    * blocks: each document (short neighbours grouped) attends within its own diagonal block of
      the mask; a block that is one whole document runs sdpa's causal kernel without a mask.

    Unpacked rows, a cache, or a mask that reaches across documents go to plain sdpa unchanged.

    Why (bench/attention.py, forward + backward, CPU): one sdpa call with the block-diagonal mask
    computes all L^2 scores of a row and the CPU kernel skips none. Measured on the tiny
    gemma4-moe's 512-token rows (head dim 16, window 32): sliding layers band 8.5 ms, blocks
    16 ms, one masked call 24.5 ms; on a Gemma 4 26B-A4B-like layer (head dim 256, 2,048-token
    rows, window 512, 100-400-token documents) blocks 0.69 s, band 2.1 s, one call 3.2 s.
    flex_attention has no CPU path without torch.compile.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout = None
    if kwargs.get("position_bias") is None and attention_mask is not None and attention_mask.shape[0] == query.shape[0]:
        layout = _attention_layout(attention_mask, kwargs.get("position_ids"), query.shape[2], key.shape[2])
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if layout[0] == "band":
        return _band_attention(query, key, value, layout[1], layout[2], dropout, scaling), None
    return _block_attention(query, key, value, layout[1], attention_mask, dropout, scaling), None


def register_document_attention() -> None:
    """Register "sdpa_packed" with transformers (idempotent; done by prepare_model_for_packing)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(DOCUMENT_SDPA, document_sdpa_attention)
    AttentionMaskInterface.register(DOCUMENT_SDPA, sdpa_mask)  # the same masks as sdpa


# ================================================================ registry

# A packing patch is a `Patch` of kind "packing": apply(model) -> number of layers patched.
PackingPatch = Patch


def register_packing_patch(patch: Patch) -> Patch:
    if patch.name not in PACKING_PATCH_LAYERS:
        raise KeyError(f"packing patch {patch.name!r}: name the layers it makes exact in PACKING_PATCH_LAYERS "
                       "(src/archtune/plan/packing.py), so the plan knows packing is exact with it")
    return register_patch(dataclasses.replace(patch, kind="packing") if patch.kind != "packing" else patch)


def get_packing_patch(name: str) -> Patch:
    patch = PATCHES[name]
    if patch.kind != "packing":
        raise KeyError(f"patch {name!r} is not a packing patch (it has no apply(model))")
    return patch


GATED_DELTANET_PACKING = register_packing_patch(Patch(
    name="gated_deltanet_packing",
    doc="With sample packing, every Gated DeltaNet layer gets the packed documents' boundaries (from position_ids) "
        "and restarts its convolution and recurrent state at each one; transformers' PyTorch path ignores them.",
    apply=patch_gated_deltanet_for_packing,
    upstream="transformers 5.25.0",
    relies_on={  # the replaced forward mirrors it (and its convolution); the chunked rule and the document rule
        "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5MoeGatedDeltaNet.forward": "a43ffe9ab7f4",
        "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe.causal_conv1d_forward": "80c94f801beb",
        "transformers.models.qwen3_5.modeling_qwen3_5.Qwen3_5GatedDeltaNet.forward": "a43ffe9ab7f4",
        "transformers.models.qwen3_5.modeling_qwen3_5.causal_conv1d_forward": "80c94f801beb",
        "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe.torch_chunk_gated_delta_rule": "a1bbf783aa65",
        "transformers.models.qwen3_next.modeling_qwen3_next.Qwen3NextGatedDeltaNet.forward": "d267e937a25e",
        "transformers.models.qwen3_next.modeling_qwen3_next.Qwen3NextGatedDeltaNet.fix_query_key_value_ordering":
            "1b706d1f9a49",
        "transformers.models.qwen3_next.modeling_qwen3_next.causal_conv1d_forward": "80c94f801beb",
        "transformers.models.qwen3_next.modeling_qwen3_next.torch_chunk_gated_delta_rule": "a1bbf783aa65",
        "transformers.masking_utils.find_packed_sequence_indices": "ebd2ac7ca795",
    },
))

DOCUMENT_ATTENTION = register_patch(Patch(
    name="sdpa_packed",
    doc="Packed rows attend per document: the attention implementation \"sdpa_packed\" runs sdpa on the diagonal "
        "blocks of the mask transformers built (same result, the work of the documents' own lengths).",
    apply=register_document_attention,
    upstream="transformers 5.25.0",
    relies_on={
        "transformers.integrations.sdpa_attention.sdpa_attention_forward": "9be3d6b1f79a",
        "transformers.masking_utils.sdpa_mask": "a30991b130d8",
        "transformers.masking_utils.find_packed_sequence_indices": "ebd2ac7ca795",
    },
))


class PackingUnsupported(ValueError):
    """The model has a state-carrying layer that no packing patch makes exact."""


def stateful_layers(model: torch.nn.Module) -> list[str]:
    """Names of modules that carry state along the sequence and no packing patch covers."""
    names = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        if getattr(module, _PATCHED, False) or not carries_state(cls):
            continue
        if any(getattr(m, _PATCHED, False) for m in module.modules()):
            continue  # a container of patched layers (or the patched layer's own wrapper)
        names.append(name)
    return names


def _configs(model: torch.nn.Module) -> tuple[list[Any], Any]:
    """(the model's config and its sub-configs of the language model, the text config)."""
    config = getattr(model, "config", None)
    if config is None:
        return [], None
    found = [config]
    for attr in ("text_config", "language_config", "llm_config"):
        sub = getattr(config, attr, None)
        if sub is not None and all(sub is not c for c in found):
            found.append(sub)
    get_text = getattr(config, "get_text_config", None)
    text = get_text() if callable(get_text) else config
    if text is not None and all(text is not c for c in found):
        found.append(text)
    return found, text


def prepare_model_for_packing(model: torch.nn.Module, patches=(), *, document_attention: bool = True) -> dict:
    """Make a loaded model ready for packed rows; call once, after loading (before or after LoRA).

    - applies the packing patches (PackingPatch objects or registered names, e.g. the family's
      `patches` entries that are PackingPatch) and reports {name: layers patched};
    - sets use_cache=False in the model's config and its text config: with a KV cache (Llama's
      default, in training mode too) transformers skips its packed-sequence detection and the
      documents of a row attend to each other;
    - with document_attention, switches the text config's attention from "sdpa" to
      "sdpa_packed" (`document_sdpa_attention`: the same results, per-document cost on packed
      rows; towers keep theirs);
    - raises PackingUnsupported naming the layers that still carry state across documents.
    """
    applied: dict[str, int] = {}
    for patch in patches:
        if isinstance(patch, str):
            patch = get_packing_patch(patch)
        applied[patch.name] = patch.apply(model)
    configs, text = _configs(model)
    for config in configs:
        if hasattr(config, "use_cache"):
            config.use_cache = False
    # The language model's attention only: towers never see packed rows.
    attention = getattr(text, "_attn_implementation", None)
    if document_attention and attention == "sdpa":
        register_document_attention()
        text._attn_implementation = attention = DOCUMENT_SDPA
    left = stateful_layers(model)
    if left:
        raise PackingUnsupported(
            f"{len(left)} layers carry state along the sequence and nothing passes packed document boundaries into "
            f"them ({', '.join(left[:4])}{', ...' if len(left) > 4 else ''}); packing would leak across documents. "
            "Set sample_packing: false (and eval_sample_packing: false) for this model.")
    return {"patches": applied, "use_cache": False, "attention": attention}


__all__ = ["SEQ_IDX_KWARG", "STATEFUL_LAYER_SUFFIXES", "packed_sequence_index", "segmented_causal_conv1d",
           "segmented_chunk_gated_delta_rule", "patch_gated_deltanet_for_packing", "DOCUMENT_SDPA",
           "document_sdpa_attention", "register_document_attention", "PackingPatch", "register_packing_patch",
           "get_packing_patch", "GATED_DELTANET_PACKING", "PackingUnsupported", "stateful_layers",
           "prepare_model_for_packing"]
