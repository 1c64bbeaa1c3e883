"""Activations, including the fused gate/up form used by gated MLPs."""
import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}")
    return ACTIVATIONS[name]


def gated(act, gate_up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up for a [T, 2*I] tensor holding gate and up side by side."""
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate).mul_(up)
