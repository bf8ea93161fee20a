"""Peak memory of `archtune merge-lora` and `archtune export --format merged` against the checkpoint's size.

    python bench/export_memory.py --work /tmp/export-memory [--other-src DIR]

A dense Llama-shaped checkpoint (hidden 1024, MLP 2816, 12 layers, bfloat16, archtune's tokenizer)
saved as a hub checkpoint is (safetensors shards of at most 64 MB and an index), one 2-step LoRA
run on it (r 8, every linear), then as subprocesses (OMP_NUM_THREADS=2), each one's peak RSS
(real_width.py's measure: the kernel's high-water mark or the sampled process tree, the larger):
`merge-lora` (shard by shard here: a local checkpoint, linear LoRA), and `export --format merged
--prompts 2` (which also holds the trained model for the reference logits and reloads the merged
one with transformers), run by this tree's source and, with `--other-src`, by another checkout's
(a before/after in one run). `--format gguf` measures `export --format gguf --outtype OUTTYPE (f16)
--prompts 2` instead (the merge, archtune's GGUF writer, llama.cpp loading the file for the check). Printed:
one JSON line with the checkpoint's size, each peak (GiB) and each export's check.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("real_width", REPO / "bench" / "real_width.py")
real_width = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(real_width)


def build_checkpoint(directory: Path) -> Path:
    if (directory / "model.safetensors.index.json").is_file():
        return directory
    import torch
    import transformers

    from archtune.assets import load_tokenizer
    from archtune.families.base import special_token_ids

    tokenizer = load_tokenizer()
    ids = special_token_ids(tokenizer)
    config = transformers.LlamaConfig(vocab_size=ids.vocab_size, hidden_size=1024, intermediate_size=2816,
                                      num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
                                      head_dim=64, tie_word_embeddings=False, pad_token_id=ids.pad,
                                      bos_token_id=ids.bos, eos_token_id=ids.eos)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="64MB")
    tokenizer.save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--other-src", type=Path, default=None)
    parser.add_argument("--format", choices=("merged", "gguf"), default="merged")
    parser.add_argument("--outtype", default="f16", help="the GGUF file's type (--format gguf)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = build_checkpoint(args.work / "checkpoint")
    data = real_width.DATA
    config = args.work / "run.yaml"
    config.write_text(yaml.safe_dump({
        "base_model": str(checkpoint), "datasets": [{"path": str(data / "train.jsonl"), "type": "alpaca"}],
        "test_datasets": [{"path": str(data / "test.jsonl"), "type": "alpaca"}],
        "dataset_prepared_path": str(args.work / "prepared"), "sequence_len": 64, "micro_batch_size": 1,
        "max_steps": 2, "adapter": "lora", "lora_r": 8, "lora_alpha": 16,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "bf16": True, "use_tensorboard": False, "save_strategy": "no", "output_dir": str(args.work / "out")}))
    result = {"checkpoint_gib": real_width.gib(real_width.checkpoint_bytes(checkpoint))}
    if not (args.work / "out" / "adapter_model.safetensors").is_file():
        proc, _ = real_width.archtune("train", str(config))
        assert proc.returncode == 0, proc.stderr[-3000:]
    proc, peak = real_width.archtune("merge-lora", str(config), "--out", str(args.work / "merge-lora"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result["merge_lora_peak_gib"] = real_width.gib(peak)
    sources = {"this": REPO / "src"} | ({"other": args.other_src} if args.other_src else {})
    fmt = args.format
    for label, src in sources.items():
        real_width.SRC = src
        out = args.work / (f"merged-{label}" if fmt == "merged" else f"model-{label}-{args.outtype}.gguf")
        extra = ("--outtype", args.outtype) if fmt == "gguf" else ()
        proc, peak = real_width.archtune("export", str(config), "--format", fmt, *extra, "--prompts", "2",
                                         "--out", str(out), "--json")
        assert proc.returncode in (0, 2) and proc.stdout.strip(), proc.stderr[-3000:]
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        result[f"export_{fmt}_{label}_ok"] = report["ok"]
        result[f"export_{fmt}_{label}_merged_tensors"] = report["merged_tensors"]
        result[f"export_{fmt}_{label}_peak_gib"] = real_width.gib(peak)
        result[f"export_{fmt}_{label}_notes"] = report["notes"]
        result[f"export_{fmt}_{label}_max_rel_logit_diff"] = report["verification"]["max_rel_logit_diff"]
        if fmt == "gguf":
            result[f"export_gguf_{label}_file_gib"] = real_width.gib(out.stat().st_size)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
