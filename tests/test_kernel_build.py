"""How the C++ kernels get built: at install (setup.py), else once on first use, with a lock
that a killed build cannot leave stuck, and never a prebuilt module older than its sources."""
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from miaotui import kernels
from miaotui.kernels import _build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_kwargs(monkeypatch, block_torch=False):
    import setuptools
    seen = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    if block_torch:
        for name in [m for m in sys.modules if m == "torch" or m.startswith("torch.")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, "torch", None)     # import torch -> ImportError
    monkeypatch.delenv("MIAOTUI_NO_KERNELS", raising=False)
    runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")
    return seen


def test_setup_builds_every_cpp_with_the_runtime_flags(monkeypatch):
    kw = _setup_kwargs(monkeypatch)
    (ext,) = kw["ext_modules"]
    assert ext.name == "miaotui._kernels"
    cpps = sorted(os.path.relpath(p, ROOT) for p in _build.sources())
    assert sorted(ext.sources) == cpps and len(cpps) >= 2
    assert all(f in ext.extra_compile_args for f in _build.CFLAGS)
    assert set(ext.depends) == {os.path.relpath(p, ROOT) for p in _build.headers()}


def test_setup_without_torch_still_installs(monkeypatch, capsys):
    kw = _setup_kwargs(monkeypatch, block_torch=True)
    assert "ext_modules" not in kw
    assert "compiled on first use" in capsys.readouterr().err


def test_stale_prebuilt_module_is_not_used(monkeypatch, tmp_path):
    """An editable checkout whose .cpp changed after `pip install -e .` must not run the old
    kernels: the stamp's hash no longer matches, so load() compiles instead."""
    src = tmp_path / "kernels"
    shutil.copytree(_build.DIR, src, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    before = _build.sources_hash(str(src))
    with open(src / "quant_cpu.cpp", "a") as f:
        f.write("\n// changed\n")
    assert _build.sources_hash(str(src)) != before
    (src / "new_kernel.cpp").write_text("// a file the lead adds\n")
    assert str(src / "new_kernel.cpp") in _build.sources(str(src))

    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "_kernels.so").write_text("")
    spec = type("Spec", (), {"origin": str(pkg / "_kernels.so")})()
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: spec)
    _build.write_stamp(str(pkg), torch.__version__, str(src))          # built from other sources
    mod, why = kernels.prebuilt()
    assert mod is None and "sources changed" in why
    _build.write_stamp(str(pkg), "0.0.1")                               # other torch
    mod, why = kernels.prebuilt()
    assert mod is None and "torch 0.0.1" in why


def test_cache_key_covers_interpreter_and_torch_location(monkeypatch):
    key = kernels.cache_key()
    monkeypatch.setattr(sys, "executable", "/other/venv/bin/python")
    assert kernels.cache_key() != key


def test_lock_of_a_dead_owner_is_free(tmp_path):
    """A build killed while holding the lock leaves the file (with its PID) but no lock."""
    path = str(tmp_path / "k.lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]);"
         "from miaotui.kernels import BuildLock; l = BuildLock(sys.argv[2]).__enter__();"
         "print('held', flush=True); import time; time.sleep(600)", ROOT, path],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert open(path).read().strip() == str(holder.pid)
    holder.kill()
    holder.wait()
    t0 = time.monotonic()
    with kernels.BuildLock(path):
        assert open(path).read().strip() == str(os.getpid())
    assert time.monotonic() - t0 < 5


# One function behind torch's extension header: a real compile through the same jit() (its
# lock, its restart, torch.utils.cpp_extension) of ~20 s rather than the kernels' 1-3 minutes
# (which the install compiles with the same flags: test_setup_builds_every_cpp_with_the_runtime_flags).
TINY_SOURCE = """#include <torch/extension.h>
int64_t answer() { return 42; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", &answer); }
"""


@pytest.mark.skipif(not kernels._cpu_supported() or kernels.disabled(),
                    reason="kernels are off or the CPU lacks AVX2/FMA/F16C")
def test_killed_compile_does_not_block_the_next_run(tmp_path):
    """Kill a first-use compile midway (as Ctrl-C or a timeout would); the next run must
    announce its compile, finish it and load the module. The sources are a one-function
    file (TINY_SOURCE) in place of the kernels'; everything else is the real first-use path."""
    src, cache = tmp_path / "tiny.cpp", tmp_path / "cache"
    src.write_text(TINY_SOURCE)
    env = {**os.environ, "MIAOTUI_KERNEL_CACHE": str(cache), "MIAOTUI_KERNEL_JIT": "1",
           "PYTHONPATH": ROOT}
    code = ("import sys; from miaotui.kernels import _build; "
            "_build.sources = lambda directory=_build.DIR: [sys.argv[1]]; "
            "from miaotui import kernels; print('loaded', kernels.load().answer())")
    cmd = [sys.executable, "-c", code, str(src)]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    line = first.stderr.readline()
    assert "compiling kernels (one time" in line, line
    time.sleep(3)                               # the compiler is running now
    assert first.poll() is None
    os.killpg(first.pid, signal.SIGKILL)        # the process and its compiler children
    first.wait()
    (lock,) = [p for p in os.listdir(cache) if p.endswith(".lock")]
    assert open(cache / lock).read().strip() == str(first.pid)   # left behind, owner dead

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr
    assert "loaded 42" in second.stdout
    assert "compiling kernels (one time" in second.stderr
    assert "waiting for process" not in second.stderr
    third = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert "loaded 42" in third.stdout and "compiling" not in third.stderr   # cached now


def test_ab_script_loads_its_base_build_as_a_second_module(tmp_path):
    """scripts/ab_kernel_modules.py times two builds in one process: its base must be the
    file it names, not the checkout's build again (Python keeps one extension module per
    name, which once made every A/B compare a build with itself)."""
    head = kernels.load()
    if head is None:
        pytest.skip("C++ kernels unavailable")
    copy = tmp_path / os.path.basename(head.__file__)
    shutil.copy(head.__file__, copy)
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import ab_kernel_modules
    finally:
        sys.path.pop(0)
    base = ab_kernel_modules.load_module(str(copy))
    assert base is not head and base.__file__ == str(copy)
    x, w = torch.randn(3, 64), torch.randn(16, 64)
    assert torch.equal(base.f32_matmul(x, w), head.f32_matmul(x, w))
