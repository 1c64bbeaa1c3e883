"""Which path the layers take: the CPU one (C++ kernels, float32 activations) or the GPU
one (``miaotui.kernels.gpu``: Triton kernels or their PyTorch references, activations in
the model's compute dtype).

The GPU runner (engine/gpu_runner.py) runs its forward passes inside ``gpu_path(dtype)``;
a layer whose input is on CUDA takes the GPU path too. Outside that block a CPU tensor
takes the CPU path as before: the test mode that runs the GPU path on CPU (Triton's
interpreter) is switched on per forward pass, so other engines in the process are
untouched. The check is one thread-local read per layer call.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

_mode = threading.local()


@contextmanager
def gpu_path(dtype: torch.dtype):
    """Within this block the layers take the GPU path, activations in ``dtype``."""
    prev = getattr(_mode, "dtype", None)
    _mode.dtype = dtype
    try:
        yield
    finally:
        _mode.dtype = prev


def on_gpu(x: torch.Tensor) -> bool:
    """True when ``x`` goes through the GPU path (on CUDA, or inside gpu_path())."""
    return x.is_cuda or getattr(_mode, "dtype", None) is not None


def act_dtype(x: torch.Tensor) -> torch.dtype:
    """The activation dtype for a tensor entering the model: float32 on the CPU path (as
    before), the compute dtype on the GPU path."""
    d = getattr(_mode, "dtype", None)
    return d if d is not None else (x.dtype if x.is_cuda and x.is_floating_point() else torch.float32)
