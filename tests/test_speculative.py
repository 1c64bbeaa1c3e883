"""Speculative decoding (engine/speculative.py): exact, and leaves the engine as plain decoding.

Greedy, every method's output is token for token the plain output, for every architecture,
batched with plain requests, under preemption and abort; the block pool after each step is
what plain decoding leaves; sampled, the rejection rule keeps the target's distribution
(chi-square tests, on the verifier alone and end to end through the engine).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from miaotui import LLM, SamplingParams
from miaotui.config import MiaotuiError
from miaotui.engine.sequence import Sequence
from miaotui.engine.speculative import SpeculativeConfig, Verifier, ngram_lookup
from util import make_tiny_model

FAMILIES = ["llama", "qwen3", "gpt2", "gemma3"]


def _chi2_crit(df: int) -> float:
    """The chi-square value exceeded with probability ~1e-4 (Wilson-Hilferty)."""
    z = 3.719
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the categories with expected count >= 5 (the rest pooled)."""
    n = float(counts.sum())
    exp = probs * n
    big = exp >= 5
    obs = torch.cat([counts[big].double(), counts[~big].sum().double().view(1)])
    ex = torch.cat([exp[big].double(), exp[~big].sum().double().view(1)])
    keep = ex > 0
    return float(((obs[keep] - ex[keep]) ** 2 / ex[keep]).sum()), int(keep.sum()) - 1


# ---- the proposers' pieces ------------------------------------------------------------------

def test_ngram_lookup_takes_the_latest_longest_match():
    toks = [1, 2, 3, 9, 1, 2, 4, 5, 1, 2]
    assert ngram_lookup(toks, 3, 2, 1) == [4, 5, 1]        # "1 2" last seen before 4 5
    assert ngram_lookup(toks, 3, 3, 3) == []                 # "5 1 2" never seen before
    assert ngram_lookup([7, 8, 7], 4, 3, 1) == [8, 7]        # the continuation may reach the end
    assert ngram_lookup([5], 4, 3, 1) == []
    assert ngram_lookup([1, 2, 3, 1, 2], 2, 4, 2) == [3, 1]


def test_config_errors_are_clear():
    with pytest.raises(MiaotuiError, match="unknown speculative method"):
        SpeculativeConfig.parse("medusa")
    with pytest.raises(MiaotuiError, match="unknown speculative option"):
        SpeculativeConfig.parse({"method": "ngram", "k": 3})
    with pytest.raises(MiaotuiError, match="needs model="):
        SpeculativeConfig.parse({"method": "draft"})
    with pytest.raises(MiaotuiError, match="num_tokens"):
        SpeculativeConfig.parse({"method": "ngram", "num_tokens": 0})
    assert SpeculativeConfig.parse("ngram").num_tokens == 4


def _seq(guesses, params, seed):
    s = Sequence("r", 0, [1, 2, 3], params, 10)
    s.spec_tokens = list(guesses)
    if s.generator is not None:
        s.generator.manual_seed(seed)
    return s


def test_verifier_greedy_keeps_the_agreeing_prefix_plus_one():
    v = Verifier(set())
    logits = torch.full((4, 10), -5.0)
    for row, best in enumerate([4, 6, 2, 8]):
        logits[row, best] = 5.0
    greedy = SamplingParams(temperature=0)
    assert v(logits, _seq([4, 6, 2], greedy, 0)) == [4, 6, 2, 8]     # all accepted + bonus
    assert v(logits, _seq([4, 7, 2], greedy, 0)) == [4, 6]           # rejected at the second
    assert v(logits, _seq([1, 6, 2], greedy, 0)) == [4]


def test_verifier_sampling_keeps_the_target_distribution():
    """Rows drawn from fixed logits: the first token's frequencies match p0 whatever the
    guess, and given the guess was taken, the second token's match p1."""
    torch.manual_seed(0)
    V, N = 12, 12000
    logits = torch.randn(3, V) * 1.5
    params = SamplingParams(temperature=0.8, top_k=9, top_p=0.95)
    from miaotui.layers.sampler import _filter
    probs = [_filter(logits[i] / 0.8, 9, 0.95, 0.0).softmax(-1) for i in range(3)]
    guesses = [int(probs[0].argmax()), int(probs[1].argsort()[-2])]   # a likely and a less likely guess
    first, second = torch.zeros(V), torch.zeros(V)
    v = Verifier(set())
    for i in range(N):
        out = v(logits, _seq(guesses, params, i))
        first[out[0]] += 1
        if out[0] == guesses[0]:
            second[out[1]] += 1
    for counts, p in ((first, probs[0]), (second, probs[1])):
        assert counts[p == 0].sum() == 0, "a token the filters removed was drawn"
        stat, df = _chi2(counts, p)
        assert stat < _chi2_crit(df), (stat, df)


# ---- greedy identity through the engine ------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    out = {}
    for fam in FAMILIES:
        path = str(tmp_path_factory.mktemp(f"spec_{fam}"))
        make_tiny_model(fam, path, seed=3)
        out[fam] = path
    return out


def _prompts():
    rep = [40, 41, 42, 43, 44] * 6                          # repetitive: n-grams match
    return [rep, list(range(60, 90)), [7] * 3, rep[:13] + list(range(100, 140)) + rep[:9]]


def _run(llm, prompts, params):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_identical_for_every_method(family, tiny_dirs):
    path = tiny_dirs[family]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = _run(LLM(path, max_num_seqs=8), _prompts(), params)
    for spec in ({"method": "ngram"}, {"method": "draft", "model": path},
                 {"method": "self-int4", "num_tokens": 3}):
        llm = LLM(path, max_num_seqs=8, speculative=spec)
        outs = llm.generate(_prompts(), params)
        assert [o.outputs[0].token_ids for o in outs] == plain, spec
        assert llm.engine.pool_is_full()
        if spec["method"] == "draft":   # the target as its own draft: every guess is right
            m = outs[0].metrics
            assert m["spec_proposed"] > 20 and m["acceptance_rate"] == 1.0, m
    # the draft KV pool is released too
    assert not llm.engine.speculator.proposer.shadows


def test_greedy_identical_mixed_with_plain_requests_and_logprobs(tiny_dirs):
    path = tiny_dirs["llama"]
    spec_p = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=2)
    plain_p = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=2, repetition_penalty=1.3)
    prompts = _prompts()
    ref = LLM(path, max_num_seqs=8).generate(prompts + prompts, [spec_p] * 4 + [plain_p] * 4)
    llm = LLM(path, max_num_seqs=8, speculative={"method": "draft", "model": path})
    got = llm.generate(prompts + prompts, [spec_p] * 4 + [plain_p] * 4)
    for a, b in zip(ref, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        la, lb = a.outputs[0].logprobs, b.outputs[0].logprobs
        assert [x.token_id for x in la] == [x.token_id for x in lb]
        assert [x.logprob for x in la] == pytest.approx([x.logprob for x in lb], abs=1e-5)
        assert [x.rank for x in la] == [x.rank for x in lb]
    assert got[0].metrics["spec_steps"] > 0 and got[4].metrics["spec_steps"] == 0


def test_constrained_requests_do_not_speculate_and_stay_valid(tiny_dirs):
    """A structured-output request next to speculating ones: it takes no guesses (its mask
    is per step), its output matches the regex and equals a plain engine's."""
    import re
    path = tiny_dirs["llama"]
    reg = SamplingParams(temperature=0, max_tokens=12, structured_output={"regex": r"[a-c]{3}-[0-9]{2,4}"})
    free = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompts = _prompts()[:2]
    ref = LLM(path, max_num_seqs=8).generate(prompts, [reg, free])
    outs = LLM(path, max_num_seqs=8, speculative={"method": "draft", "model": path}).generate(prompts, [reg, free])
    assert re.fullmatch(r"[a-c]{3}-[0-9]{2,4}", outs[0].outputs[0].text)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
    assert outs[0].metrics["spec_steps"] == 0 and outs[1].metrics["spec_steps"] > 0


def test_stop_conditions_inside_accepted_guesses(tiny_dirs):
    """max_tokens, a stop token and a stop string falling among accepted guesses end the
    output exactly where plain decoding does."""
    path = tiny_dirs["llama"]
    base = LLM(path, max_num_seqs=4)
    free = _run(base, _prompts()[:1], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    cases = [SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[free[9]], ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                            stop=[base.tokenizer.decode(free[11:13])])]
    spec = LLM(path, max_num_seqs=4, speculative={"method": "draft", "model": path})
    for p in cases:
        a = base.generate(_prompts()[:1], p)[0].outputs[0]
        b = spec.generate(_prompts()[:1], p)[0].outputs[0]
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
    assert spec.engine.pool_is_full()


def test_block_pool_after_each_step_is_as_plain(tiny_dirs):
    """After every step each running sequence holds exactly the blocks its tokens need."""
    path = tiny_dirs["llama"]
    llm = LLM(path, max_num_seqs=8, speculative={"method": "draft", "model": path}, block_size=4)
    eng = llm.engine
    for i, p in enumerate(_prompts()):
        eng.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=25, ignore_eos=True))
    verified = 0
    while eng.has_unfinished():
        eng.step()
        for s in eng.scheduler.running:
            # plain decoding: blocks for the computed tokens (the next one's comes when it runs)
            assert len(s.block_table) == eng.block_manager.blocks_needed(
                s.num_computed_tokens if s.num_output_tokens else len(s))
            assert not s.spec_tokens and s.spec_k == 0
        verified = eng.speculator.stats["accepted"]
    assert verified > 20
    assert eng.pool_is_full()


def test_preemption_and_abort_mid_speculation(tiny_dirs):
    path = tiny_dirs["llama"]
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    prompts = _prompts() * 2
    ref = _run(LLM(path, max_num_seqs=8), prompts, params)
    # a pool of 40 blocks of 4 tokens cannot hold 8 sequences of ~100 tokens: preemption
    llm = LLM(path, max_num_seqs=8, block_size=4, kv_cache_memory=40 * 4 * 2 * 2 * 2 * 16 * 4 + 1,
              speculative={"method": "draft", "model": path})
    assert _run(llm, prompts, params) == ref
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.pool_is_full()
    # abort one request after a few steps: the others finish unchanged, nothing leaks
    eng = LLM(path, max_num_seqs=8, speculative={"method": "draft", "model": path}).engine
    for i, p in enumerate(prompts[:4]):
        eng.add_request(f"r{i}", p, params)
    outs = {}
    for step in range(200):
        if step == 3:
            assert eng.abort("r1")
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
        if not eng.has_unfinished():
            break
    assert outs == {f"r{i}": ref[i] for i in (0, 2, 3)}
    assert eng.pool_is_full() and not eng.speculator.proposer.shadows
    assert eng.speculator.proposer.bm.num_free_blocks == eng.speculator.proposer.bm.num_blocks


def test_sampling_through_the_engine_keeps_the_distribution(tmp_path):
    """Many seeded 3-token requests on a tiny model with peaked logits, the target as its
    own (greedy) draft: given the most frequent first token a, the second token's
    frequencies match p(. | prompt, a), and given the guessed second token g, the third's
    match p(. | prompt, a, g); probabilities from transformers."""
    from util import hf_logits
    model = make_tiny_model("llama", str(tmp_path), seed=5)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)              # peaked: guesses are often right
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    prompt, T, N = list(range(50, 70)), 1.0, 3000
    llm = LLM(str(tmp_path), max_num_seqs=64, speculative={"method": "draft", "model": str(tmp_path),
                                                          "num_tokens": 2, "adaptive": False})
    outs = llm.generate([prompt] * N, [SamplingParams(temperature=T, max_tokens=3, seed=s, ignore_eos=True)
                                       for s in range(N)])
    toks = [o.outputs[0].token_ids for o in outs]
    assert sum(o.metrics["spec_proposed"] for o in outs) >= N          # guesses were verified
    a = max(set(t[0] for t in toks), key=lambda x: sum(t[0] == x for t in toks))
    p1 = torch.softmax(hf_logits(model, prompt + [a])[-1] / T, -1)
    g = int(p1.argmax())
    p2 = torch.softmax(hf_logits(model, prompt + [a, g])[-1] / T, -1)
    V = p1.numel()
    second, third = torch.zeros(V), torch.zeros(V)
    for t in toks:
        if t[0] == a:
            second[t[1]] += 1
            if t[1] == g:
                third[t[2]] += 1
    assert second.sum() > 500 and third.sum() > 200, (second.sum(), third.sum())
    assert 0.05 < float(p1[g]) < 0.95                  # both accepting and rejecting happen
    for counts, p in ((second, p1), (third, p2)):
        stat, df = _chi2(counts, p)
        assert stat < _chi2_crit(df), (stat, df)


# ---- the real default model --------------------------------------------------------------

def test_default_model_greedy_identical_and_guesses_pay(smollm2_path):
    with open(os.path.join(os.path.dirname(__file__), "data", "shakespeare_40k.txt")) as f:
        passage = f.read()[:800]
    llm = LLM(smollm2_path, max_num_seqs=8)
    msgs = [[{"role": "user", "content": "Repeat the following text exactly:\n\n" + passage}],
            [{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
            [{"role": "user", "content": "List the names in this text:\n\n" + passage[:400]}]]
    prompts = [llm.apply_chat_template(m) for m in msgs]
    params = SamplingParams(temperature=0, max_tokens=64)
    ref = _run(llm, prompts, params)
    alone = [_run(llm, [p], params)[0] for p in prompts]
    assert alone == ref
    spec = LLM(smollm2_path, max_num_seqs=8, speculative="ngram")
    outs = spec.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == ref
    assert outs[0].metrics["mean_accepted_length"] > 1.0, outs[0].metrics   # copying pays
    assert [_run(spec, [p], params)[0] for p in prompts] == ref


# ---- serving ----------------------------------------------------------------------------

def test_server_streams_speculative_output_and_reports_acceptance(tiny_dirs):
    """A server on a speculating engine streams the plain engine's tokens, and /metrics
    counts the guesses."""
    import httpx
    from test_server import serve
    path = tiny_dirs["llama"]
    ref = LLM(path, max_num_seqs=4).generate([_prompts()[0]], SamplingParams(temperature=0, max_tokens=24,
                                                                             ignore_eos=True))
    engine = LLM(path, max_num_seqs=4, speculative={"method": "draft", "model": path}).engine
    with serve(engine, "tiny") as base:
        body = {"model": "tiny", "prompt": _prompts()[0], "max_tokens": 24, "temperature": 0,
                "ignore_eos": True, "stream": True}
        text = ""
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    import json
                    text += json.loads(line[6:])["choices"][0]["text"]
        assert text == ref[0].outputs[0].text
        metrics = httpx.get(base + "/metrics", timeout=10).text
    accepted = [ln for ln in metrics.splitlines() if ln.startswith("miaotui_spec_decode_num_accepted_tokens")]
    assert accepted and float(accepted[0].split()[-1]) > 10, metrics[-2000:]
