"""`miaotui bench gpu --smoke` on the CPU: every suite of the GPU check runs end to end on
tiny shapes and writes its JSON, so scripts/gpu_check.sh is tested before it meets a GPU.
Parity with transformers must hold on the tiny models. Run on the CPU path and on the
engine's GPU path in the Triton-on-CPU mode (when the engine has one)."""
import json
import os
import subprocess
import sys

import pytest

from miaotui.bench import gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_KEYS = {"torch", "cuda", "triton", "transformers", "python", "device", "flags"}
DECODE_KEYS = {"model", "cuda_graphs", "decode_tok_s", "tpot_s", "weight_bytes", "kv_bytes_per_ctx_token",
               "bytes_per_token", "achieved_bytes_per_s", "fraction_of_copy_bw", "fraction_of_hbm_peak"}


def run_smoke(tmp_path, extra_env: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT, **extra_env}
    env.pop("OUT", None)
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "miaotui", "bench", "gpu", "--smoke", "--device", "cpu",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    docs = {}
    for suite in gpu.SUITES:
        with open(out / f"gpu_{suite}.json") as f:
            docs[suite] = json.load(f)
    return docs


def check_docs(docs: dict) -> None:
    for suite, doc in docs.items():
        assert doc["kind"] == f"gpu-{suite}" and doc["complete"]
        assert ENV_KEYS <= set(doc["env"]) and doc["env"]["device"] == "cpu"
        for row in doc["results"]:
            assert "error" not in row, (suite, row)

    parity = docs["parity"]
    assert parity["all_passed"]
    seen = {(r["family"], r["dtype"]) for r in parity["results"]}
    assert seen == {(f, d) for f in gpu.FAMILIES for d in ("float32", "bfloat16")}
    for r in parity["results"]:
        assert r["passed"] and r["tokens"] == 12
        if r["dtype"] == "float32":
            assert r["equal_prefix"] == 12
        elif r["equal_prefix"] < 12:   # bf16 may part at a near tie of the fp32 reference
            assert 0 <= r["gap_at_divergence"] <= r["tolerance"]
        assert r["prefill_logprob_max_abs_diff"] <= r["tolerance"]
        assert r["decode_logprob_max_abs_diff"] <= r["tolerance"]
        assert r["tolerance"] == (gpu.FP32_TOL if r["dtype"] == "float32" else
                                  max(gpu.BF16_TOL_FLOOR, 3 * r["transformers_dtype_error"]))

    bw = docs["decode"]["config"]["copy_bandwidth"]
    assert bw["bytes_per_s"] > 0
    for suite in ("decode", "quant"):
        for r in docs[suite]["results"]:
            assert DECODE_KEYS <= set(r)
            assert r["decode_tok_s"] > 0 and r["weight_bytes"] > 0 and r["kv_bytes_per_ctx_token"] > 0
            assert r["bytes_per_token"] == pytest.approx(r["weight_bytes"] + r["kv_bytes_per_ctx_token"] *
                                                         (r["prompt_len"] + r["output_len"] / 2))
            assert r["achieved_bytes_per_s"] == pytest.approx(r["bytes_per_token"] * r["decode_tok_s"])
    assert [r["model"].split()[-1] for r in docs["quant"]["results"]] == ["int8", "int4", "gguf-Q8_0", "gguf-Q4_0"]
    # int4 weights are about half of int8's, GGUF Q4_0 about half of Q8_0's
    w = {r["model"].split()[-1]: r["weight_bytes"] for r in docs["quant"]["results"]}
    assert w["int4"] < 0.75 * w["int8"] and w["gguf-Q4_0"] < 0.75 * w["gguf-Q8_0"]

    (tp,) = docs["throughput"]["results"]
    prompts, outs = gpu.nano_vllm_workload(8, 4, 24, 500)
    assert tp["generated_tokens"] == tp["output_tokens"] == sum(outs)
    assert tp["prompt_tokens"] == sum(map(len, prompts))
    assert tp["output_tok_s"] == pytest.approx(tp["output_tokens"] / tp["seconds"])


def test_smoke_cpu_path(tmp_path):
    check_docs(run_smoke(tmp_path, {"MIAOTUI_TRITON_CPU": "0"}))


def test_smoke_gpu_path_on_cpu(tmp_path):
    """The engine's GPU path (GPURunner, random weights made by the engine, the kernels'
    Triton versions in the interpreter) under the same script."""
    pytest.importorskip("triton")
    check_docs(run_smoke(tmp_path, {"MIAOTUI_TRITON_CPU": "1", "TRITON_INTERPRET": "1"}))


def test_nano_vllm_workload_is_its_bench():
    """nano-vllm's bench.py draws with random.seed(0): each prompt's length, then its ids,
    then every output length."""
    import random
    prompts, outs = gpu.nano_vllm_workload()
    random.seed(0)
    want = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(256)]
    assert prompts == want
    assert outs == [random.randint(100, 1024) for _ in range(256)]


def test_random_gguf_has_the_shape(tmp_path):
    """The random-block GGUF file loads as the shape it was written for, blocks intact."""
    pytest.importorskip("gguf")
    from miaotui.loader import open_checkpoint
    path = gpu.write_random_gguf(gpu.SMOKE_LLAMA, "Q4_0", str(tmp_path / "m.gguf"))
    cfg = open_checkpoint(path).config
    assert (cfg.hidden_size, cfg.num_layers, cfg.vocab_size, cfg.num_kv_heads) == (64, 2, 512, 2)


def test_cuda_refused_without_a_device():
    if gpu.torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    with pytest.raises(gpu.MiaotuiError, match="no CUDA device"):
        gpu.run(["decode"], device="cuda")


def test_gpu_check_script_dry_run(tmp_path):
    """scripts/gpu_check.sh on the CPU: a failing stage (an unknown suite) does not stop the
    next; the log, the summary and the suite's JSON land under $OUT."""
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_SMOKE": "1",
           "GPU_CHECK_TESTS": "none", "GPU_CHECK_SUITES": "nosuch,throughput", "PYTHONPATH": ROOT}
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (tmp_path / "log").read_text()
    assert "nosuch: FAILED rc=2" in log and "throughput: ok" in log
    assert "unknown suite 'nosuch'" in log
    doc = json.loads((tmp_path / "results" / "gpu_throughput.json").read_text())
    assert doc["complete"] and "error" not in doc["results"][0]
    assert sorted(os.listdir(tmp_path)) == ["log", "results"]


def test_cli_names_the_suites_without_importing_torch():
    """bench/cli.py spells the suites out so that argument errors stay torch-free; they must
    stay bench/gpu.py's."""
    import re
    src = open(os.path.join(ROOT, "miaotui", "bench", "cli.py")).read()
    names = re.search(r'SUITES = \(([^)]*)\)', src).group(1)
    assert tuple(n.strip().strip('"') for n in names.split(",")) == gpu.SUITES
