"""The audio quickstart: examples/quickstart-audio.yaml, run as shipped (outputs redirected to tmp)."""
from __future__ import annotations

from tests.e2e.conftest import REPO, heldout_accuracy, train_as_shipped

CONFIG = REPO / "examples" / "quickstart-audio.yaml"


def test_audio_quickstart_tells_held_out_tones_apart(tmp_path, capsys, monkeypatch):
    summary, redirect = train_as_shipped(capsys, CONFIG, tmp_path, monkeypatch)
    assert summary["family"] == "gemma4" and summary["data"]["audio_rows"] == {"train": 360, "eval": 100}
    assert summary["eval_loss_final"] < 0.5 < summary["eval_loss_initial"]
    # Held-out accuracy: the greedy answer to each of the 100 test clips (none of them in train).
    accuracy = heldout_accuracy(CONFIG, redirect)
    assert accuracy >= 0.9, accuracy
