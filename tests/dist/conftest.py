"""Multi-process runs: `archtune train CONFIG --nproc 2` (torchrun, gloo on CPU) as subprocesses.

Runs are cached per session (several tests read the same run), and every run gets its own
output directory. Tiny models, 64 training rows, 4 optimizer steps: a 2-process run takes
~15 s on a 2-core machine.

SGD is used where runs are compared number for number: Adam's first steps divide each gradient
by its own magnitude, which turns float rounding on near-zero gradients (batching 2x2 instead
of 4, a different reduction order) into full-size updates; SGD keeps the comparison about
the distributed arithmetic.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.dist import hooks

REPO = Path(__file__).resolve().parents[2]
QUICKSTART_DATA = REPO / "examples" / "data" / "quickstart"


def _gloo_available() -> bool:
    try:
        import torch.distributed as dist

        return dist.is_available() and dist.is_gloo_available()
    except Exception:  # pragma: no cover
        return False


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    skip = None if _gloo_available() else pytest.mark.skip(reason="torch.distributed with gloo is not available")
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.dist)
            if skip is not None:
                item.add_marker(skip)


BASE = {
    "base_model": "tiny:gemma4-moe",
    "sequence_len": 64,
    "micro_batch_size": 2,
    "max_steps": 4,
    "optimizer": "sgd",
    "learning_rate": 0.1,
    "logging_steps": 1,
    "seed": 7,
}


class Run:
    def __init__(self, out: Path, rc: int, stdout: str, stderr: str, dump: Path):
        self.out, self.rc, self.stdout, self.stderr, self.dump = out, rc, stdout, stderr, dump

    @property
    def summary(self) -> dict:
        return json.loads((self.out / "train_summary.json").read_text())

    def weights(self) -> dict:
        from safetensors.torch import load_file

        for name in ("adapter_model.safetensors", "model.safetensors"):
            if (self.out / name).is_file():
                return load_file(str(self.out / name))
        raise AssertionError(f"no final weights in {self.out}: {sorted(p.name for p in self.out.iterdir())}")

    def rank_states(self) -> list[dict]:
        from safetensors.torch import load_file

        return [load_file(str(p)) for p in sorted(self.dump.glob("rank*.safetensors"))]


class Runner:
    """Train once per distinct (nproc, keys, env); the result is shared by the tests that ask."""

    def __init__(self, root: Path):
        self.root = root
        self.cache: dict[str, Run] = {}
        data = root / "data"
        data.mkdir(parents=True, exist_ok=True)
        for name, n in (("train", 64), ("test", 16)):
            with open(QUICKSTART_DATA / f"{name}.jsonl") as f:
                (data / f"{name}.jsonl").write_text("".join(itertools.islice(f, n)))
        self.data = {"datasets": [{"path": str(data / "train.jsonl"), "type": "alpaca"}],
                     "test_datasets": [{"path": str(data / "test.jsonl"), "type": "alpaca"}],
                     "dataset_prepared_path": str(root / "prepared")}

    def __call__(self, name: str, nproc: int = 2, env: dict | None = None, output_dir: Path | None = None,
                 args: tuple[str, ...] = (), **keys) -> Run:
        """`args`: more `archtune train` options (e.g. --max-restarts 1)."""
        key = json.dumps([name, nproc, keys, env, str(output_dir), list(args)], sort_keys=True, default=str)
        if key in self.cache:
            return self.cache[key]
        out = output_dir or self.root / name
        dump = self.root / f"{name}-ranks"
        # The test hooks (tests/dist/hooks.py) ride along as an external plugin: product code has none.
        cfg = {**BASE, **self.data, "plugins": [hooks.PLUGIN], "allow_external_plugins": True, **keys,
               "output_dir": str(out)}
        cfg = {k: v for k, v in cfg.items() if v is not None}
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        run_env = {**os.environ, hooks.DUMP_RANK_STATE_ENV: str(dump), "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": pythonpath, **(env or {})}
        proc = subprocess.run([sys.executable, "-m", "archtune", "train", str(path), "--nproc", str(nproc), *args],
                              capture_output=True, text=True, env=run_env, timeout=300, cwd=self.root)
        run = Run(out, proc.returncode, proc.stdout, proc.stderr, dump)
        self.cache[key] = run
        return run


@pytest.fixture(scope="session")
def train_run(tmp_path_factory) -> Runner:
    return Runner(tmp_path_factory.mktemp("dist"))


def max_rel_diff(a: dict, b: dict) -> float:
    """Largest |a - b| / max|b| over the tensors of two state dicts with the same keys."""
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:5]
    worst = 0.0
    for k in a:
        scale = float(b[k].abs().max()) or 1.0
        worst = max(worst, float((a[k].float() - b[k].float()).abs().max()) / scale)
    return worst
