"""The Llama family: Llama 2/3, Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm), SmolLM, TinyLlama.

Written against a flat batch: ``input_ids`` and ``positions`` are [T] for all tokens of all
sequences of the step; attention metadata says which tokens belong together.
"""
from __future__ import annotations

import re
import warnings
from typing import Iterable

import numpy as np
import torch
from torch import nn

from miaotui.config import ModelConfig
from miaotui.layers.activation import gated, get_activation
from miaotui.layers.attention import Attention, AttentionMetadata
from miaotui.layers.device import on_gpu
from miaotui.layers.embedding import Embedding
from miaotui.layers.linear import Linear
from miaotui.layers.norm import RMSNorm
from miaotui.layers.rotary import RotaryEmbedding, apply_rotary


def load_linear(layer: Linear, w, shard: int = 0, is_bias: bool = False) -> None:
    """Load a dense tensor, or keep a GGUF-quantized one quantized."""
    if is_bias:
        layer.load_bias(_dense(w), shard)
    elif hasattr(w, "qtype") and not _is_dense(w):
        layer.load_raw(w, shard)
    else:   # Linear.load copies into its own weight: read straight from the file's map
        layer.load(_dense(w, layer.keep_16bit, copy=False), shard)


def _is_dense(w) -> bool:
    return getattr(w.qtype, "name", "") in ("F32", "F16", "BF16")


def _dense(w, keep_16bit: bool = False, copy: bool = True) -> torch.Tensor:
    """A float tensor from a dense tensor or a raw GGUF tensor (data, qtype, shape): float32,
    or float16 / bfloat16 as stored with `keep_16bit`; with copy=False an F32 tensor may be
    a read-only view of the file's map."""
    if isinstance(w, torch.Tensor):
        return w
    if w.qtype.name == "F32" and not copy:
        with warnings.catch_warnings():   # read-only: the caller copies it
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(np.asarray(w.data, dtype=np.float32)).reshape(w.shape)
    if w.qtype.name == "F32" or (w.qtype.name == "F16" and not keep_16bit):
        return torch.from_numpy(np.array(w.data, dtype=np.float32)).reshape(w.shape)  # a writable copy
    from miaotui.layers.quant import dequantize_gguf
    return dequantize_gguf(w.data, w.qtype, w.shape, keep_16bit=keep_16bit)


def embedding_table(w, keep_16bit: bool) -> torch.Tensor:   # (GPT-2's tables)
    """An embedding table: float32, or float16 / bfloat16 as stored with `keep_16bit` (rows
    are widened when looked up)."""
    t = _dense(w, keep_16bit)
    return t if keep_16bit and t.dtype in (torch.float16, torch.bfloat16) else t.float()


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, [cfg.q_size, cfg.kv_size, cfg.kv_size], bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias)
        norm_offset = 1.0 if cfg.family == "gemma3" else 0.0
        self.q_norm = RMSNorm(self.hd, cfg.norm_eps, norm_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.norm_eps, norm_offset) if cfg.qk_norm else None
        scale = (cfg.query_pre_attn_scalar or self.hd) ** -0.5
        self.attn = Attention(self.nh, self.nkv, self.hd, scale, sliding=cfg.is_sliding(layer))

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata):
        T = x.shape[0]
        qkv = self.qkv_proj(x).view(T, self.nh + 2 * self.nkv, self.hd)
        q, k, v = qkv.split([self.nh, self.nkv, self.nkv], dim=1)
        if on_gpu(x):   # rotary in place (miaotui.kernels.gpu): no copy of q and k
            from miaotui.kernels import gpu
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = gpu.rotary(q, k, *rope)
            return self.o_proj(self.attn(q, k, v, meta))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
            qk = apply_rotary(torch.cat((q, k), dim=1), *rope)
        else:
            qk = apply_rotary(qkv[:, : self.nh + self.nkv], *rope)
        q, k = qk.split([self.nh, self.nkv], dim=1)
        return self.o_proj(self.attn(q, k, v, meta))


# Prompt rows go through the MLP this many at a time on CPU: its gate/up output and
# activation (3 x intermediate_size floats a row) are a step's largest intermediates, and
# slicing them halves a 512-token chunk's workspace there (-34 MiB of process peak on
# TinyLlama-1.1B Q8_0) for +3% CPU time in that prompt (128 rows: +7%; measured by
# scripts/memory_stages.py). Rows are independent, so every row's result is the same
# whatever the slicing.
MLP_ROWS = 256


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, [cfg.intermediate_size] * 2, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = get_activation(cfg.hidden_act)

    def forward(self, x):
        if x.shape[0] <= MLP_ROWS or x.device.type != "cpu":
            return self._rows(x)
        return torch.cat([self._rows(x[i:i + MLP_ROWS]) for i in range(0, x.shape[0], MLP_ROWS)])

    def _rows(self, x):
        return self.down_proj(gated(self.act, self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x, rope, meta):
        x = x + self.self_attn(self.input_layernorm(x), rope, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    layer_cls = LlamaDecoderLayer
    keep_16bit = False  # set by build_model: 16-bit checkpoint tensors stay 16-bit
    # checkpoint name -> (module path relative to a layer, shard)
    stacked = {
        "q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", 1),
        "v_proj": ("self_attn.qkv_proj", 2), "gate_proj": ("mlp.gate_up_proj", 0),
        "up_proj": ("mlp.gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)   # kept as stored
        self.layers = nn.ModuleList(self.layer_cls(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, 1.0 if cfg.family == "gemma3" else 0.0)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.rotary = self._rotary(cfg.rope_theta, cfg.rope_scaling)

    def _rotary(self, theta, scaling):
        return RotaryEmbedding(self.cfg.head_dim, self.cfg.max_position_embeddings, theta, scaling)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def input_embeddings(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """What the first layer takes (the fused decode step starts from it too)."""
        return self.embed(input_ids)

    def rope_tables(self, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) per rotary table, [T, 1, head_dim / 2] each; layer_rope(i) picks one."""
        return [self.rotary.lookup(positions)]

    def layer_rope(self, layer: int) -> int:
        return 0

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata):
        x = self.input_embeddings(input_ids, positions)
        rope = self.rotary.lookup(positions)
        for layer in self.layers:
            x = layer(x, rope, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.layers]

    # ---- loading -------------------------------------------------------------------------
    @property
    def tp_sharded(self) -> bool:
        return getattr(self, "tp", None) is not None

    def load_weights(self, weights: Iterable[tuple[str, object]]) -> None:
        lm_head_seen = False
        for name, w in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "embed_tokens.weight":   # untied: rows read from the file on lookup
                self.embed_tokens.load(w, from_file=not self.cfg.tie_word_embeddings and not self.tp_sharded,
                                       keep_16bit=self.keep_16bit)
                embed_raw = w
            elif name == "lm_head.weight":
                lm_head_seen = True
                load_linear(self.lm_head, w)
            elif name == "norm.weight":
                self.norm.load(_dense(w))
            else:
                m = re.match(r"layers\.(\d+)\.(.+)\.(weight|bias)$", name)
                if not m:
                    raise ValueError(f"unexpected weight {name}")
                layer = self.layers[int(m.group(1))]
                self._load_layer_weight(layer, m.group(2), m.group(3), w)
        if not lm_head_seen and self.tp_sharded:   # tensor parallel: the head loads its vocabulary slice
            load_linear(self.lm_head, embed_raw)
        elif not lm_head_seen:  # tied: the head reads the embedding's table (quantized or float32)
            self.embed_tokens.tie(self.lm_head)
        for layer in self.modules():
            if isinstance(layer, Linear):
                layer.finish_raw()

    def _load_layer_weight(self, layer, path: str, kind: str, w) -> None:
        leaf = path.rsplit(".", 1)[-1]
        if leaf in self.stacked:
            target, shard = self.stacked[leaf]
            mod = layer.get_submodule(target)
            load_linear(mod, w, shard, is_bias=kind == "bias")
            return
        mod = layer.get_submodule(path)
        if isinstance(mod, Linear):
            load_linear(mod, w, 0, is_bias=kind == "bias")
        elif isinstance(mod, RMSNorm):
            mod.load(_dense(w))
        else:
            raise ValueError(f"unexpected weight {path}.{kind}")
