"""Sliding-window perplexity through the engine (prompt log-probs), so that every
optimisation can report its effect on quality.

Windows of `window` tokens start every `stride` tokens; each window scores only the
tokens the previous one did not (all but its first token for the first window), with
the rest of the window as context (with stride == window a window's first token has no
context and is skipped). Perplexity = exp(mean negative log-likelihood).
"""
from __future__ import annotations

import math
import sys
import time

from miaotui.sampling_params import SamplingParams


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) per window: score the last `scored` tokens of ids[begin:end]."""
    if window < 2 or not 0 < stride <= window:
        raise ValueError(f"need window >= 2 and 0 < stride <= window (got {window}, {stride})")
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        scored = end - prev_end if begin else end - 1
        if scored > 0 and end - begin >= 2:
            out.append((begin, end, min(scored, end - begin - 1)))
        prev_end = end
        if end == n:
            break
    return out


def perplexity(engine, ids: list[int], window: int = 1024, stride: int = 512,
               progress: bool = False) -> dict:
    """Perplexity of token ids under the engine's model. All windows go in as one batch
    of scoring requests (max_tokens=0, prompt_logprobs=0). `progress`: a bar of the tokens
    computed, on stderr (a long text takes minutes)."""
    if getattr(engine.config, "enable_prefix_caching", False):
        raise ValueError("perplexity needs an engine without prefix caching (cached tokens are not scored)")
    wins = windows(len(ids), window, stride)
    if not wins:
        raise ValueError("perplexity needs at least 2 tokens")
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    t0 = time.perf_counter()
    for i, (b, e, _) in enumerate(wins):
        engine.add_request(f"ppl-{i}", ids[b:e], params)
    logprobs = {}
    from tqdm import tqdm
    bar = tqdm(total=sum(e - b for b, e, _ in wins), desc="perplexity", unit="tok",
               file=sys.stderr, disable=not progress, mininterval=0.5 if sys.stderr.isatty() else 5)
    done = engine.stats["computed_prefill_tokens"]
    with bar:
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    logprobs[out.request_id] = out.prompt_logprobs
            now = engine.stats["computed_prefill_tokens"]
            bar.update(now - done)
            done = now
    nll, count = 0.0, 0
    for i, (b, e, scored) in enumerate(wins):
        lps = logprobs[f"ppl-{i}"]
        for lp in lps[len(lps) - scored:]:
            nll -= lp.logprob
            count += 1
    elapsed = time.perf_counter() - t0
    return {"perplexity": math.exp(nll / count), "nll_per_token": nll / count,
            "scored_tokens": count, "windows": len(wins), "seconds": elapsed,
            "tok_s": sum(e - b for b, e, _ in wins) / elapsed}
