"""`miaotui bench latency`: one request at a time; TTFT, TPOT, end-to-end latency,
prefill and batch-1 decode speed, each beside its roofline prediction."""
from __future__ import annotations

import random
import time

from miaotui.bench import roofline
from miaotui.bench.stats import spread, summarize
from miaotui.sampling_params import SamplingParams


def time_request(engine, prompt_ids: list[int], output_len: int, request_id: str) -> dict:
    """Run one greedy request alone through the engine (EOS ignored); its timings."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    engine.add_request(request_id, prompt_ids, params)
    t_first, n_out = None, 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id != request_id:
                continue
            n_out = len(out.outputs[0].token_ids)
            if t_first is None and n_out:
                t_first = time.perf_counter()
    t1 = time.perf_counter()
    t_first = t_first or t1
    tpot = (t1 - t_first) / (n_out - 1) if n_out > 1 else 0.0
    return {"ttft": t_first - t0, "e2e": t1 - t0, "tpot": tpot, "output_tokens": n_out}


def run_latency(engine, prompt_len: int = 128, output_len: int = 128, repeats: int = 5,
                warmup: int = 1, seed: int = 0, machine: roofline.Machine | None = None) -> dict:
    """Warm up, then time `repeats` requests with fresh random prompts (no prefix-cache
    hits). Returns summaries, raw samples and the roofline comparison."""
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    low = min(300, vocab // 2)
    samples = {"ttft": [], "tpot": [], "e2e": []}
    decoder = engine.runner.decoder
    for i in range(warmup + repeats):
        if i == warmup and decoder is not None:
            decoder.impl.profile(reset=True)
        ids = [rng.randrange(low, vocab) for _ in range(prompt_len)]
        r = time_request(engine, ids, output_len, f"latency-{i}")
        if i >= warmup:
            for k in samples:
                samples[k].append(r[k])
    ttft = summarize(samples["ttft"])
    tpot = summarize(samples["tpot"])
    results = {
        "ttft_s": ttft, "tpot_s": tpot, "e2e_s": summarize(samples["e2e"]),
        "prefill_tok_s": prompt_len / ttft["median"],
        "decode_tok_s": 1 / tpot["median"] if tpot["median"] else 0.0,
        "spread": {k: spread(v) for k, v in samples.items()},
        "samples": samples,
    }
    if decoder is not None:  # where a fused decode step's time goes, ms per step
        prof = decoder.impl.profile()
        steps = prof.pop("calls")
        results["decode_profile_ms"] = {k: 1e3 * v / steps for k, v in prof.items()} if steps else {}
    roof = {}
    if machine is not None:
        cost = roofline.engine_cost_model(engine)
        pre = cost.prefill(prompt_len)
        dec = cost.decode(1, prompt_len + output_len / 2)
        roofline.reconcile(machine, lambda m: m.time(pre), ttft["median"])    # never > 100%
        roofline.reconcile(machine, lambda m: m.time(dec), tpot["median"])
        roof["prefill"] = roofline.fraction_report("prefill", machine.time(pre), ttft["median"], pre, machine)
        roof["decode"] = roofline.fraction_report("decode", machine.time(dec), tpot["median"], dec, machine)
        roof["weights"] = cost.weights_name
        roof["machine"] = {"bandwidth_GBps": machine.bandwidth / 1e9,
                           "fp32_GFLOPs": machine.flops["float32"] / 1e9, "source": machine.source}
    return {"results": results, "roofline": roof}


def print_latency(res: dict, prompt_len: int, output_len: int) -> None:
    from miaotui.bench.report import table
    r, roof = res["results"], res["roofline"]
    rows = []
    for name, key in [("TTFT", "ttft_s"), ("TPOT", "tpot_s"), ("e2e", "e2e_s")]:
        s = r[key]
        rows.append([name, s["median"] * 1e3, s["mean"] * 1e3, s["p90"] * 1e3, s["min"] * 1e3,
                     s["max"] * 1e3, f"{r['spread'][key[:-2]]:.1%}"])
    print(f"prompt {prompt_len} tokens, output {output_len} tokens, "
          f"{r['e2e_s']['n']} repeats (ms):")
    print(table(rows, ["", "median", "mean", "p90", "min", "max", "spread"]))
    if roof:
        print(roofline.describe(roof["prefill"], r["prefill_tok_s"]))
        print(roofline.describe(roof["decode"], r["decode_tok_s"]))
    else:
        print(f"prefill {r['prefill_tok_s']:.1f} tok/s, decode {r['decode_tok_s']:.1f} tok/s")
    if r.get("decode_profile_ms"):
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["decode_profile_ms"].items())
        print(f"fused decode step (ms): {parts}; total {sum(r['decode_profile_ms'].values()):.2f} "
              f"of {r['tpot_s']['median'] * 1e3:.2f} per token")
