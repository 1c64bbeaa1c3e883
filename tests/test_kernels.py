"""The batch-invariant kernels (kernels/matmul_cpu.cpp, paged attention in decode_cpu.cpp):
right against PyTorch, and a row's result bit-identical however many rows share the call."""
import pytest
import torch

from miaotui import kernels
from miaotui.layers import quant as Q

SPLITS = [(0, 1), (3, 4), (2, 9), (5, 17), (0, 2), (7, 40)]


@pytest.fixture(scope="module")
def k():
    mod = kernels.load()
    if mod is None:
        pytest.skip("C++ kernels unavailable")
    return mod


def _invariant(f, x):
    """f(x) row by row equals f over any slice of rows, bit for bit."""
    y = f(x)
    for i, j in SPLITS:
        assert torch.equal(f(x[i:j].contiguous()), y[i:j]), (i, j)
    return y


@pytest.mark.parametrize("K,N", [(576, 1536), (37, 50), (64, 7), (200, 9)])
def test_f32_matmul(k, K, N):
    g = torch.Generator().manual_seed(K)
    x, w = torch.randn(40, K, generator=g), torch.randn(N, K, generator=g)
    y = _invariant(lambda a: k.f32_matmul(a, w), x)
    torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K,N", [(576, 1536), (37, 50), (64, 7), (200, 9)])
def test_16bit_weights_match_their_float32_values(k, dtype, K, N):
    """16-bit weights widened inside the tiles: the bits of the float32 matmul on the same
    (rounded) values, rows invariant; odd K takes the masked tail."""
    g = torch.Generator().manual_seed(K)
    x, w = torch.randn(40, K, generator=g), torch.randn(N, K, generator=g).to(dtype)
    y = _invariant(lambda a: k.f32_matmul(a, w), x)
    assert torch.equal(y, k.f32_matmul(x, w.float()))
    # the packed GEMM (prompt tokens) widens each row as it packs it: no float32 copy
    y = _invariant(lambda a: k.f32_gemm(a, w), x)
    assert torch.equal(y, k.f32_gemm(x, w.float()))


@pytest.mark.parametrize("threads", [1, 2])
def test_f32_matmul_thread_count(k, threads):
    x, w = torch.randn(40, 96), torch.randn(300, 96)
    k.set_threads(1)
    one = k.f32_matmul(x, w)
    k.set_threads(threads)
    try:
        assert torch.equal(k.f32_matmul(x, w), one)
    finally:
        k.set_threads(torch.get_num_threads())


@pytest.mark.parametrize("w", [Q.quantize_int4(torch.randn(300, 576), 32, False),
                               Q.quantize_int4(torch.randn(40, 128), 64, True),
                               Q.quantize_int8(torch.randn(70, 100))], ids=["int4g32", "int4g64sym", "int8odd"])
def test_quantized_matmuls(k, w):
    x = torch.randn(40, w.in_features)
    exact = _invariant(lambda a: k.qf32_matmul(a, *w._kernel_args()), x)
    torch.testing.assert_close(exact, x @ w.dequantize().T, rtol=1e-5, atol=1e-4)
    xp = torch.nn.functional.pad(x, (0, w.padded_in - w.in_features))
    _invariant(lambda a: k.qmatmul(a, *w._kernel_args()), xp)  # decode: int8 activations


def _vnni_cases():
    """Weights of every decode kernel that can take vpdpbusd: int4 in groups of 32 and 64
    (the row kernel; groups of 32 also the panel kernel) and the block32 formats."""
    out = [("int4g32", Q.quantize_int4(torch.randn(70, 576), 32, False)),   # a min, g32
           ("int4g64sym", Q.quantize_int4(torch.randn(40, 128), 64, True)),  # symmetric (offset 8)
           ("int4odd", Q.quantize_int4(torch.randn(9, 96), 32, True))]       # an odd last block
    return out + [(n, w) for n, w in BLOCK32 if "16x576" in n or "21x96" in n]


@pytest.mark.parametrize("T", [3, 20], ids=["row kernels", "panel kernels"])
def test_decode_matmuls_same_bits_without_vnni(k, T, monkeypatch):
    """vpdpbusd (AVX-VNNI, or AVX-512 VNNI on 256-bit vectors) gives the integer sums of
    maddubs + madd, so the same bits; MIAOTUI_NO_VNNI=1 switches it off (and
    MIAOTUI_NO_AVX512=1 its AVX-512 form). Skipped on a CPU without either."""
    if k.decode_dot() == "avx2":
        pytest.skip("this CPU has neither AVX-VNNI nor AVX-512 VNNI")
    kind = k.decode_dot()
    for name, w in _vnni_cases():
        x = torch.randn(T, w.padded_in, generator=torch.Generator().manual_seed(T))
        with_vnni = k.qmatmul(x, *w._kernel_args())
        monkeypatch.setenv("MIAOTUI_NO_VNNI", "1")
        assert k.decode_dot() == "avx2"
        assert torch.equal(k.qmatmul(x, *w._kernel_args()), with_vnni), name
        monkeypatch.delenv("MIAOTUI_NO_VNNI")
        monkeypatch.setenv("MIAOTUI_NO_AVX512", "1")
        assert k.decode_dot() == ("avx-vnni" if kind == "avx-vnni" else "avx2")
        assert torch.equal(k.qmatmul(x, *w._kernel_args()), with_vnni), name
        monkeypatch.delenv("MIAOTUI_NO_AVX512")


@pytest.mark.parametrize("K,N,T", [(576, 1536, 40), (37, 50, 30), (64, 7, 13), (200, 33, 25), (2048, 70, 3)])
def test_prefill_gemm(k, K, N, T):
    """The packed GEMM (prompt tokens): right, and every row's bits independent of the batch."""
    g = torch.Generator().manual_seed(K + N)
    x, w = torch.randn(T, K, generator=g), torch.randn(N, K, generator=g)
    y = _invariant(lambda a: k.f32_gemm(a, w), x)
    torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-4)
    # one FMA chain over k in order: acc = fma(x[t, j], w[n, j], acc), j = 0, 1, ..., K - 1
    # (a float32 product is exact in float64; the sum rounded there, then to float32)
    ref = torch.zeros((), dtype=torch.float32)
    t, n = T - 1, N - 1
    for j in range(K):
        ref = (ref.double() + x[t, j].double() * w[n, j].double()).float()
    assert y[t, n] == ref


@pytest.mark.parametrize("threads", [1, 2])
def test_prefill_gemm_thread_count(k, threads):
    x, w = torch.randn(50, 96), torch.randn(300, 96)
    k.set_threads(1)
    one = k.f32_gemm(x, w)
    k.set_threads(threads)
    try:
        assert torch.equal(k.f32_gemm(x, w), one)
    finally:
        k.set_threads(torch.get_num_threads())


@pytest.mark.parametrize("w", [Q.quantize_int4(torch.randn(300, 576), 32, False),
                               Q.quantize_int4(torch.randn(40, 128), 64, True),
                               Q.quantize_int8(torch.randn(70, 100))], ids=["int4g32", "int4g64sym", "int8odd"])
def test_prefill_gemm_quantized(k, w):
    """qf32_gemm is f32_gemm on the dequantized weight, bit for bit (dequantized exactly)."""
    x = torch.randn(40, w.in_features)
    y = _invariant(lambda a: k.qf32_gemm(a, *w._kernel_args()), x)
    assert torch.equal(y, k.f32_gemm(x, w.dequantize()))
    torch.testing.assert_close(y, x @ w.dequantize().T, rtol=1e-5, atol=1e-4)


def test_prefill_gemm_same_bits_without_avx512(k, tmp_path):
    """The AVX2 and AVX-512 GEMMs agree bit for bit (one FMA chain over k either way)."""
    import os
    import subprocess
    import sys
    code = ("import torch, sys; from miaotui import kernels; k = kernels.load(); g = torch.Generator().manual_seed(3);"
            "x, w = torch.randn(29, 300, generator=g), torch.randn(45, 300, generator=g);"
            "torch.save(k.f32_gemm(x, w), sys.argv[1])")
    outs = []
    for i, flag in enumerate(("1", "0")):
        path = str(tmp_path / f"y{i}.pt")
        subprocess.run([sys.executable, "-c", code, path], check=True, env={**os.environ, "MIAOTUI_NO_AVX512": flag})
        outs.append(torch.load(path))
    assert torch.equal(outs[0], outs[1])


def _reference_attention(q, kc, vc, tables, seq, pos, bs, window, scale):
    out = []
    for t in range(q.shape[0]):
        p = int(pos[t])
        lo = max(0, p - window + 1) if window else 0
        ps = torch.arange(lo, p + 1)
        slots = tables[seq[t], ps // bs] * bs + ps % bs
        kk, vv = kc[slots].float(), vc[slots].float()          # [L, KVH, D]
        g = q.shape[1] // kc.shape[1]
        kk, vv = kk.repeat_interleave(g, 1), vv.repeat_interleave(g, 1)
        s = torch.einsum("hd,lhd->hl", q[t], kk) * scale
        out.append(torch.einsum("hl,lhd->hd", s.softmax(-1), vv).reshape(-1))
    return torch.stack(out)


@pytest.mark.parametrize("dtype,window", [(torch.float32, 0), (torch.float16, 0), (torch.float32, 20)])
def test_paged_attention(k, dtype, window):
    g = torch.Generator().manual_seed(1)
    bs, nblk, H, KVH, D = 16, 20, 6, 2, 32
    kc = torch.randn(64 * bs, KVH, D, generator=g).to(dtype)
    vc = torch.randn(64 * bs, KVH, D, generator=g).to(dtype)
    tables = torch.stack([torch.randperm(64, generator=g)[:nblk] for _ in range(3)])
    pos = torch.tensor([0, 1, 15, 16, 63, 64, 65, 130, 200, 317, 5, 70])
    seq = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 0, 2, 1])
    q = torch.randn(len(pos), H, D, generator=g)
    scale = D ** -0.5
    f = lambda i, j: k.paged_attention(q[i:j].contiguous(), kc, vc, None, None, tables, seq[i:j].contiguous(),  # noqa: E731
                                       pos[i:j].contiguous(), bs, window, scale)
    y = f(0, len(pos))
    torch.testing.assert_close(y, _reference_attention(q, kc, vc, tables, seq, pos, bs, window, scale),
                               rtol=1e-4, atol=1e-5)
    for t in range(len(pos)):  # each token alone
        assert torch.equal(f(t, t + 1), y[t:t + 1])


def test_paged_attention_checks_its_metadata(k):
    kc = torch.zeros(32, 1, 8)
    q = torch.zeros(1, 2, 8)
    with pytest.raises(RuntimeError, match="block"):
        k.paged_attention(q, kc, kc, None, None, torch.tensor([[5]]), torch.tensor([0]), torch.tensor([3]),
                          16, 0, 1.0)
    with pytest.raises(RuntimeError, match="position"):
        k.paged_attention(q, kc, kc, None, None, torch.tensor([[0]]), torch.tensor([0]), torch.tensor([16]),
                          16, 0, 1.0)


def test_rotary_same_bits_as_pytorch(k):
    """The rotary kernel (prompt and PyTorch decode paths) gives apply_rotary's PyTorch bits,
    on a strided view of q and k heads as the model passes it."""
    from miaotui.layers.rotary import RotaryEmbedding
    rope = RotaryEmbedding(64, 256, 10000.0)
    qkv = torch.randn(37, 9 + 2 * 3, 64)
    x = qkv[:, :12]
    cos, sin = rope.lookup(torch.arange(100, 137))
    x1, x2 = x.chunk(2, dim=-1)
    want = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    assert torch.equal(k.rotary(x, cos, sin), want)


def _block32_weights():
    """int8 weights with one scale per block of 32 (the decode kernels of
    qdecode_block32.cpp): int8 (Q8_0) and int5 (Q5_0, Q5_1), with and without a min,
    float16 and float32 scales; row counts with and without a rest past the last eight,
    block counts with a short rest (3, 18: K = 576's two) and without."""
    g = torch.Generator().manual_seed(8)
    out = []
    for n, kin in [(21, 96), (16, 576), (8, 32), (9, 512)]:
        nb = kin // 32
        half = torch.rand(n, nb, generator=g).half() * 0.02 + 0.001
        mn = -torch.rand(n, nb, generator=g).half() * 0.1
        q5 = torch.randint(0, 256, (n, kin * 5 // 8), dtype=torch.uint8, generator=g)
        q8 = torch.randint(-128, 128, (n, kin), dtype=torch.int8, generator=g)
        out += [(f"int5 offset {n}x{kin}", Q.Int5Weight(q5, half, None, 32, kin)),
                (f"int5 min {n}x{kin}", Q.Int5Weight(q5, half, mn, 32, kin)),
                (f"int8 {n}x{kin}", Q.Int8Weight(q8, half, None, 32, kin)),
                (f"int8 f32 scales min {n}x{kin}", Q.Int8Weight(q8, half.float(), mn.float(), 32, kin))]
    return out


BLOCK32 = _block32_weights()


def _block32_reference(w, x):
    """The decode kernel's arithmetic in float64 from the same integers: x quantized per
    block of 32 as the kernel does it (float32 steps, round half to even), then
    y = sum_b d_b * f32(scale_b * dx_b) (+ min_b * f32(dx_b * sum xq)), d_b the exact
    integer dot product; and a bound on the kernel's float32 rounding (one fma a term)."""
    t, nb = x.shape[0], w.padded_in // 32
    xb = x.view(t, nb, 32)
    a = xb.abs().amax(-1)
    dx = a / 127
    xq = torch.round(xb * torch.where(a > 0, 127 / a, torch.zeros_like(a))[..., None])
    ints = w._ints(w.q).view(w.out_features, nb, 32).double()
    d = torch.einsum("tbk,nbk->tnb", xq.double(), ints)
    terms = d * (w.scale.float()[None] * dx[:, None]).double()
    if w.min is not None:
        bsum = dx * xq.sum(-1)
        terms = torch.cat([terms, (w.min.float()[None] * bsum[:, None]).double()], -1)
    return terms.sum(-1), terms.abs().sum(-1) * terms.shape[-1] * 2.0 ** -24 + 1e-30


@pytest.mark.parametrize("name,w", BLOCK32, ids=[n for n, _ in BLOCK32])
def test_block32_decode_matmul(k, name, w):
    """The row kernel (below 16 tokens, 8 with VNNI: the slices of 1, 2, 7, 12 and 13 tokens)
    and the panel kernel (20 tokens: tiles of four) give each token the same bits, and those bits
    are the documented arithmetic: within float32 rounding of the float64 sum of the exact
    integer block products (an integer product off by one lands several times outside the
    bound)."""
    x = torch.randn(20, w.padded_in, generator=torch.Generator().manual_seed(w.out_features))
    y = _invariant(lambda a: k.qmatmul(a, *w._kernel_args()), x)
    ref, bound = _block32_reference(w, x)
    assert ((y.double() - ref).abs() <= bound).all(), name


def _int4_weights():
    """int4 weights with one scale per block of 32 as GGUF's Q4_0 (offset 8) and Q4_1 (a
    min) hold them, float16 and float32 scales; row counts with a pair of panels, an odd
    last panel and rows past the last eight (8, 21, 40, 300 rows); K = 576 (18 blocks, two
    past the last eight), 2048, 64."""
    g = torch.Generator().manual_seed(4)
    out = []
    for n, kin in [(40, 576), (21, 2048), (300, 576), (8, 64)]:
        nb = kin // 32
        q = torch.randint(0, 256, (n, kin // 2), dtype=torch.uint8, generator=g)
        sc = torch.rand(n, nb, generator=g).half() * 0.02 + 0.001
        mn = -torch.rand(n, nb, generator=g).half() * 0.1
        out += [(f"Q4_0 {n}x{kin}", Q.Int4Weight(q, sc, None, 32, kin)),
                (f"Q4_1 {n}x{kin}", Q.Int4Weight(q, sc, mn, 32, kin)),
                (f"f32 scales min {n}x{kin}", Q.Int4Weight(q, sc.float(), mn.float(), 32, kin))]
    return out


INT4 = _int4_weights()


@pytest.mark.parametrize("name,w", INT4, ids=[n for n, _ in INT4])
def test_int4_decode_matmul_row_and_panel_kernels(k, name, w):
    """int4 weights, one scale per block of 32: the row kernel (under 8 tokens) and the
    panel kernel of qdecode_int4.cpp (8 tokens and more: slices of 8, 12, 33 and 40 tokens)
    give a token the same bits, and they are the documented steps: the exact integer block
    sums over the nibbles, an fma per block into eight accumulators (block b into b mod 8)
    with the min term after it (-8 * the block's activation sum times the scale without a
    min), the accumulators added in a fixed tree; float64 with float32 rounding bounds."""
    x = torch.randn(40, w.padded_in, generator=torch.Generator().manual_seed(w.out_features))
    f = lambda a: k.qmatmul(a, *w._kernel_args())  # noqa: E731
    y = _invariant(f, x)
    alone = torch.cat([f(x[i:i + 1].contiguous()) for i in range(x.shape[0])])
    assert torch.equal(y, alone)
    t, nb = x.shape[0], w.padded_in // 32
    xb = x.view(t, nb, 32)
    a = xb.abs().amax(-1)
    dx = a / 127
    xq = torch.round(xb * torch.where(a > 0, 127 / a, torch.zeros_like(a))[..., None])
    u = Q._unpack_int4(w.q).view(w.out_features, nb, 32).double()   # the nibbles, 0..15
    d = torch.einsum("tbk,nbk->tnb", xq.double(), u)
    bsum = (dx * xq.sum(-1))[:, None]
    c, f_min = (w.min, 1.0) if w.min is not None else (w.scale, -8.0)
    terms = torch.cat([(d * (w.scale.float()[None] * dx[:, None]).double()),
                       (c.float()[None] * (f_min * bsum)).double()], -1)
    ref, bound = terms.sum(-1), terms.abs().sum(-1) * terms.shape[-1] * 2.0 ** -24 + 1e-30
    assert ((y.double() - ref).abs() <= bound).all(), name
