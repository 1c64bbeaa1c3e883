"""Where a process's memory peaks: during the load (and at which tensor), or in the prompt step.

Each configuration runs in a fresh process: a thread samples the RSS every 2 ms while the
engine loads, labelled by the GGUF tensor being loaded; then one prompt of --prompt tokens
runs, timed in CPU seconds (both threads) and wall seconds. ``--mlp-rows`` repeats the run
for each value of models/llama.py's MLP_ROWS (prompt rows through the MLP at a time).

    python scripts/memory_stages.py ~/.cache/miaotui/shapes/tinyllama-1.1b/model-Q8_0.gguf \\
        --mlp-rows 100000,256,128 --repeats 3 --out results/memory_stages_tinyllama_q8_0.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, sys, threading, time
sys.path.insert(0, sys.argv[4])
def status():
    d = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "VmHWM")):
            d[line.split(":")[0]] = int(line.split()[1]) * 1024
    return d
stage, peaks = {"name": "start"}, {}
def sample():
    while True:
        r = status()["VmRSS"]
        if r > peaks.get(stage["name"], 0):
            peaks[stage["name"]] = r
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
import miaotui.loader.gguf_loader as G
import miaotui.models.llama as L
L.MLP_ROWS = int(sys.argv[2])
raw = G.GGUFCheckpoint.raw_tensors
def labelled(self):
    for name, t in raw(self):
        stage["name"] = "load: " + name
        yield name, t
    stage["name"] = "load: after the tensors"
G.GGUFCheckpoint.raw_tensors = labelled
from miaotui.engine.llm_engine import EngineConfig, LLMEngine
from miaotui.sampling_params import SamplingParams
n = int(sys.argv[3])
eng = LLMEngine(EngineConfig(model=sys.argv[1], max_num_seqs=1, max_model_len=n + 16, max_num_batched_tokens=n,
                             kv_cache_dtype="fp16", num_threads=2, enable_prefix_caching=False))
stage["name"] = "loaded"
time.sleep(0.05)
loaded = status()
vocab = eng.model_config.vocab_size
eng.add_request("p", [300 + (i * 7919) % (vocab - 400) for i in range(n)], SamplingParams(max_tokens=1, temperature=0))
stage["name"] = "prompt"
c0, w0 = time.process_time(), time.perf_counter()
while eng.has_unfinished():
    eng.step()
cpu, wall = time.process_time() - c0, time.perf_counter() - w0
time.sleep(0.05)
load_peaks = {k: v for k, v in peaks.items() if k.startswith("load")}
at = max(load_peaks, key=load_peaks.get)
print(json.dumps({"load_peak": load_peaks[at], "load_peak_at": at, "rss_loaded": loaded["VmRSS"],
                  "peak": status()["VmHWM"], "prompt_peak": peaks.get("prompt", 0),
                  "prompt_cpu_s": cpu, "prompt_wall_s": wall}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--mlp-rows", default="256", help="comma-separated MLP_ROWS values, one process each")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=1, help="rounds (the values take turns)")
    ap.add_argument("--out")
    a = ap.parse_args()
    values = [int(v) for v in a.mlp_rows.split(",")]
    runs = {v: [] for v in values}
    for r in range(a.repeats):
        for v in values:
            p = subprocess.run([sys.executable, "-c", CHILD, a.model, str(v), str(a.prompt), ROOT],
                               capture_output=True, text=True)
            if p.returncode:
                sys.exit(p.stderr[-2000:])
            runs[v].append(json.loads(p.stdout.strip().splitlines()[-1]))
            m = runs[v][-1]
            print(f"round {r} MLP_ROWS {v}: load peak {m['load_peak'] / 2**20:.0f} MiB at {m['load_peak_at']}, "
                  f"after load {m['rss_loaded'] / 2**20:.0f}, process peak {m['peak'] / 2**20:.0f} MiB, "
                  f"prompt {m['prompt_cpu_s']:.2f} s CPU / {m['prompt_wall_s']:.2f} s wall", flush=True)
    med = {v: {k: statistics.median(x[k] for x in rs) for k in ("load_peak", "peak", "prompt_cpu_s", "prompt_wall_s")}
           for v, rs in runs.items()}
    for v, m in med.items():
        print(f"MLP_ROWS {v:>6}: process peak {m['peak'] / 2**20:.0f} MiB, load peak {m['load_peak'] / 2**20:.0f} MiB, "
              f"prompt CPU {m['prompt_cpu_s']:.2f} s (median of {a.repeats})")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "median": {str(k): v for k, v in med.items()},
                       "rounds": {str(k): v for k, v in runs.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
