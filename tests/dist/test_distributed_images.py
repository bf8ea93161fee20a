"""DDP with image rows: a step where one rank's batch is text-only and the other's holds images.

The projector trains (lora_modules_to_save); a text-only batch gives it no gradient on that rank.
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

from tests.dist.conftest import max_rel_diff

REPO = Path(__file__).resolve().parents[2]
VISION = REPO / "examples" / "data" / "vision"


def _data(root: Path) -> dict:
    rows = []
    lines = iter((VISION / "test.jsonl").read_text().splitlines())
    for i in range(16):
        row = json.loads(next(lines))
        if i % 2:  # text-only: the same question and answer, no image
            row["messages"][0]["content"] = [p for p in row["messages"][0]["content"] if p["type"] == "text"]
        else:
            for part in row["messages"][0]["content"]:
                if part["type"] == "image":
                    part["path"] = str(VISION / part["path"])
        rows.append(row)
    root.mkdir(parents=True, exist_ok=True)
    (root / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"datasets": [{"path": str(root / "mixed.jsonl"), "type": "chat_template"}], "test_datasets": None}


IMAGES = {"base_model": "tiny:gemma3", "adapter": "lora", "lora_r": 4, "lora_alpha": 8,
          "lora_modules_to_save": ["multi_modal_projector"], "micro_batch_size": 1, "max_steps": 8,
          "dataset_prepared_path": None}


def test_ddp_text_only_batch_on_one_rank_and_images_on_the_other(train_run, tmp_path_factory):
    data = _data(tmp_path_factory.mktemp("mixed"))
    run = train_run("ddp_images", **IMAGES, **data)
    assert run.rc == 0, run.stderr[-4000:]
    s = run.summary
    assert s["world_size"] == 2 and s["steps"] == 8 and s["ddp_find_unused_parameters"] is True
    assert s["data"]["image_rows"]["train"] == 8
    rank0, rank1 = run.rank_states()
    assert max_rel_diff(rank0, rank1) == 0.0
    projector = [k for k in run.weights() if "multi_modal_projector" in k and k.endswith("mm_input_projection_weight")]
    assert projector and float(run.weights()[projector[0]].abs().sum()) > 0  # trained away from its zero init
