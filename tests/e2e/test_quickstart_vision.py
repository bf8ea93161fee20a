"""The vision quickstart: examples/quickstart-vision.yaml, run as shipped (outputs redirected to tmp)."""
from __future__ import annotations

import json

from tests.e2e.conftest import REPO, heldout_accuracy, run_cli, train_as_shipped

CONFIG = REPO / "examples" / "quickstart-vision.yaml"
VISION = REPO / "examples" / "data" / "vision"


def test_vision_quickstart_answers_held_out_images(tmp_path, capsys, monkeypatch):
    summary, redirect = train_as_shipped(capsys, CONFIG, tmp_path, monkeypatch)
    assert summary["family"] == "gemma3" and summary["data"]["image_rows"]["eval"] == 100

    # Held-out accuracy: the greedy answer to each of the 100 test questions (images not in train).
    accuracy = heldout_accuracy(CONFIG, redirect)
    assert accuracy >= 0.9, accuracy

    # generate --image on a held-out image answers like the test row says
    row = json.loads((VISION / "test.jsonl").read_text().splitlines()[0])
    image = next(p["path"] for p in row["messages"][0]["content"] if p["type"] == "image")
    question = next(p["text"] for p in row["messages"][0]["content"] if p["type"] == "text")
    code, out, err = run_cli(capsys, "generate", CONFIG, *redirect, "--image", str(VISION / image),
                             "--prompt", question, "--max-new-tokens", "4")
    assert code == 0, err
    assert out.split("output:")[1].split()[0] == row["messages"][1]["content"][0]["text"]
