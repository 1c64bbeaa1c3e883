"""Putting a model on its device: loaded weights moved there, or random weights made there.

The GPU path computes in one dtype (bfloat16 by default on CUDA): every dense weight,
bias, embedding table and rotary table is cast to it, norm weights stay float32 (the norms
compute in float32 and return the activations' dtype), quantized weights (int8, int4,
GGUF blocks) move as stored and stay quantized. Tied tensors stay one tensor.
"""
from __future__ import annotations

import torch
from torch import nn

from miaotui.config import MiaotuiError, ModelConfig


def _norm_params(model: nn.Module) -> set[int]:
    from miaotui.layers.norm import LayerNorm, RMSNorm
    return {id(p) for m in model.modules() if isinstance(m, (RMSNorm, LayerNorm))
            for p in m.parameters(recurse=False)}


def move_model(model: nn.Module, device: str | torch.device, dtype: torch.dtype,
               buffer_dtype: torch.dtype | None = None) -> nn.Module:
    """Move ``model`` to ``device`` in place for the GPU path (see the module docstring).
    A GGUF embedding read from the file on lookup is read into memory first. Floating
    buffers (rotary tables) become ``buffer_dtype`` (default: ``dtype``)."""
    from miaotui.layers.embedding import Embedding
    from miaotui.layers.linear import RowStack
    from miaotui.layers.quant import Int5Weight, QuantWeight
    for m in model.modules():
        if isinstance(m, Embedding):
            m.hold()
        q = getattr(m, "qweight", None)
        if q is not None:
            parts = q.parts if isinstance(q, RowStack) else [q]
            for i, part in enumerate(parts):
                if not isinstance(part, QuantWeight):
                    raise MiaotuiError(f"{type(part).__name__} weights (2:4 sparse) run on CPU only; "
                                       "use device='cpu'")
                if isinstance(part, Int5Weight):   # GGUF Q5_0/Q5_1: computed as int8 on the GPU
                    parts[i] = part = part.as_int8()
                part.to(device)   # a tied head's blocks are the embedding's: moved once
            if not isinstance(q, RowStack):
                m.qweight = parts[0]
    norms, done = _norm_params(model), {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            t = p.data
            want = torch.float32 if id(p) in norms or not t.is_floating_point() else dtype
            key = (t.data_ptr(), tuple(t.shape), t.dtype)   # tied weights: one copy
            if key not in done:
                done[key] = t.to(device=device, dtype=want if t.is_floating_point() else t.dtype)
            p.data = done[key]
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = b.to(device=device, dtype=(buffer_dtype or dtype) if b.is_floating_point() else b.dtype)
    return model


def random_model(cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device,
                 seed: int = 0, std: float = 0.02, gpu_path: bool = True) -> nn.Module:
    """The architecture of ``cfg`` with random weights made directly on ``device`` (no
    checkpoint; for benchmarks at real shapes: EngineConfig.load_format "dummy"): matrices
    normal(0, std) in ``dtype``, norms ones, biases zeros, a tied head sharing the table."""
    from miaotui.models import get_model_class
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else torch.float32)
    try:
        with torch.device(device):   # the placeholders in dtype: no float32 copy of the model
            model = get_model_class(cfg)(cfg)
    finally:
        torch.set_default_dtype(prev)
    gen = torch.Generator(device=device).manual_seed(seed)
    norms = _norm_params(model)
    for name, p in model.named_parameters():
        if id(p) in norms:
            p.data = (torch.zeros if name.endswith("bias") else torch.ones)(p.shape, device=device)
        elif p.dim() >= 2:
            p.data = torch.empty(p.shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)
        else:
            p.data = torch.zeros(p.shape, dtype=dtype, device=device)
    if cfg.tie_word_embeddings or cfg.family == "gpt2":
        table = model.wte if hasattr(model, "wte") else model.embed_tokens.weight
        model.lm_head.weight.data = table.data
    # the CPU path computes in float32 from 16-bit weights: its rotary tables stay float32
    return move_model(model, device, dtype, None if gpu_path else torch.float32).eval()
