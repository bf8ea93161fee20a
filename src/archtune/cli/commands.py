"""The `archtune` command line: each command is a thin call into the modules.

Exit codes: 0 success, 2 user error (one message naming the key or file:line and the fix;
a traceback only with --debug).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from archtune.cli.threads import PROBE, set_wait_policy
from archtune.errors import RunStopped, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune Gemma 4, Gemma 3, Qwen 3.5 MoE (and any causal LM) from one YAML file.")
console = Console(stderr=False)
err_console = Console(stderr=True)
_state = {"debug": False}

OverridesArg = typer.Argument(None, help="key=value overrides (dotted for nested keys)", show_default=False)


def _quiet_libraries() -> None:
    # Library chatter (bitsandbytes' optional-kernel probe, HF advisory warnings) hides our own output.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("bitsandbytes", "transformers", "peft", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")) -> None:
    _state["debug"] = debug
    if not debug:
        _quiet_libraries()


def _load(config: Path, overrides: Optional[list[str]]):
    from archtune.config import load_config

    return load_config(config, overrides or [])


@app.command()
def train(config: Path, overrides: Optional[list[str]] = OverridesArg,
          nproc: int = typer.Option(1, "--nproc", help="Processes (torchrun) on this node."),
          nnodes: int = typer.Option(1, "--nnodes", help="Nodes (machines) taking part; run the command on each."),
          node_rank: int = typer.Option(0, "--node-rank", help="This node's number, 0 (the master) to nnodes-1."),
          master_addr: Optional[str] = typer.Option(None, "--master-addr", help="Address of node 0 (several nodes)."),
          master_port: Optional[int] = typer.Option(None, "--master-port", help="Port on node 0 (default: a free "
                                                   "port on one node, 29500 on several)."),
          max_restarts: int = typer.Option(0, "--max-restarts", help="Restart all workers up to N times when one "
                                           "fails; they continue from the last complete checkpoint.")) -> None:
    """Fine-tune as the config says; writes weights, train_summary.json, loss.png, TensorBoard logs.

    With --nproc N (or --nnodes > 1) this starts torchrun's workers, each running this command as
    one rank; under torchrun (WORLD_SIZE set) it trains as that rank.

    Exit codes: 0 finished; 2 a user error (config, data; nothing in output_dir touched); 3 a NaN/Inf
    loss or gradient norm (the step was not applied); 4 a rank made no progress for ddp_timeout
    seconds (or was lost); 75 stopped by SIGTERM/SIGINT with a checkpoint (resume_from_checkpoint:
    true continues).
    """
    from archtune.train import distributed

    if not distributed.is_distributed():  # once: in the process that starts the run, not in each worker
        _warn_about_the_environment()
    if not distributed.is_distributed() and (nproc != 1 or nnodes != 1 or max_restarts):
        from archtune.train.launch import launch

        from archtune.models.load import resolve_plan

        # A bad config or a refused plan is reported once, here, before any worker starts.
        resolve_plan(_load(config, overrides), world_size=nproc * nnodes).raise_errors()
        code = launch(config, list(overrides or []), nproc=nproc, nnodes=nnodes, node_rank=node_rank,
                      master_addr=master_addr, master_port=master_port, max_restarts=max_restarts,
                      debug=_state["debug"])
        if code:
            sys.exit(code)
        return
    from archtune.train.recipe import train as run_train

    cfg = _load(config, overrides)
    summary = run_train(cfg, console=console if distributed.is_main() else None)
    if distributed.is_main():
        _print_train_summary(summary, cfg.output_dir)


def _warn_about_the_environment() -> None:
    # Libraries outside their verified ranges, patches whose upstream changed (`check` lists them too).
    from archtune.diagnostics.environment import environment_warnings

    for warning in environment_warnings():
        err_console.print(f"[bold yellow]warning[/] {escape(warning)}", highlight=False, soft_wrap=True)


def _fmt(v, digits=4):
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _print_train_summary(s: dict, output_dir: str) -> None:
    table = Table(title="archtune: training finished", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("family", f"{s['family']} ({s['model_type']}), {s['adapter'] or 'full fine-tune'}")
    if s.get("method") == "grpo":  # online RL: rewards instead of a loss
        table.add_row("method", f"grpo ({s['trainer']}, reference: {s['reference_model']}, rollouts: "
                      f"{s['rollout_backend']})")
        table.add_row("training reward", f"{_fmt(s.get('reward_mean_first'))} -> {_fmt(s.get('reward_mean_last'))}")
        if "eval_reward_mean" in s:
            table.add_row("held-out reward (greedy)",
                          f"{_fmt(s.get('eval_reward_mean_initial'))} -> {_fmt(s.get('eval_reward_mean'))}")
        table.add_row("time", f"rollouts {s['rollout_seconds']:.1f} s, updates {s['update_seconds']:.1f} s")
    elif s.get("method"):  # preference / reward training: held-out rewards instead of a loss
        table.add_row("method", f"{s['method']} ({s['trainer']}, reference: {s['reference_model']})")
        for key in ("rewards/accuracies", "rewards/margins"):
            table.add_row(f"held-out {key}", f"{_fmt(s.get(f'eval_{key}_initial'))} -> {_fmt(s.get(f'eval_{key}'))}")
    else:
        table.add_row("eval loss", f"{_fmt(s['eval_loss_initial'])} -> {_fmt(s['eval_loss_final'])}")
    table.add_row("train loss", f"{_fmt(s['train_loss_first'])} -> {_fmt(s['train_loss_last'])}")
    table.add_row("steps", str(s["steps"]))
    table.add_row("tokens/s", f"{_fmt(s['tokens_per_second'], 0)} ({s['train_tokens']} tokens in {s['train_seconds']:.1f} s)")
    table.add_row("params", f"{s['trainable_params']:,} trainable of {s['total_params']:,}")
    table.add_row("outputs", f"{output_dir}/ (weights, train_summary.json, loss.png, runs/)")
    console.print(table)


@app.command()
def check(config: Path, overrides: Optional[list[str]] = OverridesArg,
          as_json: bool = typer.Option(False, "--json", help="Print the Plan as one JSON object."),
          nproc: int = typer.Option(1, "--nproc", help="Resolve as for N processes per node (DDP/FSDP decisions)."),
          nnodes: int = typer.Option(1, "--nnodes", help="Resolve as for this many nodes, and show what each runs."),
          master_addr: Optional[str] = typer.Option(None, "--master-addr", help="Address of node 0, for the "
                                                    "command lines shown (several nodes)."),
          master_port: Optional[int] = typer.Option(None, "--master-port", help="Port on node 0, for the command "
                                                    "lines shown (default 29500 on several nodes)."),
          probe: bool = typer.Option(False, "--probe", help="Also load the model and run the consistency probe."),
          memory: bool = typer.Option(False, "--memory", help="Estimate the memory per device (from config.json, "
                                      "no weights loaded)."),
          gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Warn when the estimate exceeds this "
                                                   "(e.g. 80GiB; default: the detected GPU's memory); implies --memory.")
          ) -> None:
    """Resolve the Plan without loading weights: what the family and auto-detection set, and why.
    With --nproc / --nnodes: the plan for that world, and what each node runs."""
    from archtune.cli.check import (check_plan, error_json, launch_json, memory_check, render_launch, render_memory,
                                    render_plan, render_verdict)
    from archtune.train.launch import node_layout

    nodes: list[dict] = []
    try:
        nodes = node_layout(config, list(overrides or []), nproc=nproc, nnodes=nnodes, master_addr=master_addr,
                            master_port=master_port)
        cfg = _load(config, overrides)
        plan = check_plan(cfg, world_size=nproc * nnodes)
    except UserError as exc:
        if not as_json or _state["debug"]:
            raise
        out = error_json(exc, world_size=max(nproc, 1) * max(nnodes, 1))  # the same shape, errors filled
        out["launch"] = launch_json(None, nodes, nproc, nnodes)
        print(json.dumps(out, default=str))
        sys.exit(2)
    launch = launch_json(plan, nodes, nproc, nnodes)
    estimate = memory_check(plan, gpu_memory) if (memory or gpu_memory) and not plan.errors else None
    if not as_json:
        render_plan(plan, console)
        if plan.world_size > 1:
            render_launch(launch, console)
        if estimate is not None:
            render_memory(estimate, console)
    if probe and not plan.errors:
        _probe(cfg, plan, err_console if as_json else console, report=not as_json)
    if as_json:
        out = {**plan.to_json(), "launch": launch}
        if estimate is not None:
            out["memory"] = estimate.to_json()
        print(json.dumps(out, default=str))
    else:
        render_verdict(plan, console)
    if plan.errors:
        sys.exit(2)


def _probe(cfg, plan, out: Console, report: bool) -> None:
    """Load the model and run the consistency probe; its problems become the plan's errors.

    The probe prints its own report to `out`; it returns a list of Problems, or a result with
    `.problems` (errors) and `.warnings`.
    """
    try:
        from archtune.diagnostics.consistency import run_probe
    except ImportError as exc:
        plan.error("--probe", f"the consistency probe is not available in this build ({exc})", "run without --probe")
        if report:
            err = plan.errors[-1]
            out.print(f"[bold red]error[/] {escape(str(err))}", highlight=False)
        return
    result = run_probe(cfg, plan, out)
    plan.errors.extend(getattr(result, "problems", result) or [])
    plan.warnings.extend(getattr(result, "warnings", None) or [])


@app.command()
def preprocess(config: Path, overrides: Optional[list[str]] = OverridesArg,
               as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON.")) -> None:
    """Tokenize, validate and cache the data; print statistics."""
    from archtune.data import prepare_data
    from archtune.train.recipe import plan_for

    cfg = _load(config, overrides)
    setup = plan_for(cfg)
    if setup.plan.preference.grpo:  # rl: grpo reads prompts (your transforms run here)
        from archtune.data.grpo import prepare_grpo_data

        data = prepare_grpo_data(setup.plan, setup.tokenizer, progress=not as_json)
    else:
        data = prepare_data(setup.plan, setup.tokenizer, progress=not as_json, media=setup.media)
    if as_json:
        print(json.dumps(data.stats))
        return
    table = Table(title="archtune preprocess", show_header=False, title_justify="left")
    for k, v in data.stats.items():
        table.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
    console.print(table)


@app.command()
def evaluate(config: Path, overrides: Optional[list[str]] = OverridesArg,
             as_json: bool = typer.Option(False, "--json", help="Print {eval_loss, eval_tokens, eval_rows}.")) -> None:
    """Token-weighted mean loss over the evaluation data, with the trained weights if any (rl and
    reward_model configs: also the held-out rewards, accuracy and margin)."""
    from archtune.data import prepare_data
    from archtune.train.assembly import assemble_model
    from archtune.train.evaluation import token_weighted_loss
    from archtune.train.recipe import data_collator, plan_for

    cfg = _load(config, overrides)
    setup = plan_for(cfg)
    if setup.plan.preference.grpo:  # rl: grpo: the mean reward on the held-out prompts
        from archtune.train.grpo import evaluate_grpo

        result, weights = evaluate_grpo(setup.plan, setup.tokenizer, progress=not as_json)
        result = {"eval_loss": None, "eval_tokens": None, **result}
        if as_json:
            print(json.dumps(result))
        else:
            console.print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()
                                    if v is not None) + f" ({weights} weights)")
        return
    if setup.plan.preference.trainer:  # rl / reward_model: held-out rewards
        from archtune.train.preference import evaluate_preference

        result, weights = evaluate_preference(setup.plan, setup.tokenizer, progress=not as_json)
        if as_json:
            print(json.dumps(result))
        else:
            console.print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())
                          + f" ({weights} weights)")
        return
    data = prepare_data(setup.plan, setup.tokenizer, progress=not as_json, media=setup.media)
    if data.eval is None:
        raise UserError.single("test_datasets", "there is no evaluation data",
                               "set test_datasets, or val_set_size > 0")
    built = assemble_model(setup.plan, setup.tokenizer, "evaluate")
    result = token_weighted_loss(built.model, data.eval, data_collator(setup), setup.plan.training.micro_batch_size)
    if as_json:
        print(json.dumps(result))
    else:
        console.print(f"eval_loss {result['eval_loss']:.4f} over {result['eval_tokens']} tokens, "
                      f"{result['eval_rows']} rows ({built.weights} weights)")


@app.command()
def generate(config: Path, prompt: str = typer.Option(..., "--prompt", help="The user prompt (alpaca: the instruction)."),
             input_text: str = typer.Option("", "--input", help="alpaca: the input block."),
             overrides: Optional[list[str]] = OverridesArg,
             image: Optional[list[Path]] = typer.Option(None, "--image", help="An image for the prompt (repeatable)."),
             max_new_tokens: int = typer.Option(64, "--max-new-tokens")) -> None:
    """Greedy generation with the trained weights, the prompt rendered as the first dataset's format
    (with --image: one user turn holding the images, then the prompt)."""
    import torch

    from archtune.data import encode_prompt
    from archtune.models.load import autocast_dtype
    from archtune.train.assembly import assemble_model
    from archtune.train.recipe import plan_for

    cfg = _load(config, overrides)
    setup = plan_for(cfg)
    inputs = _image_prompt(cfg, setup, prompt, image) if image else None
    built = assemble_model(setup.plan, setup.tokenizer, "generate")
    model, kind = built.model, built.weights
    # A turn ends at eot_tokens too, whatever the checkpoint's generation_config lists.
    stops = setup.tokenizer.convert_tokens_to_ids(list(setup.plan.data.eot_tokens))
    if inputs is None and setup.plan.preference.grpo:  # one user turn, as GRPO's prompts
        from archtune.train.grpo import prompt_ids

        ids = prompt_ids(setup.tokenizer, [[{"role": "user", "content": prompt}]], setup.plan.grpo.chat_template_kwargs)[0]
        inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    elif inputs is None:
        ids = encode_prompt(cfg.datasets[0], setup.tokenizer, prompt, input_text=input_text)
        inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    # bf16/fp16 runs trained under autocast, and QLoRA keeps some weights (routers, norms) in
    # float32 beside 16-bit activations: generate under the same autocast.
    half = autocast_dtype(setup.plan)
    device = next(model.parameters()).device.type
    with torch.autocast(device, dtype=half, enabled=half is not None):
        text, end = generate_from_inputs(model, setup.tokenizer, inputs, max_new_tokens, stop_ids=stops)
    shown = "".join(f"\n[bold]image:[/]  {p}" for p in image or ())
    console.print(f"[bold]prompt:[/] {prompt}" + (f"\n[bold]input:[/]  {input_text}" if input_text else "") + shown)
    ended = f"ended at {escape(end)}" if end else f"cut at --max-new-tokens {max_new_tokens}"
    console.print(f"[bold]output:[/] {text}   [dim]({kind} weights; {ended})[/]")


def _image_prompt(cfg, setup, prompt: str, paths: list[Path]) -> dict:
    from archtune.data.formats import prompt_inputs
    from archtune.data.media import MediaRefused

    media = setup.media.processor
    if media is None:
        raise UserError.single("--image", f"this run cannot read images: {setup.media.refusal}",
                               "give a multimodal base_model with its processor files (or processor_type)")
    images = []
    for path in paths:
        try:
            images.append(Path(path).read_bytes())
        except OSError as exc:
            raise UserError.single("--image", f"cannot read {path}: {exc.strerror or exc}", "give an image file") from None
    try:
        from archtune.data.row_errors import RowError

        return prompt_inputs(media, setup.tokenizer, prompt, images, setup.plan.data.chat_template)
    except (RowError, MediaRefused) as exc:
        raise UserError.single("--image", str(exc), "give a PNG/JPEG/WebP image the model's processor reads") from None


def generate_text(model, tokenizer, ids: list[int], max_new_tokens: int, stop_ids: list[int] = ()) -> str:
    """Greedy continuation of the prompt ids, decoded without special tokens."""
    import torch

    input_ids = torch.tensor([ids])
    return generate_from_inputs(model, tokenizer, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)},
                                max_new_tokens, stop_ids)[0]


def generate_from_inputs(model, tokenizer, inputs: dict, max_new_tokens: int,
                         stop_ids: list[int] = ()) -> tuple[str, str | None]:
    """Greedy continuation of a batch of one (input_ids plus any image inputs), stopping at the
    generation config's eos ids and `stop_ids`: the text decoded without special tokens, and the
    token it ended at (None: cut at max_new_tokens)."""
    import torch

    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    model.eval()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=eos + [i for i in stop_ids if i not in eos] or None)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    stops = set(eos) | set(stop_ids)
    end = tokenizer.convert_ids_to_tokens(new[-1]) if new and new[-1] in stops else None
    return tokenizer.decode(new, skip_special_tokens=True).strip(), end


@app.command("merge-lora")
def merge_lora(config: Path, overrides: Optional[list[str]] = OverridesArg,
               out: Optional[Path] = typer.Option(None, "--out", help="Default: OUTPUT_DIR/merged.")) -> None:
    """Merge the trained LoRA adapter into the base weights; the result loads with transformers alone."""
    from archtune.train.assembly import merge_adapter
    from archtune.train.recipe import plan_for

    cfg = _load(config, overrides)
    setup = plan_for(cfg)
    target = out or Path(cfg.output_dir) / "merged"
    report = merge_adapter(setup.plan, setup.tokenizer, target)  # a 4-bit base: its values through 4 bits and back
    setup.tokenizer.save_pretrained(str(target))
    how = "shard by shard" if report.streamed else f"in memory ({report.why_in_memory})"
    console.print(f"{report.sentence()}, {how}; merged model written to {target}")


@app.command("export")
def export_command(config: Path, overrides: Optional[list[str]] = OverridesArg,
                   fmt: Optional[str] = typer.Option(None, "--format", help="gguf, merged or adapter (default: the "
                                                     "config's export.format, else gguf)."),
                   outtype: Optional[str] = typer.Option(None, "--outtype", help="f32, f16, bf16 or q8_0 (gguf; "
                                                         "default f16), f32/f16/bf16 for merged."),
                   quantize: Optional[list[str]] = typer.Option(None, "--quantize", help="GGUF: also write this "
                                                                "llama.cpp type, e.g. Q4_K_M (repeatable)."),
                   out: Optional[Path] = typer.Option(None, "--out", help="The file (gguf) or directory "
                                                      "(default: OUTPUT_DIR/export/...)."),
                   prompts: int = typer.Option(8, "--prompts", help="Held-out prompts the artifact is checked on."),
                   as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object.")) -> None:
    """Write the trained model as GGUF, merged weights or an adapter, load it back in its runtime and
    check it computes what the trained model computes (exit 2 when it does not)."""
    from archtune.export import export, settings_from
    from archtune.train.recipe import plan_for

    cfg = _load(config, overrides)
    setup = plan_for(cfg)
    settings = settings_from(setup.plan, format=fmt, outtype=outtype, quantize=quantize, out=out, prompts=prompts)
    say = (lambda _: None) if as_json else (lambda text: console.print(escape(text), highlight=False))
    report = export(setup.plan, setup.tokenizer, settings, log=say)
    if as_json:
        print(json.dumps(report.to_json()))
    else:
        _print_export_report(report)
    if not report.ok:
        err_console.print(f"[bold red]error[/] {escape(_export_failure(report))}", highlight=False, soft_wrap=True)
        sys.exit(2)


def _print_export_report(report) -> None:
    if report.merged_tensors is not None:
        console.print(report.merged_tensors.sentence() + ("" if report.format != "adapter" else " (applied by PEFT)"))
    table = Table(title=f"archtune export: {report.format} -> {report.path}", title_justify="left")
    for column in ("file", "type", "max |diff|", "rel. (tol.)", "greedy"):
        table.add_column(column, overflow="fold")
    for v, path in zip(report.verifications, report.files):
        table.add_row(Path(path).name, v.outtype, f"{v.max_abs_logit_diff:.2g}",
                      f"{v.max_rel_logit_diff:.2g} ({v.allowed:.2g})", f"{v.greedy_agree}/{len(v.prompts)}",
                      style=None if v.ok else "red")
    console.print(table)
    noise = max((v.reference_noise for v in report.verifications), default=0.0)
    if noise:
        console.print(f"tol. = the type's tolerance + {noise:.2g}, the trained model's own 16-bit arithmetic "
                      "against float32 on these prompts")
    runtimes = sorted({v.runtime for v in report.verifications})
    console.print(f"checked in {', '.join(runtimes)} against the trained model on held-out prompts "
                  f"({report.prompt_source}); greedy: prompts whose argmax agrees wherever the trained model's "
                  "choice is clear")
    for note in report.notes + [n for v in report.verifications for n in v.notes]:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)


def _export_failure(report) -> str:
    parts = []
    count = report.merged_tensors
    if count is not None and not count.ok:
        shown = ", ".join(count.missing[:5]) + (" ..." if len(count.missing) > 5 else "")
        parts.append(f"{count.sentence()}; not merged: {shown}")
    layout = report.serving_layout
    if layout is not None and not layout.ok:
        shown = ", ".join(layout.mismatched[:5]) + (" ..." if len(layout.mismatched) > 5 else "")
        parts.append(f"{layout.sentence()}; read otherwise: {shown} (vLLM's 3D loader needs gate_up_proj and "
                     "down_proj LoRA on each experts module, in PEFT's [E, out, in] orientation)")
    for v, path in zip(report.verifications, report.files):
        if not v.ok:
            parts.append(f"{Path(path).name} ({v.runtime}, {v.outtype}): max relative logit difference "
                         f"{v.max_rel_logit_diff:.3g} (allowed {v.allowed:.3g}), greedy tokens agree on "
                         f"{v.greedy_agree} of {len(v.prompts)} prompts")
    return ("the exported model does not compute what the trained model computes: " + "; ".join(parts)
            + ". Fix: report this with the JSON report (--json); do not serve this file")


@app.command("scan-weights")
def scan_weights(model_dir: Path,
                 rule: list[str] = typer.Option(..., "--rule", help="PATTERN=THRESHOLD, e.g. 'linear_attn\\.conv1d\\.weight=1.3' (repeatable)."),
                 fix: Optional[Path] = typer.Option(None, "--fix", help="Write a repaired copy of the model here."),
                 as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")) -> None:
    """Find tensors whose std drifted from their peers' median (and rescale them into --fix)."""
    from archtune.diagnostics.scan_weights import parse_rule_arg, scan_model_dir
    from archtune.models.weight_scales import render_table

    result = scan_model_dir(model_dir, [parse_rule_arg(r) for r in rule], fix_out_dir=fix)
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    console.print(render_table(result))
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    if fix is not None:
        console.print(f"repaired model written to {fix} ({result.n_rescaled} tensors rescaled)")


@app.command("init-tiny")
def init_tiny(name: str, directory: Path, seed: int = typer.Option(0, "--seed")) -> None:
    """Write a tiny random model of a family (config, safetensors, tokenizer)."""
    from archtune.models.tiny import tiny_model_names, write_tiny_model

    if name not in tiny_model_names():
        raise UserError.single("NAME", f"no tiny model named {name!r}", f"use one of: {', '.join(tiny_model_names())}")
    write_tiny_model(name, directory, seed=seed)
    console.print(f"tiny {name} written to {directory}")


@app.command("docs")
def docs_command(check_only: bool = typer.Option(False, "--check", help="Only verify the file is up to date (exit 2 if not)."),
                 out: Optional[Path] = typer.Option(None, "--out", help="The file to write or check "
                                                    "(default: docs/model_architectures.md of this checkout).")) -> None:
    """Regenerate docs/model_architectures.md from the family registry (or verify it with --check)."""
    from archtune.docs import default_output, docs_diff, write_docs

    path = out or default_output()
    if out is None and not path.parent.is_dir():
        raise UserError.single("--out", f"no docs/ directory next to the archtune sources ({path.parent})",
                               "pass --out PATH (archtune is installed outside a source checkout)")
    if check_only:
        if not path.is_file():
            raise UserError.single(str(path), "does not exist", "run `archtune docs` (and commit the file)")
        diff = docs_diff(path)
        if diff:
            shown = diff[:40]
            err_console.print("\n".join(shown) + ("\n..." if len(diff) > len(shown) else ""), markup=False,
                              highlight=False, soft_wrap=True)
            raise UserError.single(str(path), "is out of date: it differs from what the family registry and "
                                   "rules generate (diff above)", "run `archtune docs` (and commit the file); "
                                   "never edit it by hand")
        console.print(f"{path} is up to date")
        return
    write_docs(path)
    console.print(f"wrote {path}")


def main() -> None:
    # How idle OpenMP threads wait: spin on idle CPUs, sleep when other processes keep them busy
    # (spinning there measured 311 vs 7,527 tokens/s on the quickstart, 2 cores). Before torch loads.
    set_wait_policy(PROBE)
    from archtune.train.launch import record_exit

    try:
        app(standalone_mode=False)
        record_exit(0)
    except UserError as exc:
        record_exit(2)
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except RunStopped as exc:
        record_exit(exc.exit_code)
        if _state["debug"]:
            raise
        if exc.message:  # empty on the ranks other than 0 when rank 0 speaks for all
            err_console.print(escape(exc.message), highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        record_exit(code if isinstance(code, int) else 1)
        sys.exit(code if isinstance(code, int) else 1)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:
        if isinstance(exc, _click_exception_classes()):  # usage errors: click's one-line message
            exc.show()
            sys.exit(2)
        raise


def _click_exception_classes() -> tuple[type, ...]:
    """The ClickException class typer raises usage errors with: from typer 0.29 on, typer's own
    copy of click (typer._click), before it the click package; both where both are installed."""
    classes = [cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException"]
    try:
        import click

        classes.append(click.ClickException)
    except ImportError:  # typer >= 0.29 needs no click
        pass
    return tuple(classes)


if __name__ == "__main__":
    main()
