"""Quantized matmul candidates on this CPU: ``python -m miaotui.bench.kernels``.

For the weight shapes of SmolLM2-135M and TinyLlama-1.1B ("in->out") and M rows of x it
times x @ W.T done by:

  fp32          torch matmul (BLAS) on a float32 weight (the baseline)
  fp32:ours     our batch-invariant float32 dot-product tiles (float32 weights, decode rows)
  fp32:gemm     our batch-invariant packed float32 GEMM (float32 weights, prompt rows)
  torch_int8    torch.ops.aten._weight_int8pack_mm (int8, a scale per row)
  torch_int4    torch.ops.aten._weight_int4pack_mm_for_cpu (int4, groups of 32)
  <format>:int  our C++ kernel: x quantized to int8 per 32, integer dot products (decode)
  <format>:exact  our batch-invariant packed GEMM on the dequantized weight (prompts)
  <format>:tiles  the dot-product tiles on the dequantized weight (the prompt path before)
  <format>:torch  dequantization by PyTorch, then torch matmul (the no-kernel fallback)
  int8:f32x     a C++ int8-weight kernel on float32 x (M=1 only; no activation rounding)

for the formats int8 (a float32 scale per row), int4 (groups of 32, float16 scales), Q8_0
(int8, float16 scale per 32), Q4_K (int4, float32 scale and min per 32), Q6_K (int8,
float32 scale per 16), Q5_0 (5-bit as stored, float16 scale per 32) and Q5_0-int8 (the same
values repacked to int8, as Q5 tensors were held before).

Timing: every repeat runs each candidate once, in turn, so load from other processes
hits all of them alike; the table shows the median and the fastest repeat. On a shared
machine a two-thread run stalls whenever the second thread waits for a core; then
``--cpu-time`` (one thread, timed by its CPU time) gives steadier per-core numbers.
Weights rotate over copies that together exceed the 32 MiB L3, so small M reads them
from DRAM as decoding a whole model does. GB/s = bytes of weight data (scales included)
/ time; the machine's memory bandwidth is ~21-26 GB/s. ``QuantWeight.matmul`` takes
``:int`` for generated tokens and ``:exact`` for prompt tokens, whatever M (batch
invariance: the path depends on the token, not on the batch).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from miaotui import kernels
from miaotui.layers import quant as Q

SHAPES = {
    "smollm2-135m": [(576, 1536), (1536, 576), (576, 576), (576, 49152)],
    "tinyllama-1.1b": [(2048, 5632), (5632, 2048), (2048, 2048), (2048, 256), (2048, 32000)],
    "gemma3-270m": [(640, 1024), (640, 2048), (2048, 640), (640, 256)],
}
MS = [1, 8, 16, 32, 64, 512]
ROTATE_BYTES = 96 << 20  # > L3


def _gguf_weight(qtype: str, w: torch.Tensor) -> Q.QuantWeight:
    import gguf
    qt = gguf.GGMLQuantizationType[qtype]
    n, k = w.shape
    try:
        data = gguf.quants.quantize(w.numpy(), qt)
    except NotImplementedError:  # K-quants: random blocks with scales of a sane size
        block, size = gguf.GGML_QUANT_SIZES[qt]
        rng = np.random.default_rng(0)
        data = rng.integers(0, 256, (n * k // block, size), dtype=np.uint8)
        for at in {"Q4_K": [0, 2], "Q6_K": [208]}[qtype]:
            data[:, at:at + 2] = np.full((data.shape[0], 1), 1e-3, np.float16).view(np.uint8)
    return Q.from_gguf(data, qt, (n, k))


FORMATS = {
    "int8": Q.quantize_int8,
    "int4": lambda w: Q.quantize_int4(w, 32),
    "Q8_0": lambda w: _gguf_weight("Q8_0", w),
    "Q4_K": lambda w: _gguf_weight("Q4_K", w),
    "Q6_K": lambda w: _gguf_weight("Q6_K", w),
    "Q5_0": lambda w: _gguf_weight("Q5_0", w),
    "Q5_0-int8": lambda w: _as_int8(_gguf_weight("Q5_0", w)),
}


def _as_int8(w: Q.QuantWeight) -> Q.Int8Weight:
    """A 5-bit weight as the int8 repack Q5 tensors had before they were kept as stored
    (the same values and results, 1.06 instead of 0.69 bytes a weight)."""
    return Q.Int8Weight(w._ints(w.q), w.scale, w.min, w.block_size, w.in_features)


def _copy(qw: Q.QuantWeight) -> Q.QuantWeight:
    return Q.QuantWeight.from_state_dict({k: v.clone() for k, v in qw.state_dict().items()})


class _Rotating:
    """Copies of a weight that together exceed L3, handed out in turn."""

    def __init__(self, make, nbytes: int, rotate: bool):
        n = max(1, -(-ROTATE_BYTES // nbytes)) if rotate else 1
        self.items = [make() for _ in range(n)]
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def _int4pack_mm(x, packed, scales_and_zeros):
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, scales_and_zeros)


def _candidates(w: torch.Tensor, m: int, formats: list[str], k, cross: bool = False) -> dict:
    """name -> (callable taking x, weight bytes)."""
    n, kin = w.shape
    rotate = m <= 64
    out = {}
    fp = _Rotating(w.clone, w.numel() * 4, rotate)
    out["fp32"] = (lambda x: x @ fp.next().T, w.numel() * 4)
    if k is not None:
        out["fp32:ours"] = (lambda x: k.f32_matmul(x, fp.next()), w.numel() * 4)
        if m >= 8:
            out["fp32:gemm"] = (lambda x: k.f32_gemm(x, fp.next()), w.numel() * 4)
    q8 = Q.quantize_int8(w)
    if kin % 32 == 0 and (m <= 8 or n * kin <= 1 << 22):  # torch's ops take seconds at large M
        t8 = _Rotating(lambda: (q8.q.clone(), q8.scale.view(-1).clone()), q8.nbytes(), rotate)
        out["torch_int8"] = (lambda x: torch.ops.aten._weight_int8pack_mm(x, *t8.next()), q8.nbytes())
        q4 = Q.quantize_int4(w, 32, symmetric=False)
        vals = Q._unpack_int4(q4.q).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(vals, 1)
        # torch's int4 format: w = (q - 8) * scale + zero, scales_and_zeros [k/32, n, 2]
        sz = torch.stack([q4.scale.float(), q4.min.float() + 8 * q4.scale.float()], -1)
        sz = sz.transpose(0, 1).contiguous()
        t4 = _Rotating(lambda: (packed.clone(), sz.clone()), q4.nbytes(), rotate)
        out["torch_int4"] = (lambda x: _int4pack_mm(x, *t4.next()), q4.nbytes())
    for f in formats:
        if f.endswith("_K") and kin % 256:
            continue  # K-quants need in_features % 256 == 0
        qw = FORMATS[f](w)
        pool = _Rotating(lambda qw=qw: _copy(qw), qw.nbytes(), rotate)
        nb = qw.nbytes()
        if k is not None:
            if m <= 64 or cross:
                out[f"{f}:int"] = (lambda x, p=pool: p.next()._matmul_int8(k, x), nb)
            if m >= 8 or cross:
                out[f"{f}:exact"] = (lambda x, p=pool: k.qf32_gemm(x, *p.next()._kernel_args()), nb)
                out[f"{f}:tiles"] = (lambda x, p=pool: k.qf32_matmul(x, *p.next()._kernel_args()), nb)
            if f == "int8" and m == 1:
                out["int8:f32x"] = (lambda x, p=pool: (lambda q: k.int8_f32_gemv(
                    torch.nn.functional.pad(x, (0, q.padded_in - q.in_features)), q.q, q.scale,
                    q.block_size))(p.next()), nb)
        if m >= 8 or k is None:
            out[f"{f}:torch"] = (lambda x, p=pool: (lambda q: q._matmul_tiles(x, q._dequant_rows))(
                p.next()), nb)
    return out


_clock = time.perf_counter


def _time(cands: dict, x: torch.Tensor, budget_s: float, max_reps: int) -> dict:
    for f, _ in cands.values():  # warm up (and first-touch the copies)
        f(x)
    t0 = _clock()
    for f, _ in cands.values():
        f(x)
    per_round = _clock() - t0
    reps = int(min(max_reps, max(3, budget_s / max(per_round, 1e-6))))
    times = {name: [] for name in cands}
    for _ in range(reps):
        for name, (f, _) in cands.items():
            t = _clock()
            f(x)
            times[name].append(_clock() - t)
    return times


def run(models: list[str], ms: list[int], formats: list[str], budget_s: float = 1.0,
        max_reps: int = 200, all_paths: bool = False) -> list[dict]:
    k = kernels.load()
    torch.manual_seed(0)
    rows = []
    for model in models:
        for kin, n in SHAPES[model]:
            w = torch.randn(n, kin) * 0.02
            for m in ms:
                cands = _candidates(w, m, formats, k, all_paths)
                x = torch.randn(m, kin)
                times = _time(cands, x, budget_s if m < 512 else 3 * budget_s, max_reps)
                base = statistics.median(times["fp32"])
                for name, ts in times.items():
                    med = statistics.median(ts)
                    rows.append(dict(
                        model=model, shape=f"{kin}->{n}", M=m, candidate=name,
                        median_ms=med * 1e3, min_ms=min(ts) * 1e3, reps=len(ts),
                        weight_bytes=cands[name][1], gbps=cands[name][1] / med / 1e9,
                        gflops=2 * m * n * kin / med / 1e9, speedup_vs_fp32=base / med))
                del cands
                _print_block(rows, model, f"{kin}->{n}", m)
    return rows


def _print_block(rows, model, shape, m):
    sel = [r for r in rows if r["model"] == model and r["shape"] == shape and r["M"] == m]
    cells = "  ".join(f"{r['candidate']} {r['median_ms']:.3f}/{r['min_ms']:.3f}ms "
                      f"({r['gbps'] if m == 1 else r['gflops']:.1f}{'GB/s' if m == 1 else 'GF/s'}, "
                      f"x{r['speedup_vs_fp32']:.2f})" for r in sel)
    print(f"{model} {shape} M={m} (median/min): {cells}", flush=True)


def summary(rows: list[dict]) -> str:
    """Per model and candidate, over the shapes it ran on (times summed over shapes):
    GB/s at M=1 from the median and from the fastest repeat, and the speedup over fp32
    (medians) at M=1 and M=512."""
    lines = ["model           candidate    M=1 GB/s med (best)  x fp32 M=1  x fp32 M=512"]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        fp32 = {(r["shape"], r["M"]): r["median_ms"] for r in mine if r["candidate"] == "fp32"}
        for name in dict.fromkeys(r["candidate"] for r in mine):
            gbps, speedup = "-", {1: "-", 512: "-"}
            for m in (1, 512):
                sel = [r for r in mine if r["candidate"] == name and r["M"] == m]
                if not sel:
                    continue
                t, best = sum(r["median_ms"] for r in sel), sum(r["min_ms"] for r in sel)
                speedup[m] = f"{sum(fp32[(r['shape'], m)] for r in sel) / t:.2f}"
                if m == 1:
                    nbytes = sum(r["weight_bytes"] for r in sel)
                    gbps = f"{nbytes / t / 1e6:5.1f} ({nbytes / best / 1e6:4.1f})"
            lines.append(f"{model:15s} {name:12s} {gbps:>19s}  {speedup[1]:>10s}  {speedup[512]:>12s}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--m", nargs="+", type=int, default=MS, help="rows of x")
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--budget", type=float, default=1.0, help="seconds per (shape, M)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cpu-time", action="store_true",
                   help="one thread, timed by its CPU time: per-core numbers that other "
                        "processes on the machine disturb less")
    p.add_argument("--all-paths", action="store_true",
                   help="time :int and :exact at every M")
    p.add_argument("--json", default="bench_kernels.json", help="where to write the results")
    a = p.parse_args(argv)
    global _clock
    if a.cpu_time:
        a.threads, _clock = 1, time.thread_time
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'CPU' if a.cpu_time else 'wall'} time, kernels: "
          f"{'yes' if kernels.load() is not None else 'no (PyTorch fallback)'}")
    rows = run(a.models, a.m, a.formats, a.budget, all_paths=a.all_paths)
    text = summary(rows)
    print("\n" + text)
    with open(a.json, "w") as f:
        json.dump({"threads": torch.get_num_threads(), "cpu_time": a.cpu_time, "rows": rows,
                   "summary": text}, f, indent=1)
    print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
