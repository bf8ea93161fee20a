"""Packed and unpacked runs of the same data agree, for every tiny family (LoRA on).

- evaluation: token_weighted_loss (what `archtune evaluate` reports) over packed rows equals the
  unpacked value (relative difference < 1e-4), with the same eval_tokens and eval_rows;
- training: one optimizer step's adapter gradients, the loss being the mean over the label
  tokens of the whole step (num_items_in_batch), agree with gradient accumulation 1 and 2;
- Qwen 3.5: without the Gated DeltaNet patch the packed loss leaks (differs), with it it matches,
  activation checkpointing included;
- the real Trainer step (ArchtuneTrainer, accumulation 2) updates the adapters identically;
- per-document attention ("sdpa_packed") and plain sdpa over the packed row agree.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from datasets import Dataset

from archtune.data.collate import DataCollator
from archtune.data.packing import pack_dataset
from archtune.families import find_tiny
from archtune.patches.packing import GATED_DELTANET_PACKING, PackingUnsupported, prepare_model_for_packing
from archtune.models import build_tiny_model
from archtune.train.evaluation import token_weighted_loss

SEQUENCE_LEN = 256
RTOL = 1e-4
# Families whose layers need a packing patch (the one each family declares in `patches`).
PATCHES = {"qwen3_5-moe": [GATED_DELTANET_PACKING], "qwen3_5": [GATED_DELTANET_PACKING]}
FAMILIES = ["gemma4-moe", "gemma4-e2b", "gemma4-unified", "gemma3", "qwen3_5-moe", "qwen3_5", "llama"]
LLAMA_TARGETS = r".*\.(q|k|v|o|gate|up|down)_proj"


def make_docs(vocab: int, bos: int, n: int = 24, seed: int = 0) -> Dataset:
    """n documents of varied length (2..120): bos, a prompt (labels -100), an answer (labels = ids)."""
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([[2, 3, 120, 64, 65, 2], rng.integers(4, 110, n - 6)])
    ids, labels = [], []
    for length in lengths.tolist():
        row = [bos] + rng.integers(32, vocab, length - 1).tolist()
        prompt = int(rng.integers(1, max(2, length // 2)))
        ids.append(row)
        labels.append([-100] * prompt + row[prompt:])
    return Dataset.from_dict({"input_ids": ids, "labels": labels, "length": lengths.tolist()})


def lora_model(name: str):
    from peft import LoraConfig, get_peft_model

    family, _ = find_tiny(name)
    model, tok = build_tiny_model(name, seed=0)
    targets = family.lora_target_regex or LLAMA_TARGETS
    # init_lora_weights=False: B is random too, so A gets a gradient (PEFT's default B=0 gives none).
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = get_peft_model(model, config)
    return model, tok


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def step_gradient(model, micro_batches: list[dict], per_step_mean: bool = True) -> torch.Tensor:
    """The adapter gradient of one optimizer step over `micro_batches` (gradient accumulation).

    per_step_mean: the loss is (sum of per-token losses of the step) / (label tokens of the
    step), as the Trainer does with num_items_in_batch; else a mean per micro batch / their count
    (the normalisation that makes packed and unpacked steps differ).
    """
    model.train()
    model.zero_grad(set_to_none=True)
    n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
    for batch in micro_batches:
        if per_step_mean:
            loss = model(**batch, use_cache=False, num_items_in_batch=torch.tensor(n_items)).loss
        else:
            loss = model(**batch, use_cache=False).loss / len(micro_batches)
        loss.backward()
    grads = [p.grad.flatten() for n, p in sorted(model.named_parameters()) if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    return torch.cat(grads).double()


def grad_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def collate_parts(collator, ds: Dataset, parts: int) -> list[dict]:
    bounds = np.linspace(0, len(ds), parts + 1).round().astype(int)
    return [collator([ds[i] for i in range(lo, hi)]) for lo, hi in zip(bounds[:-1], bounds[1:])]


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    torch.manual_seed(0)
    name = request.param
    model, tok = lora_model(name)
    vocab = model.get_base_model().config.get_text_config().vocab_size
    docs = make_docs(vocab, tok.bos_token_id)
    packed = pack_dataset(docs, SEQUENCE_LEN, seed=0)
    assert len(packed) <= len(docs) / 3  # several documents per row
    report = prepare_model_for_packing(model, PATCHES.get(name, []))
    return name, model, DataCollator(tok, drop_attention_mask=True), docs, packed, report


def test_eval_loss_packed_equals_unpacked(setup):
    name, model, collator, docs, packed, _ = setup
    unpacked = token_weighted_loss(model, docs, collator, batch_size=5)
    pk = token_weighted_loss(model, packed, collator, batch_size=3)
    assert pk["eval_tokens"] == unpacked["eval_tokens"] > 0
    assert pk["eval_rows"] == unpacked["eval_rows"] == len(docs)
    diff = rel(pk["eval_loss"], unpacked["eval_loss"])
    print(f"{name}: eval_loss unpacked {unpacked['eval_loss']:.8f} packed {pk['eval_loss']:.8f} rel diff {diff:.2e}")
    assert diff < RTOL


@pytest.mark.parametrize("accumulation", [1, 2])
def test_step_gradient_packed_equals_unpacked(setup, accumulation):
    name, model, collator, docs, packed, _ = setup
    # The same documents in both steps: unpacked micro batches of 5/6 documents padded, packed rows.
    g_unpacked = step_gradient(model, collate_parts(collator, docs, accumulation * 2))
    g_packed = step_gradient(model, collate_parts(collator, packed, accumulation))
    diff = grad_rel(g_packed, g_unpacked)
    print(f"{name}: gradient accumulation {accumulation}: adapter gradient rel diff {diff:.2e}")
    assert diff < RTOL


def test_a_mean_per_micro_batch_would_not_be_the_same_objective():
    # The control for the normalisation: the step's mean over label tokens is what makes packed
    # and unpacked agree; a mean of per-micro-batch means (different token counts) does not.
    model, tok = lora_model("llama")
    collator = DataCollator(tok, drop_attention_mask=True)
    docs = make_docs(model.get_base_model().config.vocab_size, tok.bos_token_id)
    packed = pack_dataset(docs, SEQUENCE_LEN, seed=0)
    prepare_model_for_packing(model)
    g_unpacked = step_gradient(model, collate_parts(collator, docs, 4), per_step_mean=False)
    g_packed = step_gradient(model, collate_parts(collator, packed, 2), per_step_mean=False)
    assert grad_rel(g_packed, g_unpacked) > 1e-2


def checkpointed_gradient_rel(model, collator, docs, packed) -> float:
    """Relative difference of the packed step's gradient under activation checkpointing (which
    recomputes the layers in backward: the document index must be there too) from the unpacked one."""
    g_unpacked = step_gradient(model, collate_parts(collator, docs, 2))
    model.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})
    try:
        g_packed = step_gradient(model, collate_parts(collator, packed, 1))
    finally:
        model.get_base_model().gradient_checkpointing_disable()
    return grad_rel(g_packed, g_unpacked)


def packed_row_logit_diff(model, collator, row) -> float:
    """Max |logit| difference between a packed row and its documents run one by one."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [row["length"]]
    with torch.no_grad():
        model.eval()
        whole = model(**collator([row]), use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([row["input_ids"][a:b]]), use_cache=False).logits[0]
                           for a, b in zip(starts[:-1], starts[1:])])
    return float((whole - alone).abs().max())


def test_qwen3_5_packing_leaks_without_the_deltanet_patch():
    model, tok = lora_model("qwen3_5-moe")
    collator = DataCollator(tok, drop_attention_mask=True)
    docs = make_docs(model.get_base_model().config.get_text_config().vocab_size, tok.bos_token_id)
    packed = pack_dataset(docs, SEQUENCE_LEN, seed=0)
    def row_logit_diff() -> float:
        return packed_row_logit_diff(model, collator, packed[0])

    unpacked = token_weighted_loss(model, docs, collator, batch_size=6)["eval_loss"]
    leaked = token_weighted_loss(model, packed, collator, batch_size=6)["eval_loss"]
    assert rel(leaked, unpacked) > RTOL, "the unpatched DeltaNet should carry state across documents"
    assert row_logit_diff() > 1e-2
    with pytest.raises(PackingUnsupported, match="linear_attn"):  # the family's patch not applied: refused
        prepare_model_for_packing(model)

    assert prepare_model_for_packing(model, [GATED_DELTANET_PACKING])["patches"] == {"gated_deltanet_packing": 3}
    assert row_logit_diff() < 1e-4
    exact = token_weighted_loss(model, packed, collator, batch_size=6)["eval_loss"]
    assert rel(exact, unpacked) < RTOL
    # Unpacked rows take the original forward, untouched by the patch.
    assert token_weighted_loss(model, docs, collator, batch_size=6)["eval_loss"] == unpacked
    assert checkpointed_gradient_rel(model, collator, docs, packed) < RTOL


def test_a_trainer_step_on_packed_rows_is_the_unpacked_step(tmp_path):
    # The real optimizer step (ArchtuneTrainer, gradient accumulation 2, SGD lr 1: the update is
    # minus the gradient) on the same documents, packed and unpacked: the Trainer counts the
    # step's label tokens (num_items_in_batch) over the shifted labels, which packing keeps equal.
    from transformers import TrainingArguments

    from archtune.train.trainer import ArchtuneTrainer

    def update(dataset, micro_batch_size: int) -> torch.Tensor:
        model, tok = lora_model("llama")
        prepare_model_for_packing(model)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        args = TrainingArguments(
            output_dir=str(tmp_path / "out"), per_device_train_batch_size=micro_batch_size,
            gradient_accumulation_steps=2, max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant",
            weight_decay=0.0, max_grad_norm=0.0, warmup_steps=0, report_to=[], save_strategy="no",
            remove_unused_columns=False, use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
        ArchtuneTrainer(model=model, args=args, train_dataset=dataset, data_collator=DataCollator(tok, drop_attention_mask=True)).train()
        return torch.cat([(p.detach() - before[n]).flatten() for n, p in sorted(model.named_parameters())
                          if p.requires_grad]).double()

    _, tok = build_tiny_model("llama", seed=0)
    docs = make_docs(1000, tok.bos_token_id)
    packed = pack_dataset(docs, SEQUENCE_LEN, seed=0)
    # Every row in the one step (the order the sampler picks cannot matter).
    u_unpacked = update(docs, len(docs) // 2)
    u_packed = update(packed, (len(packed) + 1) // 2)
    assert u_unpacked.norm() > 0
    assert grad_rel(u_packed, u_unpacked) < RTOL


@pytest.mark.parametrize("name", ["qwen3_5-moe", "qwen3_5"])
def test_the_qwen3_5_families_declare_the_deltanet_patch(name):
    family, _ = find_tiny(name)
    assert GATED_DELTANET_PACKING.name in family.patches, (
        f"families/{family.name}.py must declare patches=[\"gated_deltanet_packing\"] (archtune.patches.packing)")


def test_without_use_cache_false_llama_packing_leaks():
    # Why prepare_model_for_packing switches the cache off: Llama's config says use_cache=True, the
    # model then builds a cache in training mode too, and transformers skips packed-sequence masks.
    model, tok = build_tiny_model("llama", seed=0)
    model.train()
    ids = torch.tensor([[2, 40, 41, 42, 2, 50, 51, 52]])
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    with torch.no_grad():
        alone = model(input_ids=ids[:, 4:], use_cache=False).logits
        leaky = model(input_ids=ids, position_ids=pos).logits[:, 4:]
        prepare_model_for_packing(model)
        exact = model(input_ids=ids, position_ids=pos).logits[:, 4:]
    assert (leaky - alone).abs().max() > 1e-2
    assert (exact - alone).abs().max() < 1e-5


def test_packed_rows_run_attention_per_document_and_plain_sdpa_agrees(monkeypatch):
    import torch.nn.functional as F

    model, tok = lora_model("gemma4-moe")
    collator = DataCollator(tok, drop_attention_mask=True)
    docs = make_docs(model.get_base_model().config.get_text_config().vocab_size, tok.bos_token_id)
    packed = pack_dataset(docs, SEQUENCE_LEN, seed=0)
    unpacked = token_weighted_loss(model, docs, collator, batch_size=6)["eval_loss"]
    assert prepare_model_for_packing(model, document_attention=False)["attention"] == "sdpa"
    plain = token_weighted_loss(model, packed, collator, batch_size=3)["eval_loss"]
    assert rel(plain, unpacked) < RTOL

    lengths = []
    original = F.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        lengths.append(query.shape[-2])
        return original(query, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    assert prepare_model_for_packing(model)["attention"] == "sdpa_packed"
    per_document = token_weighted_loss(model, packed, collator, batch_size=3)["eval_loss"]
    assert rel(per_document, unpacked) < RTOL
    assert lengths and max(lengths) < max(packed["length"])  # sdpa saw documents or chunks, never a whole row


def qwen3_next_lora_model():
    """tiny:qwen3_next (Gated DeltaNet with the fused projections, 2 value heads per key head) with
    the family's LoRA targets, resolved to module names as archtune places them."""
    from peft import LoraConfig, get_peft_model

    from archtune.patches.peft_targets import keep_module_targets

    family, _ = find_tiny("qwen3_next")
    model, tok = build_tiny_model("qwen3_next", seed=0)
    targets = [n for n, _ in model.named_modules() if re.fullmatch(family.lora_target_regex, n)]
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    with torch.random.fork_rng(devices=[]), keep_module_targets():
        torch.manual_seed(1)
        model = get_peft_model(model, lora)
    return family, model, tok


def test_qwen3_next_packing_is_exact_with_the_deltanet_patch_for_its_fused_projections():
    family, model, tok = qwen3_next_lora_model()
    assert family.patches == [GATED_DELTANET_PACKING.name]
    targeted = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert {"in_proj_qkvz", "out_proj", "q_proj", "o_proj"} <= targeted
    collator = DataCollator(tok, drop_attention_mask=True)
    docs = make_docs(len(tok), tok.bos_token_id)
    packed = pack_dataset(docs, SEQUENCE_LEN, seed=0)
    def row_logit_diff() -> float:
        return packed_row_logit_diff(model, collator, packed[0])

    unpacked = token_weighted_loss(model, docs, collator, batch_size=6)["eval_loss"]
    leaked = token_weighted_loss(model, packed, collator, batch_size=6)["eval_loss"]
    leaked_logits = row_logit_diff()
    # The control: unpatched, the DeltaNet carries state across documents.
    assert rel(leaked, unpacked) > 1e-5 and leaked_logits > 1e-3
    with pytest.raises(PackingUnsupported, match="linear_attn"):
        prepare_model_for_packing(model)

    assert prepare_model_for_packing(model, [GATED_DELTANET_PACKING])["patches"] == {"gated_deltanet_packing": 3}
    exact = token_weighted_loss(model, packed, collator, batch_size=6)["eval_loss"]
    exact_logits = row_logit_diff()
    print(f"qwen3_next: eval_loss unpacked {unpacked:.8f} packed {exact:.8f} (unpatched {leaked:.8f}); "
          f"packed-row max logit diff {exact_logits:.2e} (unpatched {leaked_logits:.2e})")
    assert exact_logits < 1e-5 and rel(exact, unpacked) < 1e-6
    assert token_weighted_loss(model, docs, collator, batch_size=6)["eval_loss"] == unpacked
    assert checkpointed_gradient_rel(model, collator, docs, packed) < RTOL
