"""Single-thread rates of the prompt GEMMs on quantized weights: the default exact one
(float32 activations, W dequantized into packed panels) against the --prefill-int8 one
(int8 activations: AVX-512 VNNI, else AVX2 maddubs), per core by CPU time, M prompt rows.

    python scripts/prompt_gemm_rates.py --out results/prompt_gemm_rates_avx2.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from miaotui import kernels
from miaotui.layers import quant as Q

SHAPES = [(1536, 576), (576, 1536), (5632, 2048), (2048, 5632)]   # SmolLM2, TinyLlama MLP


def rate(w, x, int8: bool, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        with Q.exact_activations():
            if int8:
                with Q.int8_prompt():
                    t = time.process_time(); w.matmul(x); times.append(time.process_time() - t)
            else:
                t = time.process_time(); w.matmul(x); times.append(time.process_time() - t)
    return 2 * x.shape[0] * w.in_features * w.out_features / statistics.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()
    k = kernels.load()
    if k is None:
        raise SystemExit("the C++ kernels are not available")
    k.set_threads(1)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rows = []
    for n, kin in SHAPES:
        wf = torch.randn(n, kin, generator=g)
        x = torch.randn(args.m, kin, generator=g)
        for name, w in [("int8", Q.quantize_int8(wf)), ("int4", Q.quantize_int4(wf, 32, True))]:
            r = {"shape": f"{kin}->{n}", "weights": name, "exact_gflops": rate(w, x, False, args.repeats),
                 "int8_gops": rate(w, x, True, args.repeats)}
            rows.append(r)
            print(f"{r['shape']:>10} {name}: exact float32 GEMM {r['exact_gflops']:.1f} GFLOP/s, "
                  f"int8 GEMM {r['int8_gops']:.1f} GOP/s ({r['int8_gops'] / r['exact_gflops']:.2f}x)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cpu": platform.processor() or platform.machine(), "vnni": bool(k.has_vnni()),
                       "m": args.m, "repeats": args.repeats, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
