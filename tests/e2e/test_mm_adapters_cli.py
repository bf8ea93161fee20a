"""Training the multimodal parts on image rows through the CLI (tiny Gemma 4): LoRA inside the
vision tower through an explicit regex (PEFT rejects Gemma4ClippableLinear; the family's redirect
puts the adapter on its inner linear), and a full fine-tune of the projector alone."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.e2e.conftest import read_json, run_cli, vision_rows, write_config

TOWER = "model.vision_tower."
PROJECTOR = "model.embed_vision."
SEED = 5


def _config(tmp: Path, **keys) -> Path:
    train = tmp / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in vision_rows("train.jsonl", 10)))  # row 10: text only
    return write_config(tmp / "config.yaml", base_model="tiny:gemma4-dense",
                        datasets=[{"path": str(train), "type": "chat_template"}], sequence_len=128,
                        micro_batch_size=5, max_steps=3, seed=SEED, output_dir=str(tmp / "out"),
                        dataset_prepared_path=str(tmp / "prepared"), use_tensorboard=False, **keys)


def _base_state() -> dict[str, torch.Tensor]:
    from archtune.models.tiny import build_tiny_model

    model, _ = build_tiny_model("gemma4-dense", seed=SEED)  # the weights the run started from
    return model.state_dict()


def test_lora_inside_the_vision_tower_trains_its_adapters_only(tmp_path, capsys):
    regex = (r"model\.vision_tower\..*\.self_attn\.(q|k|v|o)_proj"
             r"|model\.language_model\.layers\.\d+\.self_attn\.(q|v)_proj")
    config = _config(tmp_path, adapter="lora", lora_r=4, lora_alpha=8, lora_target_modules=regex,
                     freeze_mm_modules=False, learning_rate=0.01)
    code, out, err = run_cli(capsys, "train", config)
    assert code == 0, err
    summary = read_json(tmp_path / "out" / "train_summary.json")
    assert summary["data"]["image_rows"]["train"] == 9
    adapter = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    tower = {k: v for k, v in adapter.items() if TOWER in k}
    # On the inner linear of each Gemma4ClippableLinear (q, k, v, o of the one tower layer), A and B.
    assert sorted({k.split(".lora_")[0].rsplit(".", 2)[-2:][0] for k in tower}) == ["k_proj", "o_proj", "q_proj",
                                                                                     "v_proj"]
    assert len(tower) == 8 and all(".linear.lora_" in k for k in tower)
    # B starts at zero: nonzero B means the tower's adapters trained.
    assert all(torch.count_nonzero(v) > 0 for k, v in tower.items() if ".lora_B." in k)
    # Exactly the adapter's tensors were trainable: no base weight of the tower (or elsewhere) was.
    assert summary["trainable_params"] == sum(v.numel() for v in adapter.values())


def test_full_fine_tune_of_the_projector_alone(tmp_path, capsys):
    config = _config(tmp_path, unfrozen_parameters=[PROJECTOR + "*"], learning_rate=0.01)
    code, out, err = run_cli(capsys, "train", config)
    assert code == 0, err
    summary = read_json(tmp_path / "out" / "train_summary.json")
    trained = load_file(str(tmp_path / "out" / "model.safetensors"))
    base = _base_state()
    projector = [k for k in trained if k.startswith(PROJECTOR)]
    assert projector and summary["trainable_params"] == sum(trained[k].numel() for k in projector)
    assert all(not torch.equal(trained[k], base[k]) for k in projector)  # every projector weight moved
    others = [k for k in trained if not k.startswith(PROJECTOR)]
    assert [k for k in others if k.startswith(TOWER)] and all(torch.equal(trained[k], base[k]) for k in others)


def test_lora_target_linear_keeps_axolotls_intent_without_the_trap(tmp_path, capsys):
    """`lora_target_linear: true` on image rows: with the towers frozen (the default) every linear
    layer of the language model gets an adapter and no tower does, `check` says so; with
    `freeze_mm_modules: false` the towers' linears are adapted too (as Axolotl does) and train."""
    from archtune.models.tiny import build_tiny_model

    model, _ = build_tiny_model("gemma4-dense")
    lm_linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.language_model.")}
    for name, keys in (("frozen", {}), ("towers", {"freeze_mm_modules": False})):
        (tmp_path / name).mkdir()
        config = _config(tmp_path / name, adapter="lora", lora_r=4, lora_alpha=8, lora_target_linear=True,
                         learning_rate=0.01, **keys)
        code, out, err = run_cli(capsys, "check", config, "--json")
        assert code == 0, out + err
        report = json.loads(out)
        assert report["errors"] == [] and report["settings"]["lora_target_modules"]["value"] == "all-linear"
        code, out, err = run_cli(capsys, "train", config)
        assert code == 0, err
        adapter = load_file(str(tmp_path / name / "out" / "adapter_model.safetensors"))
        adapted = {k.split(".lora_")[0].replace("base_model.model.", "", 1) for k in adapter if ".lora_" in k}
        tower = {k for k in adapted if k.startswith((TOWER, PROJECTOR))}
        if name == "frozen":
            assert "the language model" in report["settings"]["lora_target_modules"]["reason"]
            assert adapted == lm_linears and not tower
        else:
            assert any("puts LoRA adapters in the vision/audio towers" in w for w in report["warnings"])
            assert adapted - tower == lm_linears and {k for k in tower if k.startswith(TOWER)}
            assert all(torch.count_nonzero(v) > 0 for k, v in adapter.items() if TOWER in k and ".lora_B." in k)
