"""`check` names a library outside its verified range and a patch whose upstream code changed."""
from __future__ import annotations

import importlib.metadata as metadata

import transformers.masking_utils as masking_utils

from archtune.diagnostics import environment
from archtune.patches import PATCHES


def test_the_locked_stack_gives_no_warning():
    # The suite runs on requirements.lock's stack: every range admits it, every patch matches it.
    assert environment.versions_outside_range() == []
    assert environment.drifted_patches() == []
    assert environment.environment_warnings() == []


def test_a_library_outside_its_declared_range_is_named(monkeypatch):
    installed = metadata.version("transformers")
    declared = metadata.requires("archtune")
    monkeypatch.setattr(environment.metadata, "requires",
                        lambda dist: [*declared, "transformers<5.0", "no-such-library>=1"])
    assert environment.versions_outside_range() == [("transformers", installed, "<5.0")]
    (warning,) = environment.environment_warnings()
    assert f"transformers {installed} is installed" in warning and "transformers<5.0" in warning


def test_every_patch_names_versions_that_are_installed_ones():
    # The shortcut in drifted_patches (same versions, same code) needs parseable `upstream` strings.
    for name, patch in PATCHES.items():
        versions = environment.upstream_versions(patch)
        assert versions and all(metadata.version(lib) == v for lib, v in versions.items()), (name, patch.upstream)


def test_a_patch_whose_upstream_code_changed_is_named(monkeypatch):
    def find_packed_sequence_indices(position_ids):  # a stand-in with different code
        return position_ids

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", find_packed_sequence_indices)
    # Same versions: the released code is taken as verified, nothing is fingerprinted.
    assert environment.drifted_patches() == []
    real_version = environment.metadata.version
    monkeypatch.setattr(environment.metadata, "version",
                        lambda lib: "5.99.0" if lib == "transformers" else real_version(lib))
    drifted = environment.drifted_patches()
    assert ("gated_deltanet_packing", "transformers.masking_utils.find_packed_sequence_indices") in drifted
    assert ("sdpa_packed", "transformers.masking_utils.find_packed_sequence_indices") in drifted
    assert all(name != "expert_lora_factors" for name, _ in drifted)  # a peft-only patch: peft is as verified
    warnings = environment.environment_warnings()
    assert any("patch 'sdpa_packed' was verified against transformers 5.25.0" in w for w in warnings)


def test_check_json_and_train_carry_the_warning(monkeypatch, capsys, tmp_path):
    import json

    from tests.e2e.conftest import run_cli

    declared = metadata.requires("archtune")
    monkeypatch.setattr(environment.metadata, "requires", lambda dist: [*declared, "transformers<5.0"])
    code, out, err = run_cli(capsys, "check", "examples/quickstart.yaml", "--json")
    assert code == 0, err
    assert any("verified with transformers<5.0" in w for w in json.loads(out)["warnings"])
    # train says it before it starts (a refused plan stops it right after, nothing is loaded).
    code, out, err = run_cli(capsys, "train", "examples/quickstart.yaml", "adapter=nonsense",
                             f"output_dir={tmp_path / 'out'}")
    assert code == 2 and "verified with transformers<5.0" in err
