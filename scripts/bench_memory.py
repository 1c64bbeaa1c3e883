"""Peak memory of miaotui and llama.cpp on the very same GGUF files, at the same context.

Workload: batch-1 greedy decode of --gen tokens after a --prompt-token prompt, 2 threads, the
KV cache in float16 on both sides (llama.cpp's default; miaotui --kv-cache-dtype fp16), a
context of prompt + gen tokens (miaotui: max_model_len, one sequence; llama-bench:
``-pg PROMPT,GEN``, whose context is the same), prompts processed 512 tokens a step
(miaotui: max_num_batched_tokens; llama.cpp: its default ubatch). Each run is a fresh
process; its peak RSS is what ``/usr/bin/time`` reports (%M, the kernel's high-water mark).
miaotui's run also reports its memory breakdown (miaotui/bench/memory.py), which is
checked against its own measured peak.

Files: random weights of SmolLM2-135M's and TinyLlama-1.1B's shapes in F32, Q8_0 and Q4_0
(written once by scripts/bench_cpu.py's converter, the files cpu_path.json used), and the
default model (SmolLM2-135M-Instruct Q4_1). The engines take turns (--repeats rounds); the
figure per file is the median of the rounds.

    python scripts/bench_memory.py --llama-bench /path/to/llama-bench --out results/memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIME = "/usr/bin/time"   # GNU time (apt package `time`)

MIAOTUI_CHILD = r"""
import json, sys
import miaotui
from miaotui.bench import memory
from miaotui.engine.llm_engine import EngineConfig, LLMEngine
from miaotui.sampling_params import SamplingParams
path, prompt, gen, threads, kv = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
engine = LLMEngine(EngineConfig(model=path, max_num_seqs=1, max_model_len=prompt + gen,
                                max_num_batched_tokens=min(512, prompt), kv_cache_dtype=kv,
                                num_threads=threads))
vocab = engine.model_config.vocab_size
ids = [300 + (i * 7919) % (vocab - 400) for i in range(prompt)]
engine.add_request("r", ids, SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True))
while engine.has_unfinished():
    engine.step()
print("BREAKDOWN " + json.dumps(memory.engine_breakdown(engine).to_dict()))
"""


def peak_of(cmd: list[str], env: dict | None = None) -> tuple[int, str, float]:
    """(peak RSS in bytes, stdout, seconds) of a command in a fresh process, as GNU time
    reports it (%M): the command is that small process's child, so its peak does not start
    from this process's size (a child's ru_maxrss includes its parent's RSS at fork)."""
    import tempfile
    t0 = time.perf_counter()
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        p = subprocess.run([TIME, "-f", "%M", "-o", tf.name, *cmd], capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"{os.path.basename(cmd[0])} failed ({p.returncode}): {p.stderr[-1500:]}")
        kib = int(tf.read().strip().splitlines()[-1])
    return kib * 1024, p.stdout, time.perf_counter() - t0


def miaotui_run(path: str, args) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    peak, out, secs = peak_of([sys.executable, "-c", MIAOTUI_CHILD, path, str(args.prompt), str(args.gen),
                               str(args.threads), args.kv], env)
    line = next(s for s in out.splitlines() if s.startswith("BREAKDOWN "))
    bd = json.loads(line[len("BREAKDOWN "):])
    return {"peak_rss": peak, "seconds": secs, "breakdown": bd,
            "predicted_over_measured": bd["predicted_peak"] / peak}


def llama_run(path: str, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}   # see bench/llama_cpp.py
    cmd = [args.llama_bench, "-m", path, "-p", "0", "-n", "0", "-pg", f"{args.prompt},{args.gen}",
           "-r", "1", "-t", str(args.threads), "-ctk", args.kv_llama, "-ctv", args.kv_llama,
           "-ub", "512", "-o", "json"]
    peak, out, secs = peak_of(cmd, env)
    try:
        rows = json.loads(out)
        tok_s = rows[0].get("avg_ts")
        info = {k: rows[0].get(k) for k in ("n_ctx", "type_k", "type_v", "n_ubatch", "flash_attn",
                                               "build_commit", "model_size")}
    except (ValueError, IndexError, KeyError):
        tok_s, info = None, {}
    return {"peak_rss": peak, "seconds": secs, "tok_s": tok_s, "llama_bench": info, "cmd": " ".join(cmd)}


def files(args) -> list[tuple[str, str]]:
    out = []
    if args.default:
        from miaotui.loader import default_model_path
        out.append(("default (SmolLM2-135M-Instruct Q4_1)", default_model_path()))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_cpu import gguf_file   # the same files as results/cpu_path.json
    for shape in [s for s in args.shapes.split(",") if s]:
        for qt in [q for q in args.qtypes.split(",") if q]:
            out.append((f"{shape} {qt}", gguf_file(shape, qt)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", default=shutil.which("llama-bench"),
                    help="llama.cpp's llama-bench binary (default: on PATH); without it only miaotui runs")
    ap.add_argument("--shapes", default="smollm2-135m,tinyllama-1.1b")
    ap.add_argument("--qtypes", default="F32,Q8_0,Q4_0")
    ap.add_argument("--no-default", dest="default", action="store_false", help="skip the default model")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv", default="fp16", choices=["fp16", "fp32"], help="KV cache precision, both engines")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="results/memory.json")
    args = ap.parse_args()
    args.kv_llama = {"fp16": "f16", "fp32": "f32"}[args.kv]
    if not os.access(TIME, os.X_OK):
        sys.exit(f"{TIME} (GNU time) is needed to measure peak RSS: apt-get install time")
    if args.llama_bench and not os.access(args.llama_bench, os.X_OK):
        sys.exit(f"not an executable: {args.llama_bench}")
    results = []
    for name, path in files(args):
        rounds = []
        for r in range(args.repeats):
            row = {"miaotui": miaotui_run(path, args)}
            if args.llama_bench:
                row["llama.cpp"] = llama_run(path, args)
            rounds.append(row)
            m = row["miaotui"]
            msg = f"{name} round {r + 1}: miaotui {m['peak_rss'] / 2**20:.0f} MiB " \
                  f"(breakdown {m['predicted_over_measured']:.2f}x)"
            if args.llama_bench:
                msg += f", llama.cpp {row['llama.cpp']['peak_rss'] / 2**20:.0f} MiB"
            print(msg, file=sys.stderr, flush=True)
        med = lambda eng: statistics.median(x[eng]["peak_rss"] for x in rounds)  # noqa: E731
        entry = {"file": name, "path": path, "file_bytes": os.path.getsize(path), "rounds": rounds,
                 "miaotui_peak_rss": med("miaotui"),
                 "breakdown": rounds[-1]["miaotui"]["breakdown"],
                 "breakdown_over_measured": statistics.median(x["miaotui"]["predicted_over_measured"] for x in rounds)}
        if args.llama_bench:
            entry["llama_cpp_peak_rss"] = med("llama.cpp")
            entry["miaotui_over_llama_cpp"] = entry["miaotui_peak_rss"] / entry["llama_cpp_peak_rss"]
        results.append(entry)
    print_table(results, bool(args.llama_bench))
    doc = {"kind": "memory", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "config": {k: v for k, v in vars(args).items()},
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "load_avg": os.getloadavg()},
           "results": results}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {args.out}", file=sys.stderr)


def print_table(results: list[dict], llama: bool) -> None:
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    head = "| file | file MiB | miaotui peak MiB | breakdown / peak |"
    if llama:
        head += " llama.cpp peak MiB | miaotui / llama.cpp |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for e in results:
        row = (f"| {e['file']} | {mib(e['file_bytes'])} | {mib(e['miaotui_peak_rss'])} | "
               f"{e['breakdown_over_measured']:.2f} |")
        if llama:
            row += f" {mib(e['llama_cpp_peak_rss'])} | {e['miaotui_over_llama_cpp']:.2f} |"
        print(row)


if __name__ == "__main__":
    main()
