"""Chunked linear cross-entropy (train/losses.py) against transformers' own loss on real tiny models."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from archtune.models.tiny import build_tiny_config, build_tiny_model
from archtune.errors import UserError
from archtune.train.losses import ChunkedCrossEntropy


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and, on CPU, backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _batch(model, seed: int = 0, length: int = 40):
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, length), generator=g)
    labels = ids.clone()
    labels[0, :7] = -100  # a masked prompt
    labels[1, 25:] = -100  # padding
    labels[1, 12] = -100  # a packed document's first token
    return ids, labels


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _max_rel(a: dict, b: dict) -> float:
    assert set(a) == set(b) and a
    return max(float((a[n] - b[n]).abs().max() / a[n].abs().max().clamp_min(1e-30)) for n in a)


def _pair(name: str, lora_on_head: bool = False):
    model, _ = build_tiny_model(name)
    if lora_on_head:
        from peft import LoraConfig, get_peft_model

        # A regex: a name list would also hit Gemma 4's vision tower (PEFT refuses its ClippableLinear).
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.q_proj|lm_head",
                                                 init_lora_weights=False))
    model.train()
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("name,lora", [("gemma4-dense", False), ("llama", False), ("gemma4-dense", True),
                                       ("llama", True)])
def test_loss_and_gradients_equal_the_stock_loss(name, lora):
    """Gemma 4 (softcap 30, lm_head tied to the embeddings) and Llama (untied), full and with LoRA
    on lm_head; num_items_in_batch as the Trainer passes it under gradient accumulation."""
    stock, chunked = _pair(name, lora)
    ids, labels = _batch(stock)
    items = torch.tensor(int((labels[:, 1:] != -100).sum()) + 13)  # the whole accumulated batch's count
    loss = ChunkedCrossEntropy.install(chunked, num_chunks=3)
    expected = stock(input_ids=ids, labels=labels, num_items_in_batch=items).loss
    expected.backward()
    with loss.labels(labels):
        got = chunked(input_ids=ids, labels=labels, num_items_in_batch=items).loss
    got.backward()
    assert got.dtype == expected.dtype == torch.float32
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
    assert _max_rel(_grads(stock), _grads(chunked)) < 1e-5
    if lora:
        assert any("lm_head.lora_A" in n for n in _grads(chunked))


def test_mean_reduction_without_num_items_and_eval_sum():
    stock, chunked = _pair("gemma4-dense")
    ids, labels = _batch(stock, seed=1)
    loss = ChunkedCrossEntropy.install(chunked, num_chunks=4)
    with torch.no_grad():
        expected = stock(input_ids=ids, labels=labels).loss
        with loss.labels(labels):
            got = chunked(input_ids=ids, labels=labels).loss
            result = loss.result()
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
    assert int(result.count) == int((labels[:, 1:] != -100).sum())
    assert result.sum64 / int(result.count) == pytest.approx(float(expected), rel=1e-6)


def test_full_logits_never_exist_in_forward_or_backward():
    stock, chunked = _pair("gemma4-dense")
    ids, labels = _batch(stock, length=200)
    vocab = stock.config.get_text_config().vocab_size
    full = ids.numel() * vocab
    biggest_param = max(p.numel() for p in stock.parameters())  # the tied embeddings, vocab x hidden
    loss = ChunkedCrossEntropy.install(chunked, num_chunks=8)
    with LargestTensor() as seen:
        stock(input_ids=ids, labels=labels).loss.backward()
    assert seen.largest >= full  # the control: the stock loss holds [tokens x vocab]
    with LargestTensor() as seen:
        with loss.labels(labels):
            out = chunked(input_ids=ids, labels=labels)
        out.loss.backward()
    chunk = -(-int((labels[:, 1:] != -100).sum()) // 8)
    assert seen.largest <= max(chunk * vocab, biggest_param) < full / 3


def test_outside_a_labels_block_the_model_is_unchanged():
    stock, chunked = _pair("gemma4-dense")
    ids, _ = _batch(stock)
    ChunkedCrossEntropy.install(chunked)
    with torch.no_grad():
        assert torch.equal(stock(input_ids=ids).logits, chunked(input_ids=ids).logits)


def test_a_logit_transform_the_config_does_not_declare_is_refused():
    """The loss applies the config's softcap inside; a model that post-processes differently
    (here: the config changed after installing) is caught by the probe, not trained silently."""
    _, chunked = _pair("gemma4-dense")
    ids, labels = _batch(chunked)
    loss = ChunkedCrossEntropy.install(chunked)
    chunked.config.get_text_config().final_logit_softcapping = 5.0
    with pytest.raises(UserError, match="final_logit_softcapping 30"):
        with loss.labels(labels):
            chunked(input_ids=ids, labels=labels)


# ---------------------------------------------------------------- the Plan's chunked_cross_entropy

def _plan(name: str = "gemma4-dense", vocab: int | None = None, **keys):
    from archtune.config import config_from_dict
    from archtune.plan import resolve

    model_config = build_tiny_config(name).to_dict()
    if vocab is not None:
        (model_config.get("text_config") or model_config)["vocab_size"] = vocab
    cfg = config_from_dict({"base_model": f"tiny:{name}", "datasets": [{"path": "d.jsonl"}], **keys})
    return resolve(cfg, model_config)


@pytest.mark.parametrize("vocab,keys,value,source", [
    (262_144, {}, True, "auto"),  # Gemma's vocabulary: on, with the softcap inside
    (2048, {}, False, "default"),
    (2048, {"chunked_cross_entropy": True}, True, "user"),
    (262_144, {"chunked_cross_entropy": False}, False, "user"),
    (2048, {"cut_cross_entropy": True}, True, "auto"),
    (2048, {"liger_fused_linear_cross_entropy": True}, True, "auto"),
    (2048, {"plugins": ["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"]}, True, "auto"),
    (2048, {"plugins": ["axolotl.integrations.liger.LigerPlugin"]}, False, "default"),  # Liger: needs its key
])
def test_plan_decides_chunked_cross_entropy(vocab, keys, value, source):
    plan = _plan(vocab=vocab, **keys)
    d = plan.settings["chunked_cross_entropy"]
    assert (d.value, d.source) == (value, source) and not plan.errors
    assert plan.get("chunked_cross_entropy_num_chunks") == (8 if value else None)
    if source == "auto" and keys:
        assert "maps to archtune's chunked cross-entropy" in d.reason
    if vocab == 262_144 and source == "auto":
        assert "262,144" in d.reason and "final_logit_softcapping 30.0 is applied inside" in d.reason


def test_plan_refuses_a_fused_loss_key_against_chunked_false():
    plan = _plan(chunked_cross_entropy=False, cut_cross_entropy=True)
    assert [p.key for p in plan.errors] == ["chunked_cross_entropy"]
