"""The fused C++ decode step (engine/cpu_decoder.py) against the PyTorch path it replaces."""
import random

import pytest

from miaotui import LLM, SamplingParams
from miaotui import kernels

pytestmark = pytest.mark.skipif(kernels.load() is None, reason="C++ kernels unavailable")

PARAMS = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=1)


def prompts(n=6, seed=1):
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(rng.randint(2, 70))] for _ in range(n)]


def run(path, monkeypatch, fused: bool, **kwargs):
    monkeypatch.setenv("MIAOTUI_FUSED_DECODE", "1" if fused else "0")
    llm = LLM(path, kv_cache_memory=8 << 20, block_size=16, **kwargs)
    decoder = llm.engine.runner.decoder
    assert (decoder is not None) == fused
    outs = llm.generate(prompts(), PARAMS)
    if fused:  # every decode step went through C++
        assert decoder.impl.profile()["calls"] >= PARAMS.max_tokens - 1
    assert llm.engine.pool_is_full()
    return [o.outputs[0] for o in outs]


def assert_same(a, b, tol):
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        for lx, ly in zip(x.logprobs, y.logprobs):
            assert abs(lx.logprob - ly.logprob) < tol


@pytest.fixture(scope="module", params=["llama", "llama3", "mistral", "qwen2", "qwen3"])
def tiny(request, tmp_path_factory):
    from util import make_tiny_model
    path = tmp_path_factory.mktemp(request.param)
    make_tiny_model(request.param, str(path))
    return str(path)


def test_fused_decode_matches_pytorch(tiny, monkeypatch):
    assert_same(run(tiny, monkeypatch, True), run(tiny, monkeypatch, False), 1e-4)


@pytest.mark.parametrize("kwargs", [dict(kv_cache_dtype="int8"), dict(kv_cache_dtype="fp16"), dict(quantization="int8"),
                                    dict(quantization="int4"), dict(max_num_seqs=2)])
def test_fused_decode_variants(tiny_llama_dir, monkeypatch, kwargs):
    """int8 KV cache, quantized weights (the same kernel on both paths), small batches."""
    path = tiny_llama_dir[0]
    assert_same(run(path, monkeypatch, True, **kwargs), run(path, monkeypatch, False, **kwargs), 1e-3)


def test_models_outside_the_family_keep_the_pytorch_path(tmp_path):
    from util import make_tiny_model
    make_tiny_model("gemma3", str(tmp_path))
    assert LLM(str(tmp_path), kv_cache_memory=4 << 20).engine.runner.decoder is None


@pytest.mark.parametrize("kv", ["auto", "fp16", "int8"])
def test_fused_attention_splits_long_contexts(tiny_llama_dir, monkeypatch, kv):
    """One sequence of ~200 tokens: its keys are split into runs across threads
    (flash-decoding) and the partial softmaxes merged; the result must match PyTorch's."""
    path = tiny_llama_dir[0]
    rng = random.Random(7)
    prompt = [[rng.randrange(3, 256) for _ in range(180)]]

    def go(fused):
        monkeypatch.setenv("MIAOTUI_FUSED_DECODE", "1" if fused else "0")
        llm = LLM(path, kv_cache_memory=8 << 20, block_size=16, max_num_seqs=1, kv_cache_dtype=kv)
        return [o.outputs[0] for o in llm.generate(prompt, PARAMS)]
    assert_same(go(True), go(False), 1e-4)
