"""Builds the C++ CPU kernels (miaotui/kernels/*.cpp) into miaotui._kernels at install time.

Everything else about the package is in pyproject.toml. torch must be importable while
building, and pip must not fetch it into an isolated build environment (that would be a
multi-GB CUDA build), so install with the torch you already have:

    pip install --no-build-isolation .        (or -e . for a checkout; scripts/install.sh does this)

Without torch at build time, without a C++ compiler, or when the compile fails, the install
still succeeds without the module (a warning says so) and miaotui compiles the kernels on
first use instead (miaotui/kernels/__init__.py). MIAOTUI_NO_KERNELS=1 skips the build.
"""
import importlib.util
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _build_info():
    """miaotui/kernels/_build.py, loaded by path (the package itself is not importable yet)."""
    spec = importlib.util.spec_from_file_location(
        "_miaotui_kernels_build", os.path.join(HERE, "miaotui", "kernels", "_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _warn(msg: str) -> None:
    print(f"WARNING miaotui: {msg}; the kernels will be compiled on first use instead",
          file=sys.stderr, flush=True)


def kernel_extension() -> dict:
    if os.environ.get("MIAOTUI_NO_KERNELS", "") not in ("", "0"):
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        _warn("torch is not importable while building (install torch first, then "
              "pip install --no-build-isolation)")
        return {}
    info = _build_info()

    class OptionalBuildExt(BuildExtension):
        """Never fails the install: a missing compiler or a compile error only warns. After
        a build, records what it was built from beside the module (the runtime checks it)."""

        built = False

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001  (no compiler found, ...)
                _warn(f"C++ kernels not built ({type(e).__name__}: {e})")
                return
            if self.built and self.inplace:   # editable install: the module was copied here
                info.write_stamp(os.path.join(HERE, "miaotui"), torch.__version__)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001  (compile or link error)
                _warn(f"C++ kernels not built ({type(e).__name__}: {str(e).strip()[-300:]})")
                return
            info.write_stamp(os.path.dirname(self.get_ext_fullpath(ext.name)), torch.__version__)
            self.built = True

    sources = [os.path.relpath(p, HERE) for p in info.sources()]
    ext = CppExtension(info.MODULE, sources, extra_compile_args=info.CFLAGS,
                       depends=[os.path.relpath(p, HERE) for p in info.headers()])
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExt}}


setup(**kernel_extension())
