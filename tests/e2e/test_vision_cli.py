"""Images through the CLI on the tiny Gemma 3: bad images dropped by reason, image tokens never
labels, projector trained while the tower stays frozen, mixed text/image batches, evaluate,
generate --image, check --probe; image rows refused where they cannot be trained."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from tests.e2e.conftest import (
    REPO,
    evaluate_and_probe,
    preprocess_refused,
    read_json,
    run_cli,
    vision_rows,
    write_config,
)

VISION = REPO / "examples" / "data" / "vision"


def _bad_rows(tmp: Path) -> list[dict]:
    (tmp / "junk.png").write_bytes(b"this is not an image")
    buf = io.BytesIO()
    Image.new("I;16", (8, 8)).save(buf, format="PNG")
    (tmp / "deep.png").write_bytes(buf.getvalue())

    def row(path):
        return {"messages": [{"role": "user", "content": [{"type": "image", "path": str(path)},
                                                          {"type": "text", "text": "What color is the shape?"}]},
                             {"role": "assistant", "content": "red"}]}

    return [row(tmp / "missing.png"), row(tmp / "junk.png"), row(tmp / "deep.png")]


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vision")
    train = vision_rows("train.jsonl", 30) + _bad_rows(tmp)
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in vision_rows("test.jsonl", 8)))
    config = write_config(
        tmp / "config.yaml", base_model="tiny:gemma3",
        datasets=[{"path": str(tmp / "train.jsonl"), "type": "chat_template"}],
        test_datasets=[{"path": str(tmp / "test.jsonl"), "type": "chat_template"}],
        sequence_len=64, adapter="lora", lora_r=8, lora_alpha=16,
        lora_modules_to_save=["multi_modal_projector"], micro_batch_size=4, max_steps=4,
        learning_rate=0.01, output_dir=str(tmp / "out"), dataset_prepared_path=str(tmp / "prepared"),
        logging_steps=1, use_tensorboard=False)
    return tmp, config


def test_vision_training_end_to_end(vision_run, capsys):
    import torch
    from datasets import load_from_disk
    from safetensors.torch import load_file

    tmp, config = vision_run
    code, out, err = run_cli(capsys, "train", config)
    assert code == 0, err
    summary = read_json(tmp / "out" / "train_summary.json")
    data = summary["data"]
    # three bad images, each dropped and counted by its reason
    assert {k: v for k, v in data["rows_dropped"].items() if v} == {
        "image_missing": 1, "image_undecodable": 1, "image_mode": 1}
    assert data["image_rows"] == {"train": 27, "eval": 8}  # 3 of the 30 bundled rows are text-only

    # image tokens (typed by the processor) never carry a label; each image row has its 16 tokens
    train = load_from_disk(str(Path(data["cache_dir"]) / "train"))
    soft = 6  # <image_soft_token> in archtune's tokenizer
    for row in train:
        if row["images"]:
            assert sum(row["token_types"]) == row["input_ids"].count(soft) == 16
        assert all(lab == -100 for lab, t in zip(row["labels"], row["token_types"]) if t)
        assert soft not in row["labels"]

    # the projector trained (saved with the adapter), the tower did not
    adapter = load_file(str(tmp / "out" / "adapter_model.safetensors"))
    projector = [k for k in adapter if "multi_modal_projector" in k]
    assert projector and not [k for k in adapter if "vision_tower" in k]
    weight = next(adapter[k] for k in projector if k.endswith("mm_input_projection_weight"))
    assert torch.count_nonzero(weight) > 0  # transformers initialises it to zeros

    result = evaluate_and_probe(capsys, config)
    assert result["eval_rows"] == 8 and abs(result["eval_loss"] - summary["eval_loss_final"]) < 1e-4

    image = VISION / "images" / "0600.png"
    code, out, err = run_cli(capsys, "generate", config, "--image", str(image), "--prompt", "What color is the shape?",
                             "--max-new-tokens", "3")
    assert code == 0, err
    assert "output:" in out


def test_image_rows_are_refused_for_a_text_only_model(vision_run, capsys, tmp_path):
    tmp, config = vision_run
    err = preprocess_refused(capsys, config, tmp_path, "base_model=tiny:llama")
    assert f"{tmp / 'train.jsonl'}:1" in err and "image" in err


def test_packing_is_refused_for_image_rows(vision_run, capsys, tmp_path):
    err = preprocess_refused(capsys, vision_run[1], tmp_path, "sample_packing=true")
    assert "sample_packing" in err and "carry images" in err


@pytest.mark.parametrize("tiny, projector, tokens", [("gemma4-dense", "embed_vision", 64), ("qwen3_5-moe", "merger", 16)])
def test_images_train_on_gemma4_and_qwen3_5(tmp_path, capsys, tiny, projector, tokens):
    """The tiny Gemma 4 and Qwen 3.5 processors (images only): the processor's own image token
    count per image, its mm_token_type_ids, pixel_values (and image_grid_thw) reach the model,
    the projector trains, the tower does not."""
    from datasets import load_from_disk
    from safetensors.torch import load_file

    rows = vision_rows("train.jsonl", 10)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = write_config(
        tmp_path / "config.yaml", base_model=f"tiny:{tiny}",
        datasets=[{"path": str(tmp_path / "train.jsonl"), "type": "chat_template"}],
        sequence_len=128, adapter="lora", lora_r=4, lora_alpha=8, lora_modules_to_save=[projector],
        micro_batch_size=5, max_steps=2, output_dir=str(tmp_path / "out"),
        dataset_prepared_path=str(tmp_path / "prepared"), use_tensorboard=False)
    code, out, err = run_cli(capsys, "train", config)
    assert code == 0, err
    summary = read_json(tmp_path / "out" / "train_summary.json")
    assert summary["data"]["image_rows"]["train"] == 9  # row 10 is text-only
    train = load_from_disk(str(Path(summary["data"]["cache_dir"]) / "train"))
    for row in train:
        if row["images"]:
            assert sum(1 for t in row["token_types"] if t) == row["input_ids"].count(6) == tokens
        assert all(lab == -100 for lab, t in zip(row["labels"], row["token_types"]) if t)
    adapter = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert [k for k in adapter if f".{projector}." in k]
    assert not [k for k in adapter if "vision_tower" in k or "visual.blocks" in k]


def test_processor_from_a_model_directory_and_processor_type(vision_run, capsys, tmp_path):
    """`archtune init-tiny gemma3 DIR` writes the processor; a model directory's processor is
    loaded (AutoProcessor, or the class processor_type names); a class transformers lacks is a
    user error on processor_type; image_size resizes before the processor."""
    tmp, config = vision_run
    code, _, err = run_cli(capsys, "init-tiny", "gemma3", tmp_path / "model")
    assert code == 0, err
    assert (tmp_path / "model" / "processor_config.json").is_file()
    common = [f"base_model={tmp_path / 'model'}", f"dataset_prepared_path={tmp_path / 'p'}"]
    for extra in ([], ["processor_type=Gemma3Processor", "image_size=24", "image_resize_algorithm=bicubic"]):
        code, out, err = run_cli(capsys, "preprocess", config, *common, *extra, "--json")
        assert code == 0, err
        assert json.loads(out)["image_rows"] == {"train": 27, "eval": 8}
    code, out, err = run_cli(capsys, "preprocess", config, *common, "processor_type=NoSuchProcessor")
    assert code == 2 and "processor_type" in err


def test_skip_prepare_dataset_trains_image_rows_with_the_same_losses(vision_run, capsys, tmp_path):
    """Axolotl's multimodal examples set skip_prepare_dataset (with remove_unused_columns: false):
    the rows are encoded with the processor for this run only, no cache written, and train to the
    same losses as through the cache."""
    tmp, config = vision_run
    summaries = []
    for name, extra in (("cached", []), ("skipped", ["skip_prepare_dataset=true", "remove_unused_columns=false"])):
        code, out, err = run_cli(capsys, "train", config, "max_steps=2", f"output_dir={tmp_path / name}",
                                 f"dataset_prepared_path={tmp_path / name / 'prepared'}", *extra)
        assert code == 0, err
        summaries.append(read_json(tmp_path / name / "train_summary.json"))
    cached, skipped = summaries
    assert skipped["data"]["cache"] == "skipped" and not (tmp_path / "skipped" / "prepared").exists()
    assert skipped["data"]["image_rows"] == cached["data"]["image_rows"] == {"train": 27, "eval": 8}
    for key in ("train_loss_first", "train_loss_last", "eval_loss_initial", "eval_loss_final"):
        assert abs(skipped[key] - cached[key]) < 1e-5, key


def _qwen3_5_checkpoint_like(capsys, model: Path) -> Path:
    """`init-tiny qwen3_5` written to `model` with its processor files laid out as the Qwen 3.5 checkpoints'
    are: no processor_config.json; preprocessor_config.json names the processor class and the fast image
    processor; video_preprocessor_config.json holds the video part (Qwen3VLVideoProcessor needs torchvision)."""
    code, _, err = run_cli(capsys, "init-tiny", "qwen3_5", model)
    assert code == 0, err
    image = json.loads((model / "processor_config.json").read_text())["image_processor"]
    image.update(image_processor_type="Qwen2VLImageProcessorFast", processor_class="Qwen3VLProcessor")
    (model / "preprocessor_config.json").write_text(json.dumps(image))
    video = {k: v for k, v in image.items() if k != "image_processor_type"}
    (model / "video_preprocessor_config.json").write_text(json.dumps({**video,
                                                                      "video_processor_type": "Qwen3VLVideoProcessor"}))
    (model / "processor_config.json").unlink()
    return model


def test_a_qwen3_5_checkpoints_processor_loads_in_check_and_train(tmp_path, capsys):
    """Axolotl's Qwen 3.5 vision config (processor_type: AutoProcessor): the processor class is found where
    AutoProcessor finds it (preprocessor_config.json), loaded without its video part where torchvision is
    missing; check passes and the image rows are read."""
    model = _qwen3_5_checkpoint_like(capsys, tmp_path / "model")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in vision_rows("train.jsonl", 6)))
    config = write_config(
        tmp_path / "config.yaml", base_model=str(model), processor_type="AutoProcessor",
        skip_prepare_dataset=True, remove_unused_columns=False,
        datasets=[{"path": str(tmp_path / "train.jsonl"), "type": "chat_template"}], sequence_len=128,
        adapter="lora", lora_r=4, lora_alpha=8, micro_batch_size=3, max_steps=1, output_dir=str(tmp_path / "out"),
        use_tensorboard=False)
    code, out, err = run_cli(capsys, "check", config, "--json")
    assert code == 0 and json.loads(out)["errors"] == [], out
    code, out, err = run_cli(capsys, "train", config)
    assert code == 0, err
    assert read_json(tmp_path / "out" / "train_summary.json")["data"]["image_rows"]["train"] == 6


def test_a_processor_that_does_not_load_is_a_check_error_with_trains_message(tmp_path, capsys):
    """processor_type set (the config trains on images) and the model directory holds no processor files:
    check stops with the message and fix train stops with, before any weight is loaded."""
    model = _qwen3_5_checkpoint_like(capsys, tmp_path / "model")
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        (model / name).unlink()
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in vision_rows("train.jsonl", 3)))
    config = write_config(tmp_path / "config.yaml", base_model=str(model), processor_type="Qwen3VLProcessor",
                          datasets=[{"path": str(tmp_path / "train.jsonl"), "type": "chat_template"}],
                          max_steps=1, output_dir=str(tmp_path / "out"))
    code, out, err = run_cli(capsys, "check", config, "--json")
    (error,) = json.loads(out)["errors"]
    assert code == 2 and error["key"] == "processor_type" and "cannot load Qwen3VLProcessor" in error["message"]
    code, out, err = run_cli(capsys, "train", config)
    assert code == 2 and "Traceback" not in err and not (tmp_path / "out").exists()
    assert f"processor_type: {' '.join(error['message'].split())}" in " ".join(err.split())
    # Without processor_type, train reads text rows and refuses image rows: check warns with the reason.
    text_config = write_config(tmp_path / "text.yaml", base_model=str(model),
                               datasets=[{"path": str(tmp_path / "train.jsonl"), "type": "chat_template"}],
                               max_steps=1, output_dir=str(tmp_path / "out"))
    code, out, err = run_cli(capsys, "check", text_config, "--json")
    assert code == 0, out
    assert [w for w in json.loads(out)["warnings"] if w.startswith("rows with images or audio will be refused: ")
            and "has no image processor" in w], out
