"""The fast CPU path side by side with llama.cpp, on the very same weights.

For each shape (random weights of real shapes), the same GGUF files (F32, Q8_0, Q4_0)
run through miaotui and through llama.cpp (llama-cpp-python, 2 threads): batch-1 decode
tokens/s (128 new tokens after a 128-token prompt, median time per token) and prefill
tokens/s (a 512-token prompt, time to first token), plus miaotui's roofline fraction.
The two engines take turns (--repeats rounds, each engine loading the file afresh) and
each figure is the median over the rounds, so that a slow minute on this shared machine
hits both sides instead of one; every round's figures are stored too.

    python scripts/bench_cpu.py --shapes smollm2-135m,tinyllama-1.1b --out results/cpu_path.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import miaotui  # noqa: F401  (before torch: OpenMP wait policy)

QTYPES = ["F32", "Q8_0", "Q4_0"]


def gguf_file(shape: str, qtype: str) -> str:
    """Convert the shape's random HF weights to GGUF once (cached beside them)."""
    from miaotui.bench.shapes import shape_dir
    hf = shape_dir(shape)
    path = os.path.join(hf, f"model-{qtype}.gguf")
    if not os.path.isfile(path):
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from gguf_writer_util import write_gguf_from_hf
        print(f"writing {path} ...", file=sys.stderr, flush=True)
        write_gguf_from_hf(hf, path + ".tmp", qtype)
        os.replace(path + ".tmp", path)
    return path


def prompts(vocab: int, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(300, vocab - 1) for _ in range(n)]


def time_stream(stream, n_new: int) -> tuple[float, float]:
    """(time to first token, median seconds per later token) of an iterator of tokens."""
    t0 = time.perf_counter()
    stamps = []
    for _ in zip(range(n_new), stream):
        stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return stamps[0] - t0, statistics.median(gaps) if gaps else 0.0


def run_miaotui(path: str, vocab: int, threads: int, machine, kv_cache_dtype: str = "auto") -> dict:
    from miaotui.bench import roofline
    from miaotui.llm import LLM
    from miaotui.sampling_params import SamplingParams
    llm = LLM(path, num_threads=threads, kv_cache_memory=256 << 20, enable_prefix_caching=False,
              kv_cache_dtype=kv_cache_dtype)
    p = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)

    def tokens(ids, params):
        for out in llm.stream(ids, params):
            yield from out.outputs[0].delta_token_ids

    time_stream(tokens(prompts(vocab, 32, 0), p), 8)                              # warm-up
    ttft512, _ = time_stream(tokens(prompts(vocab, 512, 1), p), 1)
    _, tpot = time_stream(tokens(prompts(vocab, 128, 2), p), 128)
    cost = roofline.engine_cost_model(llm.engine)
    dec = cost.decode(1, 192)
    return {"prefill_tok_s": 512 / ttft512, "decode_tok_s": 1 / tpot,
            "decode_roofline_fraction": machine.time(dec) / tpot,
            "decode_effective_GBps": dec.bytes / tpot / 1e9}


def run_llama_cpp(path: str, vocab: int, threads: int) -> dict:
    from miaotui.bench import llama_cpp
    llm = llama_cpp.load(path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512)

    def tokens(ids):
        llm.reset()
        return llm.generate(ids, temp=0.0, reset=True)

    time_stream(tokens(prompts(vocab, 32, 0)), 8)
    ttft512, _ = time_stream(tokens(prompts(vocab, 512, 1)), 1)
    _, tpot = time_stream(tokens(prompts(vocab, 128, 2)), 128)
    return {"prefill_tok_s": 512 / ttft512, "decode_tok_s": 1 / tpot}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="smollm2-135m,tinyllama-1.1b")
    ap.add_argument("--qtypes", default=",".join(QTYPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (miaotui, llama.cpp) per file")
    ap.add_argument("--kv-cache-dtype", default="auto",
                    help="miaotui's KV cache: auto (float32 here) or fp16 (llama.cpp's own default)")
    ap.add_argument("--out", default="results/cpu_path.json")
    args = ap.parse_args()
    from miaotui.bench import llama_cpp
    have_llama = llama_cpp.available()
    if not have_llama:
        print("llama-cpp-python not installed: llama.cpp columns skipped", file=sys.stderr)
    from miaotui.bench import roofline
    from miaotui.bench.shapes import hf_config
    # The roofline's peak: the better of the cached calibration and one measured now (a
    # busy minute on this shared machine lowers a measurement, never raises it).
    cached, fresh = roofline.load_machine(args.threads), roofline.calibrate(args.threads)
    machine = max(cached, fresh, key=lambda m: m.bandwidth)
    print(f"peak bandwidth: {machine.bandwidth / 1e9:.1f} GB/s (cached {cached.bandwidth / 1e9:.1f}, "
          f"now {fresh.bandwidth / 1e9:.1f})", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        vocab = hf_config(shape)["vocab_size"]
        for qt in args.qtypes.split(","):
            path = gguf_file(shape, qt)
            rounds = {"miaotui": [], "llama_cpp": []}
            for _ in range(args.repeats):
                rounds["miaotui"].append(run_miaotui(path, vocab, args.threads, machine, args.kv_cache_dtype))
                if have_llama:
                    rounds["llama_cpp"].append(llama_cpp.in_child(run_llama_cpp, path, vocab, args.threads))
            row = {"shape": shape, "qtype": qt}
            for engine, runs in rounds.items():
                if runs:
                    row[engine] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            if have_llama:
                for k in ("prefill_tok_s", "decode_tok_s"):
                    row[f"{k}_ratio"] = row["miaotui"][k] / row["llama_cpp"][k]
            row["rounds"] = rounds
            rows.append(row)
            m, l = row["miaotui"], row.get("llama_cpp", {})
            print(f"{shape:15s} {qt:5s} decode {m['decode_tok_s']:7.1f} tok/s "
                  f"({m['decode_roofline_fraction']:.0%} of roofline, {m['decode_effective_GBps']:.1f} GB/s)"
                  f" vs llama.cpp {l.get('decode_tok_s', 0):7.1f} | prefill {m['prefill_tok_s']:7.1f} "
                  f"vs {l.get('prefill_tok_s', 0):7.1f} tok/s", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    from miaotui.bench.report import environment
    with open(args.out, "w") as f:
        json.dump({"env": environment(), "kv_cache_dtype": args.kv_cache_dtype, "machine": {"bandwidth_GBps": machine.bandwidth / 1e9,
                   "source": machine.source}, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
