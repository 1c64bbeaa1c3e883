"""Before/after: one `miaotui bench` command on two commits of this repository, taking turns.

On a shared machine only side-by-side figures mean anything, so the two checkouts run the
same benchmark alternately for --rounds rounds (each in its own process) and every figure
is the median of its rounds. The base commit is checked out with `git worktree` into a
temporary folder (its kernels compile once into their own cache folder).

    python scripts/ab_bench.py --base a002140 --rounds 3 --out results/ab_latency.json -- \\
        bench latency --output-len 64
    python scripts/ab_bench.py --base a002140 --rounds 3 --out results/ab_throughput.json -- \\
        bench throughput -m smollm2-135m -n 64 --input-len 32-512 --output-len 32-256 --no-roofline
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def headline(result: dict) -> dict[str, float]:
    """The figures a bench JSON is judged by."""
    r = result["results"]
    if result["kind"] == "latency":
        return {"decode_tok_s": r["decode_tok_s"], "prefill_tok_s": r["prefill_tok_s"],
                "tpot_ms": 1e3 * r["tpot_s"]["median"], "ttft_ms": 1e3 * r["ttft_s"]["median"]}
    if result["kind"] == "throughput":
        run = r["runs"]["miaotui"]
        return {"output_tok_s": run["output_tok_s"], "total_tok_s": run["total_tok_s"],
                "elapsed_s": run["elapsed_s"]}
    raise SystemExit(f"no headline figures for a {result['kind']!r} result")


def run_once(checkout: str, args: list[str], out: str) -> dict:
    env = {**os.environ, "PYTHONPATH": checkout}
    cmd = [sys.executable, "-m", "miaotui.cli", *args, "-o", out]
    subprocess.run(cmd, cwd=checkout, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the commit to compare against")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", required=True, help="JSON with every round and the medians")
    ap.add_argument("bench", nargs=argparse.REMAINDER, help="-- then the miaotui arguments")
    a = ap.parse_args()
    args = a.bench[1:] if a.bench[:1] == ["--"] else a.bench
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.strip()
    rounds: dict[str, list[dict]] = {"base": [], "head": []}
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = os.path.join(tmp, "base")
        subprocess.run(["git", "worktree", "add", "--detach", "-q", base_dir, a.base], cwd=REPO, check=True)
        try:
            for i in range(a.rounds):
                for name, checkout in (("base", base_dir), ("head", REPO)):
                    res = run_once(checkout, args, os.path.join(tmp, f"{name}{i}.json"))
                    rounds[name].append({"figures": headline(res), "loadavg_1m": res["env"].get("loadavg_1m")})
                    print(f"round {i + 1}/{a.rounds} {name}: {rounds[name][-1]['figures']}", file=sys.stderr)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", base_dir], cwd=REPO)
    medians = {n: {k: statistics.median(r["figures"][k] for r in rs) for k in rs[0]["figures"]}
               for n, rs in rounds.items()}
    ratio = {k: medians["head"][k] / medians["base"][k] for k in medians["head"]}
    report = {"kind": "ab", "command": args, "base": a.base, "head": head, "rounds": rounds,
              "median": medians, "head_over_base": ratio}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    for k, r in ratio.items():
        print(f"{k:>14}: base {medians['base'][k]:10.2f}  head {medians['head'][k]:10.2f}  head/base {r:.3f}")


if __name__ == "__main__":
    main()
