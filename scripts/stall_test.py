"""Does one long prompt stall everyone? (issue 11)

Serves a model in this process on a free loopback port, starts one streaming request, and
records when each of its tokens arrives: first with nothing else running (the idle gaps),
then while a long prompt (8,000 tokens by default, max_tokens 1) is prefilled, next to a
short 4-token request sent with it. Prints and writes JSON: the stream's p50 / p99 / max
inter-token gap idle and during the long prefill, their p99 ratio (target: at most 3), the
long prefill's duration and the short request's latency.

    python scripts/stall_test.py --out stall.json                  # the default model
    python scripts/stall_test.py --long-tokens 2000 --max-num-batched-tokens 512 -m MODEL

It takes the model flags of `miaotui serve`. Bounded: loopback only, and --timeout seconds
(default 600) for the whole measurement; what was measured by then is still reported.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time

import httpx

from miaotui.cli import add_model_args, load_llm
from miaotui.serve.api import create_app
from miaotui.serve.cli import serve_in_thread

WORDS = ("river stone light paper garden window music winter market letter forest bridge "
         "engine silver orange morning station ladder harbor candle thunder meadow").split()


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summary(gaps: list[float]) -> dict:
    ms = [g * 1000 for g in gaps]
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
            "max_ms": max(ms, default=None)}


def long_prompt(tokenizer, n: int) -> list[int]:
    """`n` token ids of random prose (not in the prefix cache)."""
    rng = random.Random(time.time_ns())
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(2000)),
                                add_special_tokens=False)
    return ids[:n]


async def measure(base: str, args, long_ids: list[int], arrivals: list[float],
                  marks: dict) -> None:
    """Fill `arrivals` (the stream's token times) and `marks` (what happened when)."""
    idle_done = asyncio.Event()

    async def stream(http):
        body = {"prompt": "Once upon a time", "max_tokens": args.stream_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                arrivals.append(time.perf_counter())
                if len(arrivals) == args.warmup + args.idle_tokens + 1:
                    idle_done.set()
                if "long_done" in marks and len(arrivals) > marks["tokens_at_done"] + args.tail:
                    break
        idle_done.set()        # the stream ended (too short for the long prefill if early)

    async def timed_post(name: str, http, body) -> None:
        r = await http.post("/v1/completions", json=body)
        marks[name] = {"s": time.perf_counter() - marks["long_start"], "status": r.status_code}

    async with httpx.AsyncClient(base_url=base, timeout=None) as http:
        task = asyncio.create_task(stream(http))
        await idle_done.wait()
        marks["long_start"] = time.perf_counter()
        await asyncio.gather(
            timed_post("long_request", http, {"prompt": long_ids, "max_tokens": 1}),
            timed_post("short_request", http, {"prompt": "Hello", "max_tokens": 4,
                                               "ignore_eos": True}))
        marks["long_done"] = time.perf_counter()
        marks["tokens_at_done"] = len(arrivals)
        await task


def report(args, n_long: int, arrivals: list[float], marks: dict) -> dict:
    start = marks.get("long_start", float("inf"))
    done = marks.get("long_done", time.perf_counter())      # not done: timed out
    pairs = list(zip(arrivals[args.warmup:], arrivals[args.warmup + 1:]))
    idle = [b - a for a, b in pairs if b <= start]
    during = [b - a for a, b in pairs if a < done and b > start]
    result = {"long_prompt_tokens": n_long, "timed_out": "long_done" not in marks,
              "long_request": marks.get("long_request"), "short_request": marks.get("short_request"),
              "idle_gap": summary(idle), "gap_during_long_prefill": summary(during),
              "gaps_during_ms": [round(g * 1000, 1) for g in during][:200],
              "stream_outlived_prefill": bool(arrivals) and arrivals[-1] > done}
    if idle and during:
        ratio = result["gap_during_long_prefill"]["p99_ms"] / result["idle_gap"]["p99_ms"]
        result["p99_ratio"] = ratio
        result["meets_target_3x"] = ratio <= 3
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--long-tokens", type=int, default=8000, help="length of the long prompt")
    p.add_argument("--stream-tokens", type=int, default=2000,
                   help="max_tokens of the running stream (it is closed once the long prefill ends)")
    p.add_argument("--idle-tokens", type=int, default=50, help="idle gaps to measure first")
    p.add_argument("--warmup", type=int, default=3, help="first stream tokens not counted")
    p.add_argument("--tail", type=int, default=5, help="stream tokens kept after the long request")
    p.add_argument("--timeout", type=float, default=600, help="seconds for the whole measurement")
    p.add_argument("--out", default=None, help="also write the JSON report here")
    p.set_defaults(max_decode_delay=2.5)   # as `miaotui serve`; --max-decode-delay to change
    args = p.parse_args()

    llm = load_llm(args)
    long_ids = long_prompt(llm.tokenizer, args.long_tokens)
    if len(long_ids) + 1 > llm.engine.max_model_len:
        raise SystemExit(f"--long-tokens {args.long_tokens} does not fit the context window "
                         f"({llm.engine.max_model_len} tokens)")
    arrivals: list[float] = []
    marks: dict = {}
    with serve_in_thread(create_app(llm.engine, "stall-test")) as base:
        with contextlib.suppress(asyncio.TimeoutError):
            asyncio.run(asyncio.wait_for(measure(base, args, long_ids, arrivals, marks), args.timeout))
    result = report(args, len(long_ids), arrivals, marks)
    result["engine"] = {"model": llm.engine.model_path,
                        "max_num_batched_tokens": args.max_num_batched_tokens,
                        "max_decode_delay": args.max_decode_delay,
                        "max_num_seqs": args.max_num_seqs}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
