"""Batched sampling: penalties, greedy, temperature, top-k, top-p, min-p, per-request seeds.

Each sequence owns a torch.Generator, so a seeded request draws the same tokens whether
it runs alone or batched with others. Device-agnostic: the logits stay where they are (the
GPU path's on the GPU); the generators are CPU ones, their noise moved to the logits.
"""
from __future__ import annotations

import torch

from miaotui.engine.sequence import Logprob, Sequence


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    V = logits.shape[1]
    for i, s in enumerate(seqs):
        p = s.params
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(V, dtype=torch.bool, device=logits.device)
            seen[torch.tensor(s.token_ids, dtype=torch.long, device=logits.device)] = True
            row = logits[i]
            logits[i] = torch.where(seen, torch.where(row > 0, row / p.repetition_penalty,
                                                      row * p.repetition_penalty), row)
        if (p.presence_penalty or p.frequency_penalty) and s.num_output_tokens:
            counts = torch.bincount(torch.tensor(s.output_ids, dtype=torch.long, device=logits.device),
                                    minlength=V)[:V]
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)


def _suppress_eos(logits: torch.Tensor, seqs: list[Sequence], eos_ids: set[int]) -> None:
    for i, s in enumerate(seqs):
        if s.num_output_tokens < s.params.min_tokens:
            ids = [t for t in set(s.params.stop_token_ids) | (set() if s.params.ignore_eos else eos_ids)
                   if t < logits.shape[1]]
            logits[i, ids] = float("-inf")


def _filter(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Mask one row of temperature-scaled logits to the allowed set."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p          # keep the smallest set reaching top_p
        logits = logits.index_put((idx[drop],), torch.tensor(float("-inf"), device=logits.device))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def make_logprobs(logprobs: torch.Tensor, token_id: int, k: int) -> Logprob:
    lp = logprobs[token_id].item()
    rank = int((logprobs > lp).sum().item()) + 1
    top = {}
    if k:
        vals, ids = torch.topk(logprobs, k)
        top = dict(zip(ids.tolist(), vals.tolist()))
    return Logprob(token_id, lp, rank, top)


def _exponential(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Exp(1) noise shaped like probs from the sequence's (CPU) generator: the same draws
    on every device, so a seeded request samples alike on CPU and GPU."""
    noise = torch.empty(probs.shape, dtype=probs.dtype).exponential_(generator=generator)
    return noise if probs.device.type == "cpu" else noise.to(probs.device)


class Sampler:
    def __init__(self, eos_ids: set[int]):
        self.eos_ids = eos_ids

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """logits: [B, V] float32, one row per sequence; returns the chosen token ids."""
        logits = logits.float()
        want_lp = [s.params.logprobs is not None for s in seqs]
        raw_logprobs = torch.log_softmax(logits, -1) if any(want_lp) else None
        if any(s.params.repetition_penalty != 1.0 or s.params.presence_penalty
               or s.params.frequency_penalty for s in seqs):
            logits = logits.clone()
            _apply_penalties(logits, seqs)
        if any(s.num_output_tokens < s.params.min_tokens for s in seqs):
            _suppress_eos(logits, seqs, self.eos_ids)
        constrained = [i for i, s in enumerate(seqs) if s.constraint is not None]
        if constrained:   # structured output: only the grammar's tokens (other rows untouched)
            from miaotui.engine.structured import apply_masks
            apply_masks(logits, constrained, [seqs[i].constraint for i in constrained])
        # numpy's argmax: one thread, ~6 us over a 49k vocabulary; torch's wakes its thread
        # pool and takes ~90 us, 1-2% of a small model's decode step (same first-max ties)
        tokens = (logits.numpy().argmax(-1) if logits.device.type == "cpu" else logits.argmax(-1)).tolist()
        for i, s in enumerate(seqs):
            p = s.params
            if p.greedy:
                continue
            row = _filter(logits[i] / p.temperature, p.top_k, p.top_p, p.min_p)
            probs = row.softmax(-1)
            # exponential race: argmax(p / E) with E ~ Exp(1) samples from p
            noise = _exponential(probs, s.generator)
            tokens[i] = int((probs / noise).argmax())
        if raw_logprobs is not None:
            for i, s in enumerate(seqs):
                if want_lp[i]:
                    s.logprobs.append(make_logprobs(raw_logprobs[i], tokens[i], s.params.logprobs))
        return tokens
