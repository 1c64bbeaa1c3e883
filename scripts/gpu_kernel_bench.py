"""Bandwidth of the CUDA path's memory-bound kernels against the GPU's copy bandwidth.

Decode is memory-bound: a batch-1 step streams every weight once and each sequence's KV
cache once. This times the kernels that do it (quant_matmul's GEMV on int8/int4 weights,
paged decode attention, add_rms_norm) at Llama-3-8B shapes in bf16, each replayed from a
CUDA graph (no launch overhead), and reports bytes moved / time as GB/s and as a fraction
of a device-to-device copy's bandwidth measured in the same run (and of the nominal HBM
figure given with --hbm-gbs). cuBLAS's bf16 GEMV (torch) is the reference point.

    python scripts/gpu_kernel_bench.py [--json results/gpu/kernels.json] [--hbm-gbs 4800]
    python scripts/gpu_kernel_bench.py --smoke     # tiny shapes on CPU, Triton's interpreter

--smoke checks that the script runs (tests/test_gpu_kernels.py); its timings mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:   # before triton is imported: the interpreter, kernels on CPU tensors
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["MIAOTUI_TRITON_CPU"] = "1"

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from miaotui.kernels import gpu  # noqa: E402
from miaotui.layers import quant  # noqa: E402


def timed(fn, dev: torch.device, iters: int) -> float:
    """Seconds per call: replayed from a CUDA graph on a GPU, plain calls on CPU."""
    fn()
    if dev.type != "cuda":
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) / iters
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (iters * 10)


def to(w, dev):
    for name in ("q", "scale", "min"):
        if getattr(w, name) is not None:
            setattr(w, name, getattr(w, name).to(dev))
    return w


def cases(dev: torch.device, smoke: bool):
    """(name, bytes moved, fn) per kernel call."""
    bf = torch.bfloat16
    hidden, inter, heads, kvh, hd, ctx = (64, 128, 4, 2, 16, 64) if smoke else (4096, 14336, 32, 8, 128, 4096)
    g = torch.Generator().manual_seed(0)
    for n, k in ((hidden, hidden),) if smoke else ((hidden, hidden), (2 * inter, hidden), (hidden, inter)):
        w = torch.randn(n, k, generator=g) * 0.02
        x = torch.randn(1, k, dtype=bf, device=dev)
        dense = w.to(bf).to(dev)
        yield f"dense bf16 GEMV {n}x{k} (torch)", dense.nbytes, lambda x=x, d=dense: x @ d.T
        for label, qw in (("int8", quant.quantize_int8(w)), ("int4 g32", quant.quantize_int4(w, 32)),
                          ("int4 g32 min", quant.quantize_int4(w, 32, symmetric=False))):
            qw = to(qw, dev)
            yield f"quant_matmul {label} M=1 {n}x{k}", qw.nbytes(), lambda x=x, qw=qw: gpu.quant_matmul(x, qw)
    for B in ((2,) if smoke else (1, 8, 64)):
        bs = 16
        nblk = B * ctx // bs
        kc = torch.randn(nblk * bs, kvh, hd, dtype=bf, device=dev)
        vc = torch.randn_like(kc)
        tables = torch.randperm(nblk, device=dev).to(torch.int32).view(B, -1)
        lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
        q = torch.randn(B, heads, hd, dtype=bf, device=dev)
        yield (f"paged_decode_attention B={B} ctx={ctx}", 2 * kc.nbytes,
               lambda q=q, kc=kc, vc=vc, t=tables, n=lens: gpu.paged_decode_attention(q, kc, vc, t, n, bs, hd ** -0.5))
    x = torch.randn(1, hidden, dtype=bf, device=dev)
    r = torch.randn_like(x)
    wn = torch.ones(hidden, device=dev)
    yield "add_rms_norm 1 row", 4 * x.nbytes + wn.nbytes, lambda: gpu.add_rms_norm(x, r, wn, 1e-5)


def copy_gbs(dev: torch.device, smoke: bool) -> float:
    n = (1 << 20) if smoke else (1 << 30)
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    return 2 * n / timed(lambda: b.copy_(a), dev, 2 if smoke else 20) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Triton's interpreter)")
    ap.add_argument("--json", help="write the results here (default results/gpu/kernels.json, or "
                                   "$OUT/results/kernels.json when $OUT is set)")
    ap.add_argument("--hbm-gbs", type=float, default=4800.0, help="nominal HBM bandwidth (H200: 4800)")
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU check", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if args.smoke else "cuda")
    iters = 1 if args.smoke else args.iters
    copy = copy_gbs(dev, args.smoke)
    rows = []
    for name, nbytes, fn in cases(dev, args.smoke):
        s = timed(fn, dev, iters)
        gbs = nbytes / s / 1e9
        rows.append({"kernel": name, "bytes": nbytes, "us": s * 1e6, "GB/s": gbs,
                     "of_copy": gbs / copy, "of_hbm": gbs / args.hbm_gbs})
        print(f"{name:45s} {s * 1e6:9.1f} us {gbs:8.0f} GB/s  {gbs / copy:5.0%} of copy", flush=True)
    if args.json:
        out = args.json
    elif os.environ.get("OUT"):
        out = os.path.join(os.environ["OUT"], "results", "kernels.json")
    else:
        out = os.path.join("results", "gpu", "kernels.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    info = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke: timings mean nothing)",
            "torch": torch.__version__, "copy_GB/s": copy, "hbm_GB/s": args.hbm_gbs, "kernels": rows}
    with open(out, "w") as f:
        json.dump(info, f, indent=1)
    print(f"copy {copy:.0f} GB/s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
