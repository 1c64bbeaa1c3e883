"""The transformers baseline: HF ``generate`` on the same prompts, batched with left padding."""
from __future__ import annotations

import os
import time

import torch


def load_hf_model(path: str, dtype: torch.dtype = torch.float32):
    """A transformers causal LM from a Hugging Face directory or a .gguf file."""
    from transformers import AutoModelForCausalLM
    if path.endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@torch.inference_mode()
def hf_generate_batch(model, prompts: list[list[int]], max_new: int, pad_id: int = 0) -> torch.Tensor:
    """Greedy, exactly `max_new` tokens per prompt (EOS suppressed), left-padded batch."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                         min_new_tokens=max_new, do_sample=False, pad_token_id=pad_id)
    return out[:, width:]


def run_hf(model, requests, batch_size: int = 8, pad_id: int = 0) -> dict:
    """Requests in arrival order, `batch_size` at a time; every sequence of a batch runs to
    the batch's longest output (useful tokens = the requested ones)."""
    t0 = time.perf_counter()
    generated = 0
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        max_new = max(r.output_len for r in batch)
        out = hf_generate_batch(model, [r.prompt_ids for r in batch], max_new, pad_id)
        generated += out.numel()
    elapsed = time.perf_counter() - t0
    return {"elapsed_s": elapsed, "generated_tokens": generated}
