"""Gemma 4's turn markers as Axolotl's Gemma 4 examples write them (`chat_template: gemma4`,
`eot_tokens: ["<turn|>"]`) on a stand-in whose tokenizer has Gemma 4's real `<|turn>` and `<turn|>`
tokens: the closing `<turn|>` of each answer is a label (axolotl#3754: a masked terminator trains a
model that never stops), and after SFT generation ends at the turn end."""
from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.conftest import read_json, run_cli, write_config


def gemma4_turn_model(out: Path) -> Path:
    """A tiny Gemma 4 directory whose tokenizer carries Gemma 4's turn tokens (at the ids the bundled
    tokenizer gives its own turn markers) and whose generation_config stops only at <eos>, as a
    base checkpoint's may."""
    from archtune.models.tiny import write_tiny_model

    write_tiny_model("gemma4-dense", out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        text = (out / name).read_text().replace("<start_of_turn>", "<|turn>").replace("<end_of_turn>", "<turn|>")
        (out / name).write_text(text)
    gen = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [gen["eos_token_id"][0]]}))
    return out


def test_gemma4_turn_end_is_trained_and_generation_stops_there(tmp_path, capsys):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    model = gemma4_turn_model(tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(model)
    turn_end, answer = tok.convert_tokens_to_ids("<turn|>"), tok("blue", add_special_tokens=False)["input_ids"]
    rows = [{"messages": [{"role": "user", "content": f"Name a color, {i}."}, {"role": "assistant", "content": "blue"}]}
            for i in range(32)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = write_config(
        tmp_path / "config.yaml", base_model=str(model), chat_template="gemma4", eot_tokens=["<turn|>"],
        datasets=[{"path": str(tmp_path / "train.jsonl"), "type": "chat_template"}], sequence_len=64,
        adapter="lora", lora_r=8, lora_alpha=16, micro_batch_size=8, max_steps=12, learning_rate=0.01,
        output_dir=str(tmp_path / "out"), dataset_prepared_path=str(tmp_path / "prepared"), use_tensorboard=False)
    code, out, err = run_cli(capsys, "check", config, "--json")
    assert code == 0 and json.loads(out)["errors"] == [], out + err
    code, out, err = run_cli(capsys, "train", config)
    assert code == 0, err
    summary = read_json(tmp_path / "out" / "train_summary.json")
    train = load_from_disk(str(Path(summary["data"]["cache_dir"]) / "train"))
    for row in train:  # the answer and its closing <turn|> carry loss, nothing else
        assert [t for t in row["labels"] if t != -100] == answer + [turn_end]
    code, out, err = run_cli(capsys, "generate", config, "--prompt", "Name a color, 99.", "--max-new-tokens", "8")
    assert code == 0, err
    text, ended = out.split("output:", 1)[1].split("(adapter weights; ")
    assert text.strip() == "blue" and ended.startswith("ended at <turn|>"), out
