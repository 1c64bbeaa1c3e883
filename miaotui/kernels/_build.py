"""What the kernels are built from: sources, flags and their hash. Shared by setup.py (which
loads this file by path, before miaotui is importable) and the runtime loader, so the two
can never disagree on whether a prebuilt module matches the sources. No torch import here.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os

DIR = os.path.dirname(os.path.abspath(__file__))
# -ffp-contract=off: no multiply+add fusing, so dequantization is bit-exact.
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off"]
MODULE = "miaotui._kernels"          # the extension pip builds (setup.py)
STAMP = "_kernels.json"              # beside the built module: what it was built from


def sources(directory: str = DIR) -> list[str]:
    """Every .cpp in the kernels folder (new files are picked up without a list to edit)."""
    return sorted(glob.glob(os.path.join(directory, "*.cpp")))


def headers(directory: str = DIR) -> list[str]:
    return sorted(glob.glob(os.path.join(directory, "*.h")))


def sources_hash(directory: str = DIR) -> str:
    """sha256 of the flags and of each source and header (name and content)."""
    h = hashlib.sha256(" ".join(CFLAGS).encode())
    for path in sources(directory) + headers(directory):
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def write_stamp(module_dir: str, torch_version: str, directory: str = DIR) -> str:
    """Record beside a freshly built module what it was built from."""
    path = os.path.join(module_dir, STAMP)
    with open(path, "w") as f:
        json.dump({"sources": sources_hash(directory), "torch": torch_version}, f)
    return path


def read_stamp(module_dir: str) -> dict:
    try:
        with open(os.path.join(module_dir, STAMP)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}
