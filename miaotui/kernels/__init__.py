"""C++ CPU kernels: built when the package is installed, compiled on first use only as a
fallback.

``load()`` returns the kernel module, or None when the kernels are off
(``MIAOTUI_NO_KERNELS=1``), the CPU lacks AVX2/FMA/F16C, or no module can be had (a
warning says why). Callers then take their pure-PyTorch path, so the kernels only ever
make things faster.

1. ``pip install`` builds ``miaotui._kernels`` (setup.py) and records beside it a hash of the
   sources and flags it was built from. That module is used when the hash still matches the
   sources here and torch is the version it was built against.
2. Otherwise (an editable checkout whose .cpp files changed, an install without a compiler
   at hand, ``MIAOTUI_KERNEL_JIT=1``) the kernels are compiled once with
   torch.utils.cpp_extension into ``~/.cache/miaotui/kernels/<key>`` (or
   ``$MIAOTUI_KERNEL_CACHE``), announced on stderr. The key covers the sources, flags, this
   checkout, the interpreter and torch's version and location, so venvs and checkouts never
   overwrite each other's builds. Concurrent processes serialise on an flock()ed lock file
   holding the owner's PID: the kernel drops the lock when its owner dies, so a build killed
   midway (Ctrl-C, a timeout) never blocks later runs; the next one discards the
   half-finished build and compiles again.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
import shutil
import sys
import time
import warnings

import torch

from miaotui.kernels import _build

_DIR = _build.DIR
_CFLAGS = _build.CFLAGS
_DONE = "miaotui_built"          # written into a JIT build folder once the build succeeded


def disabled() -> bool:
    return os.environ.get("MIAOTUI_NO_KERNELS", "") not in ("", "0")


def _force_jit() -> bool:
    return os.environ.get("MIAOTUI_KERNEL_JIT", "") not in ("", "0")


def _cpu_supported() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        return {"avx2", "fma", "f16c"} <= set(flags)
    except OSError:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _say(msg: str) -> None:
    print(f"miaotui: {msg}", file=sys.stderr, flush=True)


def prebuilt():
    """(module, "") when the installed miaotui._kernels matches these sources, else
    (None, why not)."""
    spec = importlib.util.find_spec(_build.MODULE)
    if spec is None or not spec.origin:
        return None, "no prebuilt kernel module"
    stamp = _build.read_stamp(os.path.dirname(spec.origin))
    if stamp.get("sources") != _build.sources_hash():
        return None, "the kernel sources changed since the installed build"
    if stamp.get("torch") != torch.__version__:
        return None, f"the kernels were built for torch {stamp.get('torch')}, not {torch.__version__}"
    try:
        return importlib.import_module(_build.MODULE), ""
    except ImportError as e:
        return None, f"the prebuilt kernels do not load ({e})"


def cache_key() -> str:
    """Sources and flags, this checkout, the interpreter, torch's version and location."""
    h = hashlib.sha256("\0".join([
        _build.sources_hash(), _DIR, sys.executable, sys.version, torch.__version__,
        os.path.dirname(torch.__file__)]).encode())
    return h.hexdigest()[:16]


def cache_dir() -> str:
    return os.environ.get("MIAOTUI_KERNEL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "miaotui", "kernels")


class BuildLock:
    """An exclusive flock() on `path`, which holds the owner's PID for the messages. The
    kernel releases an flock when its process dies, so a dead owner never blocks anyone."""

    def __init__(self, path: str):
        self.path, self.fd = path, None

    def owner(self) -> str:
        try:
            with open(self.path) as f:
                return f.read().strip() or "?"
        except OSError:
            return "?"

    def __enter__(self):
        import fcntl
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for process {self.owner()}, which is compiling the kernels...")
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def __exit__(self, *exc):
        import fcntl
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _import_so(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def jit(why: str = ""):
    """Compile (once per cache key) and load the kernels with torch.utils.cpp_extension."""
    key = cache_key()
    name = f"miaotui_kernels_{key}"
    build_dir = os.path.join(cache_dir(), key)
    so = os.path.join(build_dir, f"{name}.so")
    done = os.path.join(build_dir, _DONE)
    if os.path.exists(done) and os.path.exists(so):
        return _import_so(name, so)
    os.makedirs(build_dir, exist_ok=True)
    with BuildLock(build_dir + ".lock"):
        if os.path.exists(done) and os.path.exists(so):   # built while we waited
            return _import_so(name, so)
        if os.listdir(build_dir):    # what a killed build left (torch's lock included): start over
            shutil.rmtree(build_dir)
            os.makedirs(build_dir)
        from torch.utils.cpp_extension import load as cpp_load
        _say(f"compiling kernels (one time, 1-3 minutes){f'; {why}' if why else ''}...")
        t0 = time.perf_counter()
        mod = cpp_load(name=name, sources=_build.sources(), extra_cflags=_CFLAGS,
                       build_directory=build_dir, verbose=False)
        with open(done, "w") as f:
            f.write(f"{time.perf_counter() - t0:.1f}\n")
        _say(f"kernels compiled in {time.perf_counter() - t0:.0f} s (cached in {build_dir})")
        return mod


@functools.cache
def load():
    """The compiled kernel module, or None (then use the PyTorch path)."""
    if disabled() or not _cpu_supported():
        return None
    why = "MIAOTUI_KERNEL_JIT is set"
    if not _force_jit():
        mod, why = prebuilt()
        if mod is not None:
            return mod
    try:
        return jit(why)
    except Exception as e:  # no compiler, no headers, a compile error: fall back
        msg = str(e).strip().splitlines()
        warnings.warn(f"miaotui: C++ kernels unavailable, using the PyTorch path "
                      f"({type(e).__name__}: {msg[-1] if msg else ''})", RuntimeWarning)
        return None
