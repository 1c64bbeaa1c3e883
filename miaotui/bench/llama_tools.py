"""llama.cpp's own benchmark tools as a baseline: ``llama-bench``, ``llama-batched-bench``
and ``llama-quantize``, driven by path (nothing of llama.cpp ships with miaotui).

Users compare engines with these tools, so miaotui's figures are set beside theirs on the
same GGUF file and the same work (scripts/bench_cpu.py). Each tool runs in a child
process whose environment lacks miaotui's ``OMP_WAIT_POLICY=PASSIVE`` (which slows
llama.cpp's OpenMP threads about 5x, see bench/llama_cpp.py) unless the user set it.
"""
from __future__ import annotations

import json
import os
import subprocess


class ToolError(RuntimeError):
    """A llama.cpp tool failed or printed nothing we can read."""


def tool_env() -> dict:
    """The environment for a llama.cpp tool: ours without the OpenMP policy miaotui set."""
    import miaotui
    env = dict(os.environ)
    if miaotui.SET_OMP_WAIT_POLICY:
        env.pop("OMP_WAIT_POLICY", None)
    return env


def check_tool(path: str, name: str) -> str:
    """path if it is an executable file, else a clear error naming the flag's tool."""
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise ToolError(f"{name}: {path!r} is not an executable file")
    return path


def build_config(binary: str) -> dict:
    """The instruction-set options (GGML_NATIVE, GGML_AVX2, GGML_AVX512...) the tool was
    configured with, read from the CMakeCache.txt of the build tree it sits in (build/bin/..);
    {} for a tool that is not in one. The tools do not print which ISA they were built for,
    and on a CPU with AVX-512 a native build and an AVX2 build are different baselines."""
    cache = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(binary))), "CMakeCache.txt")
    opts = {}
    try:
        with open(cache) as f:
            for line in f:
                name, _, value = line.strip().partition("=")
                name = name.split(":")[0]
                if name.startswith("GGML_") and name[5:].split("_")[0] in ISA_OPTIONS:
                    opts[name] = value
    except OSError:
        pass
    return opts


# GGML_<first word>_...: AVX covers AVX_VNNI, AVX512 the AVX512_* options, AMX the AMX_* ones
ISA_OPTIONS = ("NATIVE", "AVX", "AVX2", "AVX512", "FMA", "F16C", "BMI2", "AMX")


def _run(cmd: list[str], timeout: float | None) -> str:
    try:
        p = subprocess.run(cmd, env=tool_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise ToolError(f"{os.path.basename(cmd[0])} timed out after {timeout} s") from e
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
        raise ToolError(f"{' '.join(cmd)} exited with {p.returncode}: " + " | ".join(tail))
    return p.stdout


def bench_cmd(binary: str, model: str, threads: int, n_prompt: int, n_gen: int,
              depths: list[int], repetitions: int) -> list[str]:
    """llama-bench over the given depths (JSON out, llama.cpp's defaults otherwise:
    flash attention auto, f16 KV cache, batch 2048 / ubatch 512, warm-up run)."""
    return [binary, "-m", model, "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
            "-d", ",".join(str(d) for d in depths), "-r", str(repetitions), "-o", "json"]


def parse_bench(stdout: str) -> list[dict]:
    """llama-bench's JSON: one entry per test; kept: what it ran and its speed."""
    try:
        tests = json.loads(stdout)
    except json.JSONDecodeError as e:
        raise ToolError(f"llama-bench printed no JSON: {stdout[:200]!r}") from e
    keep = ("n_prompt", "n_gen", "n_depth", "n_threads", "type_k", "type_v", "flash_attn",
            "avg_ts", "stddev_ts", "samples_ts")
    return [{k: t.get(k) for k in keep} for t in tests]


def run_bench(binary: str, model: str, threads: int = 2, n_prompt: int = 0, n_gen: int = 32,
              depths: list[int] = (0,), repetitions: int = 1, timeout: float | None = 3600) -> list[dict]:
    return parse_bench(_run(bench_cmd(binary, model, threads, n_prompt, n_gen, list(depths), repetitions),
                            timeout))


def batched_cmd(binary: str, model: str, threads: int, npp: int, ntg: int, npl: list[int]) -> list[str]:
    """llama-batched-bench: npl sequences, each its own npp-token prompt (not shared), then
    ntg tokens each, decoded together; a context that holds the largest case."""
    ctx = max(npl) * (npp + ntg)
    return [binary, "-m", model, "-t", str(threads), "-tb", str(threads), "-c", str(ctx),
            "-npp", str(npp), "-ntg", str(ntg), "-npl", ",".join(str(n) for n in npl),
            "--output-format", "jsonl"]


def parse_batched(stdout: str) -> list[dict]:
    """llama-batched-bench's JSONL lines (other lines, logs, are skipped). speed is the
    total: (all prompt tokens + all generated tokens) / (prefill time + decode time)."""
    rows = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed"' in line:
            r = json.loads(line)
            rows.append({k: r[k] for k in ("pp", "tg", "pl", "t_pp", "speed_pp", "t_tg", "speed_tg", "t", "speed")})
    if not rows:
        raise ToolError(f"llama-batched-bench printed no results: {stdout[-300:]!r}")
    return rows


def run_batched(binary: str, model: str, threads: int = 2, npp: int = 128, ntg: int = 128,
                npl: list[int] = (1, 4, 8, 16), timeout: float | None = 3600) -> list[dict]:
    return parse_batched(_run(batched_cmd(binary, model, threads, npp, ntg, list(npl)), timeout))


def quantize(binary: str, src: str, dst: str, qtype: str, threads: int = 2) -> str:
    """dst = src quantized to qtype by llama-quantize, every tensor in that type (--pure:
    no Q6_K output layer), written beside and renamed into place when complete."""
    if not os.path.isfile(dst):
        tmp = f"{dst}.{os.getpid()}.tmp"   # per process: concurrent runs may make the same file
        _run([binary, "--pure", src, tmp, qtype, str(threads)], timeout=3600)
        os.replace(tmp, dst)
    return dst
