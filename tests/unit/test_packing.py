"""Sample packing, data side and kernels: bins, packed rows, statistics, the collator, and the
segment-aware Gated DeltaNet kernels against transformers' own, one document at a time."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset

from archtune.data.collate import DataCollator
from archtune.data.packing import (best_fit_decreasing, doc_length_histogram, pack_dataset, packing_stats,
                                   plan_bins)
from archtune.patches.packing import (GATED_DELTANET_PACKING, PackingPatch, PackingUnsupported,
                                                get_packing_patch, packed_sequence_index, prepare_model_for_packing,
                                                register_packing_patch, segmented_causal_conv1d,
                                                segmented_chunk_gated_delta_rule, stateful_layers)


def docs_dataset(lengths, seed: int = 0, prompt: bool = True) -> Dataset:
    """Rows as prepare_data writes them: bos first, label -100 on the bos (and a prompt), ids = labels after."""
    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for n in lengths:
        row = [2] + rng.integers(32, 1000, n - 1).tolist()
        masked = int(rng.integers(1, n)) if prompt and n > 1 else 1
        ids.append(row)
        labels.append([-100] * masked + row[masked:])
    return Dataset.from_dict({"input_ids": ids, "labels": labels, "length": list(lengths)})


MIX = [3, 17, 120, 64, 5, 128, 33, 2, 90, 47, 8, 111, 1, 60, 25, 77, 128, 9, 14, 100]


# ---------------------------------------------------------------- bins

def test_best_fit_decreasing_docstring_example():
    assert best_fit_decreasing(np.array([3, 8, 2, 5, 2]), capacity=10) == [[1, 4], [3, 0, 2]]


def test_best_fit_takes_the_tightest_open_row():
    # 6 opens row 0 (room 4), 5 opens row 1 (room 5); 4 fits both, best fit puts it in row 0.
    assert best_fit_decreasing(np.array([6, 5, 4]), capacity=10) == [[0, 2], [1]]


def test_plan_bins_places_every_document_once_within_capacity():
    rng = np.random.default_rng(1)
    lengths = np.concatenate([rng.integers(1, 60, 2000), rng.integers(300, 1025, 100)])
    rows = plan_bins(lengths, 1024, seed=3)
    flat = np.concatenate(rows)
    assert sorted(flat.tolist()) == list(range(lengths.size))
    assert max(lengths[r].sum() for r in rows) <= 1024
    # Near the lower bound ceil(total / capacity): the tail of short documents fills the gaps.
    assert len(rows) <= int(np.ceil(lengths.sum() / 1024)) + 1


def test_plan_bins_is_deterministic_under_seed():
    lengths = np.random.default_rng(0).integers(1, 500, 300)
    a, b, c = (plan_bins(lengths, 512, seed=s) for s in (7, 7, 8))
    assert [r.tolist() for r in a] == [r.tolist() for r in b]
    assert [r.tolist() for r in a] != [r.tolist() for r in c]


def test_plan_bins_windows_pack_each_window_alone():
    lengths = np.full(100, 30)
    rows = plan_bins(lengths, 100, seed=0, window=10)  # 10 windows of 10 x 30 tokens: 4 rows each
    assert len(rows) == 40 and sorted(np.concatenate(rows).tolist()) == list(range(100))


def test_plan_bins_refuses_documents_longer_than_sequence_len():
    with pytest.raises(ValueError, match="longer than sequence_len=10"):
        plan_bins(np.array([5, 11]), 10)


# ---------------------------------------------------------------- packed rows

def test_pack_dataset_rows_restart_positions_and_mask_each_documents_first_label():
    ds = docs_dataset(MIX)
    packed = pack_dataset(ds, 128, seed=0)
    assert packed.column_names == ["input_ids", "labels", "position_ids", "length", "num_docs"]
    assert sum(packed["num_docs"]) == len(MIX) and sum(packed["length"]) == sum(MIX)
    seen = []
    for row in packed:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) == row["length"] <= 128
        pos = np.asarray(row["position_ids"])
        starts = np.flatnonzero(pos == 0)
        assert starts[0] == 0 and len(starts) == row["num_docs"]
        ends = np.append(starts[1:], len(pos))
        for s, e in zip(starts, ends):
            assert pos[s:e].tolist() == list(range(e - s))
            assert row["labels"][s] == -100  # nothing predicts a document's first token
            seen.append((tuple(row["input_ids"][s:e]), tuple(row["labels"][s + 1:e])))
    # Every document is there exactly once, its labels unchanged after its first token.
    want = sorted((tuple(r["input_ids"]), tuple(r["labels"][1:])) for r in ds)
    assert sorted(seen) == want


def test_pack_dataset_masks_a_first_label_the_data_left_on():
    ds = Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9]], "labels": [[5, 6, 7], [8, 9]]})
    packed = pack_dataset(ds, 8, seed=0)
    assert len(packed) == 1
    row = packed[0]
    assert sorted(zip(row["input_ids"], row["labels"])) == [(5, -100), (6, 6), (7, 7), (8, -100), (9, 9)]


def test_pack_dataset_is_deterministic_and_reads_through_select():
    ds = docs_dataset(MIX * 3).select(range(5, 50))
    a, b = pack_dataset(ds, 256, seed=11), pack_dataset(ds, 256, seed=11)
    assert a["input_ids"] == b["input_ids"] and a["position_ids"] == b["position_ids"]
    assert sum(a["length"]) == sum(ds["length"])


def test_packing_stats():
    packed = pack_dataset(docs_dataset(MIX), 128, seed=0)
    stats = packing_stats(packed, 128)
    assert stats["packed_rows"] == len(packed) and stats["docs"] == len(MIX) and stats["tokens"] == sum(MIX)
    assert stats["efficiency"] == pytest.approx(sum(MIX) / (len(packed) * 128), abs=1e-6)
    assert sum(stats["doc_length_histogram"].values()) == len(MIX)
    assert stats["doc_length_histogram"] == doc_length_histogram(MIX, 128)
    assert doc_length_histogram([3, 16, 17, 100], 128) == {"1-16": 2, "17-32": 1, "33-64": 0, "65-128": 1}


def test_efficiency_on_a_realistic_mix():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(20, 60, 3000), rng.integers(150, 1000, 150)])
    rows = plan_bins(lengths, 1024, seed=42)
    assert lengths.sum() / (len(rows) * 1024) >= 0.98


# ---------------------------------------------------------------- collator

def test_collator_drops_the_attention_mask_of_packed_rows_and_pads_positions_with_zero():
    rows = [{"input_ids": [2, 10, 11, 2, 12], "labels": [-100, 10, 11, -100, 12], "position_ids": [0, 1, 2, 0, 1]},
            {"input_ids": [2, 13], "labels": [-100, 13], "position_ids": [0, 1], "num_docs": 1}]
    batch = DataCollator(pad_token_id=0, drop_attention_mask=True)(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]
    assert batch["labels"][1].tolist() == [-100, 13, -100, -100, -100]
    assert int((batch["input_ids"] != 0).sum()) == 7  # real tokens, as the Trainer counts them without a mask
    # The padding are documents of their own: transformers' rule sees 2 + 1 + 3 documents.
    assert packed_sequence_index(batch["position_ids"]).tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 2, 3]]


def test_collator_follows_the_plans_packing_mask_decision():
    rows = [{"input_ids": [2, 10, 11, 2, 12], "labels": [-100, 10, 11, -100, 12], "position_ids": [0, 1, 2, 0, 1]},
            {"input_ids": [2, 13], "labels": [-100, 13], "position_ids": [0, 1]}]
    kept = DataCollator(pad_token_id=0, drop_attention_mask=False)(rows)
    assert set(kept) == {"input_ids", "labels", "position_ids", "attention_mask"}
    assert kept["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    dropped = DataCollator(pad_token_id=0, drop_attention_mask=True)(rows)
    assert "attention_mask" not in dropped and torch.equal(dropped["position_ids"], kept["position_ids"])


def test_collator_takes_the_mask_decision_from_its_caller_only():
    # No default of its own: every caller passes the plan's sample_packing_drop_attention_mask.
    with pytest.raises(TypeError, match="drop_attention_mask"):
        DataCollator(pad_token_id=0)


def test_collator_keeps_the_attention_mask_of_unpacked_rows_and_refuses_a_mix():
    rows = [{"input_ids": [2, 10], "labels": [-100, 10]}, {"input_ids": [2], "labels": [-100]}]
    batch = DataCollator(pad_token_id=0, drop_attention_mask=True)(rows)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    with pytest.raises(ValueError, match="packed rows"):
        DataCollator(pad_token_id=0, drop_attention_mask=True)([rows[0], {**rows[1], "position_ids": [0]}])


def test_packed_sequence_index_is_transformers_rule():
    assert packed_sequence_index(torch.tensor([[0, 1, 0, 1, 2, 0]])).tolist() == [[0, 0, 1, 1, 1, 2]]
    assert packed_sequence_index(torch.tensor([[0, 1, 2, 3]])) is None  # one document: not packed
    assert packed_sequence_index(None) is None


# ---------------------------------------------------------------- Gated DeltaNet kernels

def _documents(lengths_per_row):
    return torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths_per_row])


# Boundaries mid-chunk, on a chunk boundary (64), a 1-token document, a document spanning chunks.
ROWS = [[40, 24, 70, 16], [1, 63, 65, 21]]


def test_segmented_gated_delta_rule_equals_transformers_per_document():
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import torch_chunk_gated_delta_rule

    g = torch.Generator().manual_seed(0)
    B, T, Hk, Hv, dk, dv = 2, 150, 2, 4, 16, 8
    q, k = torch.randn(B, T, Hk, dk, generator=g), torch.randn(B, T, Hk, dk, generator=g)
    v = torch.randn(B, T, Hv, dv, generator=g)
    decay, beta = -3 * torch.rand(B, T, Hv, generator=g), torch.rand(B, T, Hv, generator=g)
    seq_idx = _documents(ROWS)
    out = segmented_chunk_gated_delta_rule(q, k, v, decay, beta, seq_idx)
    ref = torch.zeros_like(out)
    for b, row in enumerate(ROWS):
        start = 0
        for n in row:
            s = slice(start, start + n)
            ref[b, s] = torch_chunk_gated_delta_rule(q[b:b + 1, s], k[b:b + 1, s], v[b:b + 1, s], g=decay[b:b + 1, s],
                                                     beta=beta[b:b + 1, s], use_qk_l2norm_in_kernel=True)[0][0]
            start += n
    assert (out - ref).abs().max() < 1e-5 * ref.abs().max()
    # One document per row: bit for bit the unsegmented kernel.
    whole = torch_chunk_gated_delta_rule(q, k, v, g=decay, beta=beta, use_qk_l2norm_in_kernel=True)[0]
    assert torch.equal(segmented_chunk_gated_delta_rule(q, k, v, decay, beta, torch.zeros(B, T, dtype=torch.long)),
                       whole)
    # And the plain kernel over the packed row is what leaks.
    assert (whole - ref).abs().max() > 1e-2


def test_segmented_conv_equals_the_causal_conv_per_document():
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import causal_conv1d_fn

    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 12, 150, generator=g), torch.randn(12, 4, generator=g)
    out = segmented_causal_conv1d(x, w, None, _documents(ROWS), "silu")
    for b, row in enumerate(ROWS):
        start = 0
        for n in row:
            ref = causal_conv1d_fn(x[b:b + 1, :, start:start + n], w, None, activation="silu")[0]
            assert torch.allclose(out[b, :, start:start + n], ref, atol=1e-6)
            start += n


# ---------------------------------------------------------------- registry and refusal

def test_packing_patch_registry():
    assert get_packing_patch("gated_deltanet_packing") is GATED_DELTANET_PACKING
    with pytest.raises(KeyError, match="registered twice"):
        register_packing_patch(PackingPatch("gated_deltanet_packing", "", lambda m: 0, "transformers 5.24.0", {"x": "y"}))
    with pytest.raises(KeyError, match="no patch 'nope'"):
        get_packing_patch("nope")


def test_a_model_with_an_unpatched_recurrent_layer_is_refused():
    class FooMamba2Mixer(torch.nn.Module):
        pass

    class FooModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = FooMamba2Mixer()
            self.mlp = torch.nn.Linear(2, 2)

    model = FooModel()
    assert stateful_layers(model) == ["mixer"]
    with pytest.raises(PackingUnsupported, match="mixer"):
        prepare_model_for_packing(model, [GATED_DELTANET_PACKING])


# ---------------------------------------------------------------- per-document attention

class _Attention(torch.nn.Module):
    num_key_value_groups = 2
    is_causal = True


def _packed_masks(position_ids):
    """transformers' own masks for a packed batch: full causal and sliding window (4) layers."""
    from transformers import LlamaConfig
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    config = LlamaConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, sliding_window=4)
    config._attn_implementation = "sdpa"
    embeds = torch.zeros(*position_ids.shape, 8)
    return [make(config=config, inputs_embeds=embeds, attention_mask=None, cache=None, position_ids=position_ids)
            for make in (create_causal_mask, create_sliding_window_causal_mask)]


@pytest.mark.parametrize("window", [False, True])
@pytest.mark.parametrize("min_block", [1, 4])
def test_document_attention_equals_sdpa_on_transformers_packed_masks(window, min_block, monkeypatch):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from archtune.patches import packing as packing_patch
    from archtune.patches.packing import _document_blocks, document_sdpa_attention

    monkeypatch.setattr(packing_patch, "_MIN_BLOCK", min_block)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 0], [0, 1, 2, 0, 1, 2, 0, 1, 2, 3]])
    mask = _packed_masks(position_ids)[int(window)]
    # One block per document, or consecutive documents grouped into blocks of >= min_block tokens.
    # A block that is one whole document (within the window of 4) is flagged causal: no mask needed.
    fits = not window  # the 6-token document is cut by the window
    blocks = {1: [[(0, 6, fits), (6, 9, True), (9, 10, True)], [(0, 3, True), (3, 6, True), (6, 10, True)]],
              4: [[(0, 6, fits), (6, 10, False)], [(0, 6, False), (6, 10, True)]]}[min_block]
    assert _document_blocks(mask, position_ids, 10, 10) == blocks
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 10, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 10, 8, generator=g, requires_grad=True) for _ in range(2))
    module = _Attention()
    ours, _ = document_sdpa_attention(module, q, k, v, mask, scaling=0.5, position_ids=position_ids)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.5, position_ids=position_ids)
    assert ours.shape == ref.shape == (2, 10, 4, 8)
    assert torch.allclose(ours, ref, atol=1e-6)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, ref_grads))


def test_document_attention_falls_back_to_sdpa_when_blocks_do_not_apply(monkeypatch):
    from archtune.patches import packing as packing_patch
    from archtune.patches.packing import _document_blocks

    monkeypatch.setattr(packing_patch, "_MIN_BLOCK", 1)

    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    mask = _packed_masks(position_ids)[0]
    across = mask.clone()
    across[0, 0, 4, 1] = True  # a mask that lets a document see the previous one: not ours to split
    assert _document_blocks(across, position_ids, 8, 8) is None
    assert _document_blocks(mask, None, 8, 8) is None  # no positions
    assert _document_blocks(None, position_ids, 8, 8) is None  # no mask
    one_doc = torch.arange(8)[None]
    assert _document_blocks(_packed_masks(one_doc)[1], one_doc, 8, 8) is None  # unpacked
    # One document filling most of the row, cut by the sliding window (so it needs its mask):
    # plain sdpa is as cheap as the loop. Without the window it runs on the causal kernel.
    long_first = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0]])
    full, sliding = _packed_masks(long_first)
    assert _document_blocks(sliding, long_first, 8, 8) is None
    assert _document_blocks(full, long_first, 8, 8) == [[(0, 7, True), (7, 8, True)]]


def _attention_case(position_ids, mask, heads=4, kv_heads=2):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from archtune.patches.packing import document_sdpa_attention

    g = torch.Generator().manual_seed(0)
    batch, length = position_ids.shape
    q = torch.randn(batch, heads, length, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(batch, kv_heads, length, 8, generator=g, requires_grad=True) for _ in range(2))
    module = _Attention()
    ours, _ = document_sdpa_attention(module, q, k, v, mask, scaling=0.5, position_ids=position_ids)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.5, position_ids=position_ids)
    assert ours.shape == ref.shape == (batch, length, heads, 8)
    assert torch.allclose(ours, ref, atol=1e-6)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, ref_grads))


@pytest.mark.parametrize("window", [False, True])
def test_rows_that_look_back_a_few_tokens_run_as_one_band(window, monkeypatch):
    from archtune.patches import packing as packing_patch
    from archtune.patches.packing import _attention_layout

    monkeypatch.setattr(packing_patch, "_BAND_ALIGN", 1)
    # Full layers on short documents (at most 3 tokens: chunks of 3), or a sliding window of 4 over
    # longer ones (chunks of 4); 22 tokens, not a multiple of either (padding queries see themselves).
    short = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 0, 0, 1, 2, 0, 1, 0, 1, 2, 0, 1, 2, 0, 1]] * 2)
    long = torch.tensor([[*range(9), *range(7), *range(6)], [*range(12), *range(10)]])
    position_ids = long if window else short
    mask = _packed_masks(position_ids)[int(window)]
    layout = _attention_layout(mask, position_ids, 22, 22)
    assert layout[0] == "band" and layout[1] == (4 if window else 3)
    _attention_case(position_ids, mask)
    # Without the window the long documents are blocks: a band would be as wide as the row.
    monkeypatch.setattr(packing_patch, "_MIN_BLOCK", 1)
    monkeypatch.setattr(packing_patch, "_CALL_SCORES", 0)
    assert _attention_layout(_packed_masks(long)[0], long, 22, 22)[0] == "blocks"


def test_a_band_is_refused_when_the_mask_reaches_further(monkeypatch):
    from archtune.patches import packing as packing_patch
    from archtune.patches.packing import _window_band

    monkeypatch.setattr(packing_patch, "_BAND_ALIGN", 1)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 0, 1]])
    mask = _packed_masks(position_ids)[0]
    chunk, band = _window_band(mask, 12)
    assert chunk == 4 and band.shape == (1, 1, 12, 8)
    # The band of query i starts at the chunk before i's: position (i // C - 1) * C.
    i, j = 9, 6
    assert band[0, 0, i, j - (i // chunk - 1) * chunk] == mask[0, 0, i, j]
    # A gap-free reach is all the band reads: a pair outside the chunk reach is never dropped.
    sparse = torch.eye(12, dtype=torch.bool)[None, None].clone()
    sparse[0, 0, 11, 0] = True  # looks back 11 tokens: the band becomes the whole row
    assert _window_band(sparse, 12)[0] == 12


@pytest.mark.parametrize("cuda, attention", [(False, "sdpa_packed"), (True, "sdpa")])
def test_training_applies_the_plans_document_attention(monkeypatch, cuda, attention):
    """The plan decides per device (CPU: per-document sdpa; CUDA: one masked sdpa call) and the
    recipe applies that decision to the model it trains."""
    from archtune.config import config_from_dict
    from archtune.models.tiny import build_tiny_config, build_tiny_model
    from archtune.plan import resolve
    from archtune.train.assembly import prepare_packing

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda)
    cfg = config_from_dict({"base_model": "tiny:llama", "datasets": [{"path": "d.jsonl"}], "sample_packing": True})
    plan = resolve(cfg, build_tiny_config("llama").to_dict())
    model, _ = build_tiny_model("llama")
    prepare_packing(model, plan)
    assert model.config._attn_implementation == attention and model.config.use_cache is False


def test_prepare_model_for_packing_switches_only_the_language_model_to_document_attention():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, attn_implementation="sdpa"))
    assert model.config.use_cache is True
    report = prepare_model_for_packing(model)
    assert report == {"patches": {}, "use_cache": False, "attention": "sdpa_packed"}
    assert model.config.use_cache is False and model.config._attn_implementation == "sdpa_packed"
    # A packed row through the model equals its documents one by one.
    ids = torch.tensor([[1, 5, 6, 7, 1, 8, 9, 1, 10, 11]])
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    with torch.no_grad():
        whole = model(input_ids=ids, position_ids=pos).logits[0]
        alone = torch.cat([model(input_ids=ids[:, a:b]).logits[0] for a, b in ((0, 4), (4, 7), (7, 10))])
    assert torch.allclose(whole, alone, atol=1e-5)
