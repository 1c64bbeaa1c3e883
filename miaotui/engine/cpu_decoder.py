"""Decode steps on CPU in one C++ call (kernels/decode_cpu.cpp): the Llama family, Gemma 3
and GPT-2.

Through PyTorch a decode step is ~20 small ops per layer; on a 135M model their dispatch
and thread wake-ups cost more than the matmuls. The model runner hands steps that only
decode to a :class:`CPUDecoder` when one can be built for the model: the C++ side holds
pointers to the model's own weights and KV cache, so nothing is copied and the PyTorch
path (prefill, and every model this does not cover) sees the same state. The embeddings
(Gemma's scale, GPT-2's learned positions), the rotary tables and Gemma's final logit
soft-capping are computed by the model's own code around the call. Tests check the two
paths against each other.
"""
from __future__ import annotations

import os

import torch

from miaotui.layers.attention import KVCache
from miaotui.layers.linear import Linear, RowStack
from miaotui.layers.quant import QuantWeight
from miaotui.layers.sparse import Sparse24Weight

# the model's hidden_act -> the C++ step's activation
ACTS = {"silu": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def enabled() -> bool:
    return os.environ.get("MIAOTUI_FUSED_DECODE", "1") not in ("0", "")


class CPUDecoder:
    def __init__(self, model, impl):
        self.model, self.impl = model, impl
        self.rope = hasattr(model, "rope_tables")
        self.cap = getattr(model.cfg, "final_logit_softcapping", None)

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
        """A decoder for this model, or None when it is not covered: not a Llama-family,
        Gemma 3 or GPT-2 model, an activation other than SiLU or GELU (tanh), weights neither
        quantized nor float32/float16/bfloat16, or no kernels."""
        from miaotui import kernels
        from miaotui.models.gemma3 import Gemma3ForCausalLM
        from miaotui.models.gpt2 import GPT2LMHeadModel
        from miaotui.models.llama import LlamaForCausalLM
        k = kernels.load()
        cfg = model.cfg
        kind = {LlamaForCausalLM: "llama", Gemma3ForCausalLM: "gemma3", GPT2LMHeadModel: "gpt2"}.get(type(model))
        act = ACTS.get(cfg.hidden_act)
        if (k is None or not enabled() or kind is None or act is None or (kind == "llama" and act != "silu")
                or cfg.attn_logit_softcapping or _embed_table(model).device.type != "cpu"):
            return None
        layers = model.h if kind == "gpt2" else model.layers
        attn0 = layers[0].attn if kind == "gpt2" else layers[0].self_attn.attn
        down = layers[0].mlp_proj if kind == "gpt2" else layers[0].mlp.down_proj
        # under tensor parallel: this rank's heads and MLP slice
        impl = k.DecodeModel(cfg.hidden_size, attn0.num_heads, attn0.num_kv_heads, cfg.head_dim,
                             down.in_features, cfg.norm_eps, attn0.scale, block_size)
        tp = getattr(model, "tp", None)
        if tp is not None:   # o and down give partial sums: all-reduced inside the step
            impl.set_reduce(tp.group.all_reduce)
        try:
            impl.set_arch("layer" if kind == "gpt2" else "rms", act, kind != "gpt2")
            for i, (layer, cache) in enumerate(zip(layers, caches)):
                scales = (cache.k_scale, cache.v_scale) if cache.quantized else (None, None)
                if kind == "gpt2":
                    impl.add_layer(layer.ln_1.weight, layer.ln_2.weight, None, None, cache.k, cache.v, *scales)
                    impl.set_norm(i, 0, layer.ln_1.weight, layer.ln_1.bias)
                    impl.set_norm(i, 2, layer.ln_2.weight, layer.ln_2.bias)
                    impl.set_attention(i, 0, -1)
                    linears = (layer.c_attn, layer.c_proj, layer.c_fc, layer.mlp_proj)
                else:
                    a = layer.self_attn
                    mlp_in = layer.pre_feedforward_layernorm if kind == "gemma3" else layer.post_attention_layernorm
                    impl.add_layer(layer.input_layernorm.weight, mlp_in.weight,
                                   None if a.q_norm is None else a.q_norm.weight,
                                   None if a.k_norm is None else a.k_norm.weight, cache.k, cache.v, *scales)
                    if kind == "gemma3":  # the sandwich norms around attention's and the MLP's outputs
                        impl.set_norm(i, 1, layer.post_attention_layernorm.weight)
                        impl.set_norm(i, 3, layer.post_feedforward_layernorm.weight)
                    window = a.attn.sliding and cfg.sliding_window or 0
                    impl.set_attention(i, window, model.layer_rope(i))
                    linears = (a.qkv_proj, a.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
                for which, lin in enumerate(linears):
                    if not _add_linear(impl, i, which, lin):
                        return None
            final = model.ln_f if kind == "gpt2" else model.norm
            impl.set_head(final.weight, model.lm_head.out_features)   # this rank's vocabulary
            if kind == "gpt2":
                impl.set_norm(-1, 0, final.weight, final.bias)
            if not _add_linear(impl, -1, 0, model.lm_head):
                return None
        except RuntimeError:  # a shape or dtype the C++ side does not take
            return None
        return cls(model, impl)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 tables: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] of one token per sequence."""
        x = self.model.input_embeddings(input_ids, positions).float().contiguous()
        if self.rope:  # [tables, B, head_dim / 2]
            ropes = self.model.rope_tables(positions)
            cos = torch.stack([c.squeeze(1) for c, _ in ropes])
            sin = torch.stack([s.squeeze(1) for _, s in ropes])
        else:
            cos = sin = torch.empty(0, 0)
        logits = self.impl.forward(x, cos, sin, slots, tables, lens)
        head = self.model.lm_head
        if head.tp_out is not None:
            logits = head.tp_out(logits)   # tensor parallel: the vocabulary all-gathered
        # as the model's compute_logits
        return logits if not self.cap else torch.tanh(logits / self.cap) * self.cap


def _embed_table(model) -> torch.Tensor:
    return model.wte if hasattr(model, "wte") else model.embed_tokens


def _add_linear(impl, layer: int, which: int, lin: Linear) -> bool:
    if lin.bias is not None:
        impl.set_bias(layer, which, lin.bias.data)
    if lin.qweight is None:
        if lin.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return False
        impl.add_dense(layer, which, 0, lin.weight.data.contiguous())
        return True
    if isinstance(lin.qweight, Sparse24Weight):
        impl.add_sparse24(layer, which, 0, *lin.qweight._kernel_args())
        return True
    parts = lin.qweight.parts if isinstance(lin.qweight, RowStack) else [lin.qweight]
    out0 = 0
    for p in parts:
        if not isinstance(p, QuantWeight) or p.padded_in != p.in_features:
            return False
        impl.add_quant(layer, which, out0, *p._kernel_args())
        out0 += p.out_features
    return True
