"""Benchmarks: the roofline cost model against hand counts, perplexity against transformers,
percentile math, `bench serve` against a streaming server, and the CLI end to end."""
from __future__ import annotations

import json
import math
import os
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from miaotui.bench import roofline
from miaotui.bench.perplexity import perplexity, windows
from miaotui.bench.stats import percentile, spread, summarize
from miaotui.config import ModelConfig

DATA = os.path.join(os.path.dirname(__file__), "data", "shakespeare_40k.txt")


def small_cfg(**kw) -> ModelConfig:
    """hidden 64, 4 heads of 16 (GQA: 2 KV heads), MLP 128, 2 layers, vocab 100, tied."""
    base = dict(family="llama", model_type="llama", vocab_size=100, hidden_size=64,
                intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                tie_word_embeddings=True)
    return ModelConfig(**{**base, **kw})


# ---- cost model -------------------------------------------------------------------------
# Per layer, matmul weights [out, in]: qkv [64+2*32, 64], o [64, 64], gate_up [256, 64],
# down [64, 128] = 36864 weights in 512 rows; 2 layers.
def test_weight_bytes_by_format():
    cfg = small_cfg()
    fp32 = roofline.CostModel.from_config(cfg, roofline.weight_format())
    assert fp32.layer_weight_bytes == 2 * 36864 * 4
    assert fp32.lm_head_bytes == fp32.embed_bytes == 100 * 64 * 4
    assert fp32.shared_head and fp32.weight_memory() == 2 * 36864 * 4 + 25600   # tied: once

    int8 = roofline.CostModel.from_config(cfg, roofline.weight_format("int8"))
    assert int8.layer_weight_bytes == 2 * (36864 + 512 * 4)       # + a float32 scale per row
    assert int8.lm_head_bytes == 6400 + 100 * 4
    assert not int8.shared_head                                     # head quantized, table float32
    assert int8.weight_memory() == 2 * (36864 + 2048) + 6800 + 25600

    # int4, groups of 32 inputs: qkv 128*2, o 64*2, gate_up 256*2, down 64*4 = 1152 groups
    sym = roofline.CostModel.from_config(cfg, roofline.weight_format("int4", group_size=32, zeros=False))
    assert sym.layer_weight_bytes == 2 * (36864 // 2 + 1152 * 2)    # float16 scales
    int4 = roofline.CostModel.from_config(cfg, roofline.weight_format("int4", group_size=32))
    assert int4.layer_weight_bytes == 2 * (36864 // 2 + 1152 * 4)   # + float16 zeros (mins)
    assert int4.lm_head_bytes == int8.lm_head_bytes                 # the head keeps int8
    g64 = roofline.weight_format("int4", group_size=64, zeros=False)
    assert g64.nbytes(64, 128) == 64 * 64 + 64 * 2 * 2


def test_kv_bytes_gqa_and_int8():
    cfg = small_cfg()
    assert roofline.kv_bytes_per_token(cfg) == 2 * 32 * 4 * 2              # K+V, 2 KV heads x 16
    assert roofline.kv_bytes_per_token(cfg, "int8") == (2 * 32 + 2 * 2 * 4) * 2   # + scales
    from miaotui.engine.model_runner import ModelRunner
    assert ModelRunner.kv_bytes_per_token(cfg, torch.int8) == roofline.kv_bytes_per_token(cfg, "int8")


def test_prefill_and_decode_counts():
    cost = roofline.CostModel.from_config(small_cfg())
    assert cost.matmul_flops_per_token() == 2 * 2 * 36864
    act = 2 * 4 * 2 * (6 * 64 + 2 * 64 + 2 * 32 + 3 * 128)                  # 15360
    assert cost.act_bytes_per_token() == act
    # prefill of 8: matmuls, causal attention 4*heads*head_dim*(1+..+8) per layer, 1 logits row
    pre = cost.prefill(8)
    assert pre.flops == 8 * 147456 + 4 * 4 * 16 * 36 * 2 + 2 * 64 * 100
    assert pre.bytes == 2 * 36864 * 4 + 25600 + 8 * 64 * 4 + 8 * 512 + 8 * act + 2 * 100 * 4
    # decode, batch 2 at 10 keys: every weight once, each sequence reads 10 and writes 1 KV
    dec = cost.decode(2, 10)
    assert dec.flops == 2 * (147456 + 4 * 4 * 16 * 10 * 2 + 2 * 64 * 100)
    assert dec.bytes == 2 * 36864 * 4 + 25600 + 2 * (64 * 4 + 512 * 11 + act + 2 * 100 * 4)
    # a chunk after 4 cached tokens reads them from the cache
    assert cost.prefill(4, cached=4).bytes - cost.prefill(4).bytes == 4 * 512


def test_sliding_window_caps_keys():
    assert roofline._sum_capped(0, 10, 4) == 1 + 2 + 3 + 4 * 7
    assert roofline._sum_capped(5, 10, 4) == 5 * 4
    assert roofline._sum_capped(2, 6, 4) == 3 + 4 + 4 + 4
    cfg = small_cfg(sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    cost = roofline.CostModel.from_config(cfg)
    attn = cost.decode(1, 10).flops - roofline.CostModel.from_config(small_cfg()).decode(1, 0).flops
    assert attn == 4 * 4 * 16 * (4 + 10)


def test_machine_roofline_and_workload():
    m = roofline.Machine(bandwidth=10e9, flops={"float32": 100e9}, threads=2)
    assert m.time(roofline.Cost(1e9, 1e9)) == pytest.approx(0.1)     # memory-bound
    assert m.bound(roofline.Cost(1e12, 1e9)) == "compute"
    cost = roofline.CostModel.from_config(small_cfg())
    pred = roofline.predict_workload(cost, m, [(4, 3)])
    expect = m.time(cost.prefill(4)) + m.time(cost.decode(1, 5)) + m.time(cost.decode(1, 6))
    assert pred["time"] == pytest.approx(expect)
    r = roofline.fraction_report("decode", 0.05, 0.1, roofline.Cost(0, 1e9), m)
    assert r["fraction"] == 0.5 and r["effective_GBps"] == pytest.approx(10.0)
    assert roofline.describe(r, 9.1) == "decode 9.1 tok/s, 50% of the bandwidth limit, 10.0 GB/s effective"


def test_workload_parts_bound_adds_attention_to_the_matmuls():
    """Sequential parts can only take longer than the overlapped step; with a compute-bound
    matmul part and a memory-bound attention part, strictly longer, by their sum."""
    m = roofline.Machine(bandwidth=10e9, flops={"float32": 100e9}, threads=2)
    cost = roofline.CostModel.from_config(small_cfg())
    step, attn = cost.decode(64, 5000), cost.decode_attention(64, 5000)
    assert 0 < attn.flops < step.flops and 0 < attn.bytes < step.bytes
    rest = roofline.Cost(step.flops - attn.flops, step.bytes - attn.bytes)
    pred = roofline.predict_workload(cost, m, [(4999, 2)] * 64)
    assert pred["decode_parts_time"] == pytest.approx(m.time(attn) + m.time(rest))
    assert pred["decode_parts_time"] >= pred["decode_time"] == pytest.approx(m.time(step))


def test_sizes_measured_on_a_loaded_model(tiny_llama_dir):
    from miaotui.engine.llm_engine import EngineConfig, LLMEngine
    path, _ = tiny_llama_dir
    for quant in (None, "int8", "int4"):
        engine = LLMEngine(EngineConfig(model=path, quantization=quant, kv_cache_memory=1 << 20))
        measured = roofline.engine_cost_model(engine)
        analytic = roofline.CostModel.from_config(engine.model_config, roofline.weight_format(quant))
        assert measured.layer_weight_bytes == analytic.layer_weight_bytes
        assert measured.lm_head_bytes == analytic.lm_head_bytes
        assert measured.kv_per_token == analytic.kv_per_token


def test_footprint_and_max_batch():
    cost = roofline.CostModel.from_config(small_cfg())
    fp = cost.footprint(4, 100, step_tokens=64, overhead=0)
    assert fp["kv_cache"] == 4 * 100 * 512
    assert fp["activations"] == 4 * (64 * (2 * 64 + 64 + 2 * 32 + 3 * 128) + 4 * 100)  # + 4 logits rows
    assert fp["total"] == fp["weights"] + fp["kv_cache"] + fp["activations"]
    budget = fp["total"]
    assert cost.max_batch(budget, 100, step_tokens=64, overhead=0) == 4


# ---- statistics -------------------------------------------------------------------------
def test_percentiles_match_numpy():
    rng = random.Random(1)
    xs = [rng.expovariate(10) for _ in range(101)]
    for p in (0, 1, 50, 90, 99, 100):
        assert percentile(xs, p) == pytest.approx(float(np.percentile(xs, p)))
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)
    s = summarize([0.1, 0.2, 0.3, 0.4, 1.0])
    assert s["median"] == 0.3 and s["mean"] == pytest.approx(0.4) and s["max"] == 1.0
    assert s["p99"] == pytest.approx(0.976)
    assert spread([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert summarize([]) == {"n": 0} and math.isnan(percentile([], 50))


# ---- perplexity -------------------------------------------------------------------------
def test_windows_cover_every_token_once():
    for n, w, s in [(10, 4, 2), (100, 32, 32), (7, 16, 8), (50, 16, 5)]:
        wins = windows(n, w, s)
        assert sum(k for *_, k in wins) == n - 1 - (n > w and s == w) * (len(wins) - 1)
        assert all(e - b <= w and k <= e - b - 1 for b, e, k in wins)


def _hf_perplexity(model, ids, window, stride) -> float:
    nll, count = 0.0, 0
    for b, e, scored in windows(len(ids), window, stride):
        with torch.no_grad():
            logits = model(torch.tensor([ids[b:e]])).logits[0].double()
        lp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[b + 1:e])[:, None])[:, 0]
        nll -= lp[-scored:].sum().item()
        count += scored
    return math.exp(nll / count)


def test_perplexity_matches_transformers(tiny_llama_dir):
    from miaotui.engine.llm_engine import EngineConfig, LLMEngine
    path, model = tiny_llama_dir
    engine = LLMEngine(EngineConfig(model=path, enable_prefix_caching=False, kv_cache_memory=1 << 24))
    with open(DATA, encoding="utf-8") as f:
        ids = engine.tokenizer.encode(f.read(3000))[:400]
    for window, stride in [(128, 64), (400, 400), (96, 96)]:
        res = perplexity(engine, ids, window, stride)
        assert res["perplexity"] == pytest.approx(_hf_perplexity(model, ids, window, stride), rel=1e-4)
    assert engine.pool_is_full()
    with pytest.raises(ValueError):
        perplexity(LLMEngine(EngineConfig(model=path, kv_cache_memory=1 << 22)), ids, 64, 32)


# ---- bench serve ------------------------------------------------------------------------
class _StubOpenAI(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible completions server streaming one word per token."""
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/v1/models":
            self._send(200, json.dumps({"data": [{"id": "stub"}]}).encode())
        else:
            self._send(404, b"{}")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/completions" or body.get("model") != "stub":
            return self._send(404, b'{"error": "unknown"}')
        n = body["max_tokens"]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        import time
        for i in range(n):
            time.sleep(0.002)
            chunk = {"choices": [{"index": 0, "text": f" w{i}", "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        usage = {"prompt_tokens": len(body["prompt"].split()), "completion_tokens": n, "total_tokens": 0}
        self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())


@pytest.fixture
def stub_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_bench_serve_against_stub(stub_server):
    from miaotui.bench.serve import run_serve
    from miaotui.bench.workload import random_requests
    reqs = random_requests(8, "8-16", "4-8", 0, seed=3, text=True)
    res = run_serve(stub_server, reqs, concurrencies=[1, 4], max_duration=30, timeout=30,
                    slo_ttft=10.0, slo_tpot=10.0)
    assert [lv["load"] for lv in res["levels"]] == [1, 4]
    for lv in res["levels"]:
        assert lv["failures"] == 0 and lv["completed"] == 8
        assert lv["output_tok_s"] > 0 and lv["req_s"] > 0 and lv["goodput_req_s"] == lv["req_s"]
        assert lv["ttft"]["median"] > 0 and lv["tpot"]["median"] > 0 and lv["itl"]["p99"] > 0
        assert lv["total_tok_s"] > lv["output_tok_s"]
    strict = run_serve(stub_server, reqs[:3], rates=[50.0], slo_ttft=1e-9)
    assert strict["levels"][0]["completed"] == 3 and strict["levels"][0]["goodput_req_s"] == 0
    bad = run_serve(stub_server, reqs[:2], model="nope")
    assert bad["levels"][0]["failures"] == 2 and "HTTP 404" in bad["levels"][0]["errors"][0]


def test_cli_bench_serve(stub_server, tmp_path):
    from miaotui.cli import main
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--base-url", stub_server, "-n", "4", "--input-len", "8",
                 "--output-len", "4", "--concurrency", "1,2", "-o", str(out),
                 "--plot", str(tmp_path / "serve.png")]) == 0
    levels = json.load(open(out))["results"]["levels"]
    assert [lv["load"] for lv in levels] == [1, 2] and all(lv["failures"] == 0 for lv in levels)
    assert os.path.getsize(tmp_path / "serve.png") > 1000


# ---- CLI end to end ---------------------------------------------------------------------
def test_cli_latency_throughput_compare(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    from miaotui.cli import main
    path, _ = tiny_llama_dir
    monkeypatch.setattr(roofline, "calibration_path", lambda: str(tmp_path / "calibration.json"))
    monkeypatch.setattr(roofline, "calibrate", lambda threads=None: roofline.Machine(
        10e9, {"float32": 50e9}, threads or 1, "test"))
    lat = str(tmp_path / "lat.json")
    assert main(["bench", "latency", "--model", path, "--prompt-len", "16", "--output-len", "4",
                 "--repeats", "2", "--kv-cache-memory", "1e6", "-o", lat,
                 "--plot", str(tmp_path / "lat.png")]) == 0
    doc = json.load(open(lat))
    assert doc["env"]["torch"] == torch.__version__ and doc["env"]["cpu"]
    assert doc["results"]["ttft_s"]["n"] == 2 and doc["results"]["decode_tok_s"] > 0
    assert 0 < doc["roofline"]["decode"]["fraction"]
    assert os.path.getsize(tmp_path / "lat.png") > 1000
    tp = str(tmp_path / "tp.json")
    assert main(["bench", "throughput", "--model", path, "-n", "4", "--input-len", "8-16",
                 "--output-len", "4-8", "--backend", "both", "--hf-batch-size", "2",
                 "--kv-cache-memory", "1e6", "-o", tp, "--plot", str(tmp_path / "tp.png")]) == 0
    doc = json.load(open(tp))
    runs = doc["results"]["runs"]
    assert runs["miaotui"]["useful_output_tokens"] == runs["transformers"]["useful_output_tokens"]
    assert runs["miaotui"]["output_tokens"] == runs["miaotui"]["useful_output_tokens"]
    assert runs["transformers"]["peak_rss_bytes"] > 0 and doc["results"]["miaotui_over_transformers"] > 0
    capsys.readouterr()
    assert main(["bench", "compare", lat, lat]) == 0
    assert "1.000x" in capsys.readouterr().out
    assert main(["estimate", "--model", path, "--quantization", "int4", "--memory-budget", "1G"]) == 0
    out = capsys.readouterr().out
    assert "int4-g32" in out and "largest batch" in out


def test_cli_perplexity(tiny_llama_dir, tmp_path, capsys):
    from miaotui.cli import main
    path, _ = tiny_llama_dir
    out = str(tmp_path / "ppl.json")
    assert main(["perplexity", "--model", path, "--text", DATA, "--max-tokens", "200",
                 "--window", "64", "-o", out]) == 0
    doc = json.load(open(out))
    assert doc["results"]["scored_tokens"] == 199 and doc["results"]["perplexity"] > 1
    assert main(["perplexity", "--model", path, "--text", str(tmp_path / "missing.txt")]) == 2


def test_bench_serve_against_miaotui_server(tiny_llama_dir):
    """The project's own server (create_app on a loopback port) under a short load."""
    import socket
    import time

    import uvicorn

    from miaotui.bench.serve import run_serve
    from miaotui.bench.workload import random_requests
    from miaotui.engine.llm_engine import EngineConfig, LLMEngine
    from miaotui.serve.api import create_app
    path, _ = tiny_llama_dir
    engine = LLMEngine(EngineConfig(model=path, kv_cache_memory=1 << 24))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "tiny", api_key="k"), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.02)
    try:
        reqs = random_requests(6, "8-24", "4-8", 0, seed=5, text=True)
        res = run_serve(f"http://127.0.0.1:{port}", reqs, concurrencies=[3], max_duration=30,
                        timeout=60, api_key="k")
        lv = res["levels"][0]
        assert lv["failures"] == 0 and lv["completed"] == 6, lv["errors"]
        assert lv["output_tok_s"] > 0 and lv["ttft"]["median"] > 0 and lv["tpot"]["median"] > 0
        assert lv["total_tok_s"] > lv["output_tok_s"]
        denied = run_serve(f"http://127.0.0.1:{port}", reqs[:1], concurrencies=[1], model="tiny")
        assert denied["levels"][0]["failures"] == 1
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_workloads(tmp_path):
    from miaotui.bench.workload import parse_range, random_requests, sharegpt_requests
    assert parse_range("32-512") == (32, 512) and parse_range("7") == (7, 7)
    with pytest.raises(ValueError):
        parse_range("9-3")
    reqs = random_requests(50, "32-64", "5", 1000, seed=1)
    assert all(32 <= r.prompt_len <= 64 and r.output_len == 5 for r in reqs)
    assert all(300 <= t < 1000 for r in reqs for t in r.prompt_ids)
    assert [r.prompt_ids for r in reqs] == [r.prompt_ids for r in random_requests(50, "32-64", "5", 1000, seed=1)]
    data = [{"conversations": [{"from": "human", "value": "tell me a story please"},
                               {"from": "gpt", "value": "once upon a time there was"}]},
            {"conversations": [{"from": "human", "value": "hi"}]},
            {"conversations": [{"from": "human", "value": "x" * 5000}, {"from": "gpt", "value": "a b c d"}]}]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    got = sharegpt_requests(str(path), 10, None, max_len=100)
    assert len(got) == 1 and got[0].output_len == 6 and got[0].prompt.startswith("tell")


def test_bench_spec_runs_every_method_against_plain(tiny_llama_dir, tmp_path):
    """`miaotui bench spec` on one engine: each method's run is compared with the plain run
    of the same repeat, and its tokens are the plain tokens."""
    from miaotui.bench import speculative as sb
    from miaotui.engine.llm_engine import EngineConfig, LLMEngine
    path, _ = tiny_llama_dir
    engine = LLMEngine(EngineConfig(model=path, max_num_seqs=1))
    res = sb.run(engine, [{"method": "ngram"}, {"method": "draft", "model": path}], ["story"], 2, 12)
    rows = {(r["task"], r["method"]): r for r in res["rows"]}
    assert set(rows) == {(t, m) for t in ("story",) for m in ("plain", "ngram", f"draft:{path}")}
    for r in res["rows"]:
        assert r["identical_to_plain"] and r["output_tokens"] == 12 and len(r["speedups"]) == 2
    assert rows[("story", f"draft:{path}")]["acceptance_rate"] == 1.0    # its own draft
    assert engine.speculator is None and engine.pool_is_full()
    assert "| story | ngram |" in sb.table(res)


def test_kernel_bench_times_every_candidate(tmp_path, monkeypatch):
    """`python -m miaotui.bench.kernels` on one small shape: every candidate of each M is timed
    (the prompt paths from M = 8 on), and the JSON holds the rows and the summary."""
    from miaotui import kernels
    from miaotui.bench import kernels as kb
    monkeypatch.setitem(kb.SHAPES, "tiny", [(64, 96)])
    monkeypatch.setattr(kb, "ROTATE_BYTES", 1 << 20)
    out = tmp_path / "k.json"
    kb.main(["--models", "tiny", "--m", "1", "8", "--formats", "int8", "Q8_0", "--budget", "0.01",
             "--json", str(out)])
    d = json.load(open(out))
    got = {(r["M"], r["candidate"]) for r in d["rows"]}
    want = {(m, c) for m in (1, 8) for c in ("fp32", "torch_int8")} | {(8, "Q8_0:torch")}
    if kernels.load() is not None:
        want |= {(m, f"{f}:int") for m in (1, 8) for f in ("int8", "Q8_0")}
        want |= {(8, f"{f}:{p}") for f in ("int8", "Q8_0") for p in ("exact", "tiles")} | {(1, "int8:f32x")}
    assert want <= got
    assert all(r["reps"] >= 1 and r["median_ms"] > 0 and r["speedup_vs_fp32"] > 0 for r in d["rows"])
    assert all(c in d["summary"] for _, c in want) and "tiny" in d["summary"]
