"""Every patch names the upstream version it targets and the upstream code it relies on; this
test recomputes the fingerprint of that code, so it fails as soon as upstream changes under a
patch (a new transformers or PEFT release): re-verify the patch (its own tests say whether it
still holds), then update `relies_on` in the patch's file."""
from __future__ import annotations

import pytest

from pathlib import Path

from archtune.patches import PATCHES, Patch, register_patch, upstream_fingerprint

# Each patch's exactness tests: what proves it still computes the right thing (a fingerprint only
# says upstream changed). scripts/upstream_check.sh runs them on the newest releases and reports
# per patch. Entries are pytest node ids, or their prefixes (a file, a test and its parameters).
EXACTNESS_TESTS: dict[str, tuple[str, ...]] = {
    "gated_deltanet_packing": ("tests/unit/test_packing_exact.py::test_eval_loss_packed_equals_unpacked",
                               "tests/unit/test_packing_exact.py::test_step_gradient_packed_equals_unpacked",
                               "tests/unit/test_packing_exact.py::test_qwen3_5_packing_leaks_without_the_deltanet_patch",
                               "tests/unit/test_packing_exact.py::test_a_trainer_step_on_packed_rows_is_the_unpacked_step",
                               "tests/unit/test_packing_exact.py::"
                               "test_qwen3_next_packing_is_exact_with_the_deltanet_patch_for_its_fused_projections"),
    "sdpa_packed": ("tests/unit/test_packing_exact.py::test_packed_rows_run_attention_per_document_and_plain_sdpa_agrees",
                    "tests/unit/test_packing_exact.py::test_eval_loss_packed_equals_unpacked"),
    "expert_lora_factors": ("tests/unit/test_scattermoe.py::test_skip_parametrization_check_keeps_results",
                            "tests/unit/test_scattermoe.py::test_tiny_model_logits_and_every_gradient_match_eager",
                            "tests/unit/test_scattermoe.py::test_merged_expert_lora_matches_unmerged"),
    "lora_target_redirect": ("tests/unit/test_adapters.py::test_peft_alone_rejects_gemma4_clippable_linear",
                             "tests/unit/test_adapters.py::test_lora_into_the_vision_tower_lands_on_the_inner_linear_and_trains"),
    "text_only_inputs": ("tests/e2e/test_trainer_multimodal.py::test_text_only_extras_per_model",
                         "tests/e2e/test_trainer_multimodal.py::test_ddp_gemma4_moe_lora_same_loss_as_unwrapped"),
    "peft_module_targets": ("tests/unit/test_peft_targets.py",),
    "fsdp_deferred_reduction": ("tests/dist/test_distributed.py::test_fsdp2_with_gradient_accumulation_equals_ddp",),
    "meta_fused_attention": ("tests/unit/test_memory_estimate.py::test_the_meta_attention_patch_is_sdpa",
                             "tests/unit/test_memory_estimate.py::test_meta_activations_match_what_autograd_saves_on_cpu"),
    "meta_balanced_experts": (
        "tests/unit/test_memory_estimate.py::test_the_balanced_experts_patch_is_the_experts_forward_when_experts_are_equal",
        "tests/unit/test_memory_estimate.py::test_meta_activations_match_what_autograd_saves_on_cpu"),
}
REPO = Path(__file__).resolve().parents[2]


def test_every_patch_module_registers_a_patch_with_its_upstream():
    assert set(PATCHES.names()) == {"gated_deltanet_packing", "sdpa_packed", "expert_lora_factors",
                                    "lora_target_redirect", "text_only_inputs", "peft_module_targets",
                                    "fsdp_deferred_reduction", "meta_fused_attention", "meta_balanced_experts"}
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


def test_every_patch_names_exactness_tests_that_exist():
    assert set(EXACTNESS_TESTS) == set(PATCHES.names())
    for name, node_ids in EXACTNESS_TESTS.items():
        for node_id in node_ids:
            path, _, test = node_id.partition("::")
            source = (REPO / path).read_text()
            assert not test or f"def {test}(" in source, (name, node_id)
