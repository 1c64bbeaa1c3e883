"""Load-test a running `miaotui serve` (or any OpenAI-compatible server on this machine).

N clients each send streaming /v1/completions requests back to back for a fixed time;
the script reports requests, failures, throughput and TTFT / TPOT / end-to-end latency
percentiles, and writes them as JSON.

    python scripts/load_test.py --base-url http://127.0.0.1:8000 --clients 64 --duration 120

Bounded on purpose: loopback addresses only, at most 256 clients and 30 minutes.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from urllib.parse import urlparse

import httpx

from miaotui.serve.cli import is_loopback as is_loopback_host

PROMPTS = [
    "Write a short story about a cat who learns to fly.",
    "Explain how a refrigerator works to a ten-year-old.",
    "List some good habits for staying healthy.",
    "What are the main differences between Python and C?",
    "Describe the water cycle in a few sentences.",
    "Give me three ideas for a weekend trip.",
    "Why is the sky blue?",
    "Summarize the plot of a detective novel you invent.",
    "How do I make a good cup of tea?",
    "Write a haiku about autumn leaves.",
    "What is machine learning, in simple words?",
    "Tell me a fun fact about octopuses.",
    "Suggest a name for a bakery and explain it.",
    "How does a bicycle stay upright?",
    "Write a polite email declining a meeting.",
    "What should I pack for a rainy hike?",
]


def is_loopback(url: str) -> bool:
    return is_loopback_host(urlparse(url).hostname or "")


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    values = sorted(values)

    def pct(p: float) -> float:
        return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]
    return {"mean": statistics.fmean(values), "p50": pct(50), "p90": pct(90), "p99": pct(99),
            "max": values[-1]}


async def one_request(http: httpx.AsyncClient, body: dict) -> dict:
    """One streaming completion; returns its timings and token count (or its error)."""
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"error": f"HTTP {r.status_code}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": "stream error"}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                last = time.perf_counter()
                first = first or last
    end = time.perf_counter()
    if first is None:
        return {"error": "no tokens"}
    tpot = (last - first) / (tokens - 1) if tokens > 1 else None
    return {"ttft": first - start, "tpot": tpot, "e2e": end - start, "tokens": tokens}


async def client(i: int, http: httpx.AsyncClient, args, deadline: float, results: list) -> None:
    n = 0
    while time.perf_counter() < deadline:
        body = {"model": args.model, "prompt": PROMPTS[(i + n) % len(PROMPTS)],
                "max_tokens": args.max_tokens, "temperature": args.temperature,
                "ignore_eos": args.ignore_eos, "stream": True,
                "stream_options": {"include_usage": True}}
        try:
            results.append(await one_request(http, body))
        except httpx.HTTPError as exc:
            results.append({"error": type(exc).__name__})
        n += 1


async def run(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(args.request_timeout)) as http:
        if args.model is None:
            args.model = (await http.get("/v1/models")).json()["data"][0]["id"]
        results: list[dict] = []
        start = time.perf_counter()
        deadline = start + args.duration
        tasks = [asyncio.create_task(client(i, http, args, deadline, results))
                 for i in range(args.clients)]
        done, pending = await asyncio.wait(tasks, timeout=args.duration + args.request_timeout)
        for t in pending:                       # a request outlived the grace period
            t.cancel()
        elapsed = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    errors: dict[str, int] = {}
    for r in results:
        if "error" in r:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    out_tokens = sum(r["tokens"] for r in ok)
    return {
        "base_url": args.base_url, "model": args.model, "clients": args.clients,
        "duration_s": args.duration, "elapsed_s": elapsed, "max_tokens": args.max_tokens,
        "requests": len(results), "succeeded": len(ok), "failures": len(results) - len(ok),
        "failure_kinds": errors, "output_tokens": out_tokens,
        "requests_per_s": len(ok) / elapsed, "output_tokens_per_s": out_tokens / elapsed,
        "ttft_s": percentiles([r["ttft"] for r in ok]),
        "tpot_s": percentiles([r["tpot"] for r in ok if r["tpot"] is not None]),
        "e2e_s": percentiles([r["e2e"] for r in ok]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of sending requests")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let answers stop at EOS (default: always max_tokens tokens)")
    p.add_argument("--model", default=None, help="default: the first of /v1/models")
    p.add_argument("--api-key", default=None)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--out", default="load_test.json")
    args = p.parse_args(argv)
    if not is_loopback(args.base_url):
        p.error("only loopback servers (127.0.0.1, ::1, localhost) may be load-tested")
    if not 1 <= args.clients <= 256 or not 0 < args.duration <= 1800:
        p.error("--clients must be in 1..256 and --duration in (0, 1800] seconds")
    report = asyncio.run(run(args))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    ms = lambda d, k: f"{d.get(k, float('nan')) * 1000:.0f}"
    print(f"{report['requests']} requests ({report['failures']} failed) in {report['elapsed_s']:.0f}s, "
          f"{report['requests_per_s']:.2f} req/s, {report['output_tokens_per_s']:.1f} output tok/s")
    for name in ("ttft_s", "tpot_s", "e2e_s"):
        d = report[name]
        print(f"  {name[:-2]:5s} ms: p50 {ms(d, 'p50')}  p90 {ms(d, 'p90')}  p99 {ms(d, 'p99')}  "
              f"max {ms(d, 'max')}")
    print(f"wrote {args.out}")
    return 0 if report["succeeded"] else 1


if __name__ == "__main__":
    sys.exit(main())
