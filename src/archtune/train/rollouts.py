"""Seeded rollouts: every completion is sampled from a random stream of its own.

`model.generate` samples a batch with one `torch.multinomial` call on the process's global RNG, so
the tokens a prompt gets depend on which rows share its batch and on the process that generates
it: 2 DDP processes sample other completions than one process with the same global batch. Here
each completion (a row of the generation batch) gets uniforms from a generator seeded by (the
run's seed, the stream, the optimizer step, the row's index in the global generation batch), and
its next token is drawn from its own distribution (inverse CDF of the warped probabilities). The
completion then depends only on its prompt, the weights and those numbers: the same on 1 or N
processes, in any batch, and after a resume (the seed comes from the step, not from RNG state).
"""
from __future__ import annotations

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

TRAINING_STREAM, EVALUATION_STREAM = 0, 1


def completion_seeds(seed: int, stream: int, step: int, first: int, count: int) -> list[int]:
    """One seed per row `first .. first + count - 1` of the global batch of `step`."""
    return [int(np.random.SeedSequence([seed, stream, step, first + i]).generate_state(1, np.uint64)[0])
            for i in range(count)]


class NonFiniteProbabilities(RuntimeError):
    """The next-token probabilities of a row are not finite (inf or nan weights or activations):
    what torch.multinomial refuses in the unseeded path."""


class SeededSampler(LogitsProcessor):
    """Draws each row's next token from the warped distribution with that row's own uniform and
    returns scores that put all the mass on it, so the sampling (or greedy) step of `generate`
    picks exactly that token. Rows are left-padded to `start` tokens; the k-th new token of a row
    uses its k-th uniform, whatever else is in the batch."""

    def __init__(self, seeds: list[int], max_new_tokens: int, start: int, generation_config):
        self.start = start
        self.uniforms = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(s),
                                                dtype=torch.float64) for s in seeds])
        self.warpers = LogitsProcessorList(warpers(generation_config))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.start
        probs = torch.softmax(self.warpers(input_ids, scores).double(), dim=-1)
        cdf = probs.cumsum(-1)
        if not torch.isfinite(cdf[:, -1]).all():
            raise NonFiniteProbabilities("the next-token probabilities are not finite (inf or nan)")
        u = self.uniforms[:, step].to(cdf.device) * cdf[:, -1]
        # right=True: the first token whose cumulative mass exceeds u, never one with zero mass.
        token = torch.searchsorted(cdf, u[:, None], right=True).clamp(max=scores.shape[-1] - 1)
        return torch.full_like(scores, -torch.inf).scatter_(1, token, 0.0)


def warpers(config) -> list:
    """The sampling warpers `generate` applies for `config`, in its order (temperature, top-k,
    top-p, min-p); the seeded sampler applies them before it draws."""
    out = []
    if config.temperature is not None and config.temperature != 1.0:
        out.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k is not None and config.top_k != 0:
        out.append(TopKLogitsWarper(top_k=config.top_k))
    if config.top_p is not None and config.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=config.top_p))
    if config.min_p is not None:
        out.append(MinPLogitsWarper(min_p=config.min_p))
    return out


@torch.no_grad()
def generate_completions(model, prompts: list[list[int]], generation_config, *, seeds: list[int] | None, device,
                         extras=None, eos: list[int] | None = None) -> list[list[int]]:
    """Completion token ids of `prompts` (token lists): left-padded, generated together with the KV
    cache (`generation_config` holds the pad and eos ids), each cut after its first eos id (of `eos`,
    when given: the ids the trainer cuts at). With `seeds` (one per prompt) every row samples from its
    own stream (SeededSampler); without, `generation_config` decides (greedy for evaluation).
    `extras(model, batch)`: more inputs the model's forward needs (multimodal wrappers)."""
    pad = generation_config.pad_token_id
    if eos is None:
        eos = generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos)
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if extras is not None:
        batch.update(extras(model, batch))
    processors = LogitsProcessorList()
    if seeds is not None:
        processors.append(SeededSampler(seeds, generation_config.max_new_tokens, width, generation_config))
    out = model.generate(**batch, generation_config=generation_config, logits_processor=processors)
    completions = []
    for row in out[:, width:].tolist():
        cut = next((i for i, tok in enumerate(row) if tok in eos), None)
        completions.append(row[: cut + 1] if cut is not None else row)
    return completions


__all__ = ["EVALUATION_STREAM", "TRAINING_STREAM", "NonFiniteProbabilities", "SeededSampler", "completion_seeds", "generate_completions",
           "warpers"]
