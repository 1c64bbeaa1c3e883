"""miaotui.bench.llama_tools: the command lines given to llama.cpp's tools and the reading
of their output (real output lines of llama-bench / llama-batched-bench, build 0c1e570).
With MIAOTUI_LLAMA_BIN set to a llama.cpp build/bin directory, the tools are run too."""
from __future__ import annotations

import json
import os

import pytest

from miaotui.bench import llama_tools

BENCH_ENTRY = {
    "build_commit": "0c1e570", "model_type": "llama 256M Q4_0", "n_batch": 2048, "n_ubatch": 512,
    "n_threads": 2, "poll": 50, "type_k": "f16", "type_v": "f16", "flash_attn": -1, "repack": True,
    "n_prompt": 0, "n_gen": 4, "n_depth": 16, "avg_ns": 1348133171, "stddev_ns": 0,
    "avg_ts": 2.967066, "stddev_ts": 0.0, "samples_ns": [1348133171], "samples_ts": [2.96707]}
BATCHED_LINES = (
    "llama_context: n_ctx = 64\n"
    '{"n_kv_max": 512, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, '
    '"n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 8, "tg": 4, "pl": 2, "n_kv": 24, '
    '"t_pp": 0.019584, "speed_pp": 816.993469, "t_tg": 0.026640, "speed_tg": 300.300293, "t": 0.046224, '
    '"speed": 519.210815}\n')


def test_bench_command_and_parse():
    cmd = llama_tools.bench_cmd("/bin/llama-bench", "m.gguf", 2, 0, 32, [0, 512, 4096], 1)
    assert cmd[cmd.index("-d") + 1] == "0,512,4096"
    assert cmd[cmd.index("-p") + 1] == "0" and cmd[cmd.index("-n") + 1] == "32"
    assert cmd[cmd.index("-o") + 1] == "json" and cmd[cmd.index("-t") + 1] == "2"
    rows = llama_tools.parse_bench(json.dumps([BENCH_ENTRY]))
    assert rows == [{"n_prompt": 0, "n_gen": 4, "n_depth": 16, "n_threads": 2, "type_k": "f16",
                     "type_v": "f16", "flash_attn": -1, "avg_ts": 2.967066, "stddev_ts": 0.0,
                     "samples_ts": [2.96707]}]
    with pytest.raises(llama_tools.ToolError, match="no JSON"):
        llama_tools.parse_bench("| model | size |")


def test_batched_command_and_parse():
    cmd = llama_tools.batched_cmd("/bin/llama-batched-bench", "m.gguf", 2, 128, 128, [1, 4, 8, 16])
    assert cmd[cmd.index("-npl") + 1] == "1,4,8,16"
    assert cmd[cmd.index("-c") + 1] == str(16 * 256)   # room for the largest case
    assert "-pps" not in cmd                           # every sequence its own prompt
    rows = llama_tools.parse_batched(BATCHED_LINES)
    assert rows == [{"pp": 8, "tg": 4, "pl": 2, "t_pp": 0.019584, "speed_pp": 816.993469,
                     "t_tg": 0.02664, "speed_tg": 300.300293, "t": 0.046224, "speed": 519.210815}]
    with pytest.raises(llama_tools.ToolError, match="no results"):
        llama_tools.parse_batched("main: error\n")


def test_tool_env_drops_miaotuis_omp_policy(monkeypatch):
    import miaotui
    monkeypatch.setattr(miaotui, "SET_OMP_WAIT_POLICY", True)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert "OMP_WAIT_POLICY" not in llama_tools.tool_env()
    monkeypatch.setattr(miaotui, "SET_OMP_WAIT_POLICY", False)   # the user's own setting stays
    assert llama_tools.tool_env()["OMP_WAIT_POLICY"] == "PASSIVE"


def test_bad_tool_path_and_failing_tool(tmp_path):
    with pytest.raises(llama_tools.ToolError, match="not an executable"):
        llama_tools.check_tool(str(tmp_path / "nope"), "--llama-bench")
    with pytest.raises(llama_tools.ToolError, match="exited with"):
        llama_tools._run(["false"], timeout=10)


def test_build_config_reads_the_isa_options_of_the_build_tree(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "CMakeCache.txt").write_text(
        "GGML_NATIVE:BOOL=OFF\nGGML_AVX2:BOOL=ON\nGGML_AVX512_VNNI:BOOL=OFF\nGGML_CUDA:BOOL=OFF\n"
        "CMAKE_BUILD_TYPE:STRING=Release\n")
    assert llama_tools.build_config(str(tmp_path / "bin" / "llama-batched-bench")) == {
        "GGML_NATIVE": "OFF", "GGML_AVX2": "ON", "GGML_AVX512_VNNI": "OFF"}
    assert llama_tools.build_config(str(tmp_path / "bin" / "sub" / "llama-bench")) == {}


LLAMA_BIN = os.environ.get("MIAOTUI_LLAMA_BIN")


@pytest.mark.skipif(not LLAMA_BIN, reason="MIAOTUI_LLAMA_BIN (a llama.cpp build/bin) not set")
def test_real_tools_on_a_tiny_gguf(tmp_path):
    from gguf_writer_util import write_gguf_from_hf
    from util import make_tiny_model
    model = make_tiny_model("llama", str(tmp_path / "hf"))
    f32 = write_gguf_from_hf(model, str(tmp_path / "m-F32.gguf"), "F32")
    q8 = llama_tools.quantize(os.path.join(LLAMA_BIN, "llama-quantize"), f32, str(tmp_path / "m-Q8_0.gguf"), "Q8_0")
    rows = llama_tools.run_bench(os.path.join(LLAMA_BIN, "llama-bench"), q8, 1, 0, 4, [0, 16], 1, timeout=300)
    assert [r["n_depth"] for r in rows] == [0, 16] and all(r["avg_ts"] > 0 for r in rows)
    rows = llama_tools.run_batched(os.path.join(LLAMA_BIN, "llama-batched-bench"), q8, 1, 8, 4, [1, 2], timeout=300)
    assert [r["pl"] for r in rows] == [1, 2] and all(r["speed"] > 0 for r in rows)


def test_bench_cpu_batched_side_runs_with_the_kv_type_asked(tmp_path, monkeypatch):
    """scripts/bench_cpu.py's miaotui side of the batched suite: npl requests run to the
    end, timed, on an engine whose KV cache is the type asked for (fp16 by default, the
    type llama-batched-bench keeps)."""
    from gguf_writer_util import write_gguf_from_hf
    from util import VOCAB, make_tiny_model
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "scripts"))
    import bench_cpu
    f32 = write_gguf_from_hf(make_tiny_model("llama", str(tmp_path / "hf")), str(tmp_path / "m-F32.gguf"), "F32")
    kinds = []
    real = bench_cpu.engine_for

    def spy(path, threads, kv, *a, **kw):
        eng = real(path, threads, kv, *a, **kw)
        kinds.append((eng.config.kv_cache_dtype, eng.config.prefill_int8))
        return eng
    monkeypatch.setattr(bench_cpu, "engine_for", spy)
    rows = bench_cpu.miaotui_batched(f32, VOCAB, 1, 8, 4, [2, 3], seed=0)
    assert [r["pl"] for r in rows] == [2, 3]
    assert all(0 < r["t_pp"] <= r["t"] and r["speed"] == r["pl"] * 12 / r["t"] for r in rows)
    bench_cpu.miaotui_batched(f32, VOCAB, 1, 8, 4, [2], seed=0, kv="fp32")
    bench_cpu.miaotui_batched(f32, VOCAB, 1, 8, 4, [2], seed=0, prefill_int8=True)  # --prefill-int8
    assert kinds == [("float16", False), ("float32", False), ("float16", True)]


def test_bench_cpu_redraws_the_depth_plot_from_saved_results(tmp_path, monkeypatch):
    """--plot-from: the depth plot from JSON already written (rows of several files), no run."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "scripts"))
    import bench_cpu
    files = []
    for shape in ("smollm2-135m", "tinyllama-1.1b"):
        rows = [{"shape": shape, "qtype": "Q4_0", "depth": d, "miaotui": {"fp16": {"ratio": 1.0 + d / 1e4}}}
                for d in (0, 512)]
        files.append(tmp_path / f"{shape}.json")
        files[-1].write_text(json.dumps({"depth": rows}))
    png = tmp_path / "depth.png"
    monkeypatch.setattr("sys.argv", ["bench_cpu.py", "--plot", str(png), "--plot-from", *map(str, files)])
    bench_cpu.main()
    assert png.read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "empty.json").write_text(json.dumps({"depth": []}))
    monkeypatch.setattr("sys.argv", ["bench_cpu.py", "--plot", str(png), "--plot-from", str(tmp_path / "empty.json")])
    with pytest.raises(SystemExit, match="no depth rows"):
        bench_cpu.main()


@pytest.mark.parametrize("qt", ["Q4_0", "Q8_0", "F32", "F16"])
def test_bench_cpu_batched_rows_hold_each_miaotui_variant(qt, monkeypatch):
    """The batched suite's rows: llama.cpp's and miaotui's medians and rounds, and with
    --prefill-int8 on a quantized file the int8 prompt path's too (the keys the README reads)."""
    import argparse
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "scripts"))
    import bench_cpu
    from miaotui.bench import llama_tools
    speeds = iter(range(1, 1000))

    def fake(npls):
        return [{"pl": n, "speed": float(next(speeds))} for n in npls]
    monkeypatch.setattr(llama_tools, "run_batched", lambda binary, path, threads, npp, ntg, npls: fake(npls))
    calls = []

    def fake_miaotui(path, vocab, threads, npp, ntg, npls, seed, kv, prefill_int8=False):
        calls.append(prefill_int8)
        return fake(npls)
    monkeypatch.setattr(bench_cpu, "miaotui_batched", fake_miaotui)
    args = argparse.Namespace(prefill_int8=True, repeats=3, llama_batched_bench="x", threads=1, npp=8, ntg=4,
                              npl=[2, 4], batched_kv="fp16")
    rows = bench_cpu.run_batched(args, "s", qt, "f.gguf", 100)
    want_qt = qt in ("Q4_0", "Q8_0")   # the option changes quantized weights only
    assert calls == [False, True] * 3 if want_qt else calls == [False] * 3
    assert [r["npl"] for r in rows] == [2, 4]
    for r in rows:
        assert len(r["llama_cpp_rounds"]) == len(r["miaotui_rounds"]) == 3
        assert r["ratio"] == r["miaotui_tok_s"] / r["llama_cpp_tok_s"]
        per_round = sorted(m["speed"] / l["speed"] for m, l in zip(r["miaotui_rounds"], r["llama_cpp_rounds"]))
        assert r["ratio_paired"] == per_round[1]   # each round's engines side by side, then the median
        assert ("ratio_int8" in r) == want_qt and ("ratio_int8_paired" in r) == want_qt
        if want_qt:
            assert r["miaotui_int8_tok_s"] == sorted(x["speed"] for x in r["miaotui_int8_rounds"])[1]
            assert r["miaotui_int8_tok_s"] != r["miaotui_tok_s"]
