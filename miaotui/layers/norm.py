"""Normalisation layers. Gemma's (1 + w) RMSNorm is folded into w at load time.

On the GPU path (layers/device.py) RMSNorm is miaotui.kernels.gpu's. With the C++
kernels, float32 rows on CPU go through the fused decode step's own norms
(kernels/decode_cpu.cpp), so both decode paths give the same bits (see activation.py).
"""
import torch
import torch.nn.functional as F
from torch import nn

from miaotui import kernels
from miaotui.layers.device import on_gpu


def _kernels(x: torch.Tensor, w: torch.Tensor):
    if x.dtype != torch.float32 or w.dtype != torch.float32 or x.device.type != "cpu" or w.numel() % 8:
        return None
    return kernels.load()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, weight_offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.weight_offset = weight_offset  # gemma stores w and multiplies by (1 + w)
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def load(self, w: torch.Tensor) -> None:
        self.weight.data = w.float() + self.weight_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if on_gpu(x):   # fp32 statistics, the output in x's dtype
            from miaotui.kernels import gpu
            return gpu.rms_norm(x, self.weight, self.eps)
        k = _kernels(x, self.weight)
        if k is not None:
            return k.rms_norm(x.contiguous(), self.weight, self.eps)
        # the same four ops as transformers (bit-identical); F.rms_norm cost ~50 us a call here
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if on_gpu(x):   # fp32 statistics (the weights stay fp32), the output in x's dtype
            return F.layer_norm(x.float(), self.weight.shape, self.weight, self.bias, self.eps).to(x.dtype)
        k = _kernels(x, self.weight)
        if k is not None and self.bias.dtype == torch.float32:
            return k.layer_norm(x.contiguous(), self.weight, self.bias, self.eps)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
