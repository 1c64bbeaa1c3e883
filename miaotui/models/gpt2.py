"""GPT-2: learned positions, LayerNorm, fused c_attn, GELU (tanh) MLP, tied head."""
from __future__ import annotations

import re
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from miaotui.config import ModelConfig
from miaotui.layers.activation import get_activation
from miaotui.layers.attention import Attention
from miaotui.layers.device import act_dtype
from miaotui.layers.linear import Linear
from miaotui.layers.norm import LayerNorm
from miaotui.models.llama import _dense, embedding_table, load_linear


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, self.nh, self.hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.ln_1 = LayerNorm(h, cfg.norm_eps)
        self.c_attn = Linear(h, 3 * h, bias=True)
        self.attn = Attention(self.nh, self.nh, self.hd, self.hd ** -0.5)
        self.c_proj = Linear(h, h, bias=True)
        self.ln_2 = LayerNorm(h, cfg.norm_eps)
        self.c_fc = Linear(h, cfg.intermediate_size, bias=True)
        self.mlp_proj = Linear(cfg.intermediate_size, h, bias=True)
        self.act = get_activation(cfg.hidden_act)

    def forward(self, x, meta):
        T = x.shape[0]
        q, k, v = self.c_attn(self.ln_1(x)).view(T, 3 * self.nh, self.hd).split(self.nh, dim=1)
        x = x + self.c_proj(self.attn(q, k, v, meta))
        return x + self.mlp_proj(self.act(self.c_fc(self.ln_2(x))))


class GPT2LMHeadModel(nn.Module):
    keep_16bit = False  # set by build_model: 16-bit checkpoint tensors stay 16-bit
    # HF GPT-2 stores Conv1D weights as [in, out]: transposed at load
    names = {"attn.c_attn": "c_attn", "attn.c_proj": "c_proj", "mlp.c_fc": "c_fc",
             "mlp.c_proj": "mlp_proj", "ln_1": "ln_1", "ln_2": "ln_2"}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False)
        self.wpe = nn.Parameter(torch.empty(cfg.max_position_embeddings, cfg.hidden_size), requires_grad=False)
        self.h = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)

    def input_embeddings(self, input_ids, positions):
        # self.embed: tensor parallel replaces it with its vocabulary-parallel lookup
        dt = act_dtype(input_ids)   # float32; on the GPU path the compute dtype
        return self.embed(input_ids).to(dt) + F.embedding(positions, self.wpe).to(dt)

    def forward(self, input_ids, positions, meta):
        x = self.input_embeddings(input_ids, positions)
        for block in self.h:
            x = block(x, meta)
        return self.ln_f(x)

    def embed(self, input_ids):
        return F.embedding(input_ids, self.wte)

    def compute_logits(self, hidden):
        return self.lm_head(hidden)

    def attention_layers(self) -> list[Attention]:
        return [b.attn for b in self.h]

    def load_weights(self, weights: Iterable[tuple[str, object]]) -> None:
        lm_head_seen = False
        for name, w in weights:
            name = name.removeprefix("transformer.")
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue
            if name in ("wte.weight", "wpe.weight"):
                getattr(self, name[:3]).data = embedding_table(w, self.keep_16bit)
            elif name == "lm_head.weight":
                lm_head_seen = True
                load_linear(self.lm_head, w)
            elif name.startswith("ln_f."):
                getattr(self.ln_f, name[5:]).data = _dense(w).float()
            else:
                m = re.match(r"h\.(\d+)\.(.+)\.(weight|bias)$", name)
                if not m or m.group(2) not in self.names:
                    raise ValueError(f"unexpected weight {name}")
                mod = getattr(self.h[int(m.group(1))], self.names[m.group(2)])
                if isinstance(mod, LayerNorm):
                    getattr(mod, m.group(3)).data = _dense(w).float()
                elif m.group(3) == "bias":
                    mod.load_bias(_dense(w))
                elif isinstance(w, torch.Tensor):
                    mod.load(w.t())      # Conv1D [in, out] -> [out, in]
                else:
                    load_linear(mod, w)  # GGUF already stores [out, in]
        if not lm_head_seen:
            self.lm_head.weight.data = self.wte.data
        for m in self.modules():
            if isinstance(m, Linear):
                m.finish_raw()
