"""Every patch names the upstream version it targets and the upstream code it relies on; this
test recomputes the fingerprint of that code, so it fails as soon as upstream changes under a
patch (a new transformers or PEFT release): re-verify the patch (its own tests say whether it
still holds), then update `relies_on` in the patch's file."""
from __future__ import annotations

import pytest

from archtune.patches import PATCHES, Patch, register_patch, upstream_fingerprint


def test_every_patch_module_registers_a_patch_with_its_upstream():
    assert set(PATCHES.names()) == {"gated_deltanet_packing", "sdpa_packed", "expert_lora_factors",
                                    "lora_target_redirect", "text_only_inputs", "peft_module_targets",
                                    "fsdp_deferred_reduction"}
    for name, patch in PATCHES.items():
        assert patch.upstream and patch.relies_on and callable(patch.apply), name


@pytest.mark.parametrize("name, path", sorted((n, p) for n, patch in PATCHES.items() for p in patch.relies_on))
def test_upstream_code_under_each_patch_is_unchanged(name, path):
    patch = PATCHES[name]
    found = upstream_fingerprint(path)
    assert found == patch.relies_on[path], (
        f"{path} changed since patch {name!r} was written against {patch.upstream} (fingerprint "
        f"{patch.relies_on[path]} -> {found}): re-verify the patch, then update relies_on in src/archtune/patches/")


def test_a_patch_without_its_upstream_is_refused():
    with pytest.raises(ValueError, match="upstream"):
        register_patch(Patch("a_patch_without_upstream", "doc", lambda: None))
    with pytest.raises(KeyError, match="registered twice"):
        register_patch(Patch("sdpa_packed", "doc", lambda: None, "transformers 5.24.0", {"x": "y"}))


def test_a_changed_upstream_function_changes_its_fingerprint(monkeypatch):
    # The control: the fingerprint is of the source, so an edited upstream function fails the test above.
    import transformers.masking_utils as mu

    path = "transformers.masking_utils.find_packed_sequence_indices"
    before = upstream_fingerprint(path)

    def find_packed_sequence_indices(position_ids):  # a stand-in with different code
        return position_ids

    monkeypatch.setattr(mu, "find_packed_sequence_indices", find_packed_sequence_indices)
    assert upstream_fingerprint(path) != before
