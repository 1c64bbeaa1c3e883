"""C++ CPU kernels, compiled once on first use with torch.utils.cpp_extension.

``load()`` returns the compiled module, or None when the kernels are off
(``MIAOTUI_NO_KERNELS=1``), the CPU lacks AVX2/FMA/F16C, or the build fails (a warning
says why). Callers then take their pure-PyTorch path, so the kernels only ever make
things faster. The build lands in ``~/.cache/miaotui/kernels/<hash>`` (or
``$MIAOTUI_KERNEL_CACHE``), keyed by the sources, flags and torch version: the first
process compiles (about 25 s), later ones load the cached library.
"""
from __future__ import annotations

import functools
import hashlib
import os
import warnings

import torch

_DIR = os.path.dirname(os.path.abspath(__file__))
_SOURCES = ["quant_cpu.cpp", "decode_cpu.cpp", "matmul_cpu.cpp"]
_HEADERS = ["quant_cpu.h"]
# -ffp-contract=off: no multiply+add fusing, so dequantization is bit-exact.
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off"]


def disabled() -> bool:
    return os.environ.get("MIAOTUI_NO_KERNELS", "") not in ("", "0")


def _cpu_supported() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        return {"avx2", "fma", "f16c"} <= set(flags)
    except OSError:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@functools.cache
def load():
    """The compiled kernel module, or None (then use the PyTorch path)."""
    if disabled() or not _cpu_supported():
        return None
    paths = [os.path.join(_DIR, s) for s in _SOURCES]
    h = hashlib.sha256(" ".join(_CFLAGS + [torch.__version__]).encode())
    for p in paths + [os.path.join(_DIR, s) for s in _HEADERS]:
        with open(p, "rb") as f:
            h.update(f.read())
    key = h.hexdigest()[:12]
    cache = os.environ.get("MIAOTUI_KERNEL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "miaotui", "kernels")
    build_dir = os.path.join(cache, key)
    try:
        from torch.utils.cpp_extension import load as cpp_load
        os.makedirs(build_dir, exist_ok=True)
        return cpp_load(name=f"miaotui_quant_{key}", sources=paths, extra_cflags=_CFLAGS,
                        build_directory=build_dir, verbose=False)
    except Exception as e:  # no compiler, no headers, a compile error: fall back
        msg = str(e).strip().splitlines()
        warnings.warn(f"miaotui: C++ kernels unavailable, using the PyTorch path "
                      f"({type(e).__name__}: {msg[-1] if msg else ''})", RuntimeWarning)
        return None
