"""`miaotui bench spec`: speculative decoding against plain decoding, on the same engine.

One engine holds the target model and its KV pool; each method's speculator (with its
draft model, if any) is attached in turn, so every method decodes with the same weights,
cache and threads. For each repeat, each task runs once with plain decoding and once per
method, alternating; a run is greedy, one request at a time (batch 1), and reports its
decode speed (output tokens after the first / time after the first token), whether its
tokens equal the plain run's, and its acceptance. Medians over repeats; speed-ups are
ratios to the plain run of the same repeat.
"""
from __future__ import annotations

import statistics
import sys
import time

from miaotui.bench.spec_tasks import TASKS
from miaotui.engine import speculative
from miaotui.engine.speculative import SpeculativeConfig
from miaotui.sampling_params import SamplingParams


def _decode(engine, ids: list[int], max_tokens: int) -> dict:
    """One greedy request; the decode phase's speed and its step-time profile: steps after
    the first token, ms per step, tokens per step, and of a step's time the guessing part."""
    engine.add_request("bench-spec", ids, SamplingParams(temperature=0, max_tokens=max_tokens))
    spec = engine.speculator
    t0 = time.perf_counter()
    t_first = None
    out = None
    steps = 0
    while engine.has_unfinished():
        for o in engine.step():
            out = o
            if t_first is None and o.outputs[0].token_ids:
                t_first = time.perf_counter()
                propose0 = spec.propose_s if spec is not None else 0.0
            elif t_first is not None:
                steps += 1
    t1 = time.perf_counter()
    toks = out.outputs[0].token_ids
    m = out.metrics
    guess_s = (spec.propose_s - propose0) if spec is not None else 0.0
    return {"tokens": toks, "ttft_s": t_first - t0, "decode_s": t1 - t_first,
            "decode_tok_s": (len(toks) - 1) / (t1 - t_first) if len(toks) > 1 else 0.0,
            "decode_steps": steps, "ms_per_step": 1e3 * (t1 - t_first) / max(1, steps),
            "tokens_per_step": (len(toks) - 1) / max(1, steps),
            "guess_ms_per_step": 1e3 * guess_s / max(1, steps),
            "acceptance_rate": m.get("acceptance_rate"), "mean_accepted_length": m.get("mean_accepted_length")}


def _attach(engine, spec) -> None:
    engine.speculator = spec
    engine.scheduler.on_finish = spec.release if spec is not None else None
    if spec is not None and engine.runner.verifier is None:
        engine.runner.verifier = speculative.Verifier(engine.eos_ids)


def run(engine, methods: list[dict], tasks: list[str], repeats: int, max_tokens: int) -> dict:
    speculators = {}
    for m in methods:
        cfg = SpeculativeConfig.parse(m)
        name = cfg.method if cfg.method != "draft" else f"draft:{cfg.model}"
        speculators[name] = speculative.build(cfg, engine)
    from miaotui.engine.speculative import Speculator
    prompts = {t: engine.tokenizer.encode(engine.tokenizer.apply_chat_template(TASKS[t], add_generation_prompt=True),
                                          add_special_tokens=False) for t in tasks}
    runs: dict[str, dict[str, list]] = {t: {n: [] for n in ["plain", *speculators]} for t in tasks}
    for rep in range(repeats):
        order = ["plain", *speculators]
        for t in tasks:
            for name in (order if rep % 2 == 0 else order[::-1]):   # alternating: no order bias
                spec = speculators.get(name)
                if spec is not None:   # a fresh per-sequence state each run
                    spec = Speculator(spec.cfg, spec.proposer, spec.max_model_len)
                _attach(engine, spec)
                r = _decode(engine, prompts[t], max_tokens)
                runs[t][name].append(r)
                print(f"[bench spec] repeat {rep + 1}/{repeats} {t:6s} {name:10s} "
                      f"{r['decode_tok_s']:7.1f} tok/s  tokens {len(r['tokens'])}"
                      + (f"  accepted {r['acceptance_rate']:.2f}" if r["acceptance_rate"] is not None else ""),
                      file=sys.stderr)
    _attach(engine, None)
    rows = []
    for t in tasks:
        plain = runs[t]["plain"]
        for name, rs in runs[t].items():
            speedups = [r["decode_tok_s"] / p["decode_tok_s"] for r, p in zip(rs, plain)]
            rows.append({
                "task": t, "method": name, "prompt_tokens": len(prompts[t]),
                "output_tokens": len(rs[0]["tokens"]),
                "decode_tok_s": statistics.median(r["decode_tok_s"] for r in rs),
                "speedup": statistics.median(speedups), "speedups": speedups,
                "identical_to_plain": all(r["tokens"] == p["tokens"] for r, p in zip(rs, plain)),
                "acceptance_rate": _median(r["acceptance_rate"] for r in rs),
                "mean_accepted_length": _median(r["mean_accepted_length"] for r in rs),
                # the profile: speed-up = tokens/step ratio x step-time ratio
                "tokens_per_step": _median(r["tokens_per_step"] for r in rs),
                "ms_per_step": _median(r["ms_per_step"] for r in rs),
                "guess_ms_per_step": _median(r["guess_ms_per_step"] for r in rs),
            })
    return {"benchmark": "spec", "model": engine.model_path, "repeats": repeats, "max_tokens": max_tokens,
            "rows": rows}


def _median(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def table(result: dict) -> str:
    lines = ["| task | method | decode tok/s | vs plain | acceptance | accepted/verify | tokens/step "
             "| ms/step (guessing) | same tokens |",
             "|---|---|---:|---:|---:|---:|---:|---:|:-:|"]
    for r in result["rows"]:
        acc = "" if r["acceptance_rate"] is None else f"{100 * r['acceptance_rate']:.0f}%"
        mal = "" if r["mean_accepted_length"] is None else f"{r['mean_accepted_length']:.2f}"
        lines.append(f"| {r['task']} | {r['method']} | {r['decode_tok_s']:.1f} | {r['speedup']:.2f}x | {acc} "
                     f"| {mal} | {r['tokens_per_step']:.2f} | {r['ms_per_step']:.1f} ({r['guess_ms_per_step']:.1f}) "
                     f"| {'yes' if r['identical_to_plain'] else 'NO'} |")
    return "\n".join(lines)
