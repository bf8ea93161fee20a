"""The embedded tiny models: build, train a step, determinism, write/reload, shapes and family fields."""
from __future__ import annotations

import math
import re

import pytest
import torch
import transformers

from archtune.families import detect, find_tiny
from archtune.models import build_tiny_model, tiny_model_names, write_tiny_model

NAMES = ["gemma4-moe", "gemma4-dense", "gemma4-e2b", "gemma4-unified", "gemma3", "qwen3_5-moe", "qwen3_5", "qwen3_next",
         "llama"]
FAMILY_OF = {
    "gemma4-moe": "gemma4",
    "gemma4-dense": "gemma4",
    "gemma4-e2b": "gemma4",
    "gemma4-unified": "gemma4_unified",
    "gemma3": "gemma3",
    "qwen3_5-moe": "qwen3_5_moe",
    "qwen3_5": "qwen3_5",
    "qwen3_next": "qwen3_next",
    "llama": "generic",
}


@pytest.fixture(scope="module")
def built():
    """One build per name (seed 0), shared by the read-only tests."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build_tiny_model(name, seed=0)
        return cache[name]

    return get


def _batch(vocab: int, batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Ids above the special tokens: plain text, no multimodal placeholders.
    return torch.randint(32, vocab, (batch, seq), generator=g)


def _module_names(model) -> set[str]:
    return {name for name, _ in model.named_modules()}


def test_names_are_the_declared_ones():
    assert sorted(tiny_model_names()) == sorted(NAMES)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(KeyError) as info:
        build_tiny_model("no-such-model")
    for name in NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_family_detection(name, built):
    model, _ = built(name)
    family, _ = find_tiny(name)
    assert family.name == FAMILY_OF[name]
    assert detect(model.config.to_dict()).name == FAMILY_OF[name]
    assert type(model) is getattr(transformers, family.auto_class)._model_mapping[type(model.config)]


@pytest.mark.parametrize("name", NAMES)
def test_size_vocab_and_special_ids(name, built):
    model, tok = built(name)
    n_params = sum(p.numel() for p in model.parameters())
    assert 2e5 <= n_params <= 3e6, n_params
    text = model.config.get_text_config()
    assert text.vocab_size == len(tok)
    assert (text.pad_token_id, text.bos_token_id, text.eos_token_id) == (
        tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    # Every special-token id anywhere in the config (image, audio, video, boi/eoi, vision
    # start/end, ...) must be one of the tokenizer's ids (the upstream defaults are ~256k).
    found = {}

    def walk(d, path=""):
        for key, value in d.items():
            if isinstance(value, dict):
                walk(value, f"{path}{key}.")
            elif re.search(r"token_(id|index)$", str(key)) and isinstance(value, int):
                found[path + key] = value

    walk(model.config.to_dict())
    assert found
    for key, value in found.items():
        assert 0 <= value < len(tok), (key, value)
    # The multimodal ones point at archtune's named special tokens.
    specials = {tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens}
    for key, value in found.items():
        assert value in specials, (key, value)


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward(name):
    model, tok = build_tiny_model(name, seed=0)
    model.train()
    ids = _batch(len(tok))
    out = model(input_ids=ids, labels=ids)
    loss = out.loss
    assert torch.isfinite(loss)
    # Random init: close to uniform over the vocabulary.
    assert abs(loss.item() - math.log(len(tok))) < 0.3, loss.item()
    loss.backward()
    family, _ = find_tiny(name)
    prefix = family.language_model_prefix
    lm_grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix) and p.grad is not None]
    assert lm_grads and all(torch.isfinite(g).all() for g in lm_grads)
    assert any(g.abs().sum() > 0 for g in lm_grads)
    expert_grads = [p.grad for n, p in model.named_parameters() if n.endswith(family.expert_param_names or ("-",))]
    assert all(g is not None and g.abs().sum() > 0 for g in expert_grads)


@pytest.mark.parametrize("name", NAMES)
def test_seeded_and_deterministic(name, built):
    a, _ = built(name)
    state = torch.get_rng_state()
    b, _ = build_tiny_model(name, seed=0)
    assert torch.equal(torch.get_rng_state(), state), "building must not touch the global RNG"
    torch.manual_seed(1234)  # global RNG state must not matter
    c, _ = build_tiny_model(name, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point() and sa[k].std() > 0)


@pytest.mark.parametrize("name", NAMES)
def test_write_and_reload_with_transformers_alone(name, built, tmp_path):
    model, tok = built(name)
    family, _ = find_tiny(name)
    out = write_tiny_model(name, tmp_path / name, seed=0)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    auto = getattr(transformers, family.auto_class)
    loaded, info = auto.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(loaded) is type(model)
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    ids = _batch(len(tok), seed=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert tok.eos_token_id in gen.eos_token_id and gen.pad_token_id == tok.pad_token_id
    tok2 = transformers.AutoTokenizer.from_pretrained(out)
    text = "Hello <start_of_turn>user tiny models<end_of_turn>"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    assert len(tok2) == len(tok)


def _layers(model, name):
    family, _ = find_tiny(name)
    return model.get_submodule(f"{family.language_model_prefix}.layers")


def test_gemma4_moe_shape(built):
    model, _ = built("gemma4-moe")
    params = dict(model.named_parameters())
    gate_up = [p for n, p in params.items() if n.endswith("experts.gate_up_proj")]
    down = [p for n, p in params.items() if n.endswith("experts.down_proj")]
    assert len(gate_up) == len(down) == model.config.text_config.num_hidden_layers
    assert all(p.dim() == 3 for p in gate_up + down)
    layers = _layers(model, "gemma4-moe")
    types = model.config.text_config.layer_types
    assert {"sliding_attention", "full_attention"} <= set(types)
    for layer, layer_type in zip(layers, types):
        # MoE beside the dense MLP in every layer.
        assert hasattr(layer.mlp, "gate_proj") and hasattr(layer, "router") and hasattr(layer, "experts")
        # attention_k_eq_v: full-attention layers have no v_proj.
        assert (layer.self_attn.v_proj is None) == (layer_type == "full_attention")
    assert model.model.vision_tower is not None and model.model.audio_tower is None


def test_gemma4_dense_shape(built):
    model, _ = built("gemma4-dense")
    assert not any("experts" in n for n, _ in model.named_parameters())
    layers = _layers(model, "gemma4-dense")
    assert any(layer.self_attn.v_proj is None for layer in layers)
    assert model.model.vision_tower is not None and model.model.audio_tower is None


def test_gemma4_e2b_shape(built):
    model, _ = built("gemma4-e2b")
    text = model.config.text_config
    assert text.hidden_size_per_layer_input > 0 and text.num_kv_shared_layers > 0
    lm = model.model.language_model
    assert hasattr(lm, "embed_tokens_per_layer") and hasattr(lm, "per_layer_model_projection")
    shared = [layer for layer in lm.layers if layer.self_attn.is_kv_shared_layer]
    assert len(shared) == text.num_kv_shared_layers
    for layer in shared:
        assert not hasattr(layer.self_attn, "k_proj") and not hasattr(layer.self_attn, "v_proj")
    assert all(hasattr(layer, "per_layer_input_gate") for layer in lm.layers)
    assert model.model.vision_tower is not None and model.model.audio_tower is not None
    assert model.model.embed_audio is not None


def test_gemma3_shape(built):
    model, _ = built("gemma3")
    assert type(model.model.vision_tower).__name__ == "SiglipVisionModel"
    assert model.model.multi_modal_projector is not None


def test_qwen3_5_moe_shape(built):
    model, _ = built("qwen3_5-moe")
    types = model.config.text_config.layer_types
    assert set(types) == {"linear_attention", "full_attention"}
    for layer, layer_type in zip(_layers(model, "qwen3_5-moe"), types):
        if layer_type == "linear_attention":
            assert isinstance(layer.linear_attn.conv1d, torch.nn.Conv1d)
        else:
            assert hasattr(layer, "self_attn")
        assert hasattr(layer.mlp, "shared_expert") and layer.mlp.experts.gate_up_proj.dim() == 3
    assert model.model.visual is not None


def test_llama_is_plain(built):
    model, _ = built("llama")
    assert type(model).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("name", NAMES)
def test_family_fields_match_the_model(name, built):
    """The declared prefixes, regex, layer class and expert names describe the real module tree."""
    model, _ = built(name)
    family, _ = find_tiny(name)
    modules = _module_names(model)
    mm = family.mm_module_prefixes

    def under(name_, prefixes):
        return any(name_ == p or name_.startswith(p + ".") for p in prefixes)

    if family.language_model_prefix:
        assert family.language_model_prefix in modules
        # Every parameter is the language model's, a tower's (frozen with freeze_mm_modules) or the head.
        for pname, _ in model.named_parameters():
            assert under(pname, (family.language_model_prefix, "lm_head") + mm), pname
    if family.decoder_layer_cls:
        classes = {type(m).__name__ for m in model.modules()}
        assert family.decoder_layer_cls in classes
        layers = _layers(model, name)
        assert all(type(layer).__name__ == family.decoder_layer_cls for layer in layers)
    if family.lora_target_regex:
        regex = re.compile(family.lora_target_regex)
        hits = [m for m in modules if regex.fullmatch(m)]
        assert hits
        assert not [m for m in hits if under(m, mm)], "the default targets must not reach a tower"
        assert all(isinstance(model.get_submodule(m), torch.nn.Linear) for m in hits)
        # Every decoder layer gets adapters; no router or gate is targeted.
        n_layers = model.config.get_text_config().num_hidden_layers
        assert {int(re.search(r"layers\.(\d+)\.", m).group(1)) for m in hits} == set(range(n_layers))
        assert not [m for m in hits if re.search(r"(router|\.gate$|shared_expert_gate|in_proj_[ab]$)", m)]
    # 3D expert tensors, wherever the model has them, are named by the family.
    for pname, p in model.named_parameters():
        if p.dim() == 3 and "experts" in pname:
            assert pname.endswith(family.expert_param_names), pname


@pytest.mark.parametrize("family_name", sorted(set(FAMILY_OF.values())))
def test_every_declared_prefix_and_expert_name_exists(family_name, built):
    """No dead declarations: each mm prefix and expert name occurs in one of the family's tiny models."""
    names = [n for n, f in FAMILY_OF.items() if f == family_name]
    modules = set().union(*(_module_names(built(n)[0]) for n in names))
    params = set().union(*({p for p, _ in built(n)[0].named_parameters()} for n in names))
    family, _ = find_tiny(names[0])
    for prefix in family.mm_module_prefixes:
        assert prefix in modules, prefix
    for expert in family.expert_param_names:
        assert any(p.endswith(expert) for p in params), expert


def test_lora_target_coverage():
    """What each regex targets, on the tiny models (names relative to a decoder layer)."""
    expected = {
        "gemma4-moe": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
        "gemma3": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
        "qwen3_5-moe": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                        "linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.out_proj",
                        "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
                        "mlp.shared_expert.down_proj"},
        # No MLP names: stock PEFT would reload them onto the routed experts (families/qwen3_next.py).
        "qwen3_next": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "linear_attn.in_proj_qkvz", "linear_attn.out_proj"},
    }
    for name, suffixes in expected.items():
        model, _ = build_tiny_model(name)
        family, _ = find_tiny(name)
        regex = re.compile(family.lora_target_regex)
        hits = {re.sub(r"^.*layers\.\d+\.", "", m) for m in _module_names(model) if regex.fullmatch(m)}
        assert hits == suffixes, (name, hits ^ suffixes)
        # Checkpoint-wrapped names still match.
        wrapped = f"{family.language_model_prefix}.layers.0._checkpoint_wrapped_module.self_attn.q_proj"
        assert regex.fullmatch(wrapped)
