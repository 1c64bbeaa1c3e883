"""Attention over a paged KV cache.

The cache of a layer is one flat pool of slots, ``[num_blocks * block_size, kv_heads,
head_dim]``; a sequence's tokens live in the slots its block table names. Each step the
model runner builds one :class:`AttentionMetadata` for the whole flat batch: each token's
sequence (a row of ``tables``) and position. The C++ kernel (``paged_attention``) lets
every token attend to the cached keys up to its own position, in runs fixed by position,
so a token's output is the same in a long prefill chunk, a short one, or a decode step.
Without the kernels, PyTorch does it: prefill chunks (causal over their cached prefix plus
themselves), then decode tokens (one gather of every sequence's slots, padded, one masked
SDPA call); that fallback is not batch-invariant.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from miaotui import kernels


@dataclass
class PrefillChunk:
    start: int                           # first row of this chunk in the flat batch
    end: int
    first_pos: int                       # position of the chunk's first token
    ctx_slots: torch.Tensor | None       # slots of positions [0, end_pos); None if first_pos == 0
    mask: torch.Tensor | None = None     # [L, C] bool, None = plain causal
    sliding_mask: torch.Tensor | None = None


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor                      # [T] where each token's K/V is written
    prefills: list[PrefillChunk] = field(default_factory=list)
    num_prefill_tokens: int = 0
    decode_slots: torch.Tensor | None = None        # [B, max_ctx] (padding points at slot 0)
    decode_mask: torch.Tensor | None = None         # [B, 1, 1, max_ctx] bool or None
    decode_sliding_mask: torch.Tensor | None = None
    # for the C++ kernel: block tables [S, nblk], and per token its table row and position
    tables: torch.Tensor | None = None
    token_seq: torch.Tensor | None = None
    token_pos: torch.Tensor | None = None
    block_size: int = 0
    window: int = 0                                 # sliding layers' window (0: none)
    # the GPU path (engine/gpu_runner.py, miaotui.kernels.gpu): "prefill" or "decode", with
    # device tensors: tables [rows, max_blocks] int32 and, for decode rows, seq_lens [B]
    # int32 (0: a padding row); for prompt chunks cu_seqlens_q [N+1] and start_pos [N]
    gpu: str | None = None
    seq_lens: torch.Tensor | None = None
    cu_seqlens_q: torch.Tensor | None = None
    start_pos: torch.Tensor | None = None


class KVCache:
    """Key/value slots of one layer, optionally int8 with one scale per token and head."""

    def __init__(self, num_slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device="cpu", zeroed: bool = True):
        self.quantized = dtype == torch.int8
        # zeroed=False: the pool stays untouched, no resident pages until used (a short
        # `generate` does not pay for its whole context), for readers that read only written
        # slots (the C++ kernels); PyTorch's padded gathers multiply padding by zero weights
        new = torch.zeros if zeroed else torch.empty
        self.k = new(num_slots, kv_heads, head_dim, dtype=dtype, device=device)
        self.v = new(num_slots, kv_heads, head_dim, dtype=dtype, device=device)
        if self.quantized:
            self.k_scale = new(num_slots, kv_heads, 1, dtype=torch.float32, device=device)
            self.v_scale = new(num_slots, kv_heads, 1, dtype=torch.float32, device=device)

    def nbytes(self) -> int:
        n = self.k.nbytes + self.v.nbytes
        return n + (self.k_scale.nbytes + self.v_scale.nbytes if self.quantized else 0)

    @staticmethod
    def _quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127.0
        return torch.round(x / scale).to(torch.int8), scale

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.quantized:
            kq, ks = self._quant(k)
            vq, vs = self._quant(v)
            self.k.index_copy_(0, slots, kq)
            self.v.index_copy_(0, slots, vq)
            self.k_scale.index_copy_(0, slots, ks)
            self.v_scale.index_copy_(0, slots, vs)
        else:
            self.k.index_copy_(0, slots, k.to(self.k.dtype))
            self.v.index_copy_(0, slots, v.to(self.v.dtype))

    def read(self, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the given slots (any shape), shaped slots.shape + [kv_heads, head_dim]."""
        flat, shape = slots.reshape(-1), (*slots.shape, *self.k.shape[1:])
        k, v = self.k.index_select(0, flat), self.v.index_select(0, flat)  # faster than k[slots]
        if self.quantized:
            k = k.to(dtype) * self.k_scale.index_select(0, flat)
            v = v.to(dtype) * self.v_scale.index_select(0, flat)
        return k.to(dtype).view(shape), v.to(dtype).view(shape)


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding: bool = False):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding = sliding
        self.cache: KVCache | None = None  # set by the model runner

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KVH, D] -> [T, H*D]."""
        if meta.gpu is not None:
            return self._gpu(q, k, v, meta)
        self.cache.write(meta.slot_mapping, k, v)
        if meta.tables is not None:  # the model runner chose the C++ kernel
            c = self.cache
            ks, vs = (c.k_scale, c.v_scale) if c.quantized else (None, None)
            return kernels.load().paged_attention(q.contiguous(), c.k, c.v, ks, vs, meta.tables, meta.token_seq,
                                        meta.token_pos, meta.block_size, meta.window if self.sliding else 0,
                                        self.scale)
        parts = []
        for c in meta.prefills:
            qc = q[c.start:c.end].transpose(0, 1).unsqueeze(0)
            if c.ctx_slots is None:
                kc, vc = k[c.start:c.end], v[c.start:c.end]
                if self.cache.quantized:  # attend to what later steps will read back
                    kc, vc = self.cache.read(meta.slot_mapping[c.start:c.end], q.dtype)
            else:
                kc, vc = self.cache.read(c.ctx_slots, q.dtype)
            mask = c.sliding_mask if self.sliding else c.mask
            o = F.scaled_dot_product_attention(
                qc, kc.transpose(0, 1).unsqueeze(0), vc.transpose(0, 1).unsqueeze(0),
                attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=True)
            parts.append(o[0].transpose(0, 1))
        if meta.decode_slots is not None:
            mask = meta.decode_sliding_mask if self.sliding else meta.decode_mask
            kd, vd = self.cache.read(meta.decode_slots, q.dtype)      # [B, C, KVH, D]
            parts.append(self._decode(q[meta.num_prefill_tokens:], kd, vd, mask))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.reshape(out.shape[0], -1)

    def _gpu(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        """The GPU path: this step's K/V into the cache first, then paged attention over
        the cache (miaotui.kernels.gpu: Triton, or its PyTorch reference)."""
        from miaotui.kernels import gpu
        c = self.cache
        gpu.store_kv(k, v, c.k, c.v, meta.slot_mapping)
        window = meta.window if self.sliding else 0
        q = q.contiguous()
        if meta.gpu == "decode":
            out = gpu.paged_decode_attention(q, c.k, c.v, meta.tables, meta.seq_lens, meta.block_size,
                                             self.scale, window)
        else:
            out = gpu.paged_prefill_attention(q, c.k, c.v, meta.tables, meta.cu_seqlens_q, meta.start_pos,
                                              meta.block_size, self.scale, window)
        return out.reshape(out.shape[0], -1)

    def _decode(self, q, k, v, mask):
        """One query per sequence. Plain matmuls over grouped heads: for a single query,
        torch's CPU flash-attention kernel costs ~6 ms a call, this ~50 us.
        q: [B, H, D], k/v: [B, C, KVH, D], mask: [B, 1, 1, C] bool or None -> [B, H, D]."""
        B, H, D = q.shape
        g = H // self.num_kv_heads
        qg = q.view(B, self.num_kv_heads, g, D)
        scores = torch.matmul(qg, k.permute(0, 2, 3, 1)).mul_(self.scale)   # [B, KVH, g, C]
        if mask is not None:
            scores.masked_fill_(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return torch.matmul(probs, v.transpose(1, 2)).view(B, H, D)         # [B, KVH, g, D]
