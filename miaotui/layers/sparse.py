"""2:4 sparse weights stored compressed: half the values plus 2-bit positions.

A weight with at most 2 nonzeros in every 4 consecutive inputs of a row (what
``miaotui prune --pattern 2:4`` writes) is kept as

  vals  [out, in/2]  the kept values, float32, or int8 with one float32 scale per row
                     (the same per-row scheme as ``quant.quantize_int8``)
  idx   [out, in/8]  uint8, the two positions (0..3) of each group of 4, 2 bits each;
                     byte b holds groups 2b (low nibble) and 2b + 1 (high nibble)

so a matmul reads 2.125 bytes per weight instead of 4 (float32), 0.625 instead of 1 (int8).
``matmul`` runs kernels/sparse_cpu.cpp for generated tokens (AVX2, batch-invariant,
float32 activations); prompt tokens (``quant.exact_activations()``, many rows at a time)
expand the weight and take the dense batch-invariant kernel; without kernels the expanded
weight goes through PyTorch. The fused decode step (engine/cpu_decoder.py) takes these weights too.

Models loaded from a checkpoint whose config.json says ``"pruning": {"pattern": "2:4"}``
get such weights for every eligible layer (``MIAOTUI_SPARSE=0`` keeps them dense).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from miaotui import kernels
from miaotui.layers import quant


def enabled() -> bool:
    return os.environ.get("MIAOTUI_SPARSE", "1") not in ("0", "")


def is_24(w: torch.Tensor) -> bool:
    """At most 2 nonzeros in every 4 consecutive inputs of each row."""
    n, k = w.shape
    return k % 4 == 0 and bool(((w != 0).view(n, k // 4, 4).sum(-1) <= 2).all())


class Sparse24Weight:
    """A 2:4 sparse [out_features, in_features] weight; see the module docstring."""

    def __init__(self, vals: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor | None):
        self.vals, self.idx = vals.contiguous(), idx.contiguous()
        self.scale = None if scale is None else scale.float().contiguous()
        self.out_features, self.in_features = vals.shape[0], vals.shape[1] * 2
        if (idx.dtype != torch.uint8 or tuple(idx.shape) != (self.out_features, self.in_features // 8)
                or (vals.dtype == torch.int8) != (scale is not None) or self.in_features % 16):
            raise ValueError(f"inconsistent 2:4 weight: vals {tuple(vals.shape)} {vals.dtype}, "
                             f"idx {tuple(idx.shape)} {idx.dtype}")

    @classmethod
    def from_dense(cls, w: torch.Tensor, int8: bool = False) -> Sparse24Weight:
        """Pack a float [out, in] weight that is 2:4 sparse (in a multiple of 16)."""
        w = w.float()
        n, k = w.shape
        if k % 16 or not is_24(w):
            raise ValueError(f"weight {tuple(w.shape)} is not 2:4 sparse with in_features % 16 == 0")
        g = w.view(n, k // 4, 4)
        # the nonzero positions first, then the lowest positions; kept in increasing order
        key = (g != 0).float() * 4 - torch.arange(4, dtype=torch.float32)
        pos = key.topk(2, dim=-1).indices.sort(-1).values
        vals = g.gather(-1, pos).reshape(n, k // 2)
        nib = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.uint8)          # [n, k/4]
        idx = nib[:, 0::2] | (nib[:, 1::2] << 4)
        scale = None
        if int8:
            scale = vals.abs().amax(dim=1) / 127.0
            safe = torch.where(scale > 0, scale, 1.0)
            vals = (vals / safe[:, None]).round().clamp(-127, 127).to(torch.int8)
        return cls(vals, idx, scale)

    def __repr__(self) -> str:
        return f"Sparse24Weight({self.out_features}x{self.in_features}, {self.vals.dtype})"

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.vals, self.idx, self.scale) if t is not None)

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 [out_features, in_features]."""
        n, k = self.out_features, self.in_features
        nib = torch.stack((self.idx & 15, self.idx >> 4), dim=-1).view(n, k // 4)
        pos = torch.stack((nib & 3, nib >> 2), dim=-1).long()               # [n, k/4, 2]
        v = self.vals.float()
        if self.scale is not None:
            v = v * self.scale[:, None]
        w = torch.zeros(n, k // 4, 4)
        w.scatter_(-1, pos, v.view(n, k // 4, 2))
        return w.view(n, k)

    def _kernel_args(self):
        return self.vals, self.idx, self.scale

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> float32 [..., out_features]."""
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features).float().contiguous()
        k = kernels.load()
        if k is None:
            y = F.linear(x, self.dequantize())
        elif getattr(quant._mode, "exact", False):
            # prompt tokens: many rows, where re-reading the compressed rows per tile of x
            # costs more than expanding them once; the dense kernel is batch-invariant too
            y = k.f32_matmul(x, self.dequantize())
        else:
            y = k.sparse24_matmul(x, *self._kernel_args())
        return y.view(*lead, self.out_features)


def sparsify(model, int8: bool = False) -> int:
    """Store every 2:4-sparse float linear layer of the model (not the output head)
    compressed; returns how many were."""
    from miaotui.layers.linear import Linear
    count = 0
    for m in model.modules():
        if (isinstance(m, Linear) and m is not getattr(model, "lm_head", None) and m.qweight is None
                and m.weight is not None and m.in_features % 16 == 0 and is_24(m.weight.data)):
            m.qweight = Sparse24Weight.from_dense(m.weight.data, int8)
            m.weight = None
            count += 1
    return count
