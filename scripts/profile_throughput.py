"""Where the time of `miaotui bench throughput` goes: the offline workload's wall time split
by part of a step, beside its roofline.

The engine's own methods are wrapped with timers (nothing else changes): scheduling, the
prompt phase (the PyTorch modules over prompt chunks; inside it the logits and sampling of
finished prompts), the decode phase (metadata, the fused C++ step, sampling), and the
engine's per-token bookkeeping (detokenization, stop checks, outputs). The fused step's
own split by layer part comes from ``DecodeModel.profile()``. A short workload (fewer
requests) gives the same split on a busy machine in less time; say so when reporting.

    python scripts/profile_throughput.py -m smollm2-135m --dtype float32 -n 16 --out results/profile_tp.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def timed(obj, name: str, acc: dict, key: str | None = None) -> None:
    """Wrap obj.name so that its calls add their seconds to acc[key]."""
    fn = getattr(obj, name)
    key = key or name

    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            acc[key] += time.perf_counter() - t0
    setattr(obj, name, wrapper)


class _Proxy:
    """Stands in for a C++ object so that one of its methods can be wrapped."""

    def __init__(self, impl):
        self._impl = impl
        self.forward = impl.forward

    def __getattr__(self, name):
        return getattr(self._impl, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("-q", "--quantization", default=None)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--input-len", default="32-512")
    ap.add_argument("--output-len", default="32-256")
    ap.add_argument("--peaks", default=None, metavar="GBPS,GFLOPS",
                    help="the machine's peaks for the roofline (default: calibrated now, which a busy "
                         "machine depresses)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    from miaotui.bench import roofline
    from miaotui.bench.report import cpu_model
    from miaotui.bench.shapes import resolve_model
    from miaotui.bench.throughput import run_engine, warm_up
    from miaotui.bench.workload import random_requests
    from miaotui.engine.llm_engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(model=resolve_model(a.model), dtype=a.dtype, quantization=a.quantization,
                                    max_num_seqs=64, kv_cache_memory=float(1 << 30)))
    reqs = random_requests(a.n, a.input_len, a.output_len, engine.model_config.vocab_size)
    warm_up(engine)
    acc: dict[str, float] = defaultdict(float)
    runner = engine.runner
    timed(engine.scheduler, "schedule", acc)
    timed(runner, "_forward", acc, "prompt_forward")          # the prompt phase
    timed(runner, "prepare", acc, "prompt_prepare")
    timed(runner, "_decode", acc, "decode_total")             # metadata + fused step + sampling
    timed(runner, "_decode_fused", acc, "decode_fused_call")  # metadata + the C++ step
    timed(runner.model, "compute_logits", acc, "prompt_logits")
    timed(runner, "sampler", acc, "sampling")
    timed(engine, "_append_token", acc, "append_token")      # detokenize, stop checks
    timed(engine, "_output", acc, "outputs")
    dec = runner.decoder
    if dec is not None:
        impl = dec.impl
        impl.profile(True)
        dec.impl = _Proxy(impl)     # the C++ object's methods cannot be replaced
        timed(dec.impl, "forward", acc, "decode_cpp")
    t0 = time.perf_counter()
    run = run_engine(engine, reqs)
    wall = time.perf_counter() - t0
    cost = roofline.engine_cost_model(engine)
    if a.peaks:
        gbps, gflops = (float(v) for v in a.peaks.split(","))
        machine = roofline.Machine(gbps * 1e9, {"float32": gflops * 1e9}, 2, f"given: {a.peaks}")
    else:
        machine = roofline.load_machine()
    pred = roofline.predict_workload(cost, machine, [(len(r.prompt_ids), r.output_len) for r in reqs], 64)
    split = dict(acc)
    split["engine_other"] = wall - split["schedule"] - split["prompt_forward"] - split["decode_total"] \
        - split["append_token"] - split["outputs"]
    res = {"model": a.model, "dtype": a.dtype, "quantization": a.quantization, "requests": a.n,
           "input_len": a.input_len, "output_len": a.output_len, "cpu": cpu_model(),
           "load_avg": os.getloadavg(), "wall_s": wall, "steps": run["steps"], "split_s": split,
           "fused_profile_s": dec.impl.profile(False) if dec is not None else None,
           "roofline": {"time_s": pred["time"], "prefill_s": pred["prefill_time"], "decode_s": pred["decode_time"],
                        "fraction": pred["time"] / wall, "decode_parts_s": pred["decode_parts_time"],
                        "fraction_parts": (pred["prefill_time"] + pred["decode_parts_time"]) / wall, "machine": machine.source,
                        "bandwidth_GBps": machine.bandwidth / 1e9,
                        "fp32_GFLOPs": machine.flops["float32"] / 1e9, "weights": cost.weights_name}}
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
