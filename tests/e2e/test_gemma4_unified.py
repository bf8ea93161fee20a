"""Gemma 4 Unified (`Gemma4UnifiedForConditionalGeneration`, model_type gemma4_unified): Axolotl's
gemma4-unified text example as a user runs it (base model, data and output_dir swapped for local
stand-ins), through `archtune check` and `archtune train`, with the embedders (the family's
multimodal modules: it has no towers) frozen."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.conftest import read_json, run_cli, write_config
from tests.e2e.test_axolotl_configs import axolotl_config, write_data


def test_axolotl_gemma4_unified_text_lora_config_checks_and_trains(tmp_path, capsys):
    """Axolotl's gemma4-unified text LoRA example (tests/e2e/test_axolotl_configs.py holds its keys),
    packed: the family's plan, and LoRA on the text decoder alone."""
    cfg = axolotl_config(tmp_path, "gemma4-unified", packing=True)
    code, out, err = run_cli(capsys, "check", cfg, "--json")
    assert code == 0, out + err
    plan = json.loads(out)
    s = plan["settings"]
    assert plan["family"] == "gemma4_unified" and plan["model_type"] == "gemma4_unified"
    assert s["freeze_mm_modules"]["value"] is True and s["freeze_mm_modules"]["source"] == "family"
    assert s["chat_template"]["value"] == "gemma4_unified"
    code, out, err = run_cli(capsys, "train", cfg, "max_steps=8", "learning_rate=0.002")
    assert code == 0, out + err
    summary = read_json(tmp_path / "out" / "train_summary.json")
    assert summary["family"] == "gemma4_unified" and summary["steps"] == 8
    assert summary["eval_loss_final"] < summary["eval_loss_initial"]
    adapter = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert adapter and all(".language_model.layers." in k for k in adapter), sorted(adapter)[:5]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from archtune.models.tiny import write_tiny_model

    return write_tiny_model("gemma4-unified", tmp_path_factory.mktemp("g4u") / "base")


def test_full_fine_tune_leaves_the_embedders_as_loaded(tmp_path, capsys, base):
    """Without LoRA the text decoder trains; the vision and audio embedders are frozen and stay
    bit-identical."""
    write_data(tmp_path)
    cfg = write_config(tmp_path / "full.yaml", base_model=str(base), chat_template="gemma4_unified",
                       datasets=[{"path": str(tmp_path / "chat.jsonl"), "type": "chat_template",
                                  "field_messages": "conversations",
                                  "message_property_mappings": {"role": "from", "content": "value"}}],
                       sequence_len=128, micro_batch_size=2, max_steps=6, learning_rate=0.0005,
                       output_dir=str(tmp_path / "out"), use_tensorboard=False)
    code, out, err = run_cli(capsys, "train", cfg)
    assert code == 0, out + err
    before, after = load_file(str(base / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    # (transformers saves model.embed_vision's patch layers as model.vision_embedder.*)
    embedders = [k for k in before if k.startswith(("model.embed_vision.", "model.vision_embedder.", "model.embed_audio."))]
    decoder = [k for k in before if k.startswith("model.language_model.layers.")]
    assert embedders and decoder
    assert all(torch.equal(before[k], after[k]) for k in embedders)
    # Frozen, not merely unreached by text batches: every parameter but the embedders' trains.
    summary = read_json(tmp_path / "out" / "train_summary.json")
    assert summary["total_params"] - summary["trainable_params"] == sum(before[k].numel() for k in embedders)
    assert sum(not torch.equal(before[k], after[k]) for k in decoder) > len(decoder) // 2


def test_gemma4_unified_template_keeps_consecutive_assistant_messages_in_one_model_turn():
    from archtune.families import chat_templates
    from archtune.models.tiny import build_tiny_model

    _, tokenizer = build_tiny_model("llama")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"},
                {"role": "assistant", "content": "b"}]
    templates = chat_templates()
    unified = tokenizer.apply_chat_template(messages, chat_template=templates["gemma4_unified"], tokenize=False)
    gemma4 = tokenizer.apply_chat_template(messages, chat_template=templates["gemma4"], tokenize=False)
    assert unified == f"{tokenizer.bos_token}<|turn>user\nhi<turn|>\n<|turn>model\na<turn|>\nb<turn|>\n"
    assert gemma4.count("<|turn>model") == 2


# ---------------------------------------------------------------- audio (no torchvision needed)

def _tone_rows(tmp, n: int, seed: int, prefix: str) -> list[dict]:
    """n rows asking whether a 0.2-0.5 s tone is high or low (5-13 frames of 640 samples)."""
    import random

    from tests.audio_files import audio_row, tone_wav

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        high = rng.random() < 0.5
        path = tmp / f"{prefix}{i}.wav"
        path.write_bytes(tone_wav(rng.uniform(1800, 3000) if high else rng.uniform(200, 500), rng.uniform(0.2, 0.5)))
        rows.append(audio_row({"audio": str(path)}, "high" if high else "low"))
    return rows


def _checkpoint_like(base, model):
    """The tiny model directory with processor_config.json holding image and video parts, as the
    real checkpoints' does (both classes need torchvision in transformers 5.25)."""
    import shutil

    shutil.copytree(base, model)
    processor_config = json.loads((model / "processor_config.json").read_text())
    assert processor_config["processor_class"] == "Gemma4UnifiedProcessor" and "feature_extractor" in processor_config
    assert "image_processor" not in processor_config and "video_processor" not in processor_config
    vision = dict(patch_size=4, pooling_kernel_size=2, max_soft_tokens=16)
    processor_config["image_processor"] = {**vision, "image_processor_type": "Gemma4UnifiedImageProcessor"}
    processor_config["video_processor"] = {**vision, "video_processor_type": "Gemma4UnifiedVideoProcessor"}
    (model / "processor_config.json").write_text(json.dumps(processor_config))
    return model


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory, base):
    """Audio rows as Axolotl's gemma4-unified examples would carry them (chat_template gemma4_unified),
    LoRA on the text decoder, a model directory laid out as a checkpoint's (its processor's image and
    video parts named, which transformers cannot load without torchvision)."""
    import importlib.util

    from transformers import AutoProcessor

    tmp = tmp_path_factory.mktemp("g4u-audio")
    model = _checkpoint_like(base, tmp / "model")
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises((ImportError, ValueError), match="(?i)torchvision"):
            AutoProcessor.from_pretrained(model)
    for name, rows in (("train", _tone_rows(tmp, 12, 0, "t")), ("test", _tone_rows(tmp, 4, 1, "e"))):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = write_config(
        tmp / "config.yaml", base_model=str(model), chat_template="gemma4_unified",
        datasets=[{"path": str(tmp / "train.jsonl"), "type": "chat_template"}],
        test_datasets=[{"path": str(tmp / "test.jsonl"), "type": "chat_template"}],
        adapter="lora", lora_r=4, lora_alpha=8, sequence_len=64, micro_batch_size=4, max_steps=3,
        learning_rate=0.002, seed=5, output_dir=str(tmp / "out"), dataset_prepared_path=str(tmp / "prepared"),
        use_tensorboard=False)
    return tmp, config


def test_audio_rows_check_and_train_with_the_same_losses_cached_or_not(audio_run, capsys, tmp_path):
    """Audio rows train on Gemma 4 Unified without torchvision (the processor from its feature
    extractor, tokenizer and chat template): check passes and says image rows will be refused and
    why; the losses are finite and the same through the cache and with skip_prepare_dataset; audio
    tokens and their boa/eoa markers carry no label, the answers do."""
    import importlib.util
    import math
    from pathlib import Path

    from datasets import load_from_disk

    from archtune.assets import load_tokenizer

    tmp, config = audio_run
    code, out, err = run_cli(capsys, "check", config, "--json")
    assert code == 0, out + err
    plan = json.loads(out)
    assert plan["errors"] == []
    (image_warning,) = [w for w in plan["warnings"] if w.startswith("rows with image content will be refused: ")]
    if importlib.util.find_spec("torchvision") is None:
        assert "needs torchvision" in image_warning
        assert "pip install torchvision --index-url https://download.pytorch.org/whl/cpu" in image_warning
    assert not [w for w in plan["warnings"] if "audio" in w], plan["warnings"]

    summaries = []
    for name, extra in (("cached", []), ("skipped", ["skip_prepare_dataset=true", "remove_unused_columns=false"])):
        code, out, err = run_cli(capsys, "train", config, f"output_dir={tmp_path / name}",
                                 f"dataset_prepared_path={tmp_path / name / 'prepared'}", *extra)
        assert code == 0, err
        summaries.append(read_json(tmp_path / name / "train_summary.json"))
    cached, skipped = summaries
    assert skipped["data"]["cache"] == "skipped" and not (tmp_path / "skipped" / "prepared").exists()
    assert cached["data"]["audio_rows"] == skipped["data"]["audio_rows"] == {"train": 12, "eval": 4}
    for key in ("train_loss_first", "train_loss_last", "eval_loss_initial", "eval_loss_final"):
        assert math.isfinite(cached[key]) and abs(skipped[key] - cached[key]) < 1e-5, key
    assert cached["steps"] == 3 and cached["eval_loss_final"] < cached["eval_loss_initial"]

    tok = load_tokenizer()
    audio_id, boa, eoa = (tok.convert_tokens_to_ids(t) for t in ("<audio_soft_token>", "<start_of_audio>",
                                                                  "<end_of_audio>"))
    # (the bundled tokenizer has no <turn|> token: the turn end is plain text here, its newline labeled with it)
    answers = {tuple(tok(a + "<turn|>\n", add_special_tokens=False)["input_ids"]) for a in ("high", "low")}
    rows = load_from_disk(str(Path(cached["data"]["cache_dir"]) / "train"))
    for row in rows:
        ids, labels = row["input_ids"], row["labels"]
        n = ids.count(audio_id)
        assert 5 <= n <= 13 and ids.count(boa) == ids.count(eoa) == 1
        assert row["token_types"].count(3) == n  # the processor's mm_token_type_ids: 3 marks audio
        assert tuple(lab for lab in labels if lab != -100) in answers
        assert all(lab == -100 for lab, i in zip(labels, ids) if i in (audio_id, boa, eoa))


def test_audio_reaches_the_model_through_the_audio_embedder(audio_run, capsys, tmp_path):
    """Full fine-tune with freeze_mm_modules: false: the audio embedder's weights move (the audio
    features reach the model and carry gradient), the image embedder's, which no row reaches, stay
    bit-identical; with the family default (frozen) the audio embedder stays as loaded."""
    import torch
    from safetensors.torch import load_file

    tmp, config = audio_run
    before = load_file(str(tmp / "model" / "model.safetensors"))
    audio = [k for k in before if k.startswith("model.embed_audio.")]
    vision = [k for k in before if k.startswith(("model.embed_vision.", "model.vision_embedder."))]
    assert audio and vision
    for freeze in ("false", "true"):
        out = tmp_path / freeze
        code, _, err = run_cli(capsys, "train", config, "adapter=", "lora_r=", "lora_alpha=", "max_steps=2",
                               "learning_rate=0.001", f"freeze_mm_modules={freeze}", f"output_dir={out}")
        assert code == 0, err
        after = load_file(str(out / "model.safetensors"))
        moved = [k for k in audio if not torch.equal(before[k], after[k])]
        assert moved == ([k for k in audio if k.endswith("embedding_projection.weight")] if freeze == "false" else [])
        assert all(torch.equal(before[k], after[k]) for k in vision)


def test_image_rows_stop_with_the_torchvision_reason_check_gave(audio_run, capsys, tmp_path):
    """Image rows on Gemma 4 Unified need its torchvision-only image processor: preprocess and train
    stop (exit 2, no traceback, nothing written) naming the row and the reason check warned with."""
    from tests.e2e.conftest import preprocess_refused, vision_rows

    tmp, config = audio_run
    (tmp_path / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in vision_rows("train.jsonl", 3)))
    data = "datasets=[{\"path\": \"%s\", \"type\": \"chat_template\"}]" % (tmp_path / "images.jsonl")
    code, out, _ = run_cli(capsys, "check", config, data, "--json")
    assert code == 0, out
    (warning,) = [w for w in json.loads(out)["warnings"] if w.startswith("rows with image content will be refused: ")]
    reason = warning.split(": ", 1)[1]
    err = preprocess_refused(capsys, config, tmp_path, data)
    assert f"{tmp_path / 'images.jsonl'}:1" in err and reason in " ".join(err.split())
    code, _, err = run_cli(capsys, "train", config, data, f"output_dir={tmp_path / 'out'}")
    assert code == 2 and "Traceback" not in err and reason in " ".join(err.split())
    assert not (tmp_path / "out").exists()
