"""`miaotui bench serve`: load an OpenAI-compatible server with streaming completions at a
fixed concurrency or a Poisson request rate; TTFT, TPOT, ITL, e2e, throughput, goodput.

Bounded: at most `num_prompts` requests per load level, none started after
`max_duration` seconds, each cut off after `timeout` seconds.
"""
from __future__ import annotations

import asyncio
import json
import random
import time

import httpx

from miaotui.bench.stats import summarize


async def discover_model(client: httpx.AsyncClient, base_url: str) -> str:
    """The first model the server lists (or "default")."""
    try:
        r = await client.get(f"{base_url}/v1/models")
        return r.json()["data"][0]["id"]
    except Exception:
        return "default"


async def stream_completion(client: httpx.AsyncClient, base_url: str, model: str, prompt,
                            max_tokens: int, ignore_eos: bool = True) -> dict:
    """One streamed /v1/completions request: its chunk times and token counts."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    rec = {"ok": False, "error": None, "chunk_times": [], "output_tokens": 0, "prompt_tokens": None}
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", f"{base_url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                rec["error"] = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return rec
            usage = None
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                choices = obj.get("choices") or []
                if choices and choices[0].get("text"):
                    rec["chunk_times"].append(time.perf_counter() - t0)
                usage = obj.get("usage") or usage
        rec["e2e"] = time.perf_counter() - t0
        rec["output_tokens"] = (usage or {}).get("completion_tokens") or len(rec["chunk_times"])
        rec["prompt_tokens"] = (usage or {}).get("prompt_tokens")
        rec["ok"] = bool(rec["chunk_times"]) or max_tokens == 0
        if not rec["ok"]:
            rec["error"] = "no tokens streamed"
    except Exception as e:    # timeouts, refused connections, bad JSON: a failed request
        rec["error"] = f"{type(e).__name__}: {e}"
    return rec


async def run_level(base_url: str, requests, model: str | None = None,
                    concurrency: int | None = None, rate: float | None = None,
                    max_duration: float = 60.0, timeout: float = 120.0,
                    ignore_eos: bool = True, seed: int = 0,
                    api_key: str | None = None) -> tuple[list[dict], float]:
    """All requests (or as many as start within max_duration) at one load level:
    `concurrency` in flight at most, arriving as a Poisson process of `rate` req/s if
    given. Returns (records, elapsed seconds)."""
    base_url = base_url.rstrip("/")
    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency or len(requests) or 1)
    limits = httpx.Limits(max_connections=(concurrency or len(requests)) + 4)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) as client:
        model = model or await discover_model(client, base_url)

        async def one(req):
            async with sem:
                rec = await stream_completion(client, base_url, model, req.prompt, req.output_len, ignore_eos)
            rec.setdefault("prompt_tokens", None)
            rec["prompt_tokens"] = rec["prompt_tokens"] or req.prompt_len
            return rec

        t0 = time.perf_counter()
        tasks = []
        for req in requests:
            if time.perf_counter() - t0 > max_duration:
                break
            tasks.append(asyncio.create_task(one(req)))
            if rate:
                await asyncio.sleep(rng.expovariate(rate))
        records = await asyncio.gather(*tasks)
        return list(records), time.perf_counter() - t0


def summarize_level(records: list[dict], elapsed: float, slo_ttft: float | None = None,
                    slo_tpot: float | None = None) -> dict:
    """Latency distributions (seconds), throughput and goodput of one load level."""
    ok = [r for r in records if r["ok"]]
    ttft = [r["chunk_times"][0] for r in ok if r["chunk_times"]]
    tpot, itl = [], []
    for r in ok:
        ct = r["chunk_times"]
        if r["output_tokens"] > 1 and ct:
            tpot.append((r["e2e"] - ct[0]) / (r["output_tokens"] - 1))
        itl.extend(b - a for a, b in zip(ct, ct[1:]))
    good = 0
    for r in ok:
        ct = r["chunk_times"]
        t_first = ct[0] if ct else r["e2e"]
        per = (r["e2e"] - t_first) / (r["output_tokens"] - 1) if r["output_tokens"] > 1 else 0.0
        if (slo_ttft is None or t_first <= slo_ttft) and (slo_tpot is None or per <= slo_tpot):
            good += 1
    n_out = sum(r["output_tokens"] for r in ok)
    n_in = sum(r["prompt_tokens"] or 0 for r in ok)
    errors = sorted({r["error"] for r in records if not r["ok"]})
    return {"requests": len(records), "completed": len(ok), "failures": len(records) - len(ok),
            "errors": errors[:5], "elapsed_s": elapsed,
            "req_s": len(ok) / elapsed if elapsed else 0.0,
            "output_tok_s": n_out / elapsed if elapsed else 0.0,
            "total_tok_s": (n_in + n_out) / elapsed if elapsed else 0.0,
            "goodput_req_s": good / elapsed if elapsed else 0.0, "good_requests": good,
            "ttft": summarize(ttft), "tpot": summarize(tpot), "itl": summarize(itl),
            "e2e": summarize([r["e2e"] for r in ok])}


def run_serve(base_url: str, requests, concurrencies: list[int] | None = None,
              rates: list[float] | None = None, model: str | None = None,
              max_duration: float = 60.0, timeout: float = 120.0, ignore_eos: bool = True,
              slo_ttft: float | None = None, slo_tpot: float | None = None,
              api_key: str | None = None) -> dict:
    """One level per concurrency (or per rate); the summary of each."""
    mode = "rate" if rates else "concurrency"
    levels = []
    for load in (rates or concurrencies or [1]):
        kw = {"rate": load} if mode == "rate" else {"concurrency": int(load)}
        records, elapsed = asyncio.run(run_level(base_url, requests, model, max_duration=max_duration,
                                                 timeout=timeout, ignore_eos=ignore_eos,
                                                 api_key=api_key, **kw))
        levels.append({"load": load, **summarize_level(records, elapsed, slo_ttft, slo_tpot)})
    return {"mode": mode, "levels": levels}


def print_serve(res: dict) -> None:
    from miaotui.bench.report import table
    rows = []
    for lv in res["levels"]:
        rows.append([lv["load"], lv["completed"], lv["failures"], lv["req_s"], lv["output_tok_s"],
                     lv["goodput_req_s"], lv["ttft"].get("median", 0) * 1e3, lv["ttft"].get("p99", 0) * 1e3,
                     lv["tpot"].get("median", 0) * 1e3, lv["itl"].get("p90", 0) * 1e3,
                     lv["e2e"].get("median", 0)])
    print(table(rows, [res["mode"], "ok", "failed", "req/s", "out tok/s", "goodput req/s",
                       "TTFT med ms", "TTFT p99 ms", "TPOT med ms", "ITL p90 ms", "e2e med s"]))
    for lv in res["levels"]:
        for e in lv["errors"]:
            print(f"  {res['mode']} {lv['load']}: {e}")
