"""Pruning (optimize/prune.py): masks, reconstruction error, structured checkpoints against
transformers, the CLI."""
import json
import os

import pytest
import torch

from miaotui import LLM
from miaotui.cli import main
from miaotui.optimize.prune import (magnitude_prune, mask_from_scores, prune_model_dir,
                                    sparsegpt_prune, wanda_prune)
from test_models import PROMPT, engine_logits
from util import hf_logits, make_tiny_model

DATA = os.path.join(os.path.dirname(__file__), "data", "shakespeare_40k.txt")


def layer_problem(seed=0, n=64, k=128, tokens=512):
    """A weight and inputs whose columns differ in scale and are correlated (as activations)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    mix = torch.randn(k, k, generator=g) * 0.3 + torch.eye(k)
    scales = torch.exp(torch.randn(k, generator=g))
    x = (torch.randn(tokens, k, generator=g) @ mix) * scales
    return w, x, (x.double().t() @ x.double())


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_unstructured_sparsity_exact(sparsity):
    w, x, h = layer_problem()
    for pruned in (magnitude_prune(w, sparsity), sparsegpt_prune(w, h, sparsity)):
        assert int((pruned == 0).sum()) == round(sparsity * w.numel())   # whole matrix / block
    per_row = (wanda_prune(w, h, sparsity) == 0).sum(1)   # Wanda compares within each row
    assert (per_row == round(sparsity * w.shape[1])).all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_pattern_exact(n, m):
    w, x, h = layer_problem()
    for pruned in (magnitude_prune(w, pattern=(n, m)), wanda_prune(w, h, pattern=(n, m)),
                   sparsegpt_prune(w, h, pattern=(n, m))):
        nonzero = (pruned != 0).view(w.shape[0], -1, m).sum(-1)
        assert (nonzero == n).all()


def test_magnitude_keeps_largest():
    w = torch.tensor([[1.0, -4.0, 0.5, 3.0], [-0.1, 0.2, 5.0, -6.0]])
    assert magnitude_prune(w, pattern=(2, 4)).tolist() == [[0, -4.0, 0, 3.0], [0, 0, 5.0, -6.0]]
    keep = mask_from_scores(w.abs(), 0.25, per_row=False)
    assert keep.tolist() == [[True, True, True, True], [False, False, True, True]]


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_wanda_and_sparsegpt_beat_magnitude(pattern):
    """Output reconstruction error ||X W^T - X W_p^T|| on the calibration inputs: the
    papers' ordering, SparseGPT <= Wanda < magnitude."""
    w, x, h = layer_problem()

    def err(p):
        return float((x @ w.t() - x @ p.t()).norm())
    e_mag = err(magnitude_prune(w, 0.5, pattern))
    e_wanda = err(wanda_prune(w, h, 0.5, pattern))
    e_sgpt = err(sparsegpt_prune(w, h, 0.5, pattern))
    assert e_sgpt <= e_wanda < e_mag


def hf_model(path):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    """A tiny random Llama with 4 layers."""
    path = tmp_path_factory.mktemp("tiny4")
    make_tiny_model("llama", str(path), num_hidden_layers=4)
    return str(path)


@pytest.mark.parametrize("method,kwargs,expect", [
    ("layers", dict(sparsity=0.5), dict(num_hidden_layers=2)),
    ("width", dict(sparsity=0.25), dict(intermediate_size=96)),
    ("width", dict(sparsity=0.25, kv_groups=1), dict(intermediate_size=96, num_key_value_heads=1,
                                                     num_attention_heads=2)),
])
def test_structured_checkpoint_matches_transformers(tiny4, tmp_path, method, kwargs, expect):
    out = str(tmp_path / "pruned")
    prune_model_dir(tiny4, out, method, calib=DATA, calib_tokens=256, progress=False, **kwargs)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    for key, v in expect.items():
        assert cfg[key] == v
    ref = hf_model(out)
    llm = LLM(out, kv_cache_memory=8 << 20)
    assert (engine_logits(llm, PROMPT) - hf_logits(ref, PROMPT)).abs().max() < 1e-4
    n_params = sum(p.numel() for p in ref.parameters())
    assert n_params < sum(p.numel() for p in hf_model(tiny4).parameters())


def test_layer_drop_removes_least_important(tiny4, tmp_path):
    from miaotui.engine.llm_engine import EngineConfig, LLMEngine
    from miaotui.optimize.prune import layer_importance
    eng = LLMEngine(EngineConfig(model=tiny4, quantization="none", enable_prefix_caching=False,
                                 kv_cache_memory=8 << 20))
    ids = eng.tokenizer.encode(open(DATA).read())[:300]
    imp = layer_importance(eng, ids, window=128)
    out = str(tmp_path / "p")
    prune_model_dir(tiny4, out, "layers", 0.25, calib=DATA, calib_tokens=300, progress=False)
    dropped = json.load(open(os.path.join(out, "config.json")))["pruning"]["dropped_layers"]
    assert dropped == [min(range(4), key=lambda i: imp[i])]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_unstructured_checkpoint_loads(tiny4, tmp_path, method):
    """A 2:4 checkpoint: zeros where the pattern says, same logits in miaotui and transformers."""
    out = str(tmp_path / method)
    prune_model_dir(tiny4, out, method, pattern="2:4", calib=DATA, calib_tokens=256, progress=False)
    ref = hf_model(out)
    w = ref.model.layers[0].mlp.down_proj.weight
    assert ((w != 0).view(w.shape[0], -1, 4).sum(-1) == 2).all()
    assert ref.model.embed_tokens.weight.ne(0).all()   # embeddings are not pruned
    llm = LLM(out, kv_cache_memory=8 << 20)
    assert (engine_logits(llm, PROMPT) - hf_logits(ref, PROMPT)).abs().max() < 1e-4


def test_cli_prune_and_quantize(tiny4, tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert main(["prune", tiny4, out, "--method", "wanda", "--sparsity", "0.5", "--calib", DATA,
                 "--calib-tokens", "256"]) == 0
    assert "wrote" in capsys.readouterr().err
    from miaotui import SamplingParams
    for q in ("int8", "int4"):   # the output combines with quantization at load
        llm = LLM(out, quantization=q, kv_cache_memory=8 << 20)
        assert len(llm.generate([PROMPT], SamplingParams(max_tokens=4))[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("args,msg", [
    (["--method", "wanda", "--sparsity", "0.5"], "--calib"),
    (["--method", "magnitude", "--sparsity", "1.5"], "--sparsity"),
    (["--method", "magnitude", "--pattern", "4:2"], "--pattern"),
    (["--method", "magnitude", "--pattern", "x"], "--pattern"),
    (["--method", "layers", "--pattern", "2:4", "--calib", DATA], "--pattern"),
    (["--method", "width", "--kv-groups", "2", "--calib", DATA], "--kv-groups"),
])
def test_cli_bad_arguments(tiny4, tmp_path, capsys, args, msg):
    assert main(["prune", tiny4, str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_prune_gguf_dequantizes_and_saves_hf(tmp_path, capsys, family):
    """A GGUF model is dequantized (and says so); the output is an HF directory with a
    config.json and tokenizer that transformers and miaotui load, giving the same logits."""
    from gguf_writer_util import write_gguf_from_hf
    extra = {} if family == "llama" else dict(   # llama.cpp's gemma3 layout: a pattern of 6
        num_hidden_layers=6, layer_types=["sliding_attention"] * 5 + ["full_attention"])
    ref = make_tiny_model(family, str(tmp_path / "hf"), vocab_size=400, **extra)
    gguf_path = write_gguf_from_hf(ref, str(tmp_path / "m.gguf"), "Q8_0")
    out = str(tmp_path / "pruned")
    assert main(["prune", gguf_path, out, "--method", "layers", "--sparsity", "0.34",
                 "--calib", DATA, "--calib-tokens", "256"]) == 0
    assert "dequantizing" in capsys.readouterr().err
    theirs = hf_model(out)
    n = ref.config.num_hidden_layers
    assert theirs.config.num_hidden_layers == n - round(0.34 * n)
    llm = LLM(out, kv_cache_memory=8 << 20)
    assert (engine_logits(llm, PROMPT) - hf_logits(theirs, PROMPT)).abs().max() < 1e-4
    gguf_llm = LLM(gguf_path, kv_cache_memory=8 << 20)   # the tokenizer came along
    assert llm.tokenizer.encode("To be, or not") == gguf_llm.tokenizer.encode("To be, or not")
