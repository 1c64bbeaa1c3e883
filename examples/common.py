"""What the three example applications share: the model options, loading the model with the
public API, latency statistics and the results file. Not part of miaotui itself."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

from miaotui import LLM, SamplingParams


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a GGUF file or Hugging Face directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--kv-cache-memory", type=float, default=256 << 20,
                        help="bytes of KV cache (default 256 MiB)")
    parser.add_argument("--speculative", default=None, metavar="METHOD|JSON",
                        help="passed on as LLM(speculative=...): a method name (e.g. ngram, for "
                             "prompt-lookup decoding) or a JSON object of options")
    parser.add_argument("--no-warmup", action="store_true",
                        help="time the very first request too (one-time start-up costs included)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the measurements here")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def load_llm(args) -> LLM:
    kwargs = dict(max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory)
    if args.speculative:
        spec = args.speculative
        kwargs["speculative"] = json.loads(spec) if spec.lstrip().startswith("{") else {"method": spec}
    try:
        llm = LLM(args.model, **kwargs)
    except Exception as exc:   # a missing or unreadable model: one line, exit 2
        fail(str(exc))
    if not args.no_warmup:     # first-call costs (thread pool start, allocations) out of the figures
        llm.generate(["Hello"], SamplingParams(max_tokens=2, temperature=0))
    return llm


def summary(values: list[float]) -> dict:
    """mean, p50 and p90 (nearest rank) of `values`."""
    if not values:
        return {}
    ordered = sorted(values)
    return {"mean": statistics.fmean(ordered), "p50": statistics.median(ordered),
            "p90": ordered[min(len(ordered) - 1, max(0, -(-9 * len(ordered) // 10) - 1))],
            "n": len(ordered)}


def ms(stats: dict) -> str:
    if not stats:
        return "n/a"
    return f"mean {stats['mean'] * 1000:.0f} ms, p50 {stats['p50'] * 1000:.0f} ms, p90 {stats['p90'] * 1000:.0f} ms"


def write_json(path: str | None, record: dict) -> None:
    if not path:
        return
    record = {**record, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.machine(),
              "cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"[wrote {path}]", file=sys.stderr)
