#!/usr/bin/env python3
"""The same offline workload through miaotui, transformers and (when the `llama_cpp`
package is importable and the model is a .gguf file) llama.cpp, in one run; prints
throughput and the ratios against miaotui.

    python scripts/compare_engines.py                        # default SmolLM2 GGUF
    python scripts/compare_engines.py --model smollm2-135m -n 16 --engines miaotui,transformers

Every engine decodes greedily exactly the requested number of tokens per request (EOS
ignored) from identical token ids. miaotui batches all requests (continuous batching),
transformers runs `generate` on padded batches of --hf-batch-size, llama-cpp-python runs
one request at a time (its Python API has no batched generation). Each engine runs in its
own fresh process, so peak RSS is its own.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


from miaotui.bench import throughput as tp
from miaotui.bench.report import make_result, table, write_json
from miaotui.bench.workload import random_requests


def run_miaotui(path: str, requests, threads: int) -> dict:
    from miaotui.engine.llm_engine import EngineConfig, LLMEngine
    with tp.RssSampler() as rss:
        engine = LLMEngine(EngineConfig(model=path, num_threads=threads))
        tp.warm_up(engine)
        run = tp.run_engine(engine, requests)
    return tp.rates(requests, run, rss.peak)


def run_llama_cpp(path: str, requests, threads: int) -> dict:
    from miaotui.bench import llama_cpp
    n_ctx = max(len(r.prompt_ids) + r.output_len for r in requests) + 8
    with tp.RssSampler() as rss:
        llm = llama_cpp.load(path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512)
        n_vocab = llm.n_vocab()
        for _ in zip(range(4), llm.generate(requests[0].prompt_ids[:16], temp=0.0)):  # warm-up
            pass
        llm.reset()
        t0 = time.perf_counter()
        for r in requests:
            ids = [t % n_vocab for t in r.prompt_ids]
            for i, _ in enumerate(llm.generate(ids, temp=0.0, top_k=1, reset=True), 1):
                if i >= r.output_len:
                    break
            llm.reset()
        elapsed = time.perf_counter() - t0
    return tp.rates(requests, {"elapsed_s": elapsed}, rss.peak)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF dir, .gguf, or a shape name (default: SmolLM2 GGUF)")
    ap.add_argument("-n", "--num-prompts", type=int, default=16)
    ap.add_argument("--input-len", default="32-512")
    ap.add_argument("--output-len", default="32-256")
    ap.add_argument("--engines", default="miaotui,transformers,llama.cpp")
    ap.add_argument("--hf-batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", "-o", default=None, help="JSON results")
    args = ap.parse_args(argv)
    import torch

    from miaotui.bench.shapes import resolve_model
    torch.set_num_threads(args.threads)

    from miaotui.loader import default_model_path, open_checkpoint
    path = resolve_model(args.model) or default_model_path()
    vocab = open_checkpoint(path).config.vocab_size
    requests = random_requests(args.num_prompts, args.input_len, args.output_len, vocab, args.seed)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    runs, skipped = {}, {}
    for name in engines:
        print(f"[compare] {name}: {len(requests)} requests ...", file=sys.stderr)
        if name == "miaotui":
            runs[name] = tp.in_child(run_miaotui, path, requests, args.threads)
        elif name == "transformers":
            runs[name] = tp.bench_transformers(path, requests, args.hf_batch_size, threads=args.threads)
        elif name == "llama.cpp":
            from miaotui.bench import llama_cpp
            if not llama_cpp.available():
                skipped[name] = "llama_cpp is not installed (pip install llama-cpp-python)"
                continue
            if not path.endswith(".gguf"):
                skipped[name] = "llama.cpp needs a .gguf model"
                continue
            runs[name] = llama_cpp.in_child(run_llama_cpp, path, requests, args.threads)
        else:
            ap.error(f"unknown engine {name!r}")

    base = runs.get("miaotui")
    rows = [[name, r["elapsed_s"], r["req_s"], r["output_tok_s"], r["total_tok_s"],
             f"{r['peak_rss_bytes'] / 2**20:.0f}",
             f"{base['output_tok_s'] / r['output_tok_s']:.2f}x" if base else "-"]
            for name, r in runs.items()]
    print(f"model {path}; {len(requests)} requests, prompt {args.input_len}, output {args.output_len}, "
          f"{args.threads} threads")
    print(table(rows, ["engine", "seconds", "req/s", "out tok/s", "total tok/s", "peak RSS MiB",
                       "miaotui speedup"]))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    result = make_result("throughput", {**vars(args), "model_path": path},
                         {"runs": runs, "skipped": skipped})
    write_json(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
