"""Linear layers' weight formats: float16 and bfloat16 weights kept 16-bit (dtype "auto"),
computed in float32 by widening them on the fly."""
import copy

import pytest
import torch

from miaotui import LLM, SamplingParams
from miaotui import kernels
from miaotui.layers.linear import Linear
from util import make_tiny_model, write_tiny_tokenizer

pytestmark = pytest.mark.skipif(kernels.load() is None, reason="C++ kernels unavailable")

PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
PROMPTS = [[(5 * i + 3 * j) % 250 + 3 for j in range(n)] for i, n in enumerate([3, 17, 40])]


def weight_bytes(model) -> int:
    """Bytes of the matrices (embeddings, linear weights), each storage counted once."""
    seen = {}
    for p in model.parameters():
        if p.dim() == 2:
            seen[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    return sum(seen.values())


def outputs(path, **kwargs):
    llm = LLM(str(path), kv_cache_memory=8 << 20, **kwargs)
    outs = llm.generate(PROMPTS, PARAMS)
    return llm, [(o.outputs[0].token_ids, [lp.logprob for lp in o.outputs[0].logprobs]) for o in outs]


def save_pair(model, dtype, tmp_path, gguf_type=None):
    """The model's weights rounded to `dtype`, saved as 16-bit and as float32 holding the
    same values (safetensors, or GGUF of that type and F32)."""
    half = copy.deepcopy(model).to(dtype)
    rounded = copy.deepcopy(half).float()
    paths = []
    for m, name in ((half, "h16"), (rounded, "f32")):
        if gguf_type:
            from gguf_writer_util import write_gguf_from_hf
            paths.append(write_gguf_from_hf(m, str(tmp_path / f"{name}.gguf"), gguf_type if name == "h16" else "F32"))
        else:
            m.save_pretrained(tmp_path / name, safe_serialization=True)
            write_tiny_tokenizer(str(tmp_path / name))
            paths.append(tmp_path / name)
    return paths


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "pytorch"])
def test_16bit_checkpoint_stays_16bit(tmp_path, monkeypatch, family, dtype, fused):
    """A 16-bit checkpoint keeps its weights 16-bit (half the bytes) and computes exactly what
    float32 weights of the same values compute: same tokens, same log-prob bits, on the
    fused decode step and on the PyTorch path."""
    monkeypatch.setenv("MIAOTUI_FUSED_DECODE", "1" if fused else "0")
    h16, f32 = save_pair(make_tiny_model(family, str(tmp_path / "src")), dtype, tmp_path)
    half, got = outputs(h16)
    full, want = outputs(f32)
    assert (half.engine.runner.decoder is not None) == fused
    linears = [m for m in half.engine.model.modules() if isinstance(m, Linear)]
    assert all(m.weight.dtype == dtype for m in linears)
    assert 2 * weight_bytes(half.engine.model) == weight_bytes(full.engine.model)
    assert got == want
    # dtype="float32" converts, as before
    as_f32, _ = outputs(h16, dtype="float32")
    assert weight_bytes(as_f32.engine.model) == weight_bytes(full.engine.model)


@pytest.mark.parametrize("gguf_type,dtype", [("F16", torch.float16), ("BF16", torch.bfloat16)])
def test_16bit_gguf_stays_16bit(tmp_path, gguf_type, dtype):
    h16, f32 = save_pair(make_tiny_model("llama", str(tmp_path / "src")), dtype, tmp_path, gguf_type)
    half, got = outputs(h16)
    full, want = outputs(f32)
    assert half.engine.runner.decoder is not None
    assert all(m.weight.dtype == dtype for m in half.engine.model.modules() if isinstance(m, Linear))
    # the linear weights (an untied GGUF embedding may be read from the file, not held)
    lin_bytes = lambda m: sum(x.weight.numel() * x.weight.element_size() for x in m.modules() if isinstance(x, Linear))
    assert 2 * lin_bytes(half.engine.model) == lin_bytes(full.engine.model)
    assert got == want
