"""Every architecture against transformers on the same tiny random weights (safetensors)."""
import pytest
import torch

from miaotui import LLM, SamplingParams
from miaotui.engine.sequence import Sequence
from util import TINY, hf_greedy, hf_logits, make_tiny_model

PROMPT = [5, 17, 99, 3, 250, 41, 7, 7, 7, 120, 64, 200, 33, 18, 90, 11, 2, 300, 301, 45]


def engine_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Logits for every prompt position, through the engine's runner and paged cache."""
    eng = llm.engine
    seq = Sequence("probe", 0, ids, SamplingParams(max_tokens=1), 1)
    eng.block_manager.allocate(seq, use_cache=False)
    try:
        input_ids, positions, meta = eng.runner.prepare([(seq, len(ids))], decode=False)
        with torch.inference_mode():
            return eng.model.compute_logits(eng.model(input_ids, positions, meta))
    finally:
        eng.block_manager.free_seq(seq)


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ref = make_tiny_model(request.param, str(path))
    return request.param, ref, LLM(str(path), kv_cache_memory=8 << 20)


def test_logits_match_transformers(tiny):
    family, ref, llm = tiny
    ours = engine_logits(llm, PROMPT)
    theirs = hf_logits(ref, PROMPT)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4, family


def test_greedy_tokens_match_transformers(tiny):
    family, ref, llm = tiny
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_greedy(ref, PROMPT, 32), family
    assert llm.engine.pool_is_full()


def test_long_prompt_crosses_sliding_window(tmp_path):
    """Gemma 3's sliding layers (window 16 here) on prompts and decodes longer than the window."""
    ref = make_tiny_model("gemma3", str(tmp_path))
    llm = LLM(str(tmp_path), kv_cache_memory=8 << 20)
    prompt = (PROMPT * 4)[:70]
    assert (engine_logits(llm, prompt) - hf_logits(ref, prompt)).abs().max() < 1e-4
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_greedy(ref, prompt, 24)
