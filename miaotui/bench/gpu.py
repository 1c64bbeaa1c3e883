"""`miaotui bench gpu`: the CUDA path's checks and figures (issue 15), suite by suite.

- parity: each architecture family's tiny random model (tests/util.py) greedy through
  transformers and through miaotui on the device, fp32 and bf16; tokens-equal prefix and
  log-prob differences against transformers in fp32, with the tolerance stated.
- decode: batch-1 decode tok/s on random bf16 weights of real shapes drawn on the device
  (the engine's load_format "dummy", no file), CUDA graphs on and off; achieved GB/s
  (weights + KV read per token / time per token) against the device-to-device copy
  bandwidth measured in the same run and against the HBM peak (4.8 TB/s on an H200).
- throughput: nano-vllm's bench.py workload (256 requests, prompt and output lengths
  uniform in 100..1024, token ids in 0..10000, temperature 0.6, ignore_eos, seed 0) on a
  Qwen3-0.6B shape: output and total tok/s over the wall clock of one generate call.
- quant: batch-1 decode of TinyLlama-1.1B's shape in int8 and int4 (quantized at load)
  and as GGUF Q8_0 / Q4_0 files of random blocks.

Each suite writes RESULTS_DIR/gpu_<suite>.json (rewritten after every figure, so a stage
stopped by its time limit keeps what it measured) and prints a table. ``--smoke`` runs
every suite on tiny shapes (on the CPU here, tests/test_gpu_bench.py), so this script is
tested before it meets a GPU. Parity and the GGUF writer need the source checkout's tests/
folder (tests/util.py, tests/gguf_writer_util.py).
"""
from __future__ import annotations

import gc
import os
import random
import statistics
import sys
import tempfile
import time

import torch

from miaotui.config import MiaotuiError

SUITES = ("parity", "decode", "throughput", "quant")   # also written in bench/cli.py (no torch there)
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3", "gpt2")
HBM_PEAK_BYTES_S = 4.8e12          # H200 datasheet; the measured copy bandwidth sits beside it
PROMPT = [5, 17, 99, 3, 250, 41, 7, 7, 7, 120, 64, 200, 33, 18, 90, 11, 2, 300, 301, 45]
FP32_TOL = 1e-3                    # log-prob max-abs difference allowed in fp32
BF16_TOL_FLOOR = 0.05              # bf16: at least this, or 3x transformers' own bf16 error
TOP = 20                           # log-probs compared per position (the engine's maximum)

# smoke shapes: a few layers, small enough for the CPU and the Triton interpreter
SMOKE_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False,
                   max_position_embeddings=2048)
SMOKE_QWEN3 = dict(SMOKE_LLAMA, model_type="qwen3", head_dim=32, tie_word_embeddings=True)


# ---- environment, device, output --------------------------------------------------------
def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise MiaotuiError("--device cuda: torch sees no CUDA device")
    return device


def environment(device: str) -> dict:
    from miaotui.bench.report import environment as base
    env = {**base(), "device": device, "cuda": torch.version.cuda,
           "flags": {k: v for k, v in os.environ.items() if k.startswith(("MIAOTUI_", "TRITON_"))}}
    for mod in ("triton", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_bytes=p.total_memory, gpu_sms=p.multi_processor_count,
                   capability=f"{p.major}.{p.minor}")
    return env


def results_dir(path: str | None = None) -> str:
    """--out, else $OUT/results (the device tool's folder), else results/gpu."""
    if path:
        return path
    return os.path.join(os.environ["OUT"], "results") if os.environ.get("OUT") else os.path.join("results", "gpu")


class Recorder:
    """One suite's JSON, rewritten whenever a figure is added."""

    def __init__(self, suite: str, device: str, config: dict, out_dir: str):
        self.path = os.path.join(out_dir, f"gpu_{suite}.json")
        self.doc = {"kind": f"gpu-{suite}", "env": environment(device), "config": config,
                    "results": [], "complete": False}
        self.save()

    def add(self, row: dict) -> None:
        self.doc["results"].append(row)
        self.save()

    def finish(self, **extra) -> dict:
        self.doc.update(extra, complete=True)
        self.save()
        print(f"[miaotui] wrote {self.path}", file=sys.stderr)
        return self.doc

    def save(self) -> None:
        import json
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.doc, f, indent=1, default=float)
        os.replace(tmp, self.path)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str, nbytes: int, repeats: int = 10) -> dict:
    """Device-to-device copy of `nbytes` (random data, never zeros): median bytes read plus
    written per second, timed with CUDA events (host clock on the CPU)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 2):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            t = a.elapsed_time(b) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            t = time.perf_counter() - t0
        if i >= 2:   # two warm-ups
            times.append(t)
    if not torch.equal(dst, src):
        raise RuntimeError("copy bandwidth: the copy is wrong")
    t = statistics.median(times)
    del src, dst
    return {"bytes": nbytes, "seconds": t, "bytes_per_s": 2 * nbytes / t, "repeats": repeats}


# ---- engines ----------------------------------------------------------------------------
def engine_kwargs(device: str, eager: bool | None = None, **kw) -> dict:
    """Engine options for `device`; eager None: the engine's default (CUDA graphs on CUDA)."""
    kw["device"] = device
    if eager is not None:
        kw["enforce_eager"] = eager
    return kw


def gpu_path(device: str) -> bool:
    """Whether the engine takes its GPU path on `device` (CUDA, or the Triton-on-CPU mode)."""
    from miaotui.engine import gpu_runner
    return gpu_runner.wanted(device)


def random_model(shape: str | dict, device: str) -> tuple[object, dict]:
    """(model, engine options) for random weights of `shape`: made on the device by the
    engine (load_format "dummy") on its GPU path, else drawn by the loader
    (shapes.RandomCheckpoint; the CPU path's fused decoder wants the loaded layout)."""
    from miaotui.bench.shapes import RandomCheckpoint, config_dir
    path = config_dir(shape)
    if gpu_path(device):
        return path, {"load_format": "dummy"}
    return RandomCheckpoint(path), {}


def free_device_memory() -> None:
    """After the caller dropped its engine: collect it (and its cycles) and hand the cached
    device memory back, so the next engine sizes its KV pool from what is really free."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _tests_module(name: str):
    """A helper module of the source checkout's tests/ folder (tiny models, GGUF writer)."""
    import importlib
    tests = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tests")
    if not os.path.isfile(os.path.join(tests, name + ".py")):
        raise MiaotuiError(f"this suite needs the source checkout's tests/{name}.py")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    return importlib.import_module(name)


# ---- parity -----------------------------------------------------------------------------
def _hf_greedy(model, ids: list[int], n: int, device: str) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids], device=device), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _hf_logprobs(model, seq: list[int], device: str) -> torch.Tensor:
    """transformers' log-probs [len(seq) - 1, vocab] for each next token of seq (one forward)."""
    with torch.no_grad():
        logits = model(torch.tensor([seq[:-1]], device=device)).logits[0].float()
    return torch.log_softmax(logits, -1).cpu()


def _ours(llm, ids: list[int], n: int, ref_tokens: list[int]) -> tuple[list[int], list[dict], list[dict]]:
    """miaotui's greedy tokens with the top-20 log-probs of each (decode path), and the
    top-20 log-probs at each position of ids + ref_tokens scored as a prompt (prefill path)."""
    from miaotui import SamplingParams
    gen = llm.generate([ids], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=TOP))
    c = gen[0].outputs[0]
    scored = llm.generate([ids + ref_tokens], SamplingParams(max_tokens=0, prompt_logprobs=TOP))
    return c.token_ids, [lp.top for lp in c.logprobs], [lp.top for lp in scored[0].prompt_logprobs[1:]]


def _max_diff(tops: list[dict], ref: torch.Tensor, offset: int) -> float:
    """Largest |ours - reference| over each position's top tokens (position i of `tops`
    is row offset + i of `ref`)."""
    worst = 0.0
    for i, top in enumerate(tops):
        for tok, lp in top.items():
            worst = max(worst, abs(lp - ref[offset + i, tok].item()))
    return worst


def parity_case(family: str, path: str, ref32, dtype: str, device: str, n: int,
                ref_tokens: list[int], ref_lp: torch.Tensor) -> dict:
    """One family in one dtype against transformers' fp32 run (ref_tokens, ref_lp)."""
    from miaotui import LLM
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    hf_err = 0.0
    if dtype != "float32":   # transformers' own error in this dtype: the scale of the tolerance
        import copy
        hf = copy.deepcopy(ref32).to(torch_dtype)
        lp = _hf_logprobs(hf, PROMPT + ref_tokens, device)
        hf_err = (lp - ref_lp).abs().max().item()
        del hf
        free_device_memory()
    tol = FP32_TOL if dtype == "float32" else max(BF16_TOL_FLOOR, 3 * hf_err)
    llm = LLM(path, dtype=dtype, **engine_kwargs(device, kv_cache_memory=16 << 20, max_num_seqs=4,
                                                 gpu_memory_utilization=0.05))
    try:
        toks, dec_tops, pre_tops = _ours(llm, PROMPT, n, ref_tokens)
    finally:
        del llm
        free_device_memory()
    prefix = next((i for i, (a, b) in enumerate(zip(toks, ref_tokens)) if a != b), min(len(toks), n))
    start = len(PROMPT) - 1                      # ref_lp's row of the first generated token
    prefill_diff = _max_diff(pre_tops, ref_lp, 0)
    decode_diff = _max_diff(dec_tops[:prefix + 1], ref_lp, start)
    gap = None
    if prefix < n:   # how far from a tie the reference was where the tokens parted
        row = ref_lp[start + prefix]
        gap = (row[ref_tokens[prefix]] - row[toks[prefix]]).item()
    passed = max(prefill_diff, decode_diff) <= tol and (prefix == n or (gap is not None and gap <= tol))
    return {"family": family, "dtype": dtype, "tokens": n, "equal_prefix": prefix,
            "gap_at_divergence": gap, "prefill_logprob_max_abs_diff": prefill_diff,
            "decode_logprob_max_abs_diff": decode_diff, "transformers_dtype_error": hf_err,
            "tolerance": tol, "passed": passed}


def suite_parity(device: str, out_dir: str, smoke: bool, families=FAMILIES,
                 dtypes=("float32", "bfloat16"), n: int = 32) -> dict:
    util = _tests_module("util")
    if smoke:   # the Triton interpreter runs every kernel launch in Python
        n = 12
    rec = Recorder("parity", device, {"families": list(families), "dtypes": list(dtypes), "tokens": n,
                                      "fp32_tolerance": FP32_TOL, "bf16_tolerance_floor": BF16_TOL_FLOOR,
                                      "criterion": PARITY_CRITERION}, out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            path = os.path.join(tmp, family)
            ref = util.make_tiny_model(family, path).to(device)
            ref_tokens = _hf_greedy(ref, PROMPT, n, device)
            ref_lp = _hf_logprobs(ref, PROMPT + ref_tokens, device)
            for dtype in dtypes:
                try:
                    row = parity_case(family, path, ref, dtype, device, n, ref_tokens, ref_lp)
                except Exception as e:   # one family's failure must not hide the others
                    row = {"family": family, "dtype": dtype, "passed": False, "error": f"{type(e).__name__}: {e}"}
                rec.add(row)
            del ref
            free_device_memory()
    doc = rec.finish(all_passed=all(r["passed"] for r in rec.doc["results"]))
    from miaotui.bench.report import table
    print(table([[r["family"], r["dtype"], r.get("equal_prefix", "-"), r.get("prefill_logprob_max_abs_diff", "-"),
                  r.get("decode_logprob_max_abs_diff", "-"), r.get("tolerance", "-"),
                  "yes" if r["passed"] else "NO " + r.get("error", "")[:60]] for r in doc["results"]],
                ["family", "dtype", f"equal of {n}", "prefill lp diff", "decode lp diff", "tol", "passed"]))
    return doc


PARITY_CRITERION = (
    "against transformers in fp32 on the device: greedy tokens equal for all N, or parting only "
    "where the reference's two candidates are within the tolerance in log-prob (a near tie); "
    "log-probs of each position's top-20 tokens within the tolerance, on the prompt scored "
    "through the prefill path and on the generated tokens (decode path) up to the parting. "
    "Log-probs are the logits less each row's log-sum-exp. Tolerance: fp32 1e-3; bf16 the "
    "larger of 0.05 and 3x transformers' own bf16-vs-fp32 error on the same model.")


# ---- decode -----------------------------------------------------------------------------
def read_bytes_per_token(engine) -> tuple[int, int]:
    """(weight bytes, KV bytes per context token) a batch-1 decode step reads: every
    matmul weight once, the embedding table when it is the head too (else one row), and
    K and V of each cached token in every layer. Norms and rotary tables are left out."""
    from miaotui.bench.memory import model_bytes
    b = model_bytes(engine.model)
    tied = bool(getattr(engine.model_config, "tie_word_embeddings", False))
    weights = b["weights"] + (b["embedding"] if tied else b["embedding"] // engine.model_config.vocab_size)
    caches = getattr(engine.runner, "caches", None)
    if not caches:
        from miaotui.engine.model_runner import ModelRunner
        return weights, ModelRunner.kv_bytes_per_token(engine.model_config, engine.runner.kv_dtype)
    return weights, int(sum(c.nbytes() / c.k.shape[0] for c in caches))


def time_decode(engine, prompt_len: int, n: int, repeats: int, seed: int = 0) -> dict:
    """Median time per generated token (batch 1, greedy, EOS ignored) over `repeats`
    requests with fresh random prompts, after one warm-up request."""
    from miaotui.bench.latency import time_request
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    tpots, ttfts = [], []
    for i in range(repeats + 1):
        ids = [rng.randrange(min(300, vocab // 2), vocab) for _ in range(prompt_len)]
        r = time_request(engine, ids, n, f"decode-{i}")
        if i:
            tpots.append(r["tpot"])
            ttfts.append(r["ttft"])
    return {"tpot_s": statistics.median(tpots), "tpot_samples": tpots, "ttft_s": statistics.median(ttfts)}


def decode_row(label: str, model, device: str, copy_bw: float, prompt_len: int, n: int,
               repeats: int, eager: bool | None, **kw) -> dict:
    """Batch-1 decode of one model in one mode, with its bandwidth figures."""
    from miaotui import LLM
    t0 = time.perf_counter()
    llm = LLM(model, **engine_kwargs(device, eager, max_num_seqs=1, max_model_len=prompt_len + n + 32,
                                      kv_cache_memory=float(64 << 20) if device == "cpu" else None,
                                      gpu_memory_utilization=0.5, **kw))
    load_s = time.perf_counter() - t0
    try:
        timing = time_decode(llm.engine, prompt_len, n, repeats)
        weights, kv = read_bytes_per_token(llm.engine)
    finally:
        del llm
        free_device_memory()
    ctx = prompt_len + n / 2                     # mean context over the generated tokens
    per_token = weights + kv * ctx
    rate = per_token / timing["tpot_s"]
    return {"model": label, "cuda_graphs": None if eager is None else not eager, "batch": 1,
            "prompt_len": prompt_len, "output_len": n, "decode_tok_s": 1 / timing["tpot_s"],
            **timing, "load_s": load_s, "weight_bytes": weights, "kv_bytes_per_ctx_token": kv,
            "bytes_per_token": per_token, "achieved_bytes_per_s": rate,
            "fraction_of_copy_bw": rate / copy_bw, "fraction_of_hbm_peak": rate / HBM_PEAK_BYTES_S,
            "options": {k: v for k, v in kw.items() if v is not None}}


def _mode_list(device: str) -> list[bool | None]:
    """enforce_eager for each run: CUDA graphs on, then off; one run off CUDA."""
    return [False, True] if device == "cuda" else [None]


def _bandwidth(device: str, smoke: bool) -> dict:
    return copy_bandwidth(device, (64 << 20) if smoke or device == "cpu" else (4 << 30))


def _decode_table(rows: list[dict]) -> str:
    from miaotui.bench.report import table
    return table([[r["model"], {True: "on", False: "off", None: "-"}[r.get("cuda_graphs")],
                   r.get("decode_tok_s", "-"), r.get("tpot_s", 0) * 1e3,
                   r.get("achieved_bytes_per_s", 0) / 1e9, f"{r.get('fraction_of_copy_bw', 0):.1%}",
                   f"{r.get('fraction_of_hbm_peak', 0):.1%}", r.get("error", "")[:50]] for r in rows],
                 ["model", "graphs", "tok/s", "ms/token", "GB/s", "% copy bw", "% 4.8 TB/s", "error"])


def suite_decode(device: str, out_dir: str, smoke: bool, shapes=("llama3-8b", "tinyllama-1.1b"),
                 prompt_len: int = 128, n: int = 128, repeats: int = 3) -> dict:
    if smoke:
        shapes, prompt_len, n, repeats = ("smoke-llama",), 8, 4, 1
    bw = _bandwidth(device, smoke)
    rec = Recorder("decode", device, {"shapes": list(shapes), "prompt_len": prompt_len, "output_len": n,
                                      "repeats": repeats, "dtype": "bfloat16", "weights": "random, drawn on the device",
                                      "copy_bandwidth": bw, "hbm_peak_bytes_per_s": HBM_PEAK_BYTES_S}, out_dir)
    print(f"device copy: {bw['bytes_per_s'] / 1e9:.0f} GB/s (read + write, {bw['bytes'] >> 20} MiB)")
    for shape in shapes:
        for eager in _mode_list(device):
            try:
                model, opts = random_model(SMOKE_LLAMA if shape == "smoke-llama" else shape, device)
                row = decode_row(shape, model, device, bw["bytes_per_s"], prompt_len, n, repeats, eager,
                                 dtype="bfloat16", **opts)
            except Exception as e:
                row = {"model": shape, "cuda_graphs": None if eager is None else not eager,
                       "error": f"{type(e).__name__}: {e}"}
            rec.add(row)
    doc = rec.finish()
    print(_decode_table(doc["results"]))
    return doc


# ---- throughput -------------------------------------------------------------------------
def nano_vllm_workload(n: int = 256, lo: int = 100, hi: int = 1024, max_id: int = 10000,
                       seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """nano-vllm bench.py's requests: random.seed(0); for each, a prompt of randint(lo, hi)
    ids randint(0, max_id); then each output length randint(lo, hi)."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, max_id) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    outs = [rng.randint(lo, hi) for _ in range(n)]
    return prompts, outs


def run_requests(engine, prompts: list[list[int]], params: list, rec: Recorder,
                 every: float = 5.0) -> tuple[int, float]:
    """All requests added at once and stepped to completion (bench/throughput.py's
    run_engine); (tokens generated, wall seconds). Every `every` seconds the progress so far
    goes into the JSON ("progress"), so a run stopped by its time limit still leaves a lower
    bound."""
    from types import SimpleNamespace

    from miaotui.bench.throughput import run_engine
    gen0, last = engine.stats["generated_tokens"], [0.0]

    def progress(seconds: float, finished: int) -> None:
        if seconds - last[0] > every:
            last[0] = seconds
            gen = engine.stats["generated_tokens"] - gen0
            rec.doc["progress"] = {"seconds": seconds, "finished_requests": finished,
                                   "generated_tokens": gen, "output_tok_s_so_far": gen / seconds}
            rec.save()
    reqs = [SimpleNamespace(prompt_ids=p) for p in prompts]
    run = run_engine(engine, reqs, "tp", params, progress)
    return run["output_tokens"], run["elapsed_s"]


def suite_throughput(device: str, out_dir: str, smoke: bool, shape: str = "qwen3-0.6b",
                     num_requests: int = 256, max_num_seqs: int = 256,
                     max_num_batched_tokens: int = 16384) -> dict:
    from miaotui import LLM, SamplingParams
    lo, hi, max_id = 100, 1024, 10000
    if smoke:
        shape, num_requests, lo, hi, max_id, max_num_seqs, max_num_batched_tokens = \
            "smoke-qwen3", 8, 4, 24, 500, 8, 256
    prompts, outs = nano_vllm_workload(num_requests, lo, hi, max_id)
    cfg = {"shape": shape, "requests": num_requests, "lengths": [lo, hi], "max_token_id": max_id,
           "temperature": 0.6, "ignore_eos": True, "seed": 0, "dtype": "bfloat16",
           "max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens,
           "workload": "nano-vllm bench.py"}
    rec = Recorder("throughput", device, cfg, out_dir)
    try:
        model, opts = random_model(SMOKE_QWEN3 if shape == "smoke-qwen3" else shape, device)
        t0 = time.perf_counter()
        llm = LLM(model, dtype="bfloat16", **opts, **engine_kwargs(
            device, None, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=2 * hi + 64, gpu_memory_utilization=0.9,
            kv_cache_memory=float(256 << 20) if device == "cpu" else None))
        load_s = time.perf_counter() - t0
        llm.generate(["Benchmark: "], SamplingParams())     # warm-up, as nano-vllm's
        params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=o) for o in outs]
        _sync(device)
        steps0 = llm.engine.stats["steps"]
        got, wall = run_requests(llm.engine, prompts, params, rec)
        n_in, n_out = sum(map(len, prompts)), sum(outs)
        row = {"model": shape, "seconds": wall, "load_s": load_s, "prompt_tokens": n_in, "output_tokens": n_out,
               "generated_tokens": got, "output_tok_s": n_out / wall, "total_tok_s": (n_in + n_out) / wall,
               "requests_per_s": num_requests / wall, "steps": llm.engine.stats["steps"] - steps0}
        del llm
        free_device_memory()
    except Exception as e:
        row = {"model": shape, "error": f"{type(e).__name__}: {e}"}
    rec.add(row)
    doc = rec.finish()
    from miaotui.bench.report import table
    print(table([[r["model"], r.get("seconds", "-"), r.get("output_tok_s", "-"), r.get("total_tok_s", "-"),
                  r.get("error", "")[:60]] for r in doc["results"]],
                ["model", "seconds", "output tok/s", "total tok/s", "error"]))
    return doc


# ---- quantized decode -------------------------------------------------------------------
GGUF_BLOCK = {"Q8_0": (32, 34), "Q4_0": (32, 18)}   # (weights, bytes) per block
GGUF_SCALE = {"Q8_0": 0.02 / 64, "Q4_0": 0.02 / 4}  # values of about the bf16 shapes' spread


def write_random_gguf(shape: str | dict, qtype: str, path: str, seed: int = 0) -> str:
    """A Llama-architecture GGUF file of shape `shape` whose matmul weights are random
    `qtype` blocks (random quants, a fixed float16 scale): written in seconds, where
    quantizing drawn floats would take minutes. Embedding in the same type, norms F32."""
    import gguf
    import numpy as np

    from miaotui.bench.shapes import hf_config
    writer_util = _tests_module("gguf_writer_util")
    cfg = hf_config(shape)
    if cfg["model_type"] != "llama":
        raise MiaotuiError("write_random_gguf: Llama shapes only")
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = h // nh
    rng = np.random.default_rng(seed)
    per_block, block_bytes = GGUF_BLOCK[qtype]
    scale = np.frombuffer(np.float16(GGUF_SCALE[qtype]).tobytes(), np.uint8)

    def blocks(rows: int, cols: int) -> np.ndarray:
        raw = np.frombuffer(rng.bytes(rows * cols // per_block * block_bytes), np.uint8).copy()
        raw = raw.reshape(rows, cols // per_block, block_bytes)
        raw[:, :, :2] = scale
        return raw.reshape(rows, -1)

    tmp = path + f".tmp-{os.getpid()}"
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(f"random-{shape if isinstance(shape, str) else 'custom'}")
    w.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}"))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(h)
    w.add_feed_forward_length(inter)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(v)
    w.add_rope_dimension_count(hd)
    writer_util.add_dummy_tokenizer(w, v)
    qt = gguf.GGMLQuantizationType[qtype]
    ones = np.ones(h, np.float32)
    w.add_tensor("token_embd.weight", blocks(v, h), raw_dtype=qt)
    w.add_tensor("output_norm.weight", ones)
    if not cfg["tie_word_embeddings"]:
        w.add_tensor("output.weight", blocks(v, h), raw_dtype=qt)
    for i in range(cfg["num_hidden_layers"]):
        for name, (rows, cols) in [("attn_q", (nh * hd, h)), ("attn_k", (nkv * hd, h)), ("attn_v", (nkv * hd, h)),
                                   ("attn_output", (h, nh * hd)), ("ffn_gate", (inter, h)),
                                   ("ffn_up", (inter, h)), ("ffn_down", (h, inter))]:
            w.add_tensor(f"blk.{i}.{name}.weight", blocks(rows, cols), raw_dtype=qt)
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


def suite_quant(device: str, out_dir: str, smoke: bool, shape: str = "tinyllama-1.1b",
                prompt_len: int = 128, n: int = 128, repeats: int = 3) -> dict:
    from miaotui.bench.shapes import RandomCheckpoint, config_dir
    if smoke:
        prompt_len, n, repeats = 8, 4, 1
    dims = SMOKE_LLAMA if smoke else shape
    label = "smoke-llama" if smoke else shape
    bw = _bandwidth(device, smoke)
    formats = ["int8", "int4", "gguf-Q8_0", "gguf-Q4_0"]
    rec = Recorder("quant", device, {"shape": label, "formats": formats, "prompt_len": prompt_len,
                                     "output_len": n, "repeats": repeats, "copy_bandwidth": bw,
                                     "int4_group_size": 32, "activations": "bfloat16"}, out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in formats:
            try:
                if fmt.startswith("gguf-"):
                    t0 = time.perf_counter()
                    model = write_random_gguf(dims, fmt[5:], os.path.join(tmp, f"{fmt}.gguf"))
                    write_s = time.perf_counter() - t0
                    row = decode_row(f"{label} {fmt}", model, device, bw["bytes_per_s"], prompt_len, n,
                                     repeats, False if device == "cuda" else None, dtype="bfloat16")
                    row["gguf_write_s"] = write_s
                    os.remove(model)
                else:   # quantized at load (on the CPU) from weights drawn on the device
                    ckpt = RandomCheckpoint(config_dir(dims), draw_device=device)
                    row = decode_row(f"{label} {fmt}", ckpt, device, bw["bytes_per_s"], prompt_len, n, repeats,
                                     False if device == "cuda" else None, dtype="bfloat16", quantization=fmt)
            except Exception as e:
                row = {"model": f"{label} {fmt}", "error": f"{type(e).__name__}: {e}"}
            rec.add(row)
    doc = rec.finish()
    print(_decode_table(doc["results"]))
    return doc


# ---- entry ------------------------------------------------------------------------------
RUNNERS = {"parity": suite_parity, "decode": suite_decode, "throughput": suite_throughput, "quant": suite_quant}


def run(suites: list[str], device: str = "auto", out_dir: str | None = None, smoke: bool = False) -> dict:
    """Run the named suites in order; each writes its JSON. Returns {suite: document}."""
    bad = [s for s in suites if s not in RUNNERS]
    if bad:
        raise MiaotuiError(f"unknown suite {bad[0]!r} (choose from {', '.join(SUITES)})")
    device = pick_device(device)
    out = results_dir(out_dir)
    docs = {}
    for s in suites:
        print(f"== {s} ({device}{', smoke' if smoke else ''})", flush=True)
        docs[s] = RUNNERS[s](device, out, smoke)
    return docs
