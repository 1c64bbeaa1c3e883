"""The real SmolLM2-135M-Instruct GGUF end to end, against transformers loading the same file."""
import os

import pytest
import torch

from miaotui import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"]


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = os.path.split(smollm2_path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return tok, model


def test_greedy_matches_transformers_on_dequantized_gguf(smollm2_path, hf_smollm2):
    tok, ref = hf_smollm2
    llm = LLM(smollm2_path, quantization="none", kv_cache_memory=64 << 20)
    # min_tokens masks EOS as transformers' min_new_tokens does
    params = SamplingParams(temperature=0, max_tokens=32, min_tokens=32)
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        assert llm.tokenizer.encode(prompt) == ids
        with torch.no_grad():
            want = ref.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32,
                                do_sample=False)[0, len(ids):].tolist()
        got = llm.generate([ids], params)[0].outputs[0].token_ids
        assert got == want, prompt


def test_chat_knows_the_capital_of_france(smollm2_path):
    llm = LLM(kv_cache_memory=64 << 20)          # the default model, weights as stored
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=32))
    assert "Paris" in out[0].outputs[0].text
    assert out[0].outputs[0].finish_reason == "stop"


def test_streaming_deltas_add_up(smollm2_path):
    llm = LLM(kv_cache_memory=64 << 20)
    params = SamplingParams(temperature=0, max_tokens=40)
    prompt = llm.apply_chat_template([{"role": "user", "content": "Say hello in Chinese and add an emoji."}])
    deltas = [o.outputs[0].delta_text for o in llm.stream(prompt, params)]
    final = llm.generate([prompt], params)[0].outputs[0].text
    assert "".join(deltas) == final
    assert all("\ufffd" not in d for d in deltas)
