"""Is this environment the one archtune was verified on? Two questions `check` and `train` ask.

- Versions: every library archtune requires is declared with the range it was verified in
  (pyproject.toml's ranges, read back from the installed package's metadata); an installed
  version outside its range is named.
- Patches: each patch fingerprints the upstream code it relies on (`Patch.relies_on`); a patch
  whose upstream code differs from what was verified is named, since it may no longer apply.

Neither stops a run: a newer release often works, but then nothing proves it does.
"""
from __future__ import annotations

import importlib.metadata as metadata

from archtune.patches import PATCHES, upstream_fingerprint

DISTRIBUTION = "archtune"


def versions_outside_range() -> list[tuple[str, str, str]]:
    """(library, installed version, verified range) for each installed requirement of archtune
    (extras' too, where installed) whose version its declared range does not admit."""
    from packaging.requirements import Requirement

    try:
        declared = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return []
    found = []
    for line in declared:
        req = Requirement(line)
        if not req.specifier:
            continue
        installed = _installed(req.name)
        if installed is None:
            continue  # a missing extra: the command that needs it says so
        if not req.specifier.contains(installed, prereleases=True):
            found.append((req.name, installed, str(req.specifier)))
    return sorted(set(found))


def upstream_versions(patch) -> dict[str, str]:
    """The library versions a patch was verified against: "transformers 5.25.0, peft 0.21.2" ->
    {"transformers": "5.25.0", "peft": "0.21.2"}."""
    pairs = (part.split() for part in patch.upstream.split(","))
    return {pair[0]: pair[1] for pair in pairs if len(pair) == 2}


def _installed(library: str) -> str | None:
    try:
        return metadata.version(library)
    except metadata.PackageNotFoundError:
        return None


def drifted_patches(names: list[str] | None = None) -> list[tuple[str, str]]:
    """(patch name, upstream path) for each upstream function or class a patch relies on whose
    code is not the code the patch was verified against (or is gone). `names`: only these patches.

    The fingerprints are computed only for patches verified against other versions than the
    installed ones (a released version's code does not change): on the verified stack this
    imports nothing.
    """
    found = []
    for name, patch in PATCHES.items():
        if names is not None and name not in names:
            continue
        if all(_installed(lib) == version for lib, version in upstream_versions(patch).items()):
            continue
        for path, expected in patch.relies_on.items():
            try:
                same = upstream_fingerprint(path) == expected
            except (ImportError, AttributeError, OSError, TypeError):
                same = False
            if not same:
                found.append((name, path))
    return found


def environment_warnings() -> list[str]:
    """One sentence per library outside its verified range and per patch whose upstream changed."""
    warnings = [f"{lib} {installed} is installed; archtune was verified with {lib}{spec}: results are not proven "
                f"on this version (install the verified stack: pip install -e . -c requirements.lock from a "
                f"checkout, or pip install \"{lib}{spec}\")"
                for lib, installed, spec in versions_outside_range()]
    by_patch: dict[str, list[str]] = {}
    for name, path in drifted_patches():
        by_patch.setdefault(name, []).append(path)
    for name, paths in by_patch.items():
        patch = PATCHES[name]
        warnings.append(f"patch {name!r} was verified against {patch.upstream}, and the installed code it relies on "
                        f"differs ({', '.join(paths)}): it may no longer apply as intended")
    return warnings


__all__ = ["versions_outside_range", "upstream_versions", "drifted_patches", "environment_warnings"]
