"""Gemma 3 (text): sandwich norms, (1 + w) RMSNorm, scaled embeddings, q/k norm,
sliding-window layers with their own rotary base, optional final logit soft-capping."""
from __future__ import annotations

import torch

from miaotui.config import ModelConfig
from miaotui.layers.norm import RMSNorm
from miaotui.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP


class Gemma3DecoderLayer(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.sliding = cfg.is_sliding(layer)
        self.self_attn = LlamaAttention(cfg, layer)
        self.mlp = LlamaMLP(cfg)
        for name in ("input_layernorm", "post_attention_layernorm",
                     "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            setattr(self, name, RMSNorm(cfg.hidden_size, cfg.norm_eps, weight_offset=1.0))

    def forward(self, x, ropes, meta):
        rope = ropes[1] if self.sliding else ropes[0]
        x = x + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(x), rope, meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3ForCausalLM(LlamaForCausalLM):
    layer_cls = Gemma3DecoderLayer

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.local_rotary = self._rotary(cfg.rope_local_theta or 10000.0, None)
        self.normalizer = cfg.hidden_size ** 0.5

    def input_embeddings(self, input_ids, positions):
        x = self.embed(input_ids)   # the normalizer rounded to the activations' dtype, as transformers
        return x * torch.tensor(self.normalizer, dtype=x.dtype)

    def rope_tables(self, positions):
        return [self.rotary.lookup(positions), self.local_rotary.lookup(positions)]

    def layer_rope(self, layer: int) -> int:
        return 1 if self.layers[layer].sliding else 0

    def forward(self, input_ids, positions, meta):
        x = self.input_embeddings(input_ids, positions)
        ropes = self.rope_tables(positions)
        for layer in self.layers:
            x = layer(x, ropes, meta)
        return self.norm(x)

    def compute_logits(self, hidden):
        logits = self.lm_head(hidden)
        cap = self.cfg.final_logit_softcapping
        return logits if not cap else torch.tanh(logits / cap) * cap
