"""`miaotui quantize`: a saved quantized checkpoint loads and runs like quantizing at load."""
import os

import pytest

from miaotui import LLM, SamplingParams
from miaotui.cli import main
from util import make_tiny_model

P = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPT = [[5, 6, 7, 8, 9, 40, 41]]


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantize_roundtrip(tmp_path, method):
    src, out = str(tmp_path / "src"), str(tmp_path / "q")
    make_tiny_model("qwen2", src)
    assert main(["quantize", src, out, "--method", method]) == 0
    assert os.path.getsize(os.path.join(out, "model.safetensors")) < os.path.getsize(
        os.path.join(src, "model.safetensors"))
    at_load = LLM(src, quantization=method, kv_cache_memory=8 << 20).generate(PROMPT, P)
    saved = LLM(out, kv_cache_memory=8 << 20).generate(PROMPT, P)
    assert saved[0].outputs[0].token_ids == at_load[0].outputs[0].token_ids


def test_quantize_rejects_gguf_and_bad_paths(tmp_path, capsys):
    assert main(["quantize", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err


def test_gptq_int4_beats_rounding_on_calibrated_outputs():
    """On inputs like the calibration ones (correlated features), GPTQ's layer outputs
    are closer to the float layer's than round-to-nearest int4's."""
    import torch

    from miaotui.layers import quant
    from miaotui.optimize.gptq import gptq_int4
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    mix = torch.randn(128, 128) * 0.3 + torch.eye(128)
    x = torch.randn(2048, 128) @ mix
    h = (x.t() @ x).double()
    xt = torch.randn(512, 128) @ mix                  # held-out inputs, same distribution
    ref = xt @ w.t()
    rtn = xt @ quant.quantize_int4(w, 32, symmetric=False).dequantize().t()
    g = gptq_int4(w, h, 32)
    assert isinstance(g, quant.Int4Weight) and g.nbytes() == quant.quantize_int4(w, 32, symmetric=False).nbytes()
    gq = xt @ g.dequantize().t()
    assert (gq - ref).pow(2).mean() < 0.8 * (rtn - ref).pow(2).mean()


def test_quantize_gptq_cli(tmp_path, capsys):
    src, out = str(tmp_path / "src"), str(tmp_path / "q")
    make_tiny_model("qwen2", src)
    assert main(["quantize", src, out, "--method", "gptq"]) == 2          # no calibration text
    assert "--calib" in capsys.readouterr().err
    calib = os.path.join(os.path.dirname(__file__), "data", "shakespeare_40k.txt")
    assert main(["quantize", src, out, "--method", "gptq", "--calib", calib]) == 0
    llm = LLM(out, kv_cache_memory=8 << 20)
    assert type(llm.engine.model.layers[0].mlp.down_proj.qweight).__name__ == "Int4Weight"
    assert len(llm.generate(PROMPT, P)[0].outputs[0].token_ids) == 16
