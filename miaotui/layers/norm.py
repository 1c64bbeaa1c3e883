"""Normalisation layers. Gemma's (1 + w) RMSNorm is folded into w at load time."""
import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, weight_offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.weight_offset = weight_offset  # gemma stores w and multiplies by (1 + w)
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def load(self, w: torch.Tensor) -> None:
        self.weight.data = w.float() + self.weight_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the same four ops as transformers (bit-identical); F.rms_norm cost ~50 us a call here
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
