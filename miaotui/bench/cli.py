"""Subcommands: `miaotui bench latency|throughput|serve|compare|gpu`, `miaotui estimate`,
`miaotui perplexity`. Model names may also be random-weight shapes (smollm2-135m,
tinyllama-1.1b; see miaotui.bench.shapes)."""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys

from miaotui.cli import at_least, positive
from miaotui.config import MiaotuiError


def _cli():
    import miaotui.cli
    return miaotui.cli


def _model_path(args) -> str | None:
    from miaotui.bench.shapes import resolve_model
    return resolve_model(args.model)


def _engine(args, **overrides):
    from miaotui.engine.llm_engine import EngineConfig, LLMEngine
    kwargs = {**_cli().engine_kwargs(args), **overrides}
    engine = LLMEngine(EngineConfig(model=_model_path(args), **kwargs))
    print(f"[miaotui] loaded {engine.model_path}", file=sys.stderr)
    from miaotui.bench.report import warn_if_busy
    warn_if_busy()
    return engine


def _machine(args):
    if getattr(args, "no_roofline", False):
        return None
    from miaotui.bench.roofline import load_machine
    return load_machine(recalibrate=getattr(args, "calibrate", False))


def _output_args(p: argparse.ArgumentParser, roofline: bool = True) -> None:
    p.add_argument("--output", "-o", default=None, help="write the results as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG plot here")
    if roofline:
        p.add_argument("--no-roofline", action="store_true", help="skip the roofline prediction")
        p.add_argument("--calibrate", action="store_true", help="re-measure bandwidth and FLOP/s first")


def _finish(result: dict, args) -> None:
    from miaotui.bench import report
    report.write_json(result, args.output)
    if args.plot:
        report.plot(result, args.plot)


def _config(args, skip=("func",)) -> dict:
    return {k: v for k, v in vars(args).items() if k not in skip and not callable(v)}


# ---- bench latency ----------------------------------------------------------------------
def cmd_latency(args) -> None:
    from miaotui.bench.latency import print_latency, run_latency
    from miaotui.bench.report import make_result
    engine = _engine(args)
    res = run_latency(engine, args.prompt_len, args.output_len, args.repeats, args.warmup,
                      args.seed, _machine(args))
    print_latency(res, args.prompt_len, args.output_len)
    from miaotui.bench.memory import engine_breakdown
    mem = engine_breakdown(engine)
    print(mem.describe())
    res["results"]["memory"] = mem.to_dict()
    cfg = {**_config(args), "model_path": engine.model_path}
    result = make_result("latency", cfg, res["results"], res["roofline"])
    _spec_stats(engine, result)
    _finish(result, args)


def _spec_stats(engine, result: dict) -> None:
    """With --speculative: the engine's acceptance, printed and in the JSON."""
    if engine.speculator is None:
        return
    st = engine.speculator.stats
    result["speculative"] = {**st, "acceptance_rate": st["accepted"] / st["proposed"] if st["proposed"] else None,
                             "mean_accepted_length": st["accepted"] / st["steps"] if st["steps"] else None}
    print(f"speculative: {st['accepted']}/{st['proposed']} guesses accepted, "
          f"{result['speculative']['mean_accepted_length'] or 0:.2f} per verify step")


# ---- bench spec -------------------------------------------------------------------------
def cmd_spec(args) -> None:
    from miaotui.bench import speculative as sb
    from miaotui.bench.spec_tasks import TASKS
    methods = []
    for m in filter(None, args.methods.split(",")):
        if m not in ("ngram", "self-int4"):
            raise MiaotuiError(f"--methods: {m!r} is not ngram or self-int4 (a draft model: --draft-model)")
        methods.append({"method": m, "num_tokens": args.num_spec_tokens,
                        "prompt_lookup_max": args.prompt_lookup_max, "prompt_lookup_min": args.prompt_lookup_min})
    if args.draft_model:
        if not os.path.exists(args.draft_model):
            raise MiaotuiError(f"draft model path not found: {args.draft_model}")
        methods.append({"method": "draft", "model": args.draft_model, "num_tokens": args.num_spec_tokens})
    tasks = args.tasks.split(",")
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise MiaotuiError(f"--tasks: unknown {bad[0]!r} (choose from {', '.join(TASKS)})")
    engine = _engine(args, max_num_seqs=1)
    result = sb.run(engine, methods, tasks, args.repeats, args.max_tokens)
    result["config"] = _config(args)
    print(sb.table(result))
    from miaotui.bench import report
    report.write_json(result, args.output)


# ---- bench throughput -------------------------------------------------------------------
def _requests(args, vocab_size: int, tokenizer):
    from miaotui.bench.workload import random_requests, sharegpt_requests
    if args.dataset:
        reqs = sharegpt_requests(args.dataset, args.num_prompts, tokenizer, args.max_len, args.seed)
        if not reqs:
            raise MiaotuiError(f"{args.dataset}: no usable ShareGPT conversations")
        return reqs
    return random_requests(args.num_prompts, args.input_len, args.output_len, vocab_size, args.seed)


def cmd_throughput(args) -> None:
    from miaotui.bench import throughput as tp
    from miaotui.bench.report import make_result
    from miaotui.loader import default_model_path, load_tokenizer, open_checkpoint
    path = _model_path(args) or default_model_path()
    runs, roof = {}, {}
    if args.backend in ("miaotui", "both"):
        engine = _engine(args)
        requests = _requests(args, engine.model_config.vocab_size, engine.tokenizer)
        runs["miaotui"], roof = tp.bench_engine(engine, requests, _machine(args))
        _spec_stats(engine, runs["miaotui"])
        del engine
        gc.collect()
    else:
        ckpt = open_checkpoint(path)
        requests = _requests(args, ckpt.config.vocab_size, load_tokenizer(ckpt))
    if args.backend in ("transformers", "both"):
        print(f"[miaotui] transformers: {len(requests)} requests, batch size {args.hf_batch_size}",
              file=sys.stderr)
        runs["transformers"] = tp.bench_transformers(path, requests, args.hf_batch_size,
                                                     threads=args.threads)
    tp.print_runs(runs, roof)
    results = {"runs": runs}
    if len(runs) == 2:
        results["miaotui_over_transformers"] = runs["miaotui"]["output_tok_s"] / runs["transformers"]["output_tok_s"]
    _finish(make_result("throughput", {**_config(args), "model_path": path}, results, roof), args)


# ---- bench serve ------------------------------------------------------------------------
def _floats(text: str) -> list[float]:
    return [float(x) for x in str(text).split(",") if x.strip()]


def cmd_serve(args) -> None:
    from miaotui.bench.report import make_result
    from miaotui.bench.serve import print_serve, run_serve
    from miaotui.bench.workload import random_requests, sharegpt_requests
    if args.dataset:
        requests = sharegpt_requests(args.dataset, args.num_prompts, None, args.max_len, args.seed)
    else:
        requests = random_requests(args.num_prompts, args.input_len, args.output_len, 0, args.seed, text=True)
    rates = _floats(args.request_rate) if args.request_rate else None
    conc = [int(c) for c in _floats(args.concurrency)] if not rates else None
    res = run_serve(args.base_url, requests, conc, rates, args.served_model, args.max_duration,
                    args.timeout, not args.no_ignore_eos,
                    args.slo_ttft / 1e3 if args.slo_ttft else None,
                    args.slo_tpot / 1e3 if args.slo_tpot else None,
                    args.api_key or os.environ.get("OPENAI_API_KEY"))
    print_serve(res)
    _finish(make_result("serve", _config(args), res), args)


# ---- bench compare ----------------------------------------------------------------------
def cmd_compare(args) -> None:
    from miaotui.bench.report import compare
    docs = []
    for path in (args.a, args.b):
        try:
            with open(path) as f:
                docs.append(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise MiaotuiError(f"cannot read {path}: {e}") from None
    print(f"A: {args.a} ({docs[0].get('kind')})\nB: {args.b} ({docs[1].get('kind')})")
    print(compare(*docs))


# ---- bench gpu --------------------------------------------------------------------------
def cmd_gpu(args) -> None:
    from miaotui.bench import gpu
    docs = gpu.run([s for s in args.suites.split(",") if s], args.device, args.out, args.smoke)
    failed = [f"{r['family']} {r['dtype']}" for r in docs.get("parity", {}).get("results", []) if not r["passed"]]
    if failed:
        raise MiaotuiError(f"parity with transformers failed: {', '.join(failed)} (see gpu_parity.json)")


# ---- estimate ---------------------------------------------------------------------------
def cost_model_for(args):
    """The analytic cost model of --model with these settings (no weights loaded)."""
    from miaotui.bench import roofline
    from miaotui.loader import default_model_path, open_checkpoint
    path = _model_path(args) or default_model_path()
    ckpt = open_checkpoint(path)
    cfg = ckpt.config
    kv = roofline.kv_bytes_per_token(cfg, args.kv_cache_dtype, args.dtype)
    gguf_file = str(getattr(ckpt, "path", path))
    if args.quantization is None and gguf_file.endswith(".gguf"):
        return roofline.CostModel.from_gguf(gguf_file, cfg, kv), path
    fmt = roofline.weight_format(args.quantization, args.dtype, args.group_size)
    return roofline.CostModel.from_config(cfg, fmt, args.kv_cache_dtype, args.dtype), path


def cmd_estimate(args) -> None:
    import psutil

    from miaotui.bench import roofline
    from miaotui.bench.report import make_result, table
    cost, path = cost_model_for(args)
    cfg = cost.cfg
    machine = roofline.load_machine(args.threads, recalibrate=args.calibrate)
    P, B = args.prompt_len, args.batch
    ctx = args.context or P + args.output_len // 2
    MB, G = 1e6, 1e9
    head = (f"head = embedding {cost.embed_bytes / MB:.1f} (tied)" if cost.shared_head else
            f"head {cost.lm_head_bytes / MB:.1f}, embedding {cost.embed_bytes / MB:.1f}")
    print(f"model: {path} ({cfg.model_type}), {cfg.num_params() / 1e6:.1f}M params, weights "
          f"{cost.weights_name}: {cost.weight_memory() / MB:.1f} MB in memory (layers "
          f"{cost.layer_weight_bytes / MB:.1f}, {head})")
    print(f"KV cache: {cost.kv_per_token / 1024:.1f} KiB/token ({args.kv_cache_dtype}); machine: "
          f"{machine.bandwidth / G:.1f} GB/s, fp32 {machine.flops['float32'] / G:.0f} GFLOP/s ({machine.source})")
    items = [(f"prefill {P} tokens", cost.prefill(P), P), ("  per prefill token", cost.prefill(P).scaled(1 / P), 1),
             (f"decode step, batch 1, ctx {ctx}", cost.decode(1, ctx), 1),
             (f"decode step, batch {B}, ctx {ctx}", cost.decode(B, ctx), B)]
    rows, out = [], {}
    for label, c, toks in items:
        t = machine.time(c)
        rows.append([label, c.flops / G, c.bytes / MB, c.flops / max(c.bytes, 1), t * 1e3,
                     machine.bound(c), toks / t])
        out[label.strip()] = {"flops": c.flops, "bytes": c.bytes, "time_s": t, "tok_s": toks / t,
                              "bound": machine.bound(c)}
    print(table(rows, ["", "GFLOP", "MB moved", "FLOP/B", "predicted ms", "bound", "tok/s"]))
    from miaotui.bench.memory import workspace_bytes
    mem = _estimate_memory(args, cost, path, B, ctx)
    budget = args.memory_budget or psutil.virtual_memory().available
    per_seq = ctx * cost.kv_per_token + 4 * cfg.vocab_size    # its KV and a logits row
    step = min(args.max_num_batched_tokens, B * ctx)
    fixed = mem.runtime + mem.weights + mem.embedding + mem.other_weights + workspace_bytes(cfg, step, 0)
    fits = max(0, int((budget - fixed) // per_seq))
    print(f"memory, batch {B} x {ctx} tokens (predicted; `miaotui bench latency` measures it):")
    print("\n".join(mem.lines()))
    print(f"largest batch of {ctx}-token sequences in {budget / G:.1f} GB: {fits}")
    results = {"costs": out, "memory": mem.to_dict(), "max_batch": fits, "budget_bytes": budget,
               "weight_bytes": cost.weight_memory(), "kv_bytes_per_token": cost.kv_per_token}
    results.update(_scale_out(args, cost, machine, P, B, ctx))
    from miaotui.bench import report
    report.write_json(make_result("estimate", {**_config(args), "model_path": path}, results,
                                  {"bandwidth": machine.bandwidth, "flops": machine.flops,
                                   "source": machine.source}), args.output)


def _scale_out(args, cost, machine, P: int, B: int, ctx: int) -> dict:
    """--tp/--dp/--scaling-table: the distributed predictions (bench/scaling.py)."""
    from miaotui.bench import scaling
    from miaotui.bench.report import table
    out = {}
    n, m = args.tensor_parallel_size, args.dp
    if n > 1 or m > 1:
        link = scaling.Link(args.link_gbps or scaling.LOOPBACK.gbps,
                            args.link_latency_us or scaling.LOOPBACK.latency_us)
        same = not args.nodes
        rows = []
        for label, step, toks in ((f"prefill {P} tokens", cost.prefill(P), P),
                                  ("decode step, batch 1", cost.decode(1, ctx), 1),
                                  (f"decode step, batch {B}", cost.decode(B, ctx), B)):
            one = machine.time(step)
            r = scaling.tp_step(cost, machine, link, n, toks, step, same)
            rows.append([label, one * 1e3, r["compute_memory_s"] * 1e3, r["comm_s"] * 1e3, r["step_s"] * 1e3,
                         one / r["step_s"]])
            out[f"tp{n} {label}"] = {**r, "tp1_s": one}
        print(f"PREDICTED tensor parallel {n} ({'one machine shared' if same else 'one machine each'}, "
              f"link {link.gbps:g} Gbit/s, {link.latency_us:g} us/hop):")
        print(table(rows, ["", "TP=1 ms", "compute+mem ms", "all-reduce ms", f"TP={n} ms", "speedup"]))
        if m > 1:
            one = B / machine.time(cost.decode(B, ctx))
            dp = scaling.dp_throughput(machine, m, lambda mc, b: mc.time(cost.decode(b, ctx)), B, same)
            print(f"PREDICTED data parallel {m}: decode batch {B} {dp:.1f} tok/s vs one engine {one:.1f} "
                  f"({dp / one:.2f}x)")
            out[f"dp{m}"] = {"tok_s": dp, "one_engine_tok_s": one}
    if args.scaling_table:
        rows = scaling.scaling_predictions(B, ctx)
        print(f"PREDICTIONS (roofline at peak bandwidth/FLOP/s, not measurements): decode, batch {B}, ctx {ctx}")
        print(table([[r["model"], r["setup"], r["tp"], r["dp"], r["weights_per_rank_gb"], r["step_ms"],
                      r["comm_ms"], r["tok_s"], "yes" if r["fits"] else "NO"] for r in rows],
                    ["model", "hardware", "TP", "DP", "GB/rank", "step ms", "comm ms", "tok/s", "fits"]))
        out["scaling_predictions"] = rows
    return out
def _estimate_memory(args, cost, path: str, batch: int, ctx: int):
    """The memory breakdown an engine with these settings would have, without loading it."""
    from miaotui.bench.memory import estimate_breakdown
    from miaotui.engine.llm_engine import DEFAULT_KV_SEQS, DEFAULT_MAX_MODEL_LEN
    from miaotui.loader import load_tokenizer, open_checkpoint
    cfg = cost.cfg
    load_tokenizer(open_checkpoint(path))   # part of the runtime, as in an engine
    max_len = min(args.max_model_len or DEFAULT_MAX_MODEL_LEN, cfg.max_position_embeddings)
    pool = (int(args.kv_cache_memory // cost.kv_per_token) if args.kv_cache_memory and args.kv_cache_memory >= 1
            else max(batch * ctx, min(batch, DEFAULT_KV_SEQS) * max_len))
    step = min(args.max_num_batched_tokens, batch * ctx)
    quant = None if args.quantization == "gguf" else args.quantization
    return estimate_breakdown(path, cfg, quant, int(cost.kv_per_token), batch * ctx, pool, step,
                              min(batch, step), dtype=args.dtype)


# ---- perplexity -------------------------------------------------------------------------
def cmd_perplexity(args) -> None:
    from miaotui.bench.perplexity import perplexity
    from miaotui.bench.report import make_result
    try:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise MiaotuiError(f"cannot read {args.text}: {e.strerror}") from None
    engine = _engine(args, enable_prefix_caching=False)
    ids = engine.tokenizer.encode(text)
    if args.max_tokens:
        ids = ids[:args.max_tokens]
    window = min(args.window, engine.max_model_len)
    res = perplexity(engine, ids, window, min(args.stride or window // 2, window), progress=True)
    print(f"perplexity {res['perplexity']:.3f} over {res['scored_tokens']} tokens "
          f"({res['windows']} windows of {window}, {res['seconds']:.1f} s, {res['tok_s']:.0f} tok/s)")
    cfg = {**_config(args), "model_path": engine.model_path, "window": window}
    from miaotui.bench import report
    report.write_json(make_result("perplexity", cfg, res), args.output)


# ---- registration -----------------------------------------------------------------------
def _length_args(p: argparse.ArgumentParser, n: int, inp: str, out: str) -> None:
    p.add_argument("--num-prompts", "-n", type=at_least(1), default=n)
    p.add_argument("--input-len", default=inp, help="prompt tokens: N or LO-HI (uniform)")
    p.add_argument("--output-len", default=out, help="output tokens: N or LO-HI (uniform)")
    p.add_argument("--dataset", default=None, help="ShareGPT JSON file instead of random lengths")
    p.add_argument("--max-len", type=at_least(2), default=2048, help="ShareGPT: skip longer prompt+reply")
    p.add_argument("--seed", type=int, default=0)


def add_parser(subparsers) -> None:
    cli = _cli()
    bench = subparsers.add_parser("bench", help="benchmarks: latency, throughput, serve, compare")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    p = sub.add_parser("latency", help="one request at a time: TTFT, TPOT, e2e")
    cli.add_model_args(p)
    p.add_argument("--prompt-len", type=at_least(1), default=128)
    p.add_argument("--output-len", type=at_least(1), default=128)
    p.add_argument("--repeats", type=at_least(1), default=5)
    p.add_argument("--warmup", type=at_least(0), default=1)
    p.add_argument("--seed", type=int, default=0)
    _output_args(p)
    p.set_defaults(func=cmd_latency)

    p = sub.add_parser("spec", help="speculative decoding vs plain, batch 1, four tasks")
    cli.add_model_args(p)
    p.add_argument("--methods", default="ngram,self-int4",
                   help="comma-separated: ngram, self-int4 (plus draft with --draft-model)")
    p.add_argument("--tasks", default="faq,code,facts,story", help="comma-separated: faq, code, facts, story")
    p.add_argument("--repeats", type=at_least(1), default=3)
    p.add_argument("--max-tokens", type=at_least(2), default=128)
    p.add_argument("--output", "-o", default=None, help="write the results as JSON here")
    p.set_defaults(func=cmd_spec, bench_spec=True)

    p = sub.add_parser("throughput", help="offline batch: tokens/s, requests/s, peak memory")
    cli.add_model_args(p)
    _length_args(p, 64, "32-512", "32-256")
    p.add_argument("--backend", choices=["miaotui", "transformers", "both"], default="miaotui")
    p.add_argument("--hf-batch-size", type=at_least(1), default=8, help="transformers: prompts per generate call")
    _output_args(p)
    # batch as before (results/ compare against these), not the smaller API default
    p.set_defaults(func=cmd_throughput, max_num_seqs=64, kv_cache_memory=float(1 << 30))

    p = sub.add_parser("serve", help="drive an OpenAI-compatible server (streaming completions)")
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--served-model", default=None, help="model name to send (default: the first listed)")
    _length_args(p, 32, "128", "64")
    p.add_argument("--concurrency", default="1,4", help="comma-separated levels (default 1,4)")
    p.add_argument("--request-rate", default=None, help="Poisson rates in req/s instead, comma-separated")
    p.add_argument("--max-duration", type=positive, default=120.0, help="stop starting requests after this (s)")
    p.add_argument("--timeout", type=positive, default=300.0, help="per-request timeout (s)")
    p.add_argument("--slo-ttft", type=positive, default=None, help="goodput SLO on TTFT (ms)")
    p.add_argument("--slo-tpot", type=positive, default=None, help="goodput SLO on TPOT (ms)")
    p.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS")
    _output_args(p, roofline=False)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("compare", help="two bench JSON files side by side")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(func=cmd_compare)

    SUITES = ("parity", "decode", "throughput", "quant")   # bench/gpu.py's (it imports torch)
    p = sub.add_parser("gpu", help="the CUDA path: parity, decode, throughput, quantized decode")
    p.add_argument("--suites", default=",".join(SUITES), help=f"comma-separated, of {', '.join(SUITES)}")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, a few tokens: checks the script")
    p.add_argument("--out", default=None, help="folder for gpu_<suite>.json (default: $OUT/results, "
                   "else results/gpu)")
    p.set_defaults(func=cmd_gpu)

    p = subparsers.add_parser("estimate", help="roofline: FLOPs, bytes, predicted speed, memory")
    cli.add_model_args(p)
    p.add_argument("--prompt-len", type=at_least(1), default=512)
    p.add_argument("--output-len", type=at_least(1), default=128)
    p.add_argument("--context", type=at_least(1), default=None, help="decode context (default prompt + output/2)")
    p.add_argument("--batch", type=at_least(1), default=32)
    p.add_argument("--calibrate", action="store_true", help="re-measure this machine first")
    p.add_argument("--output", "-o", default=None)
    g = p.add_argument_group("scale-out (predicted; --tp N is --tensor-parallel-size)")
    g.add_argument("--dp", type=at_least(1), default=1, help="data-parallel replicas")
    g.add_argument("--link-gbps", type=positive, default=None, help="link bandwidth (default: this "
                   "machine's loopback as gloo sees it)")
    g.add_argument("--link-latency-us", type=positive, default=None, help="per-hop latency")
    g.add_argument("--nodes", action="store_true", help="each rank/replica on its own machine like this "
                   "one (default: all share this machine)")
    g.add_argument("--scaling-table", action="store_true",
                   help="print predictions for 7B/70B on 8 GPUs over NVLink and 4 CPU nodes over 25 GbE")
    p.set_defaults(func=cmd_estimate)

    p = subparsers.add_parser("perplexity", help="sliding-window perplexity of a text file")
    cli.add_model_args(p)
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument("--max-tokens", type=at_least(2), default=None, help="score only the first N tokens")
    p.add_argument("--window", type=at_least(2), default=1024)
    p.add_argument("--stride", type=at_least(1), default=None, help="default: window / 2")
    p.add_argument("--output", "-o", default=None)
    p.set_defaults(func=cmd_perplexity)
