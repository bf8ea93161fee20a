"""`archtune export`: each artifact loaded back in its runtime computes what the trained model computes.

Per case (a tiny family trained a few LoRA steps, expert LoRA on the MoE families):

* merged: transformers alone reloads it; every adapted tensor (expert tensors counted apart) is
  merged with the trained value; logits equal the trained adapter's;
* adapter: stock PEFT reloads it on a transformers base, with the trained deltas and logits;
* gguf: llama.cpp (llama-cpp-python) loads the file, splits the prompts as the Hugging Face
  tokenizer does, and its logits are within the outtype's tolerance; k-quants come from
  llama.cpp's own quantizer;
* the controls: a GGUF written without Gemma's norm offset, and a merged model whose expert
  deltas were dropped, exit 2.
"""
from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import QUICKSTART_DATA, head_jsonl, run_cli, write_config

pytestmark = pytest.mark.e2e
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FAMILY_KEYS = {
    "llama": {"lora_target_modules": LINEARS},
    "gemma3": {},
    "qwen3_5": {},  # the family's default targets: attention, DeltaNet projections, MLP
    "qwen3_5-moe": {"lora_target_parameters": EXPERTS,
                    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z",
                                            "out_proj", "gate_proj", "up_proj", "down_proj"]},
    "gemma4-dense": {},  # the family's default targets: the language model's attention and MLP linears
    "gemma4-e2b": {},
    "gemma4-moe": {"lora_target_parameters": EXPERTS, "lora_target_modules": LINEARS},
    "gemma4-unified": {},  # Gemma 4's default targets: the language model's attention and MLP linears
}


def _needs_llama_cpp():
    pytest.importorskip("gguf", reason="the gguf package (archtune[gguf]) is not installed")
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (archtune[gguf]) is not installed: "
                        "the GGUF files cannot be loaded in llama.cpp here")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(family, base) -> the config of a finished 3-step LoRA run on tiny:family, or on the base
    `base(family, folder)` writes there (trained once per module, on first use)."""
    import sys

    runs: dict = {}

    def get(family: str, base=None):
        if (family, base) not in runs:
            tmp = tmp_path_factory.mktemp(family)
            train = head_jsonl(QUICKSTART_DATA / "train.jsonl", tmp / "train.jsonl", 32)
            test = head_jsonl(QUICKSTART_DATA / "test.jsonl", tmp / "test.jsonl", 6)
            base_model = str(base(family, tmp / "base")) if base else f"tiny:{family}"
            config = write_config(tmp / "run.yaml", base_model=base_model, adapter="lora", lora_r=4,
                                  lora_alpha=8, **FAMILY_KEYS[family],
                                  datasets=[{"path": str(train), "type": "alpaca"}],
                                  test_datasets=[{"path": str(test), "type": "alpaca"}],
                                  dataset_prepared_path=str(tmp / "prepared"), sequence_len=128, micro_batch_size=4,
                                  max_steps=3, learning_rate=0.01, warmup_steps=0, seed=0,
                                  output_dir=str(tmp / "out"), use_tensorboard=False)
            argv, sys.argv = sys.argv, ["archtune", "train", str(config)]
            try:
                from archtune.cli import main

                main()
            except SystemExit as exc:
                assert not exc.code, f"training tiny:{family} failed"
            finally:
                sys.argv = argv
            runs[family, base] = config
        return runs[family, base]

    return get


def _export(capsys, config, *args):
    code, out, err = run_cli(capsys, "export", config, *args, "--json")
    report = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
    return code, report, err


def test_merged_expert_lora_reloads_in_transformers_with_every_delta(trained, capsys):
    code, report, err = _export(capsys, trained("qwen3_5-moe"), "--format", "merged")
    assert code == 0, err
    assert report["format"] == "merged"
    # 4 layers x (gate_up_proj, down_proj) expert tensors, and 25 linears: every delta merged with the trained value.
    assert report["merged_tensors"] == {"merged": 33, "adapted": 33, "expert": 8, "not_merged": []}
    v = report["verification"]
    assert v["runtime"].startswith("transformers") and v["prompts"] == 6 and v["greedy_agree"] == 6
    assert v["max_rel_logit_diff"] <= 1e-5, v


def test_adapter_reloads_with_stock_peft(trained, capsys):
    code, report, err = _export(capsys, trained("qwen3_5-moe"), "--format", "adapter")
    assert code == 0, err
    assert report["merged_tensors"]["merged"] == report["merged_tensors"]["adapted"] == 33
    assert report["verification"]["runtime"].startswith("peft")
    assert report["verification"]["max_rel_logit_diff"] <= 1e-5
    # The 8 expert deltas, rebuilt from the files as vLLM's 3D MoE loader reshapes them, are PEFT's.
    assert report["serving_layout"]["expert_tensors"] == report["serving_layout"]["matching"] == 8
    assert any("is_3d_moe_weight" in n for n in report["notes"])
    assert any("vllm-project/vllm#41384" in n for n in report["notes"])  # the family's facts


def test_gemma4_moe_adapter_reloads_with_stock_peft_in_the_layout_vllm_reads(trained, capsys):
    code, report, err = _export(capsys, trained("gemma4-moe"), "--format", "adapter")
    assert code == 0, err
    assert report["merged_tensors"] == {"merged": 34, "adapted": 34, "expert": 8, "not_merged": []}
    assert report["verification"]["greedy_agree"] == 6 and report["verification"]["max_rel_logit_diff"] <= 1e-5
    assert report["serving_layout"]["matching"] == 8 and report["serving_layout"]["max_abs_diff"] < 1e-6
    assert any("vllm-project/vllm#43254" in n for n in report["notes"])  # vLLM's Gemma 4 MoE has no expert LoRA


def test_adapter_on_one_expert_tensor_is_not_what_vllm_loads(trained, capsys, tmp_path):
    """The control: LoRA on experts.down_proj alone reloads in PEFT, but vLLM's 3D loader asserts a
    gate_up_proj beside it: the export says so and exits 2."""
    import yaml

    keys = yaml.safe_load(trained("qwen3_5-moe").read_text())
    keys.update(lora_target_parameters=["experts.down_proj"], output_dir=str(tmp_path / "out"))
    config = write_config(tmp_path / "down_only.yaml", **keys)
    code, _, err = run_cli(capsys, "train", config)
    assert code == 0, err
    code, report, err = _export(capsys, config, "--format", "adapter")
    assert code == 2
    assert report["verification"]["ok"] and report["serving_layout"]["matching"] == 0
    assert "vLLM's 3D loader needs gate_up_proj and down_proj" in err


def test_merged_export_fails_when_expert_deltas_are_dropped(trained, capsys, monkeypatch):
    """The control: a merge that leaves the experts as the base had them is caught, exit 2."""
    import archtune.export.hf as hf

    config = trained("qwen3_5-moe")
    saved = hf.save_merged

    def drop_expert_deltas(merged, tokenizer, out, outtype):
        from archtune.config import load_config
        from archtune.train.assembly import assemble_model
        from archtune.train.recipe import plan_for

        setup = plan_for(load_config(config))
        base = dict(assemble_model(setup.plan, setup.tokenizer, "reference").model.named_parameters())
        for name, p in merged.named_parameters():
            if "mlp.experts" in name:
                p.data.copy_(base[name].data)
        saved(merged, tokenizer, out, outtype)

    monkeypatch.setattr(hf, "save_merged", drop_expert_deltas)
    code, report, err = _export(capsys, config, "--format", "merged")
    assert code == 2
    assert report["merged_tensors"]["merged"] == 25 and report["merged_tensors"]["adapted"] == 33
    assert "merged 25 of 33 adapted tensors, 8 of them expert tensors" in err
    assert all("mlp.experts" in name for name in report["merged_tensors"]["not_merged"])


ADAPTED = {"llama": (28, 0), "gemma3": (28, 0), "qwen3_5": (25, 0), "qwen3_5-moe": (33, 8)}


@pytest.mark.parametrize("family", list(ADAPTED))
def test_gguf_loads_in_llama_cpp_and_matches(family, trained, capsys):
    _needs_llama_cpp()
    code, report, err = _export(capsys, trained(family), "--format", "gguf", "--outtype", "f16",
                                "--quantize", "Q8_0", "--quantize", "Q4_K_M")
    assert code == 0, err
    adapted, experts = ADAPTED[family]
    assert report["merged_tensors"] == {"merged": adapted, "adapted": adapted, "expert": experts, "not_merged": []}
    checks = [report["verification"], *report["quantized"]]
    assert [c["outtype"] for c in checks] == ["f16", "Q8_0", "Q4_K_M"]
    for c in checks:
        print(json.dumps({"family": family, **{k: c[k] for k in ("outtype", "max_abs_logit_diff",
                                                                  "max_rel_logit_diff", "greedy_agree")}}))
        assert c["runtime"].startswith("llama.cpp") and c["ok"], c
        assert c["tokenizer_mismatches"] == 0
    assert checks[0]["max_rel_logit_diff"] < 5e-3  # f16
    assert checks[0]["greedy_agree"] == checks[0]["prompts"]
    # archtune's tokenizer has a Gemma-style chat template: llama.cpp's built-in "gemma" format matches it
    assert any("built-in chat format (used without --jinja) formats a conversation as the chat template does" in n
               for n in report["notes"]), report["notes"]


@pytest.mark.parametrize("family, bound", [("gemma3", 1e-3), ("qwen3_5-moe", 1e-5), ("qwen3_5", 1e-5)])
def test_gguf_f32_matches_to_float_precision(family, bound, trained, capsys):
    """The writer's exactness: llama.cpp in float32 (Gemma's GELU comes from a float16 table there)."""
    _needs_llama_cpp()
    code, report, err = _export(capsys, trained(family), "--outtype", "f32")
    assert code == 0, err
    assert report["format"] == "gguf" and report["path"].endswith("model-f32.gguf")
    assert report["verification"]["max_rel_logit_diff"] < bound


def test_gguf_without_gemma_norm_offset_fails(trained, capsys, monkeypatch):
    """The control: Gemma's (1 + weight) norms written as plain weights give other logits: exit 2."""
    _needs_llama_cpp()
    from archtune.families import FAMILIES
    from archtune.families.base import GgufArch

    family = FAMILIES["gemma3"]
    monkeypatch.setitem(family.gguf, "gemma3_text", GgufArch("gemma3"))
    code, report, err = _export(capsys, trained("gemma3"), "--outtype", "f32")
    assert code == 2
    assert report["verification"]["ok"] is False and report["verification"]["max_rel_logit_diff"] > 0.05
    assert "does not compute what the trained model computes" in err


def test_gguf_without_deltanet_transforms_fails(trained, capsys, monkeypatch):
    """The control: Qwen 3.5's tensors written as Hugging Face holds them (A_log, grouped value
    heads, norms without their 1) give other logits in llama.cpp: exit 2."""
    _needs_llama_cpp()
    from archtune.families import FAMILIES
    from archtune.families.base import GgufArch

    family = FAMILIES["qwen3_5"]
    spec = family.gguf["qwen3_5_text"]

    def experts_only(name, tensor, text):  # keep what llama.cpp needs to load the file at all
        if name.endswith(".conv1d.weight"):
            return [(name, tensor.squeeze(1))]
        if name.endswith(".dt_bias"):
            return [(name.removesuffix(".dt_bias") + ".dt_proj.bias", tensor)]
        return [(name, tensor)]

    monkeypatch.setitem(family.gguf, "qwen3_5_text", GgufArch(spec.arch, tensors=experts_only, metadata=spec.metadata))
    code, report, err = _export(capsys, trained("qwen3_5"), "--outtype", "f32")
    assert code == 2
    assert report["verification"]["max_rel_logit_diff"] > 0.05


def test_the_config_export_block_is_honored(trained, capsys, tmp_path):
    import yaml

    config = trained("llama")
    keys = yaml.safe_load(config.read_text())
    keys["export"] = {"format": "merged", "outfile": str(tmp_path / "served"), "llama_cpp_dir": "/nowhere"}
    block = write_config(tmp_path / "with_export.yaml", **keys)
    code, report, err = _export(capsys, block)
    assert code == 0, err
    assert report["format"] == "merged" and report["path"] == str(tmp_path / "served")
    assert (tmp_path / "served" / "config.json").is_file()


def test_axolotl_export_spellings_ftype_and_a_quantize_string(trained, capsys, tmp_path):
    """Axolotl 0.21's export block as written: `quantize` as one comma-separated string (any case), and
    `{ftype}` in outfile replaced by each file's weight type."""
    import yaml

    _needs_llama_cpp()
    keys = yaml.safe_load(trained("llama").read_text())
    keys["export"] = {"format": "gguf", "outtype": "f16", "quantize": "q8_0", "outfile": str(tmp_path / "m-{ftype}.gguf")}
    code, report, err = _export(capsys, write_config(tmp_path / "axolotl_export.yaml", **keys))
    assert code == 0, err
    assert report["path"] == str(tmp_path / "m-f16.gguf") and (tmp_path / "m-Q8_0.gguf").is_file()
    assert [c["outtype"] for c in report["quantized"]] == ["Q8_0"] and report["quantized"][0]["ok"]
    assert not list(tmp_path.glob("*{ftype}*"))


def test_usage_errors_name_the_flag(trained, capsys):
    config = trained("llama")
    code, _, err = run_cli(capsys, "export", config, "--format", "merged", "--quantize", "Q4_K_M")
    assert code == 2 and "--quantize" in err
    code, _, err = run_cli(capsys, "export", config, "--format", "onnx")
    assert code == 2 and "unknown export format" in err


def test_qlora_with_4bit_experts_exports_what_it_trained(tmp_path, capsys):
    """A QLoRA run (4-bit linears, expert LoRA): `export --format merged` writes the dequantized
    base plus every delta (it failed before: transformers refuses to cast a model it still takes
    for a bitsandbytes one), and the merged weights, in transformers alone, are the trained model."""
    train = head_jsonl(QUICKSTART_DATA / "train.jsonl", tmp_path / "train.jsonl", 32)
    test = head_jsonl(QUICKSTART_DATA / "test.jsonl", tmp_path / "test.jsonl", 6)
    config = write_config(tmp_path / "run.yaml", base_model="tiny:qwen3_5-moe", adapter="qlora", load_in_4bit=True,
                          lora_r=4, lora_alpha=8, **FAMILY_KEYS["qwen3_5-moe"],
                          datasets=[{"path": str(train), "type": "alpaca"}],
                          test_datasets=[{"path": str(test), "type": "alpaca"}],
                          dataset_prepared_path=str(tmp_path / "prepared"), sequence_len=128, micro_batch_size=4,
                          max_steps=3, learning_rate=0.01, warmup_steps=0, seed=0,
                          output_dir=str(tmp_path / "out"), use_tensorboard=False)
    code, out, err = run_cli(capsys, "train", config)
    assert code == 0, err
    code, report, err = _export(capsys, config, "--format", "merged")
    assert code == 0, err
    assert report["merged_tensors"]["merged"] == report["merged_tensors"]["adapted"] == 33
    assert report["merged_tensors"]["expert"] == 8
    v = report["verification"]
    assert v["greedy_agree"] == v["prompts"] == 6



def _conditioned_gemma4(variant: str, out, model=None, tokenizer=None):
    """tiny:VARIANT (or `model`) with the weights of a trained Gemma 4 where a random one is too ill-conditioned
    for a rounding check: query norms at head_dim ** -0.5 (Gemma 4's attention is unscaled, and unit
    norms give scores of std sqrt(head_dim): rounding the weights to q8_0 then moves transformers' own
    logits by 0.18 of their largest) and a decisive router (x1000: a random one is near-uniform, and
    float32 rounding flips its near-tied choices). The scales training leaves at 1 (norms, the
    router's input and per-expert scales, layer scalars) are drawn around 1, so each must reach the file."""
    import torch

    from archtune.models.tiny import build_tiny_model, build_tiny_processor

    built = model is None
    if built:
        model, tokenizer = build_tiny_model(variant)
    draw = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not name.startswith("model.language_model.") or not tensor.is_floating_point():
                continue
            if name.endswith("router.proj.weight"):
                tensor.mul_(1000.0)
            elif tensor.dim() == 1 and tensor.numel() > 1 or name.endswith("layer_scalar"):
                tensor.mul_(1 + 0.2 * torch.randn(tensor.shape, generator=draw))
            if name.endswith("q_norm.weight"):
                tensor.mul_(tensor.numel() ** -0.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor = build_tiny_processor(variant, model.config) if built else None
    if processor is not None:
        processor.save_pretrained(out)
    return out


def _retokenized(variant: str, out, tokenizer):
    """tiny:VARIANT's shape over `tokenizer` (built here): its vocabulary size, special and media token
    ids (the tokenizer's real names); Gemma 4 conditioned as above."""
    import torch
    import transformers

    from archtune.families import FAMILIES
    from archtune.models.tiny import build_tiny_config

    ids = tokenizer.convert_tokens_to_ids
    config = build_tiny_config(variant)
    text = config.text_config
    text.vocab_size = len(tokenizer)
    text.pad_token_id, text.bos_token_id, text.eos_token_id = \
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    if variant.startswith("gemma4"):
        text.vocab_size_per_layer_input = len(tokenizer)
        config.image_token_id, config.boi_token_id, config.eoi_token_id = ids(["<|image|>", "<|image>", "<image|>"])
        config.audio_token_id, config.boa_token_id, config.eoa_token_index = ids(["<|audio|>", "<|audio>", "<audio|>"])
        config.video_token_id = ids("<|video|>")
    elif variant.startswith("gemma3"):
        config.image_token_index, config.boi_token_index, config.eoi_token_index = \
            ids(["<|image|>", "<|image>", "<image|>"])
    else:  # Qwen 3.5
        config.image_token_id, config.video_token_id = ids(["<|image_pad|>", "<|video_pad|>"])
        config.vision_start_token_id, config.vision_end_token_id = ids(["<|vision_start|>", "<|vision_end|>"])
    family = next(f for f in FAMILIES.values() if config.model_type in f.model_types)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, family.auto_class).from_config(config)
    turn_end = ids("<turn|>" if variant.startswith("gemma") else "<|im_end|>")
    model.generation_config.eos_token_id = sorted({tokenizer.eos_token_id, turn_end})
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    if variant.startswith("gemma4"):
        return _conditioned_gemma4(variant, out, model, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# no v_proj where k == v, no k/v where KV is shared; Gemma 4 Unified's text decoder is the dense one
GEMMA4 = {"gemma4-dense": (26, 0), "gemma4-e2b": (24, 0), "gemma4-moe": (34, 8), "gemma4-unified": (26, 0)}


@pytest.mark.parametrize("variant", list(GEMMA4))
def test_gemma4_gguf_loads_in_llama_cpp_and_matches(variant, trained, capsys):
    """Gemma 4 (arch gemma4): dense with k == v on the full-attention layers, E2B-style per-layer
    inputs and KV sharing, the MoE beside the dense MLP with expert LoRA, and Gemma 4 Unified's text
    decoder, in f32, q8_0 and llama.cpp's Q4_K_M: greedy tokens agree, logits within the type's tolerance."""
    _needs_llama_cpp()
    config = trained(variant, _conditioned_gemma4)
    adapted, experts = GEMMA4[variant]
    rows = []
    for outtype, quantize in (("f32", ()), ("q8_0", ()), ("f16", ("--quantize", "Q4_K_M"))):
        code, report, err = _export(capsys, config, "--format", "gguf", "--outtype", outtype, *quantize)
        assert code == 0, err
        assert report["merged_tensors"] == {"merged": adapted, "adapted": adapted, "expert": experts,
                                            "not_merged": []}
        for c in [report["verification"], *report["quantized"]]:
            rows.append({"family": variant, **{k: c[k] for k in ("outtype", "max_abs_logit_diff",
                                                                  "max_rel_logit_diff", "greedy_agree")}})
            assert c["ok"] and c["greedy_agree"] == c["prompts"] == 6, c
            assert c["max_rel_logit_diff"] <= c["tolerance"] and c["tokenizer_mismatches"] == 0
    print("\n".join(json.dumps(r) for r in rows))


def test_gemma4_gguf_without_the_per_expert_scale_fails(trained, capsys, monkeypatch):
    """The control: the router's per-expert scales (drawn around 1) left out of the file give other
    logits in llama.cpp: exit 2."""
    _needs_llama_cpp()
    from dataclasses import replace

    from archtune.families import FAMILIES

    family = FAMILIES["gemma4"]
    spec = family.gguf["gemma4_text"]

    def without_scale(name, tensor, text):
        return [] if name.endswith("per_expert_scale") else spec.tensors(name, tensor, text)

    monkeypatch.setitem(family.gguf, "gemma4_text", replace(spec, tensors=without_scale))
    code, report, err = _export(capsys, trained("gemma4-moe", _conditioned_gemma4), "--outtype", "f32")
    assert code == 2
    assert report["verification"]["max_rel_logit_diff"] > 0.05, report["verification"]


CHAT_DATA = QUICKSTART_DATA.parent / "chat.jsonl"


def _tokenizer_for(model: str):
    from tests.local_tokenizers import build_byte_level_tokenizer, build_gemma_tokenizer

    return build_byte_level_tokenizer(model) if model == "qwen35" else build_gemma_tokenizer()


@pytest.mark.parametrize("variant, model", [("gemma4-dense", "gemma4"), ("gemma3", "llama"), ("qwen3_5", "qwen35")])
def test_real_tokenizer_layouts_split_chat_prompts_as_transformers(variant, model, tmp_path, capsys):
    """Tokenizers in the layout real checkpoints ship, trained on chat rows in the model's turn format:
    Gemma's SentencePiece-style BPE (Gemma 4: llama.cpp's "gemma4" model with merges; Gemma 3: "llama",
    scores) with `<bos>`, `<|turn>`, `<turn|>`, and Qwen 3.5's byte-level BPE (pre-tokenizer "qwen35")
    with ChatML's `<|im_start|>`/`<|im_end|>`. llama.cpp splits every held-out chat-templated prompt into
    the Hugging Face tokenizer's ids, and the logits and greedy tokens agree."""
    _needs_llama_cpp()
    import gguf

    base = _retokenized(variant, tmp_path / "base", _tokenizer_for(model))
    train = head_jsonl(CHAT_DATA, tmp_path / "train.jsonl", 32)
    test = tmp_path / "test.jsonl"
    test.write_text("".join(CHAT_DATA.read_text().splitlines(keepends=True)[-6:]))
    config = write_config(tmp_path / "run.yaml", base_model=str(base), adapter="lora", lora_r=4, lora_alpha=8,
                          chat_template="tokenizer_default", datasets=[{"path": str(train), "type": "chat_template"}],
                          test_datasets=[{"path": str(test), "type": "chat_template"}],
                          dataset_prepared_path=str(tmp_path / "prepared"), sequence_len=128, micro_batch_size=4,
                          max_steps=3, learning_rate=0.01, warmup_steps=0, seed=0, output_dir=str(tmp_path / "out"),
                          use_tensorboard=False)
    code, _, err = run_cli(capsys, "train", config)
    assert code == 0, err
    code, report, err = _export(capsys, config, "--outtype", "f32")
    assert code == 0, err
    v = report["verification"]
    print(json.dumps({"family": variant, "tokenizer": model, **{k: v[k] for k in (
        "outtype", "max_abs_logit_diff", "max_rel_logit_diff", "greedy_agree", "tokenizer_mismatches")}}))
    assert v["ok"] and v["prompts"] == v["greedy_agree"] == 6 and v["tokenizer_mismatches"] == 0, v
    reader = gguf.GGUFReader(report["path"])

    def text(key):
        field = reader.fields[key]
        return bytes(field.parts[field.data[0]]).decode()

    assert (text("tokenizer.ggml.model"), text("tokenizer.ggml.pre") if model == "qwen35" else None) == \
        (("gpt2", "qwen35") if model == "qwen35" else (model, None))
    if model == "gemma4":
        assert "<|turn>" in text("tokenizer.chat_template")
        # llama.cpp (0.3.36's) has no built-in Gemma 4 chat format: the export says to use the file's template
        assert any("no built-in chat format" in n and "--jinja" in n for n in report["notes"]), report["notes"]
    if model == "qwen35":  # ChatML is one of llama.cpp's built-in formats
        assert any("formats a conversation as the chat template does" in n for n in report["notes"]), report["notes"]


def test_gguf_refuses_a_tokenizer_it_cannot_carry_before_writing(tmp_path, capsys):
    """A Unigram tokenizer (T5-style SentencePiece): no GGUF written, one message naming the
    tokenizer and the way out, exit 2, before the merge."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from archtune.models.tiny import write_tiny_model

    base = write_tiny_model("llama", tmp_path / "base")
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.train_from_iterator(CHAT_DATA.read_text().splitlines(), trainers.UnigramTrainer(
        vocab_size=512, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"], unk_token="<unk>", show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=unigram, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                            unk_token="<unk>").save_pretrained(base)
    train = head_jsonl(QUICKSTART_DATA / "train.jsonl", tmp_path / "train.jsonl", 16)
    config = write_config(tmp_path / "run.yaml", base_model=str(base), adapter="lora", lora_r=4, lora_alpha=8,
                          lora_target_modules=LINEARS, datasets=[{"path": str(train), "type": "alpaca"}],
                          dataset_prepared_path=str(tmp_path / "prepared"), sequence_len=128, micro_batch_size=4,
                          max_steps=1, output_dir=str(tmp_path / "out"), use_tensorboard=False)
    code, _, err = run_cli(capsys, "train", config)
    assert code == 0, err
    code, out, err = run_cli(capsys, "export", config, "--format", "gguf")
    assert code == 2 and "Traceback" not in err
    assert "tokenizer_config" in err and "Unigram model" in err and "convert_hf_to_gguf.py" in err
    assert "wrote" not in err + out and not list((tmp_path / "out").rglob("*.gguf"))


def test_merged_f32_export_of_a_bf16_run_streams_keeps_every_delta_and_allows_the_runs_own_rounding(tmp_path, capsys):
    """A bf16 LoRA run on a local sharded checkpoint, `export --format merged --outtype f32`: the merge
    streams in float32 (W + delta computed and stored in f32, so deltas below bf16's resolution stay:
    every adapted tensor within float32 rounding of the trained value), the artifact computes what the
    trained model computes in float32, and what separates it from the trained model's bf16 logits is
    that model's own arithmetic (`reference_noise`), allowed on top of f32's tolerance. Before: merged in
    bf16 and cast, the tensors off by bf16 rounding, the logits beyond f32's tolerance."""
    import torch
    import transformers

    from archtune.config import load_config
    from archtune.export.compare import hf_logits, tolerance
    from archtune.models.tiny import build_tiny_model
    from archtune.train.assembly import assemble_model
    from archtune.train.recipe import plan_for

    model, tokenizer = build_tiny_model("llama", seed=0)
    model.save_pretrained(tmp_path / "base", max_shard_size="200KB")
    tokenizer.save_pretrained(tmp_path / "base")
    train = head_jsonl(QUICKSTART_DATA / "train.jsonl", tmp_path / "train.jsonl", 32)
    test = head_jsonl(QUICKSTART_DATA / "test.jsonl", tmp_path / "test.jsonl", 6)
    config = write_config(tmp_path / "run.yaml", base_model=str(tmp_path / "base"), adapter="lora", lora_r=4,
                          lora_alpha=8, lora_target_modules=LINEARS, bf16=True,
                          datasets=[{"path": str(train), "type": "alpaca"}],
                          test_datasets=[{"path": str(test), "type": "alpaca"}],
                          dataset_prepared_path=str(tmp_path / "prepared"), sequence_len=128, micro_batch_size=4,
                          max_steps=2, learning_rate=1e-3, warmup_steps=0, seed=0,
                          output_dir=str(tmp_path / "out"), use_tensorboard=False)
    code, _, err = run_cli(capsys, "train", config)
    assert code == 0, err
    code, report, err = _export(capsys, config, "--format", "merged", "--outtype", "f32")
    assert code == 0, err
    assert report["merged_tensors"] == {"merged": 28, "adapted": 28, "expert": 0, "not_merged": []}
    v = report["verification"]
    assert v["greedy_agree"] == v["prompts"] == 6
    assert v["reference_noise"] > tolerance("f32") and v["allowed"] == tolerance("f32") + v["reference_noise"]
    assert tolerance("f32") < v["max_rel_logit_diff"] <= v["allowed"]

    # The float32 artifact is the trained model computing in float32.
    setup = plan_for(load_config(config))
    exact = assemble_model(setup.plan, setup.tokenizer, "generate").model.float()
    merged = transformers.AutoModelForCausalLM.from_pretrained(report["path"], dtype="auto")
    assert merged.dtype == torch.float32
    ids = setup.tokenizer("### Instruction:\nName the colour of the sky.\n\n### Response:\n")["input_ids"]
    a, b = hf_logits(exact, ids), hf_logits(merged, ids)
    assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())
