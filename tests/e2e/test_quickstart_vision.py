"""The vision quickstart: examples/quickstart-vision.yaml, run as shipped (outputs redirected to tmp)."""
from __future__ import annotations

import json

from tests.e2e.conftest import REPO, read_json, run_cli

CONFIG = REPO / "examples" / "quickstart-vision.yaml"
VISION = REPO / "examples" / "data" / "vision"


def test_vision_quickstart_answers_held_out_images(tmp_path, capsys, monkeypatch):
    from archtune.config import load_config
    from archtune.data import prepare_data
    from archtune.models.load import load_trained
    from archtune.train.evaluation import greedy_exact_match
    from archtune.train.recipe import data_collator, plan_for

    monkeypatch.chdir(REPO)  # the config's data paths are relative to the repository root
    redirect = [f"output_dir={tmp_path / 'out'}", f"dataset_prepared_path={tmp_path / 'prepared'}"]
    code, out, err = run_cli(capsys, "train", CONFIG, *redirect)
    assert code == 0, err
    summary = read_json(tmp_path / "out" / "train_summary.json")
    assert summary["family"] == "gemma3" and summary["data"]["image_rows"]["eval"] == 100

    # Held-out accuracy: the greedy answer to each of the 100 test questions (images not in train).
    cfg = load_config(CONFIG, redirect)
    setup = plan_for(cfg)
    data = prepare_data(setup.plan, setup.tokenizer, progress=False, media=setup.media)
    model, kind = load_trained(cfg, setup.plan, setup.tokenizer)
    assert kind == "adapter"
    accuracy = greedy_exact_match(model, data.eval, data_collator(setup), 50)["exact_match"]
    assert accuracy >= 0.9, accuracy

    # generate --image on a held-out image answers like the test row says
    row = json.loads((VISION / "test.jsonl").read_text().splitlines()[0])
    image = next(p["path"] for p in row["messages"][0]["content"] if p["type"] == "image")
    question = next(p["text"] for p in row["messages"][0]["content"] if p["type"] == "text")
    code, out, err = run_cli(capsys, "generate", CONFIG, *redirect, "--image", str(VISION / image),
                             "--prompt", question, "--max-new-tokens", "4")
    assert code == 0, err
    assert out.split("output:")[1].split()[0] == row["messages"][1]["content"][0]["text"]
