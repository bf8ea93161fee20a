"""What makes a training forward run on meta tensors and save what the GPU kernels save: the memory
estimate (`archtune check --memory`, diagnostics/memory.py) runs the decoder on the meta device
with saved-tensor hooks, and counts what autograd keeps.

- `meta_attention()` (patch "meta_fused_attention"): inside the block, SDPA is the fused kernel
  (`_scaled_dot_product_flash_attention_for_cpu`: it saves q, k, v, the output and the log-sum-exp,
  no [T x T] matrix, as the GPU's flash and memory-efficient kernels do; the stock CPU dispatch on
  meta tensors takes the math path and would count the matrix), and transformers' packed-sequence
  detection, which reads position_ids' values (meta tensors have none), finds no packing.
- `register_balanced_experts()` (patch "meta_balanced_experts"): an experts implementation that
  sends every routed copy through one expert's shapes, as a balanced grouped matmul saves them
  (routing on meta tensors has no values to group by).

Both only ever run on the meta-device skeleton; a real model never sees them.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from archtune.patches import Patch, register_patch

BALANCED_EXPERTS = "archtune_meta_balanced"  # its name in transformers' experts registry


def fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """`F.scaled_dot_product_attention` as the fused CPU kernel computes it (same arguments, same result)."""
    import torch

    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, bool(is_causal and attn_mask is None), attn_mask=attn_mask, scale=scale)[0]


@contextlib.contextmanager
def meta_attention() -> Iterator[None]:
    """Inside the block: SDPA is the fused kernel and no batch counts as packed (see the module docstring)."""
    import torch.nn.functional as F
    from transformers import masking_utils

    original_sdpa, original_find = F.scaled_dot_product_attention, masking_utils.find_packed_sequence_indices
    F.scaled_dot_product_attention = fused_sdpa
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original_sdpa
        masking_utils.find_packed_sequence_indices = original_find


def balanced_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Experts as grouped_mm saves them, every routed copy through expert 0's weights: the routed
    copies of the input, the gate/up output, the gate (the class's own `_apply_gate`), the down
    output. Equal to the experts' own forward when every expert holds expert 0's weights."""
    k = top_k_index.shape[-1]
    x = hidden_states.repeat_interleave(k, dim=0)
    transposed = getattr(self, "is_transposed", False)  # [E, in, out] instead of nn.Linear's [E, out, in]
    gate_up, down = self.gate_up_proj[0], self.down_proj[0]
    h = self._apply_gate(x @ (gate_up if transposed else gate_up.T))
    out = (h @ (down if transposed else down.T)) * top_k_weights.reshape(-1, 1).to(h.dtype)
    return out.view(hidden_states.shape[0], k, -1).sum(1)


def register_balanced_experts() -> str:
    """Add `balanced_experts_forward` to transformers' experts registry (idempotent); its name."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if BALANCED_EXPERTS not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(BALANCED_EXPERTS, balanced_experts_forward)
    return BALANCED_EXPERTS


META_FUSED_ATTENTION = register_patch(Patch(
    name="meta_fused_attention",
    doc="On the meta-device skeleton of `check --memory`, SDPA runs as the fused kernel (no [T x T] matrix "
        "saved) and transformers' packed-sequence detection, which reads values, finds no packing.",
    apply=meta_attention,
    upstream="transformers 5.25.0",  # and torch 2.13's _scaled_dot_product_flash_attention_for_cpu
    relies_on={"transformers.integrations.sdpa_attention.sdpa_attention_forward": "9be3d6b1f79a",
               "transformers.masking_utils.find_packed_sequence_indices": "ebd2ac7ca795"},
))

META_BALANCED_EXPERTS = register_patch(Patch(
    name="meta_balanced_experts",
    doc="On the meta-device skeleton of `check --memory`, the experts run as a balanced grouped matmul (an "
        "experts implementation in transformers' registry), so their saved activations are counted.",
    apply=register_balanced_experts,
    upstream="transformers 5.25.0",
    relies_on={"transformers.integrations.moe.grouped_mm_experts_forward": "54beecae8764",
               "transformers.integrations.moe.ExpertsInterface": "6b5ed11e1892"},
))

__all__ = ["BALANCED_EXPERTS", "balanced_experts_forward", "fused_sdpa", "meta_attention", "register_balanced_experts"]
