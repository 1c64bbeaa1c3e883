"""Linear layers that own their weight format and their shard of a merged weight.

A layer may hold several logical weights side by side (q, k and v; gate and up), so a
step does one large matmul instead of several small ones. Loading goes through
``load(tensor, shard)``, so checkpoint formats, quantization and (later) tensor parallel
sharding stay out of the model files.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from miaotui import kernels
from miaotui.layers import quant
from miaotui.layers.device import on_gpu


def concat_rows(parts: list):
    """One QuantWeight for row-stacked parts (q, k, v): merged when their layouts agree,
    else kept side by side (a Q4_K_M file may store v as Q6_K and q, k as Q4_K)."""
    if len(parts) == 1:
        return parts[0]
    a = parts[0]
    same = all(type(p) is type(a) and p.block_size == a.block_size and p.in_features == a.in_features
               and p.scale.dtype == a.scale.dtype and (p.min is None) == (a.min is None) for p in parts)
    if not same:
        return RowStack(parts)
    cat = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
    return type(a)(cat([p.q for p in parts]), cat([p.scale for p in parts]),
                   cat([p.min for p in parts]), a.block_size, a.in_features)


class RowStack:
    """Quantized parts of different formats computed one after the other."""

    def __init__(self, parts: list):
        self.parts = parts
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.matmul(x) for p in self.parts], dim=-1)

    def dequantize(self) -> torch.Tensor:
        return torch.cat([p.dequantize() for p in self.parts])

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.parts)


HALF = (torch.float16, torch.bfloat16)


class Linear(nn.Module):
    keep_16bit = False  # set by build_model: float16 / bfloat16 weights stay 16-bit

    def __init__(self, in_features: int, out_features: int | list[int], bias: bool = False):
        super().__init__()
        self.output_sizes = list(out_features) if isinstance(out_features, (list, tuple)) else [out_features]
        self.in_features = in_features
        self.out_features = sum(self.output_sizes)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False) if bias else None
        self.qweight = None  # a miaotui.layers.quant.QuantWeight once quantized
        self._raw_parts: dict[int, object] = {}
        self._loaded: set[int] = set()
        # tensor parallel (miaotui/distributed/tp.py): the checkpoint rows of each logical
        # shard this rank keeps (column parallel), or its input columns (row parallel), and
        # what joins the ranks' outputs (all-reduce, all-gather); None: the whole weight
        self.tp_rows: list[list[tuple[int, int]]] | None = None
        self.tp_cols: tuple[int, int] | None = None
        self.tp_out = None

    def _tp_slice(self, w: torch.Tensor, shard: int, cols: bool = True) -> torch.Tensor:
        if self.tp_rows is not None:
            w = torch.cat([w[a:b] for a, b in self.tp_rows[shard]])
        if cols and self.tp_cols is not None:
            w = w[:, self.tp_cols[0]:self.tp_cols[1]]
        return w

    def _rows(self, shard: int) -> slice:
        start = sum(self.output_sizes[:shard])
        return slice(start, start + self.output_sizes[shard])

    def load(self, w: torch.Tensor, shard: int = 0) -> None:
        rows = self._rows(shard)
        w = self._tp_slice(w, shard)
        if tuple(w.shape) != (rows.stop - rows.start, self.in_features):
            raise ValueError(f"weight shape {tuple(w.shape)} != {(rows.stop - rows.start, self.in_features)}")
        if self.keep_16bit and w.dtype in HALF and self.weight.dtype != w.dtype and not self._loaded:
            self.weight.data = torch.empty(self.weight.shape, dtype=w.dtype)  # the first shard decides
        elif self.weight.dtype in HALF and w.dtype != self.weight.dtype:   # shards stored differently
            self.weight.data = self.weight.data.float()
        self.weight.data[rows] = w.to(self.weight.dtype)
        self._loaded.add(shard)

    def load_bias(self, b: torch.Tensor, shard: int = 0) -> None:
        self.bias.data[self._rows(shard)] = self._tp_slice(b, shard, cols=False).to(self.bias.dtype)

    def load_raw(self, raw, shard: int = 0) -> None:
        """Keep a GGUF-quantized shard quantized: repacked now into memory of its own (the
        raw data may be a view of the file's map, released after this call); the shards are
        merged in `finish_raw`."""
        from miaotui.layers.quant import from_gguf
        release = getattr(raw, "release", None)   # repack a chunk at a time, releasing the file's pages
        if self.tp_rows is not None or self.tp_cols is not None:   # tensor parallel: this rank's part
            from miaotui.distributed.tp import slice_raw
            raw, release = slice_raw(raw, None if self.tp_rows is None else self.tp_rows[shard], self.tp_cols), None
        self._raw_parts[shard] = from_gguf(raw.data, raw.qtype, raw.shape, release)
        if len(self._raw_parts) == len(self.output_sizes):   # merge now, while less is resident
            self.finish_raw()

    def finish_raw(self) -> None:
        if not self._raw_parts:
            return
        parts = [self._raw_parts[i] for i in range(len(self.output_sizes))]
        self._raw_parts = {}
        self.qweight = concat_rows(parts)
        self.weight = None

    def quantize(self, method: str, group_size: int = 32) -> None:
        if self.qweight is not None or self.weight is None:
            return
        w = self.weight.data.float()
        if method == "int8":
            self.qweight = quant.quantize_int8(w)
        elif method == "int4":
            # asymmetric (scale + min per group): on SmolLM2, +19% perplexity symmetric, see README
            self.qweight = quant.quantize_int4(w, group_size=group_size, symmetric=False)
        else:
            raise ValueError(f"unknown quantization {method!r}")
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._forward(x)
        return y if self.tp_out is None else self.tp_out(y)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            y = self.qweight.matmul(x)
            return y if self.bias is None else y.add_(self.bias)
        if on_gpu(x):   # cuBLAS (weights in the compute dtype: engine/gpu_runner.py moved them)
            return F.linear(x, self.weight, self.bias)
        k = kernels.load()
        if (k is not None and x.dtype == torch.float32 and x.device.type == "cpu"
                and self.weight.dtype in (torch.float32, *HALF)):
            # batch-invariant: a row's result never depends on the other rows (BLAS's may);
            # 16-bit weights are widened in the kernel (tiles, or the GEMM's packed panels),
            # with float32 arithmetic; prompt tokens take the packed GEMM
            mm = k.f32_gemm if quant.exact_mode() else k.f32_matmul
            y = mm(x.reshape(-1, self.in_features).contiguous(), self.weight)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y.add_(self.bias)
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return F.linear(x, w, self.bias)
