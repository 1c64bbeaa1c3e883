"""The engine: batching, prefix caching, chunked prefill, preemption, abort, sampling."""
import random

import pytest
import torch

from miaotui import LLM, MiaotuiError, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def prompts(n=16, seed=0, lo=3, hi=120):
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def texts(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def alone(tiny_llama_dir):
    """Reference: each prompt run by itself, no prefix caching."""
    llm = LLM(tiny_llama_dir[0], enable_prefix_caching=False, kv_cache_memory=16 << 20)
    return [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts()]


@pytest.mark.parametrize("kwargs", [
    dict(),                                              # batched, prefix caching on
    dict(enable_prefix_caching=False),
    dict(max_num_batched_tokens=32),                     # chunked prefill
    dict(max_num_batched_tokens=3, max_num_seqs=4),     # 1-token prefill chunks too
    dict(max_num_seqs=3),
])
def test_batched_equals_alone(tiny_llama_dir, alone, kwargs):
    llm = LLM(tiny_llama_dir[0], kv_cache_memory=16 << 20, **kwargs)
    assert texts(llm.generate(prompts(), GREEDY)) == alone
    assert llm.engine.pool_is_full()


def test_preemption_keeps_outputs(tiny_llama_dir, alone):
    # 12 blocks of 16 tokens: far less than 16 sequences need at once
    kv = 12 * 16 * 2 * 2 * 2 * 16 * 4
    llm = LLM(tiny_llama_dir[0], kv_cache_memory=kv, block_size=16)
    assert llm.engine.block_manager.num_blocks == 12
    assert texts(llm.generate(prompts(), GREEDY)) == alone
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.pool_is_full()


def test_prefix_cache_computes_only_new_tokens(tiny_llama_dir):
    llm = LLM(tiny_llama_dir[0], kv_cache_memory=16 << 20)
    ref = LLM(tiny_llama_dir[0], kv_cache_memory=16 << 20, enable_prefix_caching=False)
    prefix = prompts(1, seed=7, lo=256, hi=256)[0]
    first, second = prefix + [10, 11, 12], prefix + [20, 21, 22, 23, 24]
    llm.generate([first], GREEDY)
    before = llm.engine.stats["computed_prefill_tokens"]
    out = llm.generate([second], GREEDY)[0]
    assert llm.engine.stats["computed_prefill_tokens"] - before == len(second) - 256
    assert out.num_cached_tokens == 256
    assert out.outputs[0].token_ids == ref.generate([second], GREEDY)[0].outputs[0].token_ids
    assert llm.engine.pool_is_full()


def test_abort_mid_decode_frees_blocks(tiny_llama_dir):
    llm = LLM(tiny_llama_dir[0], kv_cache_memory=16 << 20)
    eng = llm.engine
    eng.add_request("a", prompts(1)[0], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    eng.add_request("b", prompts(1, seed=1)[0], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    for _ in range(4):
        eng.step()
    assert eng.kv_usage() > 0
    assert eng.abort("a")
    while eng.has_unfinished():
        eng.step()
    assert eng.pool_is_full()
    assert not eng.abort("a")


def test_seeded_sampling_is_reproducible_and_batch_invariant(tiny_llama_dir):
    llm = LLM(tiny_llama_dir[0], kv_cache_memory=16 << 20)
    p = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, max_tokens=20, seed=1234, ignore_eos=True)
    ps = prompts(4)
    alone = [llm.generate([x], p)[0].outputs[0].token_ids for x in ps]
    assert texts(llm.generate(ps, p)) == alone
    other = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, max_tokens=20, seed=99, ignore_eos=True)
    assert llm.generate([ps[0]], other)[0].outputs[0].token_ids != alone[0]


def test_n_samples_and_stop_conditions(tiny_llama_dir):
    llm = LLM(tiny_llama_dir[0], kv_cache_memory=16 << 20)
    out = llm.generate([prompts(1)[0]], SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=8,
                                                       ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 8 and o.finish_reason == "length" for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    full = llm.generate([prompts(1)[0]], GREEDY)[0].outputs[0]
    stop_id = full.token_ids[5]
    cut = llm.generate([prompts(1)[0]], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                       stop_token_ids=[stop_id]))[0].outputs[0]
    assert cut.token_ids == full.token_ids[:full.token_ids.index(stop_id) + 1]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop_id
    stop_text = full.text[3:6]
    if stop_text:
        s = llm.generate([prompts(1)[0]], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                         stop=[stop_text]))[0].outputs[0]
        assert s.text == full.text[:full.text.index(stop_text)] and s.finish_reason == "stop"


def test_logprobs_match_log_softmax(tiny_llama_dir):
    path, ref = tiny_llama_dir
    llm = LLM(path, kv_cache_memory=16 << 20)
    p = prompts(1)[0]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True,
                                           prompt_logprobs=2))[0]
    full = p + out.outputs[0].token_ids
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor([full])).logits[0].float(), -1)
    for i, tok_lp in enumerate(out.outputs[0].logprobs):
        pos = len(p) - 1 + i
        assert abs(tok_lp.logprob - lp[pos, tok_lp.token_id].item()) < 1e-4
        assert tok_lp.rank == 1 and len(tok_lp.top) == 3
    assert out.prompt_logprobs[0] is None
    for i, plp in enumerate(out.prompt_logprobs[1:], start=1):
        assert abs(plp.logprob - lp[i - 1, p[i]].item()) < 1e-4


def test_scoring_with_max_tokens_zero(tiny_llama_dir):
    llm = LLM(tiny_llama_dir[0], kv_cache_memory=16 << 20)
    out = llm.generate([prompts(1)[0]], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert out.outputs[0].token_ids == [] and out.finished
    assert len(out.prompt_logprobs) == len(prompts(1)[0])
    assert llm.engine.pool_is_full()


@pytest.mark.parametrize("bad", [
    dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(n=0), dict(max_tokens=-1),
    dict(min_p=2), dict(presence_penalty=5), dict(logprobs=100), dict(stop=[""]),
    dict(prompt_logprobs_start=-1),
])
def test_invalid_sampling_params(bad):
    with pytest.raises(MiaotuiError):
        SamplingParams(**bad)


def test_prompt_longer_than_context(tiny_llama_dir):
    llm = LLM(tiny_llama_dir[0], kv_cache_memory=16 << 20, max_model_len=64)
    with pytest.raises(MiaotuiError, match="context window"):
        llm.generate([list(range(3, 80))], GREEDY)
    with pytest.raises(MiaotuiError, match="vocabulary"):
        llm.generate([[1, 2, 10**6]], GREEDY)
    assert llm.engine.pool_is_full() and not llm.engine.has_unfinished()


def test_request_larger_than_pool_is_rejected(tiny_llama_dir):
    llm = LLM(tiny_llama_dir[0], kv_cache_memory=4 * 16 * 2 * 2 * 2 * 16 * 4)
    with pytest.raises(MiaotuiError, match="blocks"):
        llm.generate([list(range(3, 100))], SamplingParams(max_tokens=10))


def test_int8_kv_cache_close_to_fp32(tiny_llama_dir):
    path, ref = tiny_llama_dir
    llm = LLM(path, kv_cache_memory=16 << 20, kv_cache_dtype="int8")
    p = prompts(1)[0]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))[0]
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor([p])).logits[0].float(), -1)
    ours = torch.tensor([x.logprob for x in out.prompt_logprobs[1:]])
    theirs = lp[torch.arange(len(p) - 1), torch.tensor(p[1:])]
    assert (ours - theirs).abs().max() < 0.05


def test_long_prompt_yields_to_decoding_streams(tiny_llama_dir, alone):
    """With max_decode_delay, a step that ran long next to decode-only steps shrinks the
    prompt chunks taken while others decode; the outputs stay those of each prompt alone."""
    llm = LLM(tiny_llama_dir[0], kv_cache_memory=16 << 20, max_decode_delay=2.0)
    sch = llm.engine.scheduler
    llm.engine.add_request("short", prompts()[0], GREEDY)
    llm.engine.step()                                   # its prompt
    llm.engine.step()                                   # a decode-only step
    assert sch.decode_step_s is not None
    sch.decode_step_s = 0.01
    sch.observe([(sch.running[0], 1), (sch.running[0], 1)], 0.01)   # decode-only: no change
    assert sch.prompt_cap == 16                         # the start: small, then adapted
    long = prompts(1, seed=5, lo=110, hi=120)[0]
    llm.engine.add_request("long", long, GREEDY)

    def compute(batch):  # what a step does to the sequences, without the model
        for s, n in batch:
            s.num_computed_tokens += n
            if s.num_computed_tokens >= s.num_prompt_tokens:
                s.token_ids.append(7)

    sch.prompt_cap = 50
    batch = sch.schedule()
    assert dict((s.request_id, n) for s, n in batch) == {"short": 1, "long": 50}
    seq = next(s for s, _ in batch if s.request_id == "long")
    compute(batch)
    sch.observe(batch, 0.08)                            # 8x a decode step: far over 2x
    assert 1 <= sch.prompt_cap <= 12
    cap = sch.prompt_cap
    batch = sch.schedule()
    assert dict((s.request_id, n) for s, n in batch)["long"] == min(cap, len(long) - seq.num_computed_tokens)
    compute(batch)
    sch.observe(batch, 0.01)                            # now well under: the cap grows back
    assert sch.prompt_cap > cap
    # the text is the same however the prompt was cut
    fresh = LLM(tiny_llama_dir[0], kv_cache_memory=16 << 20, max_decode_delay=1.0)
    assert texts(fresh.generate(prompts(), GREEDY)) == alone


def test_short_prompt_goes_before_a_long_one_under_the_cap(tiny_llama_dir):
    """While others decode, the capped prompt tokens go to the shortest remaining prompt
    first: a short question arriving during a long prompt's chunks is answered at once."""
    llm = LLM(tiny_llama_dir[0], kv_cache_memory=16 << 20, max_decode_delay=2.0)
    sch = llm.engine.scheduler
    llm.engine.add_request("stream", prompts()[0], GREEDY)
    llm.engine.step()
    llm.engine.add_request("long", prompts(1, seed=5, lo=110, hi=120)[0], GREEDY)
    for _ in range(3):
        llm.engine.step()                               # the long prompt takes the cap, 16 a step
    long = next(s for s in sch.running if s.request_id == "long")
    assert 0 < long.num_computed_tokens < long.num_prompt_tokens
    llm.engine.add_request("short", [5, 6, 7, 8], GREEDY)
    batch = dict((s.request_id, n) for s, n in sch.schedule())
    assert batch["short"] == 4 and batch.get("long", 0) == sch.prompt_cap - 4


def test_scoring_after_a_cached_prefix(tiny_llama_dir):
    """prompt_logprobs_start lets scored prompts share a cached prefix (computed once); the
    log-probs from the start on equal those computed without the cache."""
    llm = LLM(tiny_llama_dir[0], kv_cache_memory=16 << 20)
    prefix = list(range(5, 45))                       # 40 tokens: two full blocks of 16
    items = [[50 + i, 60 + i, 70 + i] for i in range(4)]
    plain = llm.generate([prefix + it for it in items], SamplingParams(max_tokens=0, prompt_logprobs=0))
    assert all(out.num_cached_tokens == 0 for out in plain)     # no cache without the start
    shared = SamplingParams(max_tokens=0, prompt_logprobs=0, prompt_logprobs_start=len(prefix))
    llm.generate([prefix], SamplingParams(max_tokens=0))        # warm the cache with the prefix
    scored = llm.generate([prefix + it for it in items], shared)
    for a, b in zip(plain, scored):
        assert b.num_cached_tokens == 32 and len(b.prompt_logprobs) == len(prefix) + 3
        assert b.prompt_logprobs[:33] == [None] * 33
        assert [e.logprob for e in b.prompt_logprobs[len(prefix):]] == \
            [e.logprob for e in a.prompt_logprobs[len(prefix):]]
    # the start caps what the cache may supply: the token before it is always computed
    edge = llm.generate([prefix[:33] + items[0]], SamplingParams(max_tokens=0, prompt_logprobs=0,
                                                                 prompt_logprobs_start=32))[0]
    assert edge.num_cached_tokens == 16 and edge.prompt_logprobs[32] is not None
