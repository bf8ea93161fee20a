"""One registry idiom for every extension point: duplicates and unknown names are errors that
name the file to edit; families and patches are discovered from their package."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from archtune.data.formats import FORMATS
from archtune.families import FAMILIES
from archtune.patches import PATCHES
from archtune.plan.experts import EXPERTS, ExpertsImplementation, register_experts_implementation
from archtune.plugins import PLUGINS
from archtune.registry import Registry


def test_duplicates_and_unknown_names_name_the_file():
    reg: Registry[int] = Registry("widget", "src/archtune/widgets.py")
    reg.register("a", 1)
    with pytest.raises(KeyError, match=r"widget 'a' is registered twice.*src/archtune/widgets.py"):
        reg.register("a", 2)
    with pytest.raises(KeyError, match=r"no widget 'b'; known: a \(add one in src/archtune/widgets.py\)"):
        reg["b"]
    assert reg["a"] == 1 and "a" in reg and reg.names() == ["a"]


def test_discovery_runs_once_on_first_use():
    calls = []
    reg: Registry[int] = Registry("widget", "here", discover=lambda: calls.append(reg.register("x", 1)))
    assert calls == []
    assert reg["x"] == 1 and reg.names() == ["x"] and calls == [1]


def test_every_extension_point_is_a_registry():
    for registry in (FAMILIES, FORMATS, PLUGINS, PATCHES, EXPERTS):
        assert isinstance(registry, Registry)
    assert {"alpaca", "chat_template", "completion"} <= set(FORMATS)
    with pytest.raises(KeyError, match="src/archtune/data/formats.py"):
        FORMATS["sharegpt"]


def _modules(package: str) -> set[str]:
    import archtune

    folder = Path(archtune.__file__).parent / package
    return {p.stem for p in folder.glob("*.py") if not p.stem.startswith("_")}


def test_every_module_of_a_discovered_package_registers():
    """Adding a family (or a patch) is adding its file: nothing lists the modules."""
    from archtune.families import _NOT_FAMILIES

    assert set(FAMILIES.names()) == _modules("families") - set(_NOT_FAMILIES)  # families/<name>.py registers <name>
    assert {p.apply.__module__.rsplit(".", 1)[-1] for p in PATCHES.values()} == _modules("patches")


def test_experts_implementations_are_one_registry_with_transformers_names_discovered():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    import archtune.moe

    assert EXPERTS.names()[:4] == ["eager", "grouped_mm", "batched_mm", "scattermoe"]
    assert set(ALL_EXPERTS_FUNCTIONS.keys()) - {"archtune_meta_balanced"} <= set(EXPERTS)  # deepgemm, sonicmoe, ...
    with pytest.raises(KeyError, match=r"experts implementation 'grouped_mm' is registered twice.*plan/experts.py"):
        register_experts_implementation(ExpertsImplementation("grouped_mm", "again"))
    with pytest.raises(KeyError, match=r"no experts implementation 'grouped'.*add one in src/archtune/plan/experts.py"):
        EXPERTS["grouped"]
    # archtune's own forward is where its entry says, and it is what transformers runs under that name
    module, _, attr = EXPERTS["scattermoe"].forward.partition(":")
    assert ALL_EXPERTS_FUNCTIONS["scattermoe"] is getattr(importlib.import_module(module), attr)
    assert archtune.moe.EXPERTS_IMPLEMENTATION == "scattermoe"
