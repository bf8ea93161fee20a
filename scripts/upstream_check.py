"""Do archtune's patches still hold on the installed releases? Runs each patch's exactness tests,
the packing and family tests, and prints one table per library and one per patch.

scripts/upstream_check.sh runs this in a throwaway venv holding the newest releases; run alone,
it checks the current environment. Exit status 0 when every exactness test passed.
"""
from __future__ import annotations

import argparse
import importlib.metadata as metadata
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from archtune.diagnostics.environment import drifted_patches  # noqa: E402
from archtune.patches import PATCHES  # noqa: E402
from tests.unit.test_patches import EXACTNESS_TESTS  # noqa: E402

LIBRARIES = ("transformers", "peft", "trl", "accelerate", "datasets")
# Beyond the patches' own tests: packing and every tiny family through the real libraries.
FAMILY_TESTS = ("tests/unit/test_patches.py", "tests/unit/test_packing.py", "tests/unit/test_tiny_models.py")


def locked_versions(lock: Path) -> dict[str, str]:
    pins = {}
    for line in lock.read_text().splitlines():
        name, sep, version = line.split("#", 1)[0].strip().partition("==")
        if sep:
            pins[name.strip().lower()] = version.strip()
    return pins


def installed(library: str) -> str:
    try:
        return metadata.version(library)
    except metadata.PackageNotFoundError:
        return "-"


def selected_tests() -> list[str]:
    """pytest arguments: each exactness entry, the family tests; a file named whole covers its tests."""
    entries = [*FAMILY_TESTS, *(node for nodes in EXACTNESS_TESTS.values() for node in nodes)]
    whole_files = {e for e in entries if "::" not in e}
    return sorted({e for e in entries if e in whole_files or e.partition("::")[0] not in whole_files})


def run_tests(args: list[str], junit: Path) -> None:
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadfile",
                    f"--junitxml={junit}", *args], cwd=REPO, check=False)


def outcomes(junit: Path) -> dict[str, bool]:
    """pytest node id -> passed (skipped counts as not run: absent)."""
    found = {}
    for case in ET.parse(junit).iter("testcase"):
        if case.find("skipped") is not None:
            continue
        module, name = case.get("classname", ""), case.get("name", "")
        parts = module.split(".")
        # a test in a class: classname is module.Class
        path = "/".join(parts) + ".py"
        if not (REPO / path).exists() and len(parts) > 1:
            path, name = "/".join(parts[:-1]) + ".py", f"{parts[-1]}::{name}"
        failed = case.find("failure") is not None or case.find("error") is not None
        found[f"{path}::{name}"] = not failed
    return found


def matches(node_id: str, entry: str) -> bool:
    """A node id is under an EXACTNESS_TESTS entry: the entry itself, its parameters, or its file."""
    return node_id == entry or node_id.startswith(entry + "[") or node_id.startswith(entry + "::")


def exactness(results: dict[str, bool]) -> dict[str, tuple[int, int]]:
    """patch -> (tests passed, tests run) over its exactness entries."""
    held = {}
    for name, entries in EXACTNESS_TESTS.items():
        ran = [ok for node, ok in results.items() if any(matches(node, e) for e in entries)]
        held[name] = (sum(ran), len(ran))
    return held


def patch_libraries(name: str) -> set[str]:
    return {path.split(".", 1)[0] for path in PATCHES[name].relies_on}


def tables(lock: dict[str, str], results: dict[str, bool], drifted: list[tuple[str, str]]) -> str:
    held = exactness(results)
    changed: dict[str, set[str]] = {}
    for name, path in drifted:
        changed.setdefault(path.split(".", 1)[0], set()).add(name)

    def verdict(names) -> str:
        names = sorted(names)
        if not names:
            return "no patch relies on it"
        bad = [n for n in names if held[n][0] != held[n][1] or held[n][1] == 0]
        return "held" if not bad else "NOT held: " + ", ".join(bad)

    rows = ["| library | locked | newest | patches whose upstream changed | exactness |", "|---|---|---|---|---|"]
    for lib in LIBRARIES:
        relying = [n for n in PATCHES.names() if lib in patch_libraries(n)]
        rows.append(f"| {lib} | {lock.get(lib, '-')} | {installed(lib)} | "
                    f"{', '.join(sorted(changed.get(lib, ()))) or 'none'} | {verdict(relying)} |")
    rows += ["", "| patch | relies on | upstream changed | exactness tests passed |", "|---|---|---|---|"]
    drifted_names = {n for n, _ in drifted}
    for name in PATCHES.names():
        passed, ran = held[name]
        rows.append(f"| {name} | {', '.join(sorted(patch_libraries(name)))} | "
                    f"{'yes' if name in drifted_names else 'no'} | {passed}/{ran} |")
    failed = sorted(node for node, ok in results.items() if not ok)
    rows += ["", f"{len(results)} tests ran, {len(failed)} failed" + (":" if failed else "")]
    rows += [f"  {node}" for node in failed]
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lock", type=Path, default=REPO / "requirements.lock")
    parser.add_argument("--output", type=Path, help="also write the tables (Markdown) here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        run_tests(selected_tests(), junit)
        results = outcomes(junit) if junit.exists() else {}
    report = tables(locked_versions(args.lock), results, drifted_patches())
    print("\n" + report)
    if args.output:
        args.output.write_text(report + "\n")
    held = exactness(results)
    return 0 if results and all(p == r and r > 0 for p, r in held.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
