"""llama.cpp (llama-cpp-python) as a baseline, loaded so that the comparison is fair.

Importing miaotui sets OMP_WAIT_POLICY=PASSIVE (see miaotui/__init__.py). llama.cpp's
wheel runs its threads on OpenMP too, and under that policy its decode slows down about
10x (SmolLM2-135M Q4_0: 14 instead of 131 tok/s, measured here). So llama.cpp runs in a
child process (``in_child``) started without the policy (unless the user set it
themselves), and told not to set it when it imports miaotui.
"""
from __future__ import annotations

import importlib.util
import os


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def load(path: str, **kwargs):
    """A llama_cpp.Llama; call it in a process started by ``in_child``."""
    from llama_cpp import Llama
    return Llama(model_path=path, verbose=False, **kwargs)


def in_child(fn, *args):
    """fn(*args) in a fresh process whose OpenMP runtimes start without miaotui's policy."""
    import miaotui
    from miaotui.bench.throughput import in_child as spawn
    saved = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "MIAOTUI_NO_OMP_POLICY")}
    if miaotui.SET_OMP_WAIT_POLICY:
        os.environ.pop("OMP_WAIT_POLICY", None)
    os.environ["MIAOTUI_NO_OMP_POLICY"] = "1"
    try:
        return spawn(fn, *args)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
