"""Before/after for the decode-row matmul tiles: two builds of the kernel module in one
process, the same calls taking turns, one thread each, timed by the thread's CPU time (on a
shared machine wall time mostly measures the neighbours).

    python scripts/ab_kernel_modules.py --base /work/main/miaotui/_kernels.cpython-311-x86_64-linux-gnu.so \\
        --out results/ab_decode_tiles.json

    python scripts/ab_kernel_modules.py --vnni --out results/ab_int4_vnni.json

--qdecode: instead, the quantized decode matmul (int8 activations) of the two builds on a
decode step of SmolLM2-135M's (or --shape tinyllama-1.1b) shapes: every layer's q/k/v, o,
gate/up and down and the LM head, each layer its own copy of the weights so they stream
from memory as in a real step, on the kernels' threads, wall time, the builds taking turns;
Q4_0, Q4_1 and Q8_0; rows of x as 1, 4, 8 and 16 sequences. The builds may round
differently (checked: within 1e-4; "same_bits" says whether they did).

    python scripts/ab_kernel_modules.py --qdecode --base /tmp/base/miaotui/_kernels...so \
        --out results/ab_qdecode_block32_smollm2.json

--vnni: instead, this checkout's int4 decode matmul (int8 activations) with vpdpbusd (AVX-VNNI
or AVX-512 VNNI) against the same without it (MIAOTUI_NO_VNNI=1), int4 weights in groups of 32.

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
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_module(path: str):
    """The module at path as a second module: under its own package name (Python keeps one
    extension module per name, so loading it as miaotui._kernels returned this checkout's
    build), bound to its own symbols (the kernels' C++ functions have external linkage)."""
    sys.modules.setdefault("miaotui_base", types.ModuleType("miaotui_base"))
    spec = importlib.util.spec_from_file_location("miaotui_base._kernels", path)
    mod = importlib.util.module_from_spec(spec)
    flags = sys.getdlopenflags()
    sys.setdlopenflags(os.RTLD_NOW | os.RTLD_LOCAL | os.RTLD_DEEPBIND)
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.setdlopenflags(flags)
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


STEPS = {  # (out, in) of q/k/v, o, gate/up, down; layers; LM head rows
    "smollm2-135m": ([(960, 576), (576, 576), (3072, 576), (576, 1536)], 30, 49152),
    "tinyllama-1.1b": ([(2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632)], 22, 32000),
}


def qdecode_ab(base, head, a) -> None:
    from miaotui.bench.kernels import _gguf_weight
    layer, layers, head_rows = STEPS[a.shape]
    hidden = layer[1][1]
    rows = []
    for qt in a.formats.split(","):
        torch.manual_seed(0)
        proto = {s: _gguf_weight(qt, torch.randn(*s) * 0.05) for s in layer + [(head_rows // 4, hidden)]}

        def args(w):  # a copy of the weight as qmatmul takes it
            mn = torch.empty(0) if w.min is None else w.min.clone()
            return w.q.clone(), w.scale.clone(), mn, w.block_size, w.bits, w.offset
        mats = [args(proto[s]) for _ in range(layers) for s in layer]
        mats += [args(proto[(head_rows // 4, hidden)]) for _ in range(4)]
        for T in a.tokens:
            xs = {K: torch.randn(T, K) for K in {k for _, k in layer}}
            calls = [(xs[m[0].shape[1] * 8 // m[4]], m) for m in mats]
            for x, m in calls[:4]:
                torch.testing.assert_close(head.qmatmul(x, *m), base.qmatmul(x, *m), rtol=1e-4, atol=1e-4)
            same = all(torch.equal(head.qmatmul(x, *m), base.qmatmul(x, *m)) for x, m in calls[:4])

            def step(mod):
                t0 = time.perf_counter()
                for x, m in calls:
                    mod.qmatmul(x, *m)
                return time.perf_counter() - t0
            step(base), step(head)
            tb, th = [], []
            for _ in range(a.rounds):
                tb.append(step(base))
                th.append(step(head))
            b, h = statistics.median(tb), statistics.median(th)
            ratios = statistics.median(x / y for x, y in zip(tb, th))
            rows.append({"format": qt, "T": T, "same_bits": same, "base_ms": 1e3 * b, "head_ms": 1e3 * h, "speedup": b / h,
                         "speedup_paired": ratios, "base_s": tb, "head_s": th})
            print(f"{qt} T={T:2d} base {1e3 * b:7.2f} ms head {1e3 * h:7.2f} ms  head/base {b / h:.2f} "
                  f"(paired rounds {ratios:.2f}){'  same bits' if same else ''}", flush=True)
    with open(a.out, "w") as f:
        json.dump({"base": a.base, "threads": torch.get_num_threads(), "clock": "wall",
                   "step": f"{a.shape} shapes, {layers} layers + LM head", "loadavg": os.getloadavg(),
                   "rows": rows}, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="the kernel module (.so) to compare against")
    ap.add_argument("--vnni", action="store_true", help="int4 decode matmul with and without vpdpbusd (AVX-VNNI / AVX-512 VNNI)")
    ap.add_argument("--qdecode", action="store_true", help="quantized decode matmuls of two builds, a model step")
    ap.add_argument("--formats", default="Q4_0,Q4_1,Q8_0")
    ap.add_argument("--shape", choices=sorted(STEPS), default="smollm2-135m")
    ap.add_argument("--tokens", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 8, 16])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from miaotui import kernels
    if a.vnni:
        return vnni_ab(kernels.load(), a)
    if not a.base:
        ap.error("--base or --vnni")
    base, head = load_module(a.base), kernels.load()
    assert base is not head and base.__file__ != head.__file__, "the same build twice"
    if a.qdecode:
        return qdecode_ab(base, head, a)
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
