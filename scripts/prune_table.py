"""Pruning's quality x speed table: perplexity on held-out text and batch-1 decode tok/s of
each pruned variant against the dense model, in the same run, on the real models.

    python scripts/prune_table.py --out results/prune_table.json
    python scripts/prune_table.py --kernel-only --out results/prune_kernel.json

Per model (SmolLM2-135M: the default Q4_1 GGUF; Gemma-3-270M Q4_K_M), dequantized to
float32 first as `miaotui prune` does: magnitude / Wanda / SparseGPT at 50% unstructured
and at 2:4, layer drop of 10% and 20% of the blocks, MLP width -25%, and SparseGPT 2:4 with
int8 values (against the dense model quantized to int8). Calibration uses the second half
of --text (its characters), perplexity the first --tokens tokens of the first half, so the
two never overlap. Decode speed: rounds of one greedy request per variant (prompt 32,
--gen tokens) of the variant and of its baseline (loaded side by side) in turn, --rounds
times; speedup = the median of the per-round ratios. On a shared machine wall-clock times
swing several-fold with other jobs, so the kernels run on --threads (default 1) and the
speed is measured in decode tokens per CPU second of the process (wall-clock too, *_wall).
2:4 variants run on the compressed weights and sparse kernels (layers/sparse.py); the 50%
unstructured ones run dense (no runtime format for unstructured sparsity).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import model_paths  # noqa: E402  (the two real models, as the quality table finds them)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# name -> (prune arguments or None for the dense model, load arguments, baseline name)
VARIANTS = {
    "dense": (None, dict(quantization="none"), None),
    "magnitude-50%": (dict(method="magnitude", sparsity=0.5), {}, "dense"),
    "wanda-50%": (dict(method="wanda", sparsity=0.5), {}, "dense"),
    "sparsegpt-50%": (dict(method="sparsegpt", sparsity=0.5), {}, "dense"),
    "magnitude-2:4": (dict(method="magnitude", pattern="2:4"), {}, "dense"),
    "wanda-2:4": (dict(method="wanda", pattern="2:4"), {}, "dense"),
    "sparsegpt-2:4": (dict(method="sparsegpt", pattern="2:4"), {}, "dense"),
    "layers-10%": (dict(method="layers", sparsity=0.1), {}, "dense"),
    "layers-20%": (dict(method="layers", sparsity=0.2), {}, "dense"),
    "width-25%": (dict(method="width", sparsity=0.25), {}, "dense"),
    "dense-int8": (None, dict(quantization="int8"), None),
    "sparsegpt-2:4-int8": (dict(method="sparsegpt", pattern="2:4"), dict(quantization="int8"), "dense-int8"),
}


def weight_bytes(model) -> tuple[int, int]:
    """(parameters, bytes a decode step reads: every linear weight incl. the head)."""
    from miaotui.layers.linear import Linear
    seen = {p.data_ptr(): p.numel() for p in model.parameters()}   # a tied head counts once
    params = sum(seen.values())
    read = 0
    for m in model.modules():
        if isinstance(m, Linear):
            if m.qweight is not None:
                read += m.qweight.nbytes()
                if m is not model.lm_head or not model.cfg.tie_word_embeddings:
                    params += m.qweight.out_features * m.qweight.in_features
            else:
                read += m.weight.numel() * m.weight.element_size()
    return params, read


THREADS = None


def make_llm(path: str, load: dict):
    from miaotui import LLM
    return LLM(path, enable_prefix_caching=False, kv_cache_memory=64 << 20, num_threads=THREADS,
               max_num_batched_tokens=2048, max_num_seqs=4, **load)


def decode_tok_s(llm, gen: int, seed: int) -> tuple[float, float]:
    """One greedy request (32-token prompt, `gen` new tokens): decode tokens per wall-clock
    second and per CPU second of this process (the latter barely moves when other jobs take
    the cores away, as long as the kernels run on one thread: --threads 1)."""
    import random
    from miaotui.sampling_params import SamplingParams
    rng = random.Random(seed)
    ids = [rng.randrange(300, 5000) for _ in range(32)]
    eng = llm.engine
    eng.add_request(f"d{seed}", ids, SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True))
    start, n = None, 0
    while eng.has_unfinished():
        for out in eng.step():
            n = len(out.outputs[0].token_ids)
        if start is None and n:
            start, first = (time.perf_counter(), time.process_time()), n
    wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
    return (n - first) / wall, (n - first) / cpu


def kernel_bench(rounds: int = 7, layers: int = 8) -> dict:
    """The matmuls alone at batch 1 on SmolLM2's gate/up shape [3072, 576], `layers` copies
    (out of cache, as in a decode step): dense float32 vs 2:4 float32, dense int8 vs 2:4 int8,
    alternating, medians of `rounds` (microseconds per matrix)."""
    import torch
    from miaotui import kernels
    from miaotui.layers.quant import quantize_int8
    from miaotui.layers.sparse import Sparse24Weight
    from miaotui.optimize.prune import magnitude_prune
    k = kernels.load()
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(3072, 576, generator=g) for _ in range(layers)]
    kinds = {
        "dense-fp32": [lambda x, w=w: k.f32_matmul(x, w) for w in ws],
        "2:4-fp32": [Sparse24Weight.from_dense(magnitude_prune(w, pattern=(2, 4))).matmul for w in ws],
        "dense-int8": [quantize_int8(w).matmul for w in ws],
        "2:4-int8": [Sparse24Weight.from_dense(magnitude_prune(w, pattern=(2, 4)), True).matmul for w in ws],
    }
    x = torch.randn(1, 576, generator=g)
    times = {n: [] for n in kinds}
    for _ in range(rounds):
        for name, fs in kinds.items():
            t0 = time.perf_counter()
            for _ in range(10):
                for f in fs:
                    f(x)
            times[name].append((time.perf_counter() - t0) / (10 * layers) * 1e6)
    us = {n: round(statistics.median(t), 1) for n, t in times.items()}
    return {"shape": [3072, 576], "threads": torch.get_num_threads(), "us_per_matrix": us,
            "speedup_fp32": round(us["dense-fp32"] / us["2:4-fp32"], 3),
            "speedup_int8": round(us["dense-int8"] / us["2:4-int8"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=os.path.join(ROOT, "tests", "data", "shakespeare_40k.txt"))
    ap.add_argument("--tokens", type=int, default=2048, help="scored tokens")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--gen", type=int, default=16, help="tokens generated per decode timing")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "miaotui_prune_table"),
                    help="where pruned checkpoints go (reused when present)")
    ap.add_argument("--out", default="results/prune_table.json")
    ap.add_argument("--kernel-only", action="store_true",
                    help="only time the matmuls (kernel_bench) and write that to --out")
    ap.add_argument("--threads", type=int, default=1,
                    help="kernel threads for the speed runs (1: CPU time is a fair measure on a shared machine)")
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads
    if args.kernel_only:
        import torch
        from miaotui import kernels
        torch.set_num_threads(args.threads)
        kernels.load().set_threads(args.threads)
        res = kernel_bench()
        print(json.dumps(res))
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
        return
    from miaotui.bench.perplexity import perplexity
    from miaotui.optimize.prune import prune_model_dir
    text = open(args.text, encoding="utf-8").read()
    half = len(text) // 2
    os.makedirs(args.work, exist_ok=True)
    calib = os.path.join(args.work, "calib.txt")
    with open(calib, "w", encoding="utf-8") as f:
        f.write(text[half:])
    names = args.variants.split(",")
    result = {"text": os.path.basename(args.text), "threads": args.threads,
              "speed": "decode tokens per CPU second (decode_tok_s, speedup) and per wall-clock second (*_wall)", "scored_tokens": args.tokens, "window": args.window,
              "calib_tokens": args.calib_tokens, "gen_tokens": args.gen, "rounds": args.rounds,
              "note": "2 CPU cores shared with other jobs: decode speeds are noisy", "rows": []}
    for model, src in model_paths().items():
        if model not in args.models.split(","):
            continue
        paths, rows = {}, {}
        for name in names:
            spec, load, base = VARIANTS[name]
            if spec is None:
                paths[name] = src
                continue
            key = "-".join(f"{v}" for v in spec.values()).replace(":", "_")
            out = os.path.join(args.work, f"{model}-{key}")
            if not os.path.isfile(os.path.join(out, "config.json")):
                t0 = time.perf_counter()
                prune_model_dir(src, out, calib=calib, calib_tokens=args.calib_tokens, progress=False, **spec)
                print(f"{model} {name}: pruned in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            paths[name] = out
        for name in names:   # quality, once (deterministic), cached beside the checkpoints
            spec, load, base = VARIANTS[name]
            cache = os.path.join(args.work, f"{model}-{name.replace(':', '_')}-{args.tokens}-{args.window}.json")
            if os.path.isfile(cache):
                rows[name] = json.load(open(cache))
                continue
            llm = make_llm(paths[name], load)
            ids = llm.tokenizer.encode(text[:half])[: args.tokens]
            ppl = perplexity(llm.engine, ids, args.window, args.window)["perplexity"]
            params, read = weight_bytes(llm.engine.model)
            rows[name] = dict(model=model, variant=name, perplexity=round(ppl, 3), params=params,
                              decode_bytes=read, baseline=base,
                              sparse_kernels=any(type(getattr(m, "qweight", None)).__name__ == "Sparse24Weight"
                                                 for m in llm.engine.model.modules()),
                              fused_decode=llm.engine.runner.decoder is not None)
            json.dump(rows[name], open(cache, "w"))
            print(f"{model} {name}: perplexity {ppl:.3f}", file=sys.stderr)
            del llm
            gc.collect()
        for name in names:   # speed: each variant beside its baseline, alternating
            base = VARIANTS[name][2]
            if base is None or base not in names:
                continue
            a, b = make_llm(paths[base], VARIANTS[base][1]), make_llm(paths[name], VARIANTS[name][1])
            decode_tok_s(a, 4, seed=99), decode_tok_s(b, 4, seed=99)   # warm-up
            ta, tb = [], []
            for r in range(args.rounds):
                ta.append(decode_tok_s(a, args.gen, seed=r))
                tb.append(decode_tok_s(b, args.gen, seed=r))
            for i, kind in ((1, "cpu"), (0, "wall")):
                ratios = sorted(y[i] / x[i] for x, y in zip(ta, tb))
                suffix = "" if kind == "cpu" else "_wall"
                rows[name].update({f"decode_tok_s{suffix}": round(statistics.median(y[i] for y in tb), 2),
                                   f"baseline_tok_s{suffix}": round(statistics.median(x[i] for x in ta), 2),
                                   f"speedup{suffix}": round(statistics.median(ratios), 3),
                                   f"speedup{suffix}_range": [round(ratios[0], 3), round(ratios[-1], 3)]})
                if kind == "cpu":
                    rows[base].setdefault("decode_tok_s_runs", []).append(rows[name]["baseline_tok_s"])
            print(f"{model} {name}: {rows[name]['decode_tok_s']} tok/s vs {base} "
                  f"{rows[name]['baseline_tok_s']}: {rows[name]['speedup']}x", file=sys.stderr)
            del a, b
            gc.collect()
        for name in names:
            row = rows[name]
            if "decode_tok_s_runs" in row:
                row["decode_tok_s"] = round(statistics.median(row["decode_tok_s_runs"]), 2)
            base = rows.get(row["baseline"] or name)
            if base is not None:
                row["ppl_vs_baseline_pct"] = round(100 * (row["perplexity"] / base["perplexity"] - 1), 1)
                row["bytes_ratio"] = round(base["decode_bytes"] / row["decode_bytes"], 3)
            result["rows"].append(row)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"{'model':14} {'variant':20} {'ppl':>8} {'d ppl':>7} {'tok/s':>7} {'speedup':>7} {'bytes':>6}")
    for row in result["rows"]:
        print(f"{row['model']:14} {row['variant']:20} {row['perplexity']:8.2f} "
              f"{row.get('ppl_vs_baseline_pct', 0):+6.1f}% {row.get('decode_tok_s', 0):7.1f} "
              f"{row.get('speedup', 1):7.2f}x {row.get('bytes_ratio', 1):5.2f}x")


if __name__ == "__main__":
    main()
