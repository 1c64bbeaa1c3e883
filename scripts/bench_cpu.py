"""The fast CPU path side by side with llama.cpp, on the very same weights.

With llama.cpp's own tools (what users compare engines with), given by path:

    B=path/to/llama.cpp/build/bin
    python scripts/bench_cpu.py --llama-bench $B/llama-bench --llama-batched-bench $B/llama-batched-bench \
        --llama-quantize $B/llama-quantize --suites depth,prefill,batched --out results/llama_tools.json

  depth    batch-1 decode tok/s after 0, 128, 512, 2048, 4096 tokens of context
           (`llama-bench -p 0 -n N -d D`) against miaotui decoding N tokens after a prompt
           of D tokens, for each KV cache type of --kv (llama.cpp keeps its default f16)
  prefill  a 512-token prompt (`llama-bench -p 512 -n 0`) against miaotui's time to
           first token on a 512-token prompt
  batched  `llama-batched-bench -npp 128 -ntg 128 -npl 1,4,8,16` against miaotui's offline
           throughput on the same work: npl requests of 128 prompt tokens each, all
           submitted at once, then the same 128 decode steps (max_tokens 129: the first
           token comes from the prompt's logits, as in llama-batched-bench); total tok/s
           = npl * (128 + 128) / seconds. miaotui's KV cache: --batched-kv, default fp16,
           the type llama-batched-bench keeps by default (equal bits; fp32 reads twice the
           KV bytes, which at 16 sequences outweigh Q4_0's weights). With --prefill-int8,
           also miaotui with its opt-in int8-activation prompt path (llama.cpp's prompt
           path rounds activations to 8 bits for these files too)

The test files are random weights of real shapes: F32 written by miaotui's shape writer,
Q8_0 and Q4_0 made from it by `llama-quantize --pure` (every tensor that type) when
--llama-quantize is given, else by miaotui's GGUF writer. Per file the engines take turns
(--repeats rounds; llama.cpp first) and each figure is the median of the rounds; every
round is stored. `--plot` draws the depth sweep (ratio against llama.cpp).

Without --llama-bench: the older comparison through llama-cpp-python (decode after a
128-token prompt, prefill of 512):

    python scripts/bench_cpu.py --shapes smollm2-135m,tinyllama-1.1b --out results/cpu_path.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

import miaotui  # noqa: F401  (before torch: OpenMP wait policy)

QTYPES = ["F32", "Q8_0", "Q4_0"]


def gguf_file(shape: str, qtype: str, llama_quantize: str | None = None) -> str:
    """The shape's random weights as a GGUF file of qtype, made once (cached beside them):
    F32 (and without llama-quantize every type) by miaotui's GGUF writer, else quantized
    from the F32 file by llama-quantize --pure."""
    from miaotui.bench.shapes import shape_dir
    hf = shape_dir(shape)
    if llama_quantize and qtype != "F32":
        from miaotui.bench import llama_tools
        path = os.path.join(hf, f"model-{qtype}-llama-quantize.gguf")
        if not os.path.isfile(path):
            print(f"llama-quantize {qtype} -> {path} ...", file=sys.stderr, flush=True)
        return llama_tools.quantize(llama_quantize, gguf_file(shape, "F32"), path, qtype)
    path = os.path.join(hf, f"model-{qtype}.gguf")
    if not os.path.isfile(path):
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from gguf_writer_util import write_gguf_from_hf
        print(f"writing {path} ...", file=sys.stderr, flush=True)
        tmp = f"{path}.{os.getpid()}.tmp"   # per process: concurrent runs may make the same file
        write_gguf_from_hf(hf, tmp, qtype)
        os.replace(tmp, path)
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


# ---- against llama.cpp's own tools (llama-bench, llama-batched-bench) ----

KV_NAMES = {"fp32": "float32", "fp16": "float16", "int8": "int8"}


def engine_for(path: str, threads: int, kv: str, max_len: int, seqs: int, prefill_int8: bool = False):
    """A miaotui engine for this file with room for `seqs` sequences of max_len tokens."""
    from miaotui.engine.llm_engine import EngineConfig, LLMEngine
    from miaotui.loader import open_checkpoint
    cfg = open_checkpoint(path).config
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4   # fp32: the most
    return LLMEngine(EngineConfig(model=path, num_threads=threads, kv_cache_dtype=KV_NAMES[kv],
                                  max_num_seqs=seqs, max_model_len=max_len, enable_prefix_caching=False,
                                  kv_cache_memory=(32 << 20) + seqs * (max_len + 32) * per_token,
                                  **({"prefill_int8": True} if prefill_int8 else {})))


def miaotui_depths(path: str, vocab: int, threads: int, kv: str, depths: list[int], n_gen: int,
                   seed: int) -> dict[int, float]:
    """{depth: batch-1 decode tok/s over n_gen tokens after a prompt of `depth` tokens}."""
    import gc

    from miaotui.bench.latency import time_request
    eng = engine_for(path, threads, kv, max(depths) + n_gen + 2, 1)
    time_request(eng, prompts(vocab, 16, seed), 8, "warm-up")
    out = {}
    for d in depths:
        r = time_request(eng, prompts(vocab, max(d, 1), seed + d), n_gen + 1, f"depth-{d}")
        out[d] = 1.0 / r["tpot"]
    del eng
    gc.collect()
    return out


def miaotui_prefill(path: str, vocab: int, threads: int, n: int, seed: int, prefill_int8: bool = False) -> float:
    """Prompt tokens/s of one n-token prompt (its time to first token)."""
    import gc

    from miaotui.bench.latency import time_request
    eng = engine_for(path, threads, "fp32", n + 8, 1, prefill_int8)
    time_request(eng, prompts(vocab, 64, seed), 2, "warm-up")
    r = time_request(eng, prompts(vocab, n, seed + 1), 1, "prefill")
    del eng
    gc.collect()
    return n / r["ttft"]


def baseline_prefill(checkout: str, path: str, vocab: int, threads: int, n: int, seed: int) -> float:
    """miaotui_prefill for another miaotui checkout (its own code and kernels), in a child
    process: the before of a before/after comparison, in the same rounds."""
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import bench_cpu; "
            "print(bench_cpu.miaotui_prefill(sys.argv[3], *map(int, sys.argv[4:])))")
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", code, os.path.abspath(checkout), here, path, str(vocab),
                          str(threads), str(n), str(seed)], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    return float(out.stdout.strip().splitlines()[-1])


def miaotui_batched(path: str, vocab: int, threads: int, npp: int, ntg: int, npls: list[int],
                    seed: int, kv: str = "fp16", prefill_int8: bool = False) -> list[dict]:
    """llama-batched-bench's work through miaotui's engine: for each npl, npl requests of npp
    prompt tokens submitted together, each decoding ntg steps (max_tokens ntg + 1)."""
    import gc

    from miaotui.sampling_params import SamplingParams
    eng = engine_for(path, threads, kv, npp + ntg + 2, max(npls), prefill_int8)
    rows = []
    for npl in [1] + npls:  # the first: a warm-up, not kept
        p = SamplingParams(max_tokens=ntg + 1, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        for i in range(npl):
            eng.add_request(f"b{npl}-{i}-{len(rows)}", prompts(vocab, npp, seed + 1000 * npl + i), p)
        first, t_pp = set(), None
        while eng.has_unfinished():
            for out in eng.step():
                if out.outputs[0].token_ids:
                    first.add(out.request_id)
            if t_pp is None and len(first) == npl:
                t_pp = time.perf_counter() - t0
        t = time.perf_counter() - t0
        rows.append({"pl": npl, "t_pp": t_pp, "t": t, "speed": npl * (npp + ntg) / t})
    del eng
    gc.collect()
    return rows[1:]


def median_of(rounds: list, key=None) -> float:
    return statistics.median(r if key is None else key(r) for r in rounds)


def run_depth(args, shape: str, qt: str, path: str, vocab: int, max_len: int) -> list[dict]:
    from miaotui.bench import llama_tools
    depths = [d for d in args.depths if d + args.n_gen + 2 <= max_len]
    skipped = [d for d in args.depths if d not in depths]
    if skipped:
        print(f"{shape}: depths {skipped} skipped (window {max_len})", file=sys.stderr)
    kvs = args.kv.split(",")
    llama_rounds, mt_rounds = [], {kv: [] for kv in kvs}
    for r in range(args.repeats):
        res = llama_tools.run_bench(args.llama_bench, path, args.threads, 0, args.n_gen, depths, 1)
        llama_rounds.append({t["n_depth"]: t["avg_ts"] for t in res})
        for kv in kvs:
            mt_rounds[kv].append(miaotui_depths(path, vocab, args.threads, kv, depths, args.n_gen, 10 * r))
        print(f"  {shape} {qt} round {r}: llama.cpp " +
              " ".join(f"d{d}={llama_rounds[-1][d]:.1f}" for d in depths) + " | miaotui " +
              " ".join(f"{kv}:" + ",".join(f"{mt_rounds[kv][-1][d]:.1f}" for d in depths) for kv in kvs), flush=True)
    rows = []
    for d in depths:
        row = {"shape": shape, "qtype": qt, "depth": d, "n_gen": args.n_gen,
               "llama_cpp_tok_s": median_of(llama_rounds, lambda x: x[d]),
               "llama_cpp_rounds": [x[d] for x in llama_rounds], "miaotui": {}}
        for kv in kvs:
            v = median_of(mt_rounds[kv], lambda x: x[d])
            row["miaotui"][kv] = {"tok_s": v, "rounds": [x[d] for x in mt_rounds[kv]],
                                  "ratio": v / row["llama_cpp_tok_s"]}
        rows.append(row)
    return rows


def int8_applies(args, qt: str) -> bool:
    """--prefill-int8 is timed beside the default for quantized files only (it changes
    nothing for float weights)."""
    return args.prefill_int8 and qt not in ("F32", "F16", "BF16")


def run_prefill(args, shape: str, qt: str, path: str, vocab: int) -> dict:
    from miaotui.bench import llama_tools
    int8 = int8_applies(args, qt)
    ll, mt, mt8, base = [], [], [], []
    for r in range(args.repeats):
        ll.append(llama_tools.run_bench(args.llama_bench, path, args.threads, args.n_prompt, 0, [0], 1)[0]["avg_ts"])
        if args.baseline:
            base.append(baseline_prefill(args.baseline, path, vocab, args.threads, args.n_prompt, 10 * r))
        mt.append(miaotui_prefill(path, vocab, args.threads, args.n_prompt, 10 * r))
        if int8:
            mt8.append(miaotui_prefill(path, vocab, args.threads, args.n_prompt, 10 * r, prefill_int8=True))
        print(f"  {shape} {qt} round {r}: pp{args.n_prompt} llama.cpp {ll[-1]:.1f} miaotui {mt[-1]:.1f} tok/s"
              + (f", with prefill_int8 {mt8[-1]:.1f}" if int8 else "")
              + (f", baseline {base[-1]:.1f}" if base else ""), flush=True)
    row = {"shape": shape, "qtype": qt, "n_prompt": args.n_prompt, "llama_cpp_tok_s": statistics.median(ll),
           "miaotui_tok_s": statistics.median(mt), "llama_cpp_rounds": ll, "miaotui_rounds": mt}
    row["ratio"] = row["miaotui_tok_s"] / row["llama_cpp_tok_s"]
    if int8:
        row.update(miaotui_int8_tok_s=statistics.median(mt8), miaotui_int8_rounds=mt8,
                   ratio_int8=statistics.median(mt8) / row["llama_cpp_tok_s"])
    if base:
        row.update(baseline=args.baseline, baseline_tok_s=statistics.median(base), baseline_rounds=base,
                   ratio_baseline=statistics.median(base) / row["llama_cpp_tok_s"])
    return row


def run_batched(args, shape: str, qt: str, path: str, vocab: int) -> list[dict]:
    from miaotui.bench import llama_tools
    # miaotui's variants: the default, and with --prefill-int8 the int8 prompt path too;
    # their JSON keys: miaotui{sfx}_tok_s, miaotui{sfx}_rounds, ratio{sfx}
    variants = [("", False)] + ([("_int8", True)] if int8_applies(args, qt) else [])
    ll, mt = [], {sfx: [] for sfx, _ in variants}
    for r in range(args.repeats):
        # a one-sequence case first as a warm-up (llama-batched-bench has none), not kept
        ll.append({x["pl"]: x for x in llama_tools.run_batched(args.llama_batched_bench, path, args.threads,
                                                               args.npp, args.ntg, [1] + args.npl)[1:]})
        for sfx, int8 in variants:
            mt[sfx].append({x["pl"]: x for x in miaotui_batched(path, vocab, args.threads, args.npp, args.ntg,
                                                                args.npl, 10 * r, args.batched_kv, int8)})
        print(f"  {shape} {qt} round {r}: total tok/s by npl: llama.cpp " +
              " ".join(f"{n}:{ll[-1][n]['speed']:.1f}" for n in args.npl) +
              "".join(f" | miaotui{' with prefill_int8' if int8 else ''} " +
                      " ".join(f"{n}:{mt[sfx][-1][n]['speed']:.1f}" for n in args.npl) for sfx, int8 in variants),
              flush=True)
    rows = []
    for n in args.npl:
        row = {"shape": shape, "qtype": qt, "npp": args.npp, "ntg": args.ntg, "npl": n, "kv": args.batched_kv,
               "llama_cpp_tok_s": median_of(ll, lambda x: x[n]["speed"]), "llama_cpp_rounds": [x[n] for x in ll]}
        for sfx, _ in variants:
            row[f"miaotui{sfx}_tok_s"] = median_of(mt[sfx], lambda x: x[n]["speed"])
            row[f"miaotui{sfx}_rounds"] = [x[n] for x in mt[sfx]]
            row[f"ratio{sfx}"] = row[f"miaotui{sfx}_tok_s"] / row["llama_cpp_tok_s"]
            row[f"ratio{sfx}_paired"] = paired_ratio(row[f"miaotui{sfx}_rounds"], row["llama_cpp_rounds"])
        rows.append(row)
    return rows


def paired_ratio(ours: list[dict], theirs: list[dict]) -> float:
    """The median over rounds of miaotui's speed over llama.cpp's in the same round: on a
    host whose speed drifts between rounds, each round's engines saw about the same machine."""
    return statistics.median(a["speed"] / b["speed"] for a, b in zip(ours, theirs))


def plot_depth(rows: list[dict], png: str) -> None:
    """miaotui's decode speed over llama.cpp's against context depth, one panel per shape."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4), squeeze=False)
    colors: dict[str, str] = {}  # one color per weight type across the panels
    for ax, shape in zip(axes[0], shapes):
        mine = [r for r in rows if r["shape"] == shape]
        for qt in dict.fromkeys(r["qtype"] for r in mine):
            pts = sorted((r for r in mine if r["qtype"] == qt), key=lambda r: r["depth"])
            color = colors.setdefault(qt, f"C{len(colors)}")
            for kv, style in zip(pts[0]["miaotui"], ("-", "--", ":")):
                ax.plot([r["depth"] for r in pts], [r["miaotui"][kv]["ratio"] for r in pts], style, marker="o",
                        color=color, label=f"{qt}, KV {kv}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.axhline(1.2, color="gray", lw=0.8, ls="--")
        ax.set_xscale("symlog", linthresh=128)
        ax.set_xlim(left=0)
        ax.set_xlabel("context depth (tokens)")
        ax.set_ylabel("decode tok/s, miaotui / llama-bench (f16 KV)")
        ax.set_title(f"{shape} shape, batch-1 decode, 2 threads")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def tools_main(args) -> None:
    from miaotui.bench import llama_tools
    from miaotui.bench.report import environment
    suites = args.suites.split(",")
    for flag, suite_names in (("llama_bench", ("depth", "prefill")), ("llama_batched_bench", ("batched",))):
        if any(s in suites for s in suite_names):
            if not getattr(args, flag):
                sys.exit(f"--{flag.replace('_', '-')} is needed for suites {suite_names}")
            llama_tools.check_tool(getattr(args, flag), "--" + flag.replace("_", "-"))
    if args.llama_quantize:
        llama_tools.check_tool(args.llama_quantize, "--llama-quantize")
    result = {"env": environment(), "args": vars(args), "files": {}, "depth": [], "prefill": [], "batched": [],
              "llama_cpp_build": llama_tools.build_config(args.llama_batched_bench or args.llama_bench)}
    busy = start_busy(args.busy)
    try:
        _tools_runs(args, suites, result)
    finally:
        for proc in busy:
            proc.kill()


def start_busy(n: int) -> list:
    """n competing processes, each spinning on one core for the whole run (issue 17's busy
    machine: how each engine copes with a core it does not have to itself)."""
    import subprocess
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _tools_runs(args, suites: list[str], result: dict) -> None:
    from miaotui.bench.shapes import hf_config

    def save():
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    for shape in args.shapes.split(","):
        cfg = hf_config(shape)
        vocab, max_len = cfg["vocab_size"], cfg["max_position_embeddings"]
        for qt in args.qtypes.split(","):
            path = gguf_file(shape, qt, args.llama_quantize)
            result["files"][f"{shape}/{qt}"] = path
            if "prefill" in suites:
                row = run_prefill(args, shape, qt, path, vocab)
                result["prefill"].append(row)
                print(f"{shape:15s} {qt:5s} pp{args.n_prompt}: miaotui {row['miaotui_tok_s']:.1f} llama.cpp "
                      f"{row['llama_cpp_tok_s']:.1f} tok/s ({row['ratio']:.2f}x)", flush=True)
                save()
            if "depth" in suites:
                rows = run_depth(args, shape, qt, path, vocab, max_len)
                result["depth"] += rows
                for r in rows:
                    print(f"{shape:15s} {qt:5s} depth {r['depth']:5d}: llama.cpp {r['llama_cpp_tok_s']:7.1f} | " +
                          " ".join(f"{kv} {v['tok_s']:7.1f} ({v['ratio']:.2f}x)" for kv, v in r["miaotui"].items()),
                          flush=True)
                save()
            if "batched" in suites:
                rows = run_batched(args, shape, qt, path, vocab)
                result["batched"] += rows
                for r in rows:
                    print(f"{shape:15s} {qt:5s} npl {r['npl']:2d}: miaotui {r['miaotui_tok_s']:7.1f} llama.cpp "
                          f"{r['llama_cpp_tok_s']:7.1f} total tok/s ({r['ratio']:.2f}x, paired by round "
                          f"{r['ratio_paired']:.2f}x)" + (f"; --prefill-int8 {r['miaotui_int8_tok_s']:7.1f} "
                                                         f"({r['ratio_int8']:.2f}x, paired {r['ratio_int8_paired']:.2f}x)"
                                                         if "ratio_int8" in r else ""), flush=True)
                save()
    if args.plot and result["depth"]:
        plot_depth(result["depth"], args.plot)
    save()


def legacy_main(args) -> None:
    """miaotui against llama-cpp-python (no llama.cpp tool given)."""
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


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="smollm2-135m,tinyllama-1.1b")
    ap.add_argument("--qtypes", default=",".join(QTYPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (llama.cpp, miaotui) per file")
    ap.add_argument("--kv-cache-dtype", default="auto",
                    help="(llama-cpp-python comparison) miaotui's KV cache: auto (float32 here) or fp16")
    ap.add_argument("--llama-bench", help="path of llama.cpp's llama-bench: compare with it")
    ap.add_argument("--llama-batched-bench", help="path of llama.cpp's llama-batched-bench")
    ap.add_argument("--llama-quantize", help="path of llama-quantize: makes the Q8_0/Q4_0 files")
    ap.add_argument("--suites", default="depth,prefill,batched", help="with the llama.cpp tools")
    ap.add_argument("--depths", type=ints, default=[0, 128, 512, 2048, 4096])
    ap.add_argument("--n-gen", type=int, default=32, help="decode tokens timed at each depth")
    ap.add_argument("--kv", default="fp32,fp16,int8", help="miaotui's KV cache types in the depth sweep")
    ap.add_argument("--n-prompt", type=int, default=512, help="prompt tokens of the prefill suite")
    ap.add_argument("--baseline", metavar="CHECKOUT",
                    help="prefill suite: also time the miaotui checkout at this path in each round "
                         "(before/after under the same load)")
    ap.add_argument("--prefill-int8", action="store_true",
                    help="prefill and batched suites: also time miaotui with prefill_int8 (quantized files)")
    ap.add_argument("--npp", type=int, default=128)
    ap.add_argument("--ntg", type=int, default=128)
    ap.add_argument("--npl", type=ints, default=[1, 4, 8, 16])
    ap.add_argument("--batched-kv", default="fp16", choices=sorted(KV_NAMES),
                    help="miaotui's KV cache in the batched suite (llama-batched-bench keeps f16)")
    ap.add_argument("--plot", help="PNG of the depth sweep")
    ap.add_argument("--plot-from", nargs="+", metavar="JSON",
                    help="no run: draw --plot from the depth rows of these saved results")
    ap.add_argument("--busy", type=int, default=0, help="competing busy-loop processes during the run")
    ap.add_argument("--out", default=None, help="JSON (default results/llama_tools.json, or "
                    "results/cpu_path.json without the tools)")
    args = ap.parse_args()
    if args.plot_from:
        if not args.plot:
            sys.exit("--plot-from needs --plot PNG")
        rows = [r for f in args.plot_from for r in json.load(open(f))["depth"]]
        if not rows:
            sys.exit("bench_cpu: no depth rows in " + " ".join(args.plot_from))
        plot_depth(rows, args.plot)
        print(f"wrote {args.plot} ({len(rows)} rows)")
        return
    for k in ("llama_bench", "llama_batched_bench", "llama_quantize"):
        if getattr(args, k):
            setattr(args, k, os.path.abspath(os.path.expanduser(getattr(args, k))))
    if args.llama_bench or args.llama_batched_bench:
        args.out = args.out or "results/llama_tools.json"
        try:
            tools_main(args)
        except Exception as e:  # a tool's failure: one line
            from miaotui.bench.llama_tools import ToolError
            if isinstance(e, ToolError):
                sys.exit(f"bench_cpu: {e}")
            raise
    else:
        args.out = args.out or "results/cpu_path.json"
        legacy_main(args)


if __name__ == "__main__":
    main()
