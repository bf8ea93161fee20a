"""Audio through the CLI on the tiny Gemma 4 E2B: rows with WAV tones train (the audio tower and its
embedder frozen by default), bad audio is dropped by reason, audio tokens never carry labels,
evaluate and check --probe take audio batches; packing and models without an audio tower refuse
audio rows with the reason."""
from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

from tests.audio_files import audio_row, tone_wav
from tests.e2e.conftest import evaluate_and_probe, preprocess_refused, read_json, run_cli, write_config


def _rows(tmp: Path, n: int, seed: int, prefix: str) -> list[dict]:
    """n rows asking whether a tone is high (1.8-3 kHz) or low (200-500 Hz), 0.2-0.5 s long; one
    in four at 8 kHz stereo (resampled), one in five given as a path relative to the data file."""
    rng = random.Random(seed)
    (tmp / "wav").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        high = rng.random() < 0.5
        freq = rng.uniform(1800, 3000) if high else rng.uniform(200, 500)
        rate, channels = (8000, 2) if i % 4 == 3 else (16_000, 1)
        name = f"wav/{prefix}{i}.wav"
        (tmp / name).write_bytes(tone_wav(freq, rng.uniform(0.2, 0.5), rate, channels=channels))
        rows.append(audio_row({"audio": name if i % 5 == 0 else str(tmp / name)}, "high" if high else "low"))
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audio")
    (tmp / "junk.wav").write_bytes(b"RIFF....WAVEjunk")
    bad = [audio_row({"audio": str(tmp / "missing.wav")}, "low"), audio_row({"audio": str(tmp / "junk.wav")}, "high")]
    text_only = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Is a whistle high or low?"}]},
                              {"role": "assistant", "content": [{"type": "text", "text": "high"}]}]}
    train = _write(tmp / "train.jsonl", _rows(tmp, 14, 0, "t") + bad + [text_only])
    test = _write(tmp / "test.jsonl", _rows(tmp, 6, 1, "e"))
    config = write_config(
        tmp / "config.yaml", base_model="tiny:gemma4-e2b",
        datasets=[{"path": str(train), "type": "chat_template"}],
        test_datasets=[{"path": str(test), "type": "chat_template"}],
        sequence_len=96, micro_batch_size=5, max_steps=3, learning_rate=0.002, seed=3, output_dir=str(tmp / "out"),
        dataset_prepared_path=str(tmp / "prepared"), logging_steps=1, use_tensorboard=False)
    return tmp, config


def test_audio_full_fine_tune_end_to_end(audio_run, capsys):
    """Full fine-tune: the language model trains on the audio rows, the audio tower and its
    embedder stay exactly as built; labels are the answers token by token."""
    import torch
    from datasets import load_from_disk
    from safetensors.torch import load_file

    from archtune.assets import load_tokenizer
    from archtune.models.tiny import build_tiny_model

    tmp, config = audio_run
    code, out, err = run_cli(capsys, "train", config)
    assert code == 0, err
    summary = read_json(tmp / "out" / "train_summary.json")
    data = summary["data"]
    assert {k: v for k, v in data["rows_dropped"].items() if v} == {"audio_missing": 1, "audio_undecodable": 1}
    assert data["audio_rows"] == {"train": 14, "eval": 6} and data["train_rows"] == 15
    assert summary["eval_loss_final"] < summary["eval_loss_initial"]

    tok = load_tokenizer()
    audio_id, boa, eoa = (tok.convert_tokens_to_ids(t) for t in ("<audio_soft_token>", "<start_of_audio>",
                                                                  "<end_of_audio>"))
    answers = {tuple(tok(a + "<end_of_turn>", add_special_tokens=False)["input_ids"]) for a in ("high", "low")}
    train = load_from_disk(str(Path(data["cache_dir"]) / "train"))
    for row in train:
        assert tuple(lab for lab in row["labels"] if lab != -100) in answers
        if row["audios"]:
            n = row["input_ids"].count(audio_id)
            assert n > 0 and row["token_types"].count(3) == n and set(row["token_types"]) == {0, 3}
            for lab, i in zip(row["labels"], row["input_ids"]):
                assert lab == -100 or i not in (audio_id, boa, eoa)

    trained = load_file(str(tmp / "out" / "model.safetensors"))
    base, _ = build_tiny_model("gemma4-e2b", seed=3)  # the seed the run built it with
    state = base.state_dict()
    towers = [k for k in trained if k.startswith(("model.audio_tower.", "model.embed_audio."))]
    assert towers and all(torch.equal(trained[k], state[k]) for k in towers)
    layers = [k for k in trained if k.startswith("model.language_model.layers.")]
    moved = [k for k in layers if not torch.equal(trained[k], state[k])]
    assert moved

    result = evaluate_and_probe(capsys, config)
    assert result["eval_rows"] == 6 and abs(result["eval_loss"] - summary["eval_loss_final"]) < 1e-4


def test_packing_is_refused_for_audio_rows(audio_run, capsys, tmp_path):
    err = preprocess_refused(capsys, audio_run[1], tmp_path, "sample_packing=true")
    assert "sample_packing" in err and "14 train rows carry audio" in err


@pytest.mark.parametrize("tiny", ["gemma4-dense", "gemma3"])
def test_audio_rows_are_refused_without_an_audio_tower(audio_run, capsys, tmp_path, tiny):
    tmp, config = audio_run
    err = preprocess_refused(capsys, config, tmp_path, f"base_model=tiny:{tiny}")
    assert f"{tmp / 'train.jsonl'}:1" in err and "audio" in err


def _checkpoint_like(capsys, model: Path) -> Path:
    """`init-tiny gemma4-e2b` written to `model`, its processor_config.json given a video part as
    the real checkpoints' have (transformers' Gemma4VideoProcessor needs torchvision)."""
    code, _, err = run_cli(capsys, "init-tiny", "gemma4-e2b", model)
    assert code == 0, err
    processor_config = json.loads((model / "processor_config.json").read_text())
    assert processor_config["processor_class"] == "Gemma4Processor" and "feature_extractor" in processor_config
    assert "video_processor" not in processor_config
    video = {k: v for k, v in processor_config["image_processor"].items() if k != "image_processor_type"}
    processor_config["video_processor"] = {**video, "video_processor_type": "Gemma4VideoProcessor"}
    (model / "processor_config.json").write_text(json.dumps(processor_config))
    return model


def test_init_tiny_writes_the_processor_and_a_checkpoints_video_part_is_not_needed(audio_run, capsys, tmp_path):
    """`init-tiny gemma4-e2b DIR` writes the processor (no video part); a model directory whose
    processor has a video part loads without it where torchvision is missing (transformers'
    AutoProcessor then fails), and audio rows read through it."""
    from transformers import AutoProcessor

    tmp, config = audio_run
    model = _checkpoint_like(capsys, tmp_path / "model")
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(ImportError, match="Torchvision"):
            AutoProcessor.from_pretrained(model)
    code, out, err = run_cli(capsys, "preprocess", config, f"base_model={model}",
                             f"dataset_prepared_path={tmp_path / 'p'}", "--json")
    assert code == 0, err
    assert json.loads(out)["audio_rows"] == {"train": 14, "eval": 6}


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_a_processor_that_needs_torchvision_says_how_to_install_it(audio_run, capsys, tmp_path, monkeypatch):
    """When the processor loads neither whole nor without its video part, the rows stop the run
    with the reason and the install line, not a traceback."""
    import archtune.families.media as family_media

    def fails(processor_cls):
        raise ImportError("the image processor needs torchvision too")

    tmp, config = audio_run
    model = _checkpoint_like(capsys, tmp_path / "model")
    monkeypatch.setattr(family_media, "without_video_processor", fails)
    err = preprocess_refused(capsys, config, tmp_path, f"base_model={model}")
    assert f"{tmp / 'train.jsonl'}:1" in err and "Torchvision" in err
    assert "pip install torchvision --index-url https://download.pytorch.org/whl/cpu" in err


def test_lora_inside_the_audio_tower_trains_its_adapters_only(audio_run, capsys, tmp_path):
    """An explicit regex puts LoRA in the audio tower (freeze_mm_modules: false): on the linear
    inside each Gemma4ClippableLinear, trained by the audio rows; nothing else is trainable."""
    import torch
    from safetensors.torch import load_file

    tmp, config = audio_run
    regex = (r"model\.audio_tower\.layers\.\d+\.self_attn\.(q|k|v)_proj"
             r"|model\.language_model\.layers\.\d+\.self_attn\.q_proj")
    code, out, err = run_cli(capsys, "train", config, "adapter=lora", "lora_r=4", "lora_alpha=8",
                             f"lora_target_modules={regex}", "freeze_mm_modules=false", "learning_rate=0.01",
                             f"output_dir={tmp_path / 'out'}", f"dataset_prepared_path={tmp_path / 'p'}")
    assert code == 0, err
    summary = read_json(tmp_path / "out" / "train_summary.json")
    adapter = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    tower = {k: v for k, v in adapter.items() if "model.audio_tower." in k}
    assert len(tower) == 6 and all(".self_attn." in k and ".linear.lora_" in k for k in tower)
    assert all(torch.count_nonzero(v) > 0 for k, v in tower.items() if ".lora_B." in k)  # B starts at zero
    assert summary["trainable_params"] == sum(v.numel() for v in adapter.values())

