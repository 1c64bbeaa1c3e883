"""Activations, including the fused gate/up form used by gated MLPs.

With the C++ kernels, float32 activations on CPU run the fused decode step's own code
(kernels/decode_cpu.cpp): a token's activations are then bit-identical on both decode paths,
which matters where they are rounded to int8 next. On the GPU path (layers/device.py) the
gated forms are miaotui.kernels.gpu's. Elsewhere, PyTorch's ops.
"""
import torch
import torch.nn.functional as F

from miaotui import kernels
from miaotui.layers.device import on_gpu

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
# the name the C++ kernels know an activation by (silu: gated only)
KERNEL_NAMES = {"silu": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


class Activation:
    def __init__(self, name: str):
        self.name, self.fn, self.kernel_name = name, ACTIVATIONS[name], KERNEL_NAMES.get(name)

    def _kernels(self, x: torch.Tensor, gated: bool):
        if self.kernel_name is None or (self.kernel_name == "silu" and not gated):
            return None
        if x.dtype != torch.float32 or x.device.type != "cpu":
            return None
        return kernels.load()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if on_gpu(x):
            return self.fn(x)
        k = self._kernels(x, gated=False)
        return self.fn(x) if k is None else k.activation(x.contiguous(), self.kernel_name, False)


def get_activation(name: str) -> Activation:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}")
    return Activation(name)


def gated(act: Activation, gate_up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up for a [T, 2*I] tensor holding gate and up side by side."""
    if on_gpu(gate_up) and act.kernel_name is not None:
        from miaotui.kernels import gpu
        return (gpu.silu_mul if act.kernel_name == "silu" else gpu.gelu_tanh_mul)(gate_up)
    k = act._kernels(gate_up, gated=True)
    if k is not None:
        return k.activation(gate_up.contiguous(), act.kernel_name, True)
    gate, up = gate_up.chunk(2, dim=-1)
    return act.fn(gate).mul_(up)
