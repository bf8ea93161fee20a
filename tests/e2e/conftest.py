"""Helpers for end-to-end tests: run the real CLI in-process, write small configs and data."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
QUICKSTART_DATA = REPO / "examples" / "data" / "quickstart"
VISION_DATA = REPO / "examples" / "data" / "vision"


def pytest_collection_modifyitems(config, items):
    """Every test under tests/e2e carries the `e2e` marker (`-m "not e2e and not dist"`: the unit tests alone)."""
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.e2e)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `archtune ARGS` in this process; returns (exit code, stdout, stderr)."""
    import sys

    from archtune.cli import main

    argv, sys.argv = sys.argv, ["archtune", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return code, out, err


def write_config(path: Path, **keys) -> Path:
    path.write_text(yaml.safe_dump(keys, sort_keys=False))
    return path


def head_jsonl(src: Path, dst: Path, n: int) -> Path:
    with open(src) as f:
        dst.write_text("".join(itertools.islice(f, n)))
    return dst


@pytest.fixture
def small_data(tmp_path) -> dict:
    """A 256-row slice of the bundled alpaca training data plus 32 held-out rows."""
    train = head_jsonl(QUICKSTART_DATA / "train.jsonl", tmp_path / "train.jsonl", 256)
    test = head_jsonl(QUICKSTART_DATA / "test.jsonl", tmp_path / "test.jsonl", 32)
    return {"datasets": [{"path": str(train), "type": "alpaca"}],
            "test_datasets": [{"path": str(test), "type": "alpaca"}],
            "dataset_prepared_path": str(tmp_path / "prepared")}


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def evaluate_and_probe(capsys, config: Path) -> dict:
    """`evaluate --json` (its result) after `check --probe --json` passed without errors."""
    code, out, err = run_cli(capsys, "check", config, "--probe", "--json")
    assert code == 0, err
    assert json.loads(out)["errors"] == []
    code, out, err = run_cli(capsys, "evaluate", config, "--json")
    assert code == 0, err
    return json.loads(out)


def preprocess_refused(capsys, config: Path, tmp_path: Path, *overrides: str) -> str:
    """stderr of a `preprocess` (into a fresh cache under tmp_path) that must exit 2."""
    code, _, err = run_cli(capsys, "preprocess", config, *overrides, f"dataset_prepared_path={tmp_path / 'p'}")
    assert code == 2, err
    return err


def vision_rows(name: str, n: int) -> list[dict]:
    """The first n rows of a bundled vision split (train.jsonl, test.jsonl), image paths made absolute."""
    out = []
    for line in (VISION_DATA / name).read_text().splitlines()[:n]:
        row = json.loads(line)
        for msg in row["messages"]:
            for part in msg["content"]:
                if part.get("type") == "image":
                    part["path"] = str(VISION_DATA / part["path"])
        out.append(row)
    return out


def train_as_shipped(capsys, config: Path, tmp_path: Path, monkeypatch) -> tuple[dict, list[str]]:
    """`archtune train CONFIG` run from the repository root (the shipped configs' data paths are
    relative to it), outputs redirected under tmp_path: (train_summary.json, the overrides)."""
    monkeypatch.chdir(REPO)
    redirect = [f"output_dir={tmp_path / 'out'}", f"dataset_prepared_path={tmp_path / 'prepared'}"]
    code, out, err = run_cli(capsys, "train", config, *redirect)
    assert code == 0, err
    return read_json(tmp_path / "out" / "train_summary.json"), redirect


def heldout_accuracy(config: Path, overrides: list[str]) -> float:
    """Greedy exact-match accuracy of the trained adapter on the config's evaluation rows."""
    from archtune.train.assembly import assemble_model
    from archtune.config import load_config
    from archtune.data import prepare_data
    from archtune.train.evaluation import greedy_exact_match
    from archtune.train.recipe import data_collator, plan_for

    cfg = load_config(config, overrides)
    setup = plan_for(cfg)
    data = prepare_data(setup.plan, setup.tokenizer, progress=False, media=setup.media)
    built = assemble_model(setup.plan, setup.tokenizer, "evaluate")
    model = built.model
    assert built.weights == "adapter"
    return greedy_exact_match(model, data.eval, data_collator(setup), 50)["exact_match"]
