"""Measure tensor and data parallel against one process, side by side (issue 14):

  TP: the TinyLlama-1.1B shape, TP=2 with one thread per rank vs TP=1 with two threads,
      prefill (one prompt) and decode (one sequence), variants alternating, medians;
  DP: 2 replicas with one thread each vs one engine with two threads on a 64-request
      workload (outputs checked equal);
  the gloo all-reduce over loopback (latency, bandwidth) feeding the cost model
  (bench/scaling.py), whose predictions are stored next to the measurements.

python -m miaotui.bench.distributed --output results/distributed.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def probe_rank(rank: int, port: int, sizes: list[int], repeats: int) -> dict:
    """One rank of the all-reduce probe: median seconds per all_reduce of each size."""
    import torch.distributed as dist

    from miaotui.distributed.worker import join
    torch.set_num_threads(1)
    join(rank, 2, "127.0.0.1", port, 60)
    out = {}
    for n in sizes:
        x = torch.ones(n // 4)
        times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - t0)
        out[n] = statistics.median(times)
    dist.destroy_process_group()
    return out


def probe_link(sizes=(64, 8192, 1 << 20, 8 << 20), repeats: int = 30) -> dict:
    """Fit latency and bandwidth of a 2-rank gloo all-reduce on this machine."""
    from miaotui.distributed.worker import free_port
    port = free_port()
    cmd = [sys.executable, "-m", "miaotui.bench.distributed", "--probe-rank", "{r}", "--port", str(port),
           "--probe-sizes", ",".join(map(str, sizes)), "--probe-repeats", str(repeats)]
    procs = [subprocess.Popen([c.format(r=r) for c in cmd], stdout=subprocess.PIPE, text=True) for r in (0, 1)]
    res = json.loads(procs[0].communicate(timeout=300)[0])
    procs[1].wait(timeout=60)
    t = {int(k): v for k, v in res.items()}
    small, big = min(t), max(t)
    # ring, 2 ranks: t = bytes / bw + 2 x latency
    latency = t[small] / 2
    bw = big / max(t[big] - t[small], 1e-9)
    return {"allreduce_s": t, "latency_us": latency * 1e6, "gbps": bw * 8 / 1e9}


def _timed_request(engine, prompt: list[int], max_tokens: int, tag: str) -> tuple[float, float]:
    """(seconds to the first token, seconds per later token) of one request alone."""
    from miaotui.sampling_params import SamplingParams
    t0 = time.perf_counter()
    engine.add_request(tag, prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    first = None
    while engine.has_unfinished():
        for out in engine.step():
            if first is None and out.outputs[0].token_ids:
                first = time.perf_counter()
    end = time.perf_counter()
    return first - t0, (end - first) / max(1, max_tokens - 1)


def bench_tp(model: str, quant: str | None, repeats: int, prompt_len: int, decode_tokens: int) -> dict:
    from miaotui.engine.llm_engine import EngineConfig, LLMEngine
    engines = {"tp1_2threads": LLMEngine(EngineConfig(model=model, quantization=quant, num_threads=2, max_num_seqs=4)),
               "tp2_1thread": LLMEngine(EngineConfig(model=model, quantization=quant, num_threads=1, max_num_seqs=4,
                                                     tensor_parallel_size=2))}
    vocab = engines["tp1_2threads"].model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    runs = {k: {"prefill_s": [], "decode_s_per_token": []} for k in engines}
    for r in range(repeats + 1):            # the first round warms up
        order = list(engines) if r % 2 else list(engines)[::-1]
        for name in order:
            prompt = torch.randint(300, vocab, (prompt_len,), generator=g).tolist()
            pre, _ = _timed_request(engines[name], prompt, 1, f"p{r}{name}")
            _, dec = _timed_request(engines[name], prompt[:8], decode_tokens + 1, f"d{r}{name}")
            if r:
                runs[name]["prefill_s"].append(pre)
                runs[name]["decode_s_per_token"].append(dec)
            print(f"[tp] round {r} {name}: prefill {pre:.2f}s, decode {dec * 1e3:.0f} ms/token", file=sys.stderr)
    for e in engines.values():
        e.close()
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in runs.items()}
    return {"runs": runs, "median": med,
            "tp2_vs_tp1_decode_speed": med["tp1_2threads"]["decode_s_per_token"] / med["tp2_1thread"]["decode_s_per_token"],
            "tp2_vs_tp1_prefill_speed": med["tp1_2threads"]["prefill_s"] / med["tp2_1thread"]["prefill_s"]}


def bench_dp(model: str, repeats: int, n: int, input_len: str, output_len: str) -> dict:
    from miaotui.bench.throughput import run_engine
    from miaotui.bench.workload import random_requests
    from miaotui.distributed.dp import DPEngine
    from miaotui.engine.llm_engine import EngineConfig, LLMEngine
    cfg = dict(model=model, max_num_seqs=64, kv_cache_memory=float(1 << 29))
    engines = {"one_engine_2threads": LLMEngine(EngineConfig(num_threads=2, **cfg)),
               "dp2_1thread": DPEngine(EngineConfig(num_threads=1, **cfg), 2)}
    reqs = random_requests(n, input_len, output_len, engines["dp2_1thread"].model_config.vocab_size, seed=1)
    runs = {k: [] for k in engines}
    for r in range(repeats):
        order = list(engines) if r % 2 else list(engines)[::-1]
        for name in order:
            res = run_engine(engines[name], reqs, f"r{r}")
            tok_s = sum(q.output_len + len(q.prompt_ids) for q in reqs) / res["elapsed_s"]
            runs[name].append({**res, "total_tok_s": tok_s})
            print(f"[dp] round {r} {name}: {res['elapsed_s']:.1f}s, {tok_s:.0f} tok/s", file=sys.stderr)
    same = _same_outputs(engines, reqs[:16])
    engines["dp2_1thread"].close()
    med = {k: statistics.median(x["total_tok_s"] for x in v) for k, v in runs.items()}
    return {"requests": n, "input_len": input_len, "output_len": output_len, "runs": runs, "median_tok_s": med,
            "dp2_vs_one": med["dp2_1thread"] / med["one_engine_2threads"], "outputs_equal": same}


def _same_outputs(engines, reqs) -> bool:
    from miaotui.sampling_params import SamplingParams
    got = {}
    for name, e in engines.items():
        for i, q in enumerate(reqs):
            e.add_request(f"eq{i}", q.prompt_ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        outs = {}
        while e.has_unfinished():
            for o in e.step():
                if o.finished:
                    outs[o.request_id] = o.outputs[0].token_ids
        got[name] = [outs[f"eq{i}"] for i in range(len(reqs))]
    a, b = got.values()
    return a == b


def predict(model: str, quant: str | None, link: dict, prompt_len: int, dp_input: str, dp_output: str) -> dict:
    """The cost model's TP/DP predictions for the measured settings (this machine, 2 threads)."""
    from miaotui.bench import roofline, scaling
    from miaotui.bench.shapes import resolve_model
    from miaotui.loader import open_checkpoint
    cfg = open_checkpoint(resolve_model(model)).config
    cost = roofline.CostModel.from_config(cfg, roofline.weight_format(quant), "auto")
    machine = roofline.load_machine(2)
    lk = scaling.Link(link["gbps"], link["latency_us"])
    out = {"machine": {"bandwidth": machine.bandwidth, "flops": machine.flops, "source": machine.source}}
    for label, step, toks in (("prefill", cost.prefill(prompt_len), prompt_len), ("decode", cost.decode(1, 12), 1)):
        out[f"tp1_{label}_s"] = machine.time(step)
        out[f"tp2_{label}_s"] = scaling.tp_step(cost, machine, lk, 2, toks, step, True)["step_s"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp-model", default="tinyllama-1.1b")
    p.add_argument("--tp-quantization", default="int8")
    p.add_argument("--dp-model", default="smollm2-135m")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--dp-requests", type=int, default=64)
    p.add_argument("--dp-input", default="32-128")
    p.add_argument("--dp-output", default="16-64")
    p.add_argument("--skip", default="", help="comma-separated: tp, dp")
    p.add_argument("--output", "-o", default=None)
    p.add_argument("--probe-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-sizes", default="", help=argparse.SUPPRESS)
    p.add_argument("--probe-repeats", type=int, default=30, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.probe_rank is not None:
        res = probe_rank(a.probe_rank, a.port, [int(s) for s in a.probe_sizes.split(",")], a.probe_repeats)
        if a.probe_rank == 0:
            print(json.dumps(res))
        return 0
    import platform

    from miaotui.bench.shapes import resolve_model
    skip = set(a.skip.split(","))
    result = {"machine": {"cpus": os.cpu_count(), "cpu": platform.processor(), "torch": torch.__version__},
              "command": "python -m miaotui.bench.distributed " + " ".join(argv or sys.argv[1:]),
              "load_avg_start": os.getloadavg(),
              "note": "shared 2-core machine (other agents running): timings are noisy"}
    result["link"] = probe_link()
    print(f"[link] gloo all-reduce: {result['link']['latency_us']:.0f} us/hop, {result['link']['gbps']:.1f} Gbit/s",
          file=sys.stderr)
    quant = None if a.tp_quantization == "none" else a.tp_quantization
    if "tp" not in skip:
        result["tp"] = bench_tp(resolve_model(a.tp_model), quant, a.repeats, a.prompt_len, a.decode_tokens)
        result["tp"]["predicted"] = predict(a.tp_model, quant, result["link"], a.prompt_len, a.dp_input, a.dp_output)
    if "dp" not in skip:
        result["dp"] = bench_dp(resolve_model(a.dp_model), max(1, a.repeats - 1), a.dp_requests, a.dp_input, a.dp_output)
    result["load_avg_end"] = os.getloadavg()
    text = json.dumps(result, indent=1, default=str)
    if a.output:
        os.makedirs(os.path.dirname(a.output) or ".", exist_ok=True)
        with open(a.output, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
