"""The export check's arithmetic: relative logit difference, greedy agreement where the choice is clear."""
from __future__ import annotations

import torch

from archtune.export.compare import compare_prompt, tolerance


def test_identical_logits_agree_exactly():
    ref = torch.randn(5, 11)
    r = compare_prompt(ref, ref.clone(), tolerance("f32"))
    assert r.max_abs_logit_diff == 0 and r.greedy_agree and r.positions_agree == 5


def test_a_flipped_clear_choice_is_a_disagreement_and_a_near_tie_is_not():
    ref = torch.zeros(2, 4)
    ref[0, 1] = 10.0  # a clear choice
    ref[1, 2], ref[1, 3] = 10.0, 9.9999  # a near-tie at this tolerance
    cand = ref.clone()
    cand[0, 1], cand[0, 0] = 0.0, 10.0
    r = compare_prompt(ref, cand, tolerance("f16"))
    assert not r.greedy_agree and r.disagreements == 1
    cand = ref.clone()
    cand[1, 3] = 10.0001
    r = compare_prompt(ref, cand, tolerance("f16"))
    assert r.greedy_agree and r.near_ties == 1 and r.positions_agree == 1


def test_relative_difference_is_against_the_largest_logit():
    ref = torch.tensor([[4.0, -8.0, 1.0]])
    r = compare_prompt(ref, ref + torch.tensor([[0.0, 0.08, 0.0]]), tolerance("q8_0"))
    assert abs(r.max_rel_logit_diff - 0.01) < 1e-6


def test_tolerances_grow_as_the_type_gets_coarser():
    order = ["f32", "f16", "bf16", "q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q2_K"]
    values = [tolerance(t) for t in order]
    assert values == sorted(values) and len(set(values)) == len(values)
