"""Decode steps of Llama-family models on CPU in one C++ call (kernels/decode_cpu.cpp).

Through PyTorch a decode step is ~20 small ops per layer; on a 135M model their dispatch
and thread wake-ups cost more than the matmuls. The model runner hands steps that only
decode to a :class:`CPUDecoder` when one can be built for the model: the C++ side holds
pointers to the model's own weights and KV cache, so nothing is copied and the PyTorch
path (prefill, and every model this does not cover) sees the same state. Tests check the
two paths against each other.
"""
from __future__ import annotations

import os

import torch

from miaotui.layers.attention import KVCache
from miaotui.layers.linear import Linear, RowStack
from miaotui.layers.quant import QuantWeight


def enabled() -> bool:
    return os.environ.get("MIAOTUI_FUSED_DECODE", "1") not in ("0", "")


class CPUDecoder:
    def __init__(self, model, impl):
        self.model, self.impl = model, impl

    @classmethod
    def build(cls, model, caches: list[KVCache], block_size: int) -> CPUDecoder | None:
        """A decoder, or None (see _build); under tensor parallel, the ranks agree on it,
        so that all of them take the same path and their collectives match."""
        dec = cls._build(model, caches, block_size)
        tp = getattr(model, "tp", None)
        if tp is not None:
            ok = tp.group.all_reduce(torch.tensor([1 if dec is not None else 0]))
            return dec if int(ok) == tp.group.size else None
        return dec

    @classmethod
    def _build(cls, model, caches: list[KVCache], block_size: int) -> CPUDecoder | None:
        """A decoder for this model, or None when it is not covered: not a plain Llama-family
        model (Gemma, GPT-2), not SiLU, weights neither quantized nor float32, or no kernels."""
        from miaotui import kernels
        from miaotui.models.llama import LlamaForCausalLM
        k = kernels.load()
        cfg = model.cfg
        if (k is None or not enabled() or type(model) is not LlamaForCausalLM or cfg.hidden_act != "silu"
                or model.embed_tokens.device.type != "cpu"):
            return None
        attn0 = model.layers[0].self_attn
        tp = getattr(model, "tp", None)   # tensor parallel: this rank's heads and slices
        if tp is not None and not hasattr(k.DecodeModel, "set_reduce"):
            return None
        impl = k.DecodeModel(cfg.hidden_size, attn0.attn.num_heads, attn0.attn.num_kv_heads, cfg.head_dim,
                             model.layers[0].mlp.down_proj.in_features, cfg.norm_eps, attn0.attn.scale,
                             block_size)
        if tp is not None:   # o and down give partial sums: all-reduced inside the step
            impl.set_reduce(tp.group.all_reduce)
        try:
            for i, (layer, cache) in enumerate(zip(model.layers, caches)):
                a = layer.self_attn
                impl.add_layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                               None if a.q_norm is None else a.q_norm.weight,
                               None if a.k_norm is None else a.k_norm.weight, cache.k, cache.v,
                               cache.k_scale if cache.quantized else None,
                               cache.v_scale if cache.quantized else None)
                for which, lin in enumerate((a.qkv_proj, a.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)):
                    if not _add_linear(impl, i, which, lin):
                        return None
            impl.set_head(model.norm.weight, model.lm_head.out_features)
            if not _add_linear(impl, -1, 0, model.lm_head):
                return None
        except RuntimeError:  # a shape or dtype the C++ side does not take
            return None
        return cls(model, impl)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 tables: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] of one token per sequence."""
        x = self.model.embed(input_ids).contiguous()
        cos, sin = self.model.rotary.lookup(positions)
        logits = self.impl.forward(x, cos.squeeze(1).contiguous(), sin.squeeze(1).contiguous(), slots, tables, lens)
        head = self.model.lm_head
        return logits if head.tp_out is None else head.tp_out(logits)   # all-gathered vocabulary


def _add_linear(impl, layer: int, which: int, lin: Linear) -> bool:
    if lin.bias is not None:
        impl.set_bias(layer, which, lin.bias.data)
    if lin.qweight is None:
        if lin.weight.dtype != torch.float32:
            return False
        impl.add_dense(layer, which, 0, lin.weight.data.contiguous())
        return True
    parts = lin.qweight.parts if isinstance(lin.qweight, RowStack) else [lin.qweight]
    out0 = 0
    for p in parts:
        if not isinstance(p, QuantWeight) or p.padded_in != p.in_features:
            return False
        impl.add_quant(layer, which, out0, *p._kernel_args())
        out0 += p.out_features
    return True
