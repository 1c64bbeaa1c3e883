"""llama.cpp (llama-cpp-python) as a baseline, loaded so that the comparison is fair.

Importing miaotui sets OMP_WAIT_POLICY=PASSIVE (see miaotui/__init__.py). llama.cpp's
wheel runs its threads on OpenMP too, and under that policy its decode slows down about
10x (SmolLM2-135M Q4_0: 14 instead of 131 tok/s, measured here). So llama.cpp runs in a
child process (``bench.throughput.in_child``) that drops the policy before loading llama.cpp's library,
unless the user set the policy themselves.
"""
from __future__ import annotations

import importlib.util
import os


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def load(path: str, **kwargs):
    """A llama_cpp.Llama, its OpenMP runtime started without miaotui's wait policy."""
    if os.environ.get("MIAOTUI_SET_OMP_WAIT_POLICY") == "1":
        os.environ.pop("OMP_WAIT_POLICY", None)
    from llama_cpp import Llama
    return Llama(model_path=path, verbose=False, **kwargs)

