"""2:4 sparse weights (layers/sparse.py, kernels/sparse_cpu.cpp): packing, the kernel against
the dense product and the PyTorch fallback, batch invariance, a pruned model run sparse
(PyTorch path and fused decode) against the same weights run dense."""
import os

import pytest
import torch

from miaotui import LLM, SamplingParams, kernels
from miaotui.layers import sparse
from miaotui.layers.sparse import Sparse24Weight
from miaotui.optimize.prune import magnitude_prune, prune_model_dir
from test_models import PROMPT, engine_logits

DATA = os.path.join(os.path.dirname(__file__), "data", "shakespeare_40k.txt")
needs_kernels = pytest.mark.skipif(kernels.load() is None, reason="C++ kernels unavailable")


def sparse_weight(n=48, k=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = magnitude_prune(torch.randn(n, k, generator=g), pattern=(2, 4))
    w[3, :8] = 0          # groups with fewer than two nonzeros
    w[5, 4:6] = 0
    return w


def test_pack_roundtrip():
    w = sparse_weight()
    s = Sparse24Weight.from_dense(w)
    assert torch.equal(s.dequantize(), w)
    assert s.nbytes() == w.numel() * 4 * 17 // 32           # 2.125 bytes a weight
    q = Sparse24Weight.from_dense(w, int8=True)
    err = (q.dequantize() - w).abs()
    assert (err <= q.scale[:, None] / 2 + 1e-7).all() and (q.dequantize()[w == 0] == 0).all()
    assert q.nbytes() == w.numel() * 5 // 8 + 4 * w.shape[0]


def test_rejects_dense_and_bad_shapes():
    with pytest.raises(ValueError):
        Sparse24Weight.from_dense(torch.randn(8, 32))
    with pytest.raises(ValueError):
        Sparse24Weight.from_dense(magnitude_prune(torch.randn(8, 40), pattern=(2, 4)))  # 40 % 16


@needs_kernels
@pytest.mark.parametrize("int8", [False, True])
def test_kernel_matches_dense_and_fallback(int8, monkeypatch):
    s = Sparse24Weight.from_dense(sparse_weight(), int8)
    x = torch.randn(11, s.in_features)
    y = s.matmul(x)
    ref = x.double() @ s.dequantize().double().t()
    assert (y - ref).abs().max() < 1e-4
    monkeypatch.setattr(sparse.kernels, "load", lambda: None)
    assert (s.matmul(x) - y).abs().max() < 1e-4


@needs_kernels
@pytest.mark.parametrize("int8", [False, True])
def test_kernel_rows_do_not_depend_on_batch(int8):
    s = Sparse24Weight.from_dense(sparse_weight(n=40, k=256, seed=1), int8)
    x = torch.randn(9, s.in_features)
    full = s.matmul(x)
    for t in range(1, 10):       # tiles of 4, 3, 2, 1 rows: the same bits
        assert torch.equal(s.matmul(x[:t]), full[:t])
    for i in range(9):
        assert torch.equal(s.matmul(x[i:i + 1]), full[i:i + 1])


@pytest.fixture(scope="module")
def pruned24(tmp_path_factory):
    from util import make_tiny_model
    src = str(tmp_path_factory.mktemp("tiny"))
    make_tiny_model("llama", src)
    out = str(tmp_path_factory.mktemp("pruned24"))
    prune_model_dir(src, out, "sparsegpt", pattern="2:4", calib=DATA, calib_tokens=256, progress=False)
    return out


def run(path, monkeypatch, sparse_on: bool, **kw):
    monkeypatch.setenv("MIAOTUI_SPARSE", "1" if sparse_on else "0")
    llm = LLM(path, kv_cache_memory=8 << 20, **kw)
    kinds = {type(m.qweight).__name__ for m in llm.engine.model.modules() if hasattr(m, "qweight")}
    assert ("Sparse24Weight" in kinds) == sparse_on
    out = llm.generate([PROMPT, PROMPT[:7]], SamplingParams(temperature=0, max_tokens=12,
                                                            ignore_eos=True, logprobs=1))
    return llm, [o.outputs[0] for o in out]


@pytest.mark.parametrize("fused", ["1", "0"])
def test_sparse_model_equals_dense_run(pruned24, monkeypatch, fused):
    """The same pruned weights, compressed through the sparse kernels (prefill, and decode in
    the fused C++ step or PyTorch) and dense: logits within 1e-4, the same tokens."""
    monkeypatch.setenv("MIAOTUI_FUSED_DECODE", fused)
    sp, a = run(pruned24, monkeypatch, True)
    de, b = run(pruned24, monkeypatch, False)
    if fused == "1" and kernels.load() is not None:
        assert sp.engine.runner.decoder is not None
        assert sp.engine.runner.decoder.impl.profile()["calls"] > 0
    assert (engine_logits(sp, PROMPT) - engine_logits(de, PROMPT)).abs().max() < 1e-4
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        for lx, ly in zip(x.logprobs, y.logprobs):
            assert abs(lx.logprob - ly.logprob) < 1e-4


def test_sparse_int8_model(pruned24, monkeypatch):
    """2:4 + int8 values: fused decode and the PyTorch path agree; close to float32."""
    monkeypatch.setenv("MIAOTUI_FUSED_DECODE", "1")
    fused, a = run(pruned24, monkeypatch, True, quantization="int8")
    types = {type(m.qweight).__name__ for m in fused.engine.model.modules() if getattr(m, "qweight", None) is not None}
    assert types == {"Sparse24Weight", "Int8Weight"}   # the head: dense int8
    monkeypatch.setenv("MIAOTUI_FUSED_DECODE", "0")
    _, b = run(pruned24, monkeypatch, True, quantization="int8")
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
