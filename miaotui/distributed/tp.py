"""Tensor parallel (Megatron-style): which part of each weight a rank keeps, and the
collectives that put the parts back together.

Per layer: q/k/v and gate/up are column parallel (a rank keeps the rows of its attention
heads and of its slice of the intermediate size), o and down are row parallel (the matching
input columns; their partial sums are all-reduced, one all-reduce each). The embedding and
the LM head are split over the vocabulary: a rank embeds the token ids in its range (the
others give zeros, summed by an all-reduce, which is exact) and computes its slice of the
logits (all-gathered, exact). KV heads are split with their query heads; with fewer KV heads
than ranks each is replicated on ``size / num_kv_heads`` ranks.

``shard_model`` rewrites a freshly built model (weights still ``torch.empty``) to this
rank's sizes and tells each ``Linear`` which rows/columns of the checkpoint tensors to keep,
so loading (``Linear.load``/``load_raw``) reads only the shard: GGUF blocks are sliced whole
(a row-parallel split must fall on the format's block boundary, 32 or 256 inputs).

Rounding: the row-parallel all-reduce sums N partial dot products where one rank would run
one chain, so logits differ from a single process by float32 rounding (~1e-6 relative).
"""
from __future__ import annotations

import os
import types
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
import torch.distributed as dist
import torch.nn.functional as F

from miaotui.config import MiaotuiError


@dataclass
class TPGroup:
    rank: int
    size: int
    group: object = None          # the process group (None: the default one)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_cols(self, y: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate each rank's [.., sizes[r]] along the last dim (padded to the largest)."""
        width = max(sizes)
        if y.shape[-1] < width:
            y = F.pad(y, (0, width - y.shape[-1]))
        parts = [torch.empty_like(y) for _ in range(self.size)]
        dist.all_gather(parts, y.contiguous(), group=self.group)
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)


def backend() -> str:
    return "nccl" if torch.cuda.is_available() and os.environ.get("MIAOTUI_DIST_BACKEND") != "gloo" else "gloo"


def split(n: int, parts: int, index: int, unit: int = 1) -> tuple[int, int]:
    """The index-th of `parts` contiguous ranges covering [0, n), in multiples of `unit`
    (the first ranges one unit larger when they do not divide evenly)."""
    if n % unit:
        unit = 1
    units = n // unit
    base, extra = divmod(units, parts)
    start = index * base + min(index, extra)
    stop = start + base + (1 if index < extra else 0)
    return start * unit, stop * unit


def head_ranges(nh: int, nkv: int, size: int, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(query heads, KV heads) of `rank`: whole groups of a KV head with its query heads,
    or with fewer KV heads than ranks, each KV head replicated on size/nkv ranks."""
    if nh % nkv:
        raise MiaotuiError(f"{nh} attention heads do not divide into {nkv} KV heads")
    g = nh // nkv
    if nkv >= size:
        k0, k1 = split(nkv, size, rank)
        return (k0 * g, k1 * g), (k0, k1)
    if size % nkv or nh % size:
        raise MiaotuiError(f"tensor parallel size {size} does not fit {nh} heads / {nkv} KV heads: "
                           f"with fewer KV heads than ranks, the size must be a multiple of the KV heads "
                           f"and divide the heads")
    q0, q1 = split(nh, size, rank)
    kv = rank * nkv // size
    return (q0, q1), (kv, kv + 1)


def _unit(n: int, parts: int) -> int:
    """The split granularity of an input dimension: whole GGUF blocks where every part
    still gets one."""
    return next(u for u in (256, 32, 1) if n % u == 0 and n // u >= parts)


def _column(lin, group: TPGroup, ranges: list[list[tuple[int, int]]]):
    """A column-parallel replacement for `lin`: for each logical shard, the checkpoint rows kept."""
    from miaotui.layers.linear import Linear
    new = Linear(lin.in_features, [sum(b - a for a, b in r) for r in ranges], bias=lin.bias is not None)
    new.tp_rows = ranges
    return new


def _row(lin, group: TPGroup, cols: tuple[int, int]):
    """A row-parallel replacement: input columns `cols`, output all-reduced."""
    from miaotui.layers.linear import Linear
    new = Linear(cols[1] - cols[0], lin.out_features, bias=lin.bias is not None)
    new.tp_cols = cols
    new.tp_out = group.all_reduce
    return new


def shard_model(model, group: TPGroup) -> None:
    """Rewrite a freshly built model (nothing loaded yet) to this rank's shard."""
    from miaotui.models.gpt2 import GPT2LMHeadModel
    from miaotui.models.llama import LlamaForCausalLM
    cfg, r, n = model.cfg, group.rank, group.size
    hd, h = cfg.head_dim, cfg.hidden_size
    (q0, q1), (k0, k1) = head_ranges(cfg.num_heads, cfg.num_kv_heads, n, r)
    i0, i1 = split(cfg.intermediate_size, n, r, _unit(cfg.intermediate_size, n))
    if isinstance(model, LlamaForCausalLM):
        for layer in model.layers:
            a, mlp = layer.self_attn, layer.mlp
            a.qkv_proj = _column(a.qkv_proj, group, [[(q0 * hd, q1 * hd)], [(k0 * hd, k1 * hd)], [(k0 * hd, k1 * hd)]])
            a.o_proj = _row(a.o_proj, group, (q0 * hd, q1 * hd))
            a.nh, a.nkv = q1 - q0, k1 - k0
            mlp.gate_up_proj = _column(mlp.gate_up_proj, group, [[(i0, i1)], [(i0, i1)]])
            mlp.down_proj = _row(mlp.down_proj, group, (i0, i1))
        attns, embed_name = [layer.self_attn.attn for layer in model.layers], "embed_tokens"
    elif isinstance(model, GPT2LMHeadModel):
        for b in model.h:
            b.c_attn = _column(b.c_attn, group, [[(q0 * hd + j * h, q1 * hd + j * h) for j in range(3)]])
            b.c_proj = _row(b.c_proj, group, (q0 * hd, q1 * hd))
            b.nh = q1 - q0
            b.c_fc = _column(b.c_fc, group, [[(i0, i1)]])
            b.mlp_proj = _row(b.mlp_proj, group, (i0, i1))
        attns, embed_name = [b.attn for b in model.h], "wte"
    else:
        raise MiaotuiError(f"tensor parallel does not cover {type(model).__name__}")
    for attn in attns:
        attn.num_heads, attn.num_kv_heads = q1 - q0, k1 - k0
    sizes = [b - a for a, b in (split(cfg.vocab_size, n, i) for i in range(n))]
    v0, v1 = split(cfg.vocab_size, n, r)
    model.lm_head = _column(model.lm_head, group, [[(v0, v1)]])
    model.lm_head.tp_out = lambda y: group.all_gather_cols(y, sizes)
    model.tp = types.SimpleNamespace(group=group, vocab=(v0, v1), embed_name=embed_name)

    def embed(ids: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel lookup: rows outside this rank's range are zeros, then summed."""
        w = getattr(model, embed_name)
        local = ids - v0
        inside = (local >= 0) & (local < v1 - v0)
        local = torch.where(inside, local, 0)
        # a layers.embedding.Embedding (its rows as float32), or GPT-2's plain table
        rows = w(local) if isinstance(w, nn.Module) else F.embedding(local, w).float()
        return group.all_reduce(rows * inside.unsqueeze(-1).to(rows.dtype))
    model.embed = embed


def finish_shard(model) -> None:
    """After loading: keep only this rank's vocabulary rows of the embedding (and of a tied
    dense head), and the row-parallel biases on rank 0 alone (they are added once)."""
    from miaotui.layers.linear import Linear
    tp = model.tp
    v0, v1 = tp.vocab
    w = getattr(model, tp.embed_name)
    if isinstance(w, nn.Module):   # layers.embedding.Embedding: this rank's rows, dense
        if w.num_embeddings != v1 - v0:
            rows = w.dense()[v0:v1].clone()
            w.num_embeddings = v1 - v0
            w.load(rows)
    elif w.data.shape[0] != v1 - v0:
        w.data = w.data[v0:v1].clone()
    head = model.lm_head
    if head.weight is not None and head.weight.shape[0] != v1 - v0:
        head.weight.data = head.weight.data[v0:v1].clone()
    for m in model.modules():
        if isinstance(m, Linear) and m.tp_cols is not None and m.bias is not None and tp.group.rank:
            m.bias.data.zero_()


def slice_raw(raw, rows: list[tuple[int, int]] | None, cols: tuple[int, int] | None):
    """A GGUF tensor (rows of whole quantization blocks) cut to `rows` and input `cols`."""
    import gguf
    data = np.asarray(raw.data)
    n, k = (int(s) for s in raw.shape)
    if rows is not None:
        data = np.concatenate([data[a:b] for a, b in rows]) if len(rows) > 1 else data[rows[0][0]:rows[0][1]]
        n = sum(b - a for a, b in rows)
    if cols is not None:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(raw.qtype)]
        c0, c1 = cols
        if c0 % block or c1 % block:
            raise MiaotuiError(f"tensor parallel: input columns {c0}..{c1} do not fall on "
                               f"{raw.qtype.name}'s {block}-value blocks; try another size")
        data = data.reshape(n, k // block, size)[:, c0 // block:c1 // block].reshape(n, -1)
        k = c1 - c0
    return raw._replace(data=np.ascontiguousarray(data), shape=(n, k))
