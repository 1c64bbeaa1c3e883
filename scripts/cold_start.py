"""Cold start of `miaotui generate --max-tokens 1`: its wall time, and where it goes.

Each round runs the command itself in a fresh process (wall time, and its CPU time from
the child's rusage), then a fresh process that does what the command does step by step and
times each: interpreter start, `import miaotui.llm` (torch and the engine), loading the
model (checkpoint, tokenizer, kernels, KV cache) and the first token (chat template,
prefill, one sampled token). Medians over --rounds. On a shared machine the wall times
swell with the other jobs' load (stored beside them); CPU times do not, and bound what an
idle machine would take from below.

    python scripts/cold_start.py --rounds 5 --out results/cold_start.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PROMPT = "What is the capital of France?"

STEPS = r"""
import json, sys, time
t_start = float(sys.argv[1])
w0, c0 = time.time(), time.process_time()
import miaotui.llm
from miaotui.llm import LLM
from miaotui.sampling_params import SamplingParams
w1, c1 = time.time(), time.process_time()
llm = LLM(sys.argv[2] if len(sys.argv) > 2 else None, max_num_seqs=1)
w2, c2 = time.time(), time.process_time()
prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": sys.argv[3]}])
for out in llm.stream(prompt, SamplingParams(temperature=0, max_tokens=1)):
    pass
w3, c3 = time.time(), time.process_time()
print(json.dumps({"start_wall": w0 - t_start, "import_wall": w1 - w0, "import_cpu": c1 - c0,
                  "load_wall": w2 - w1, "load_cpu": c2 - c1, "first_token_wall": w3 - w2,
                  "first_token_cpu": c3 - c2, "total_wall": w3 - t_start}))
"""


def cli_run(model: str | None) -> dict:
    """The real command; wall time and the child's CPU time (user + system)."""
    cmd = [sys.executable, "-m", "miaotui.cli", "generate", "--max-tokens", "1", PROMPT]
    if model:
        cmd[4:4] = ["--model", model]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall": wall, "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def steps_run(model: str | None) -> dict:
    out = subprocess.run([sys.executable, "-c", STEPS, repr(time.time()), model or "", PROMPT],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the default model")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rounds = []
    for r in range(a.rounds):
        load = os.getloadavg()[0]
        got = {"loadavg_1min": load, "cli": cli_run(a.model), "steps": steps_run(a.model)}
        rounds.append(got)
        print(f"round {r}: load {load:.1f}, command {got['cli']['wall']:.2f} s wall, {got['cli']['cpu']:.2f} s CPU; "
              + ", ".join(f"{k} {v:.2f}" for k, v in got["steps"].items()), file=sys.stderr, flush=True)
    med = lambda f: statistics.median(f(rd) for rd in rounds)  # noqa: E731
    summary = {"command_wall_s": med(lambda rd: rd["cli"]["wall"]), "command_cpu_s": med(lambda rd: rd["cli"]["cpu"])}
    for k in rounds[0]["steps"]:
        summary[k + "_s"] = med(lambda rd: rd["steps"][k])
    result = {"command": f"miaotui generate --max-tokens 1 {PROMPT!r}", "model": a.model or "default",
              "median": summary, "rounds": rounds, "cores": os.cpu_count(), "shared_machine": True,
              "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    for k, v in summary.items():
        print(f"{k:24s} {v:6.2f}")


if __name__ == "__main__":
    main()
