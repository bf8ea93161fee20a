#!/usr/bin/env python
"""How many of Axolotl's published example configs run unchanged through `archtune check` and
`archtune train max_steps=2`, with only base_model, the data and output_dir swapped for local
tiny ones. Prints one JSON object (the counts, and per config what stopped it).

Usage: python bench/axolotl_examples.py AXOLOTL_GIT_DIR WORK_DIR [--no-train] [--only=REGEX]

AXOLOTL_GIT_DIR is a clone of https://github.com/axolotl-ai-cloud/axolotl (read with `git show`;
nothing of it is copied into this repository). For each example of the families archtune
covers (examples/gemma3, gemma3n, gemma4, gemma4-unified, qwen3, qwen3.5, qwen3-next):
- base_model -> a tiny random model of the same architecture, written under WORK_DIR (archtune's
  embedded tiny models where one exists, else one built from a small transformers config); the
  Gemma 4 stand-ins' tokenizer and processor name their special tokens as Gemma 4 checkpoints do
  (`<|turn>`, `<turn|>`, `<|image>`, ...: GEMMA4_TOKENS);
- each dataset's path -> a local JSONL file of the same format (chat_template rows under its
  field_messages with its message_property_mappings, alpaca rows, preference pairs, or reward
  pairs), large enough that its split slice (`train[:1%]`) keeps the same number of rows; the rest
  of the entry (type, split, fields) unchanged; text only (rows of image datasets carry no image);
- output_dir (and dataset_prepared_path when set) -> under WORK_DIR.
Every other key stays exactly as Axolotl publishes it.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

FAMILIES = ("gemma3", "gemma3n", "gemma4", "gemma4-unified", "qwen3", "qwen3.5", "qwen3-next")
ROWS = 60


def git(git_dir: str, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, *args], check=True, capture_output=True, text=True).stdout


# ---------------------------------------------------------------- tiny models

def _small_text(cfg_cls, vocab: int, **extra):
    base = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True)
    base.update(extra)
    return cfg_cls(**base)


def _built(kind: str, vocab: int):
    """(model, None) of a tiny random model of `kind` built from a transformers config."""
    import transformers as tf

    if kind == "qwen3":
        return tf.Qwen3ForCausalLM(_small_text(tf.Qwen3Config, vocab))
    if kind == "qwen3_moe":
        return tf.Qwen3MoeForCausalLM(_small_text(tf.Qwen3MoeConfig, vocab, num_experts=4, num_experts_per_tok=2,
                                                  moe_intermediate_size=32, decoder_sparse_step=1))
    if kind == "gemma3_text":
        return tf.Gemma3ForCausalLM(_small_text(tf.Gemma3TextConfig, vocab, sliding_window=64))
    if kind == "gemma3n":
        # Gemma 3n checkpoints are image-audio-text models whose vision tower (MobileNet v5) is a timm
        # model: the stand-in is the whole model, built where timm is installed (else config.json only,
        # which is what `check` reads; train stops at the same plan error).
        text = _small_text(tf.Gemma3nTextConfig, vocab, num_hidden_layers=4, sliding_window=64,
                           hidden_size_per_layer_input=16, vocab_size_per_layer_input=vocab, num_kv_shared_layers=0,
                           laurel_rank=8, intermediate_size=[128] * 4, activation_sparsity_pattern=[0.0] * 4,
                           layer_types=["sliding_attention", "sliding_attention", "sliding_attention",
                                        "full_attention"])
        config = tf.Gemma3nConfig(text_config=text.to_dict(),
                                  vision_config={"hidden_size": 64, "vocab_size": 16, "vocab_offset": vocab},
                                  audio_config={"hidden_size": 64, "conf_num_attention_heads": 4,
                                                "conf_num_hidden_layers": 1, "sscp_conv_channel_size": [8, 8],
                                                "vocab_size": 16, "vocab_offset": vocab + 16})
        return tf.Gemma3nForConditionalGeneration(config) if tf.utils.is_timm_available() else config
    raise KeyError(kind)


def tiny_kind(base_model: str) -> str:
    """The tiny stand-in for a published checkpoint (same architecture, tiny sizes)."""
    name = base_model.lower()
    if "gemma-3n" in name:
        return "gemma3n"
    if "gemma-4-12b" in name:  # google/gemma-4-12B(-it) is Gemma 4 Unified (gemma4_unified, no towers)
        return "gemma4-unified"
    if "gemma-4" in name:
        return "gemma4-e2b" if "e2b" in name else ("gemma4-moe" if "a4b" in name else "gemma4-dense")
    if "gemma-3" in name:
        return "gemma3_text" if re.search(r"gemma-3-(1b|270m)", name) else "gemma3"
    if "qwen3-next" in name:
        return "qwen3_next"
    if "qwen3.5" in name:
        return "qwen3_5-moe" if re.search(r"a\d+b", name) else "qwen3_5"
    if "qwen3" in name:
        return "qwen3_moe" if re.search(r"a\d+b", name) else "qwen3"
    raise KeyError(base_model)


def tiny_model(kind: str, work: Path) -> str:
    out = work / "models" / kind
    if (out / "config.json").is_file():
        return str(out)
    from archtune.assets import load_tokenizer
    from archtune.models.tiny import tiny_model_names, write_tiny_model

    if kind in tiny_model_names():
        write_tiny_model(kind, out)
        if kind.startswith("gemma4"):
            gemma4_token_names(out)
        return str(out)
    import torch

    tok = load_tokenizer()
    torch.manual_seed(0)
    model = _built(kind, len(tok))
    out.mkdir(parents=True, exist_ok=True)
    from transformers import PretrainedConfig

    model.save_pretrained(out, **({} if isinstance(model, PretrainedConfig) else {"safe_serialization": True}))
    tok.save_pretrained(out)
    return str(out)


# The bundled tokenizer's special tokens under the names a Gemma 4 checkpoint's tokenizer gives them
# (google/gemma-4-E2B-it: <|turn> 105, <turn|> 106, <|image> 255999, <|image|> 258880, ...), so the
# examples' `eot_tokens: ["<turn|>"]` and chat_template gemma4 meet single tokens, as on the real
# checkpoint. Ids stay the same; only the strings change.
GEMMA4_TOKENS = {
    "<start_of_turn>": "<|turn>", "<end_of_turn>": "<turn|>",
    "<image_soft_token>": "<|image|>", "<audio_soft_token>": "<|audio|>", "<video_soft_token>": "<|video|>",
    "<start_of_image>": "<|image>", "<end_of_image>": "<image|>",
    "<start_of_audio>": "<|audio>", "<end_of_audio>": "<audio|>",
}


def gemma4_token_names(model_dir: Path) -> None:
    for path in model_dir.iterdir():
        if path.suffix in (".json", ".jinja") and path.name != "config.json":
            text = path.read_text()
            for old, new in GEMMA4_TOKENS.items():
                text = text.replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1])
            path.write_text(text)


# ---------------------------------------------------------------- data of the same format

def _conversation(i: int, role_key: str, content_key: str, roles: tuple[str, str]) -> list[dict]:
    return [{role_key: roles[0], content_key: f"What is {i} plus {i}?"},
            {role_key: roles[1], content_key: f"{i} plus {i} is {2 * i}."}]


def _rows_for(entry: dict) -> int:
    """ROWS, or enough rows that the entry's split slice (`train[:1%]`) still holds ROWS of them."""
    share = re.search(r"\[:(\d+(?:\.\d+)?)%\]", str(entry.get("split") or ""))
    return ROWS if share is None else int(ROWS * 100 / float(share.group(1)))


def local_data(entry: dict, work: Path, n: int) -> str:
    kind = str(entry.get("type", "alpaca"))
    path = work / "data" / f"{n}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(_rows_for(entry)):
        if kind.startswith("bradley_terry"):  # Axolotl's bradley_terry.chat_template: system/input/chosen/rejected
            rows.append({"system": "", "input": f"What is {i} plus {i}?", "chosen": f"{i} plus {i} is {2 * i}.",
                         "rejected": f"{i} plus {i} is {2 * i + 1}."})
        elif kind.endswith(("dpo", "chatml.intel")) or "chosen" in kind:
            rows.append({"chosen": _conversation(i, "role", "content", ("user", "assistant")),
                         "rejected": _conversation(i + 1, "role", "content", ("user", "assistant")),
                         "prompt": f"What is {i} plus {i}?"})
        elif kind == "chat_template":
            mapping = entry.get("message_property_mappings") or {}
            role_key, content_key = mapping.get("role", "role"), mapping.get("content", "content")
            roles = ("human", "gpt") if role_key == "from" else ("user", "assistant")
            rows.append({entry.get("field_messages") or "messages": _conversation(i, role_key, content_key, roles)})
        else:
            rows.append({"instruction": f"What is {i} plus {i}?", "input": "", "output": f"{2 * i}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def swapped(config: dict, work: Path, idx: int) -> dict:
    cfg = dict(config)
    cfg["base_model"] = tiny_model(tiny_kind(str(config["base_model"])), work)
    for key in ("tokenizer_config", "base_model_config"):
        if cfg.get(key):
            cfg[key] = cfg["base_model"]
    n = 0
    for key in ("datasets", "test_datasets"):
        for entry in cfg.get(key) or []:
            entry["path"] = local_data(entry, work, f"{idx}-{n}")
            n += 1
    cfg["output_dir"] = str(work / "out" / str(idx))
    if cfg.get("dataset_prepared_path"):
        cfg["dataset_prepared_path"] = str(work / "prepared" / str(idx))
    return cfg


# ---------------------------------------------------------------- running

def run(args: list[str], timeout: int) -> tuple[int, str]:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    try:
        p = subprocess.run([sys.executable, "-m", "archtune", *args], capture_output=True, text=True, timeout=timeout,
                           env=env)
        return p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired:
        return 124, "timeout"


def first_errors(output: str) -> list[str]:
    try:
        data = json.loads(output.strip().splitlines()[-1] if output.strip() else "{}")
        return [f"{e['key']}: {e['message'][:140]}" for e in data.get("errors", [])]
    except (ValueError, IndexError):
        lines = [ln for ln in output.splitlines() if ln.startswith(("error", "Traceback")) or "Error" in ln]
        return lines[:3] or output.strip().splitlines()[-3:]


def main() -> None:
    git_dir, work = sys.argv[1], Path(sys.argv[2]).resolve()
    train = "--no-train" not in sys.argv
    only = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--only=")), "")
    commit = git(git_dir, "rev-parse", "HEAD").strip()
    files = [f for f in git(git_dir, "ls-tree", "-r", "--name-only", "HEAD", "examples").split()
             if f.split("/")[1] in FAMILIES and f.endswith((".yml", ".yaml")) and re.search(only, f)]
    results = []
    for idx, f in enumerate(sorted(files)):
        config = yaml.safe_load(git(git_dir, "show", f"HEAD:{f}"))
        entry = {"example": f}
        try:
            cfg = swapped(config, work, idx)
        except Exception as exc:  # no tiny stand-in for this architecture
            entry.update(check=False, train=False, errors=[f"no tiny model: {type(exc).__name__}: {exc}"[:200]])
            results.append(entry)
            continue
        path = work / "configs" / Path(f).name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        code, out = run(["check", str(path), "--json"], 600)
        entry["check"] = code == 0
        entry["errors"] = [] if code == 0 else first_errors(out)
        if train and code == 0:
            code, out = run(["train", str(path), "max_steps=2"], 1200)
            entry["train"] = code == 0
            if code:
                entry["errors"] = first_errors(out)
        results.append(entry)
        print(json.dumps(entry), file=sys.stderr, flush=True)
    summary = {"axolotl_commit": commit, "examples": len(results), "check_passed": sum(r["check"] for r in results),
               "train_passed": sum(bool(r.get("train")) for r in results), "results": results}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
