"""Before/after for the decode-row matmul tiles: two builds of the kernel module in one
process, the same calls taking turns, one thread each, timed by the thread's CPU time (on a
shared machine wall time mostly measures the neighbours).

    python scripts/ab_kernel_modules.py --base /work/main/miaotui/_kernels.cpython-311-x86_64-linux-gnu.so \\
        --out results/ab_decode_tiles.json

    python scripts/ab_kernel_modules.py --vnni --out results/ab_int4_vnni.json

--vnni: instead, this checkout's int4 decode matmul (int8 activations) with AVX-VNNI against
the same without it (MIAOTUI_NO_VNNI=1), int4 weights in groups of 32.

--base: a built kernel module (.so) of the commit to compare against; the head is this
checkout's (``miaotui.kernels.load()``). Shapes: SmolLM2-135M's gate/up (576 -> 3072) and
down (1536 -> 576); rows of x as a decode step of 1, 16 and 64 sequences; float32 and
bfloat16 weights. Both builds must give the same bits (checked), so only time differs.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("miaotui._kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cpu_time(f, reps: int) -> float:
    f()
    t0 = time.thread_time()
    for _ in range(reps):
        f()
    return (time.thread_time() - t0) / reps


def vnni_ab(k, a) -> None:
    from miaotui.layers import quant as Q
    k.set_threads(1)
    torch.set_num_threads(1)
    rows = []
    for K, N in [(576, 3072), (1536, 576)]:
        w = Q.quantize_int4(torch.randn(N, K), 32, False)
        for T in (1, 16, 64):
            x = torch.randn(T, w.padded_in)
            reps = max(3, int(1e7 / (T * N * K)))
            on, off = [], []
            for _ in range(a.rounds):
                os.environ.pop("MIAOTUI_NO_VNNI", None)
                on.append(cpu_time(lambda: k.qmatmul(x, *w._kernel_args()), reps))
                os.environ["MIAOTUI_NO_VNNI"] = "1"
                off.append(cpu_time(lambda: k.qmatmul(x, *w._kernel_args()), reps))
            os.environ.pop("MIAOTUI_NO_VNNI", None)
            v, m = statistics.median(on), statistics.median(off)
            ops = 2 * T * N * K
            rows.append({"K": K, "N": N, "T": T, "vnni_GOPs": ops / v / 1e9, "maddubs_GOPs": ops / m / 1e9,
                         "speedup": m / v, "vnni_s": on, "maddubs_s": off})
            print(f"int4 {K}->{N} T={T:2d} VNNI {ops / v / 1e9:6.1f} maddubs {ops / m / 1e9:6.1f} GOP/s  {m / v:.2f}x",
                  flush=True)
    with open(a.out, "w") as f:
        json.dump({"threads": 1, "clock": "thread CPU time", "loadavg": os.getloadavg(), "rows": rows}, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="the kernel module (.so) to compare against")
    ap.add_argument("--vnni", action="store_true", help="int4 decode matmul with and without AVX-VNNI")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from miaotui import kernels
    if a.vnni:
        return vnni_ab(kernels.load(), a)
    if not a.base:
        ap.error("--base or --vnni")
    base, head = load_module(a.base), kernels.load()
    torch.set_num_threads(1)
    for m in (base, head):
        m.set_threads(1)
    rows = []
    for K, N in [(576, 3072), (1536, 576)]:
        W = torch.randn(N, K)
        for T in (1, 16, 64):
            x = torch.randn(T, K)
            for dt in (torch.float32, torch.bfloat16):
                w = W.to(dt)
                assert torch.equal(base.f32_matmul(x, w), head.f32_matmul(x, w)), "the builds disagree"
                reps = max(3, int(2e7 / (T * N * K)))
                tb, th = [], []
                for _ in range(a.rounds):
                    tb.append(cpu_time(lambda: base.f32_matmul(x, w), reps))
                    th.append(cpu_time(lambda: head.f32_matmul(x, w), reps))
                b, h = statistics.median(tb), statistics.median(th)
                flops = 2 * T * N * K
                rows.append({"K": K, "N": N, "T": T, "dtype": str(dt)[6:], "base_GFLOPs": flops / b / 1e9,
                             "head_GFLOPs": flops / h / 1e9, "speedup": b / h, "base_s": tb, "head_s": th})
                print(f"{K}->{N} T={T:2d} {str(dt)[6:]:8s} base {flops / b / 1e9:6.1f} head {flops / h / 1e9:6.1f} "
                      f"GFLOP/s  head/base {b / h:.2f}", flush=True)
    with open(a.out, "w") as f:
        json.dump({"base": a.base, "threads": 1, "clock": "thread CPU time", "loadavg": os.getloadavg(),
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
