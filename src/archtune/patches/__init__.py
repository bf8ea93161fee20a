"""Every runtime change archtune makes to a transformers or PEFT class or function, in one place.

- packing.py: Gated DeltaNet state reset at packed document boundaries, per-document attention
  ("sdpa_packed"), and `prepare_model_for_packing` (a family declares its packing patches by name);
- expert_lora.py: reading PEFT's LoRA parametrization of 3D expert tensors as factors, and
  skipping PEFT's per-forward parametrization check on expert ParamWrappers;
- lora_redirect.py: LoRA aimed at a wrapper PEFT cannot adapt (Gemma 4's ClippableLinear) lands
  on the nn.Linear inside it;
- text_only.py: the zero "no multimodal token" inputs a multimodal wrapper's forward takes on
  text-only batches.
"""
