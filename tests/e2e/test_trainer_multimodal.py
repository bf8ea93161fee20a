"""Rule 9: text-only training of multimodal wrappers through DDP / PEFT wrappers.

ArchtuneTrainer.compute_loss / prediction_step read the model through `unwrap_model` (DDP has no
`.config`, and its forward(*inputs, **kwargs) hides the real signature) and add the inputs a
multimodal wrapper takes for a text-only batch (`text_only_extras`: zeros = text tokens).

What transformers 5.24 needs (checked here, not assumed): Gemma 3 (token_type_ids), Gemma 4 and
Qwen 3.5 MoE (mm_token_type_ids) accept text-only training batches without them, and give the
same logits with them. Molmo2 (also transformers 5.24) still raises "`mm_token_type_ids` is
required as a model input when training" - the error users reported for Gemma 3/4 with older
transformers - so it is the model that shows the failure without unwrapping.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch

from archtune.models.tiny import build_tiny_model
from archtune.patches.text_only import text_only_extras, unwrap_model
from archtune.train.trainer import ArchtuneTrainer


@pytest.fixture(scope="module")
def gloo():
    """A real one-process gloo group (world size 1), destroyed cleanly at the end."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.barrier()
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def trainer_args(tmp_path_factory):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path_factory.mktemp("trainer")), report_to=[], use_cpu=True)


def _batch(batch: int = 2, seq: int = 12, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(32, 1000, (batch, seq), generator=g)  # plain text ids, no multimodal placeholders
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _lora(model):
    from peft import LoraConfig, get_peft_model

    target = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|v)_proj|mlp\.down_proj)"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=target))
    # Non-zero B: the adapters change the output, so an adapter that is skipped would show.
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return peft_model


def _tiny_molmo2():
    """A tiny Molmo2 (transformers 5.24): requires mm_token_type_ids whenever it is in training mode."""
    from transformers import Molmo2Config, Molmo2ForConditionalGeneration

    config = Molmo2Config(
        text_config=dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=1024,
                         additional_vocab_size=16, num_hidden_layers=1, intermediate_size=64),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=8, image_size=[28, 28], patch_size=14),
        adapter_config=dict(vision_feature_layer=[-1], hidden_size=16, num_attention_heads=2, num_key_value_heads=2,
                            head_dim=8, intermediate_size=32, text_hidden_size=32),
        image_start_token_id=1024, low_res_image_start_token_id=1025, image_end_token_id=1026, image_patch_id=1027,
        frame_start_token_id=1028, frame_end_token_id=1029)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Molmo2ForConditionalGeneration(config)


# ------------------------------------------------------------------ text_only_extras (pure)

@pytest.mark.parametrize("name, expected", [
    ("gemma4-moe", {"mm_token_type_ids"}),
    ("gemma3", {"token_type_ids"}),
    ("qwen3_5-moe", {"mm_token_type_ids"}),
    ("llama", set()),  # text-only model: nothing to add
])
def test_text_only_extras_per_model(name, expected):
    model, _ = build_tiny_model(name)
    batch = _batch()
    extras = text_only_extras(model, batch)
    assert set(extras) == expected
    for value in extras.values():
        assert value.shape == batch["input_ids"].shape and value.dtype == batch["input_ids"].dtype
        assert int(value.abs().sum()) == 0
    if expected:
        # Same logits with and without the zeros in transformers 5.24 (train mode): the extras are harmless.
        model.train()
        with torch.no_grad():
            plain = model(**batch).logits
            with_extras = model(**batch, **extras).logits
        assert torch.equal(plain, with_extras)
        # Never overrides what the batch carries, and a batch with images is not text-only.
        key = next(iter(expected))
        assert text_only_extras(model, {**batch, key: torch.ones_like(batch["input_ids"])}) == {}
        assert text_only_extras(model, {**batch, "pixel_values": torch.zeros(1, 3, 8, 8)}) == {}


# ------------------------------------------------------------------ through a real DDP wrapper

def test_ddp_gemma4_moe_lora_same_loss_as_unwrapped(gloo, trainer_args):
    model, _ = build_tiny_model("gemma4-moe")
    peft_model = _lora(model)
    peft_model.train()
    ddp = torch.nn.parallel.DistributedDataParallel(peft_model)
    batch = _batch()
    trainer = ArchtuneTrainer(model=peft_model, args=trainer_args)

    # What users hit: the config is not reachable through the DDP wrapper ...
    with pytest.raises(AttributeError, match="config"):
        ddp.config
    # ... but through unwrapping it is, down to the transformers model under PEFT.
    assert unwrap_model(ddp) is model
    assert set(text_only_extras(ddp, batch)) == {"mm_token_type_ids"}

    loss = trainer.compute_loss(ddp, dict(batch))
    with torch.no_grad():
        reference = peft_model(**batch).loss
    assert torch.allclose(loss.detach(), reference, rtol=0, atol=1e-6)
    loss.backward()  # a real training step's backward through DDP (gloo all-reduce of the LoRA grads)
    lora_grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and torch.isfinite(g).all() for g in lora_grads)
    assert any(float(g.abs().sum()) > 0 for g in lora_grads)

    loss_eval, logits, labels = trainer.prediction_step(ddp, dict(batch), prediction_loss_only=False)
    peft_model.eval()
    with torch.no_grad():
        out = peft_model(**batch)
    assert torch.allclose(loss_eval, out.loss, rtol=0, atol=1e-6)
    assert logits.shape == (2, 12, model.config.get_text_config().vocab_size)
    assert torch.allclose(logits, out.logits, rtol=0, atol=1e-5)
    assert torch.equal(labels, batch["labels"])


def test_ddp_without_unwrapping_fails_like_users_report(gloo, trainer_args, monkeypatch):
    model = _tiny_molmo2()
    model.train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    batch = _batch()
    trainer = ArchtuneTrainer(model=model, args=trainer_args)

    loss = trainer.compute_loss(ddp, dict(batch))
    with torch.no_grad():
        reference = model(**batch, mm_token_type_ids=torch.zeros_like(batch["input_ids"])).loss
    assert torch.allclose(loss.detach(), reference, rtol=0, atol=1e-6)
    loss_eval, _, _ = trainer.prediction_step(ddp, dict(batch), prediction_loss_only=True)
    assert loss_eval is not None and torch.isfinite(loss_eval)
    # Without labels prediction_step calls the model itself (not compute_loss): extras there too.
    unlabeled = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    _, logits, _ = trainer.prediction_step(ddp, dict(unlabeled), prediction_loss_only=False)
    assert logits.shape[:2] == batch["input_ids"].shape

    # Without unwrapping, the DDP wrapper hides config and signature: nothing is supplied and the
    # model raises the error users reported.
    monkeypatch.setattr("archtune.patches.text_only.unwrap_model", lambda m: m)
    assert text_only_extras(ddp, batch) == {}
    with pytest.raises(ValueError, match="mm_token_type_ids` is required as a model input when training"):
        trainer.compute_loss(ddp, dict(batch))
    with pytest.raises(ValueError, match="mm_token_type_ids` is required as a model input when training"):
        trainer.prediction_step(ddp, dict(unlabeled), prediction_loss_only=False)
