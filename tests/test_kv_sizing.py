"""The default KV pool is sized from the model (min(max_num_seqs, 4) sequences of
max_model_len tokens, capped by memory), not a fixed 1 GiB; the default model's
`generate` stays small."""
import os
import subprocess
import sys

import pytest

from miaotui import LLM
from miaotui.engine import llm_engine
from miaotui.engine.llm_engine import EngineConfig, kv_pool_blocks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_pool_holds_max_num_seqs_full_sequences(tiny_llama_dir):
    llm = LLM(tiny_llama_dir[0], max_num_seqs=3, max_model_len=100)
    assert llm.engine.block_manager.num_blocks == 3 * 7          # ceil(100 / 16) blocks each
    llm = LLM(tiny_llama_dir[0])                                  # the model's 1024 tokens, 4 seqs
    assert llm.engine.max_model_len == 1024
    assert llm.engine.block_manager.num_blocks == llm_engine.DEFAULT_KV_SEQS * 1024 // 16
    assert llm.engine.scheduler.max_num_seqs == 64               # more sequences share the pool
    out = llm.generate("hello", None)[0]
    assert out.outputs[0].token_ids


def test_explicit_kv_cache_memory_is_the_pool(tiny_llama_dir):
    per_block = 2 * 2 * 2 * 16 * 4 * 16        # K+V, layers, kv heads, head dim, fp32, block
    llm = LLM(tiny_llama_dir[0], kv_cache_memory=5 * per_block)
    assert llm.engine.block_manager.num_blocks == 5


def test_default_pool_is_capped_by_available_memory(monkeypatch):
    class VM:
        available = 64 << 20
    import psutil
    monkeypatch.setattr(psutil, "virtual_memory", lambda: VM)
    cfg = EngineConfig(max_num_seqs=64)
    per_token = 48 * 1024
    blocks = kv_pool_blocks(cfg, 8192, per_token)
    assert blocks == int(llm_engine.DEFAULT_KV_FRACTION * (64 << 20) // (per_token * 16))
    assert kv_pool_blocks(EngineConfig(max_num_seqs=1), 256, per_token) == 16   # fits: as asked


def test_default_context_is_capped(monkeypatch, tiny_llama_dir):
    monkeypatch.setattr(llm_engine, "DEFAULT_MAX_MODEL_LEN", 256)
    assert LLM(tiny_llama_dir[0]).engine.max_model_len == 256
    assert LLM(tiny_llama_dir[0], max_model_len=512).engine.max_model_len == 512


def test_generate_with_the_default_model_stays_small():
    """Peak RSS of `miaotui generate` on the default 98 MB model: 1.6 GB with the fixed
    1 GiB pool; now the weights, torch and one 4096-token sequence of KV (~190 MB)."""
    try:
        from miaotui.loader import default_model_path
        default_model_path()
    except Exception as e:
        pytest.skip(f"default model not installed: {e}")
    # VmHWM, not getrusage's ru_maxrss: that one keeps the parent's RSS across fork + exec
    # (a pytest process that has loaded many models)
    code = ("import re, sys; from miaotui.cli import main;"
            "rc = main(['generate', 'What is the capital of France?', '--max-tokens', '8']);"
            "hwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1));"
            "print('PEAK', hwm >> 10, file=sys.stderr);"
            "sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT}, timeout=600)
    assert r.returncode == 0, r.stderr
    peak_mb = int(r.stderr.split("PEAK")[1].split()[0])
    assert peak_mb < 700, peak_mb
