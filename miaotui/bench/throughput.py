"""`miaotui bench throughput`: an offline batch of requests through the engine (and,
optionally, through transformers on the same token ids): tokens/s, requests/s, peak RSS."""
from __future__ import annotations

import os
import threading
import time

import psutil

from miaotui.bench import roofline
from miaotui.sampling_params import SamplingParams


class RssSampler:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak = interval, 0
        self._proc = psutil.Process(os.getpid())
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def run_engine(engine, requests, tag: str = "tp", params: list | None = None, on_step=None) -> dict:
    """All requests added at once (greedy, EOS ignored, unless `params` gives each request's
    SamplingParams), stepped to completion; on_step(seconds, finished requests) after each
    step."""
    t0 = time.perf_counter()
    for i, r in enumerate(requests):
        p = params[i] if params else SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True)
        engine.add_request(f"{tag}-{i}", r.prompt_ids, p)
    n_out = steps = finished = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                n_out += len(out.outputs[0].token_ids)
                finished += 1
        steps += 1
        if on_step is not None:
            on_step(time.perf_counter() - t0, finished)
    return {"elapsed_s": time.perf_counter() - t0, "output_tokens": n_out, "steps": steps}


def rates(requests, run: dict, peak_rss: int) -> dict:
    """Throughput figures of one run, counting the requested tokens."""
    n_in = sum(len(r.prompt_ids) for r in requests)
    n_out = sum(r.output_len for r in requests)
    t = run["elapsed_s"]
    return {**run, "requests": len(requests), "prompt_tokens": n_in, "useful_output_tokens": n_out,
            "req_s": len(requests) / t, "output_tok_s": n_out / t, "total_tok_s": (n_in + n_out) / t,
            "peak_rss_bytes": peak_rss}


def warm_up(engine) -> None:
    from miaotui.bench.workload import random_requests
    run_engine(engine, random_requests(2, "16", "4", engine.model_config.vocab_size, seed=99), "warm")


def bench_engine(engine, requests, machine: roofline.Machine | None = None) -> tuple[dict, dict]:
    """(rates, roofline comparison) of the miaotui engine on `requests`."""
    warm_up(engine)
    with RssSampler() as rss:
        run = run_engine(engine, requests)
    res = rates(requests, run, rss.peak)
    roof = {}
    if machine is not None:
        cost = roofline.engine_cost_model(engine)
        shapes = [(len(r.prompt_ids), r.output_len) for r in requests]

        def predict(m):
            return roofline.predict_workload(cost, m, shapes, engine.config.max_num_seqs)
        roofline.reconcile(machine, lambda m: predict(m)["time"], run["elapsed_s"])  # never > 100%
        pred = predict(machine)
        total = roofline.Cost(pred["flops"], pred["bytes"])
        roof["workload"] = roofline.fraction_report("workload", pred["time"], run["elapsed_s"], total, machine)
        roof["workload"].update(prefill_s=pred["prefill_time"], decode_s=pred["decode_time"],
                                decode_parts_s=pred["decode_parts_time"],  # matmuls, then attention
                                fraction_parts=(pred["prefill_time"] + pred["decode_parts_time"]) / run["elapsed_s"])
        roof["output_tok_s"] = res["useful_output_tokens"] / pred["time"]
        roof["weights"] = cost.weights_name
    return res, roof


def in_child(fn, *args):
    """fn(*args) in a fresh spawned process: its memory is measured alone."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _hf_child(model_path: str, prompts: list[list[int]], outs: list[int], batch_size: int,
              pad_id: int, threads: int) -> dict:
    import torch

    from miaotui.bench.hf_backend import hf_generate_batch, load_hf_model, run_hf
    from miaotui.bench.workload import Request
    torch.set_num_threads(threads)
    requests = [Request(p, o) for p, o in zip(prompts, outs)]
    with RssSampler() as rss:
        model = load_hf_model(model_path)
        hf_generate_batch(model, [prompts[0][:16]], 4, pad_id)   # warm-up
        run = run_hf(model, requests, batch_size, pad_id)
    return rates(requests, run, rss.peak)


def bench_transformers(model_path: str, requests, batch_size: int, pad_id: int = 0,
                       threads: int | None = None) -> dict:
    """The same requests through transformers' generate (float32, batched, padded), in a
    child process."""
    import torch
    return in_child(_hf_child, model_path, [r.prompt_ids for r in requests],
                    [r.output_len for r in requests], batch_size, pad_id,
                    threads or torch.get_num_threads())


def print_runs(runs: dict, roof: dict) -> None:
    from miaotui.bench.report import table
    rows = [[name, r["requests"], r["elapsed_s"], r["req_s"], r["output_tok_s"], r["total_tok_s"],
             f"{r['peak_rss_bytes'] / 2**20:.0f}"] for name, r in runs.items()]
    print(table(rows, ["backend", "requests", "seconds", "req/s", "out tok/s", "total tok/s", "peak RSS MiB"]))
    if "miaotui" in runs and "transformers" in runs:
        ratio = runs["miaotui"]["output_tok_s"] / runs["transformers"]["output_tok_s"]
        print(f"miaotui / transformers output throughput: {ratio:.1f}x")
    if roof.get("workload"):
        w = roof["workload"]
        print(f"roofline: {roof['output_tok_s']:.1f} out tok/s predicted ({w['prefill_s']:.2f} s prefill + "
              f"{w['decode_s']:.2f} s decode); achieved {w['fraction']:.0%}, "
              f"{w['effective_GBps']:.1f} GB/s and {w['effective_GFLOPs']:.1f} GFLOP/s effective; "
              f"{w['fraction_parts']:.0%} of the cap with attention after the matmuls "
              f"({w['decode_parts_s']:.2f} s decode)")
