"""DDP with image (audio) rows: a step where one rank's batch is text-only and the other's holds
images (audio).

The projector (the audio embedder) trains (lora_modules_to_save); a text-only batch gives it no
gradient on that rank.
The family's `ddp_find_unused_parameters: true` keeps DDP going; without it this run hangs (the
ranks wait on different gradient buckets: observed, the 300 s run limit ran out), which is why
that control is not run here (the text-only control in test_distributed.py fails fast). 16 rows, half text-only, one row per rank per step over 8 steps:
a step with a text-only batch on one rank and an image batch on the other occurs unless the
shuffled order pairs every row with one of its own kind (probability below 1e-3; the order is
fixed by the seed).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dist.conftest import BASE, max_rel_diff

REPO = Path(__file__).resolve().parents[2]
VISION = REPO / "examples" / "data" / "vision"
AUDIO = REPO / "examples" / "data" / "audio"


def _data(root: Path, source: Path = VISION, kind: str = "image", key: str = "path") -> dict:
    """16 rows of a bundled test split, every other one text-only (its media part removed)."""
    rows = []
    lines = iter((source / "test.jsonl").read_text().splitlines())
    for i in range(16):
        row = json.loads(next(lines))
        if i % 2:  # text-only: the same question and answer, no media
            row["messages"][0]["content"] = [p for p in row["messages"][0]["content"] if p["type"] == "text"]
        else:
            for part in row["messages"][0]["content"]:
                if part["type"] == kind:
                    part[key] = str(source / part[key])
        rows.append(row)
    root.mkdir(parents=True, exist_ok=True)
    (root / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"datasets": [{"path": str(root / "mixed.jsonl"), "type": "chat_template"}], "test_datasets": None}


LORA = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "micro_batch_size": 1, "max_steps": 8,
        "dataset_prepared_path": None}
# media kind -> (tiny model, trained projector, data source, content-part key, summary row count)
CASES = {
    "image": ("gemma3", "multi_modal_projector", VISION, "path", "image_rows"),
    "audio": ("gemma4-e2b", "embed_audio", AUDIO, "audio", "audio_rows"),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_ddp_text_only_batch_on_one_rank_and_media_on_the_other(train_run, tmp_path_factory, kind):
    from archtune.models.tiny import build_tiny_model

    tiny, projector, source, key, rows = CASES[kind]
    data = _data(tmp_path_factory.mktemp(f"mixed_{kind}"), source, kind, key)
    run = train_run(f"ddp_{kind}", base_model=f"tiny:{tiny}", lora_modules_to_save=[projector], **LORA, **data)
    assert run.rc == 0, run.stderr[-4000:]
    s = run.summary
    assert s["world_size"] == 2 and s["steps"] == 8 and s["ddp_find_unused_parameters"] is True
    assert s["data"][rows]["train"] == 8
    rank0, rank1 = run.rank_states()
    assert max_rel_diff(rank0, rank1) == 0.0
    # The projector trained (Gemma 3's starts at zero): every tensor moved from the base model's.
    base = build_tiny_model(tiny, seed=BASE["seed"])[0].state_dict()
    trained = {k.removeprefix("base_model.model."): v for k, v in run.weights().items() if f".{projector}." in k}
    assert trained and all(not torch.equal(v, base[k]) for k, v in trained.items())
