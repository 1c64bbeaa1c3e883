"""miaotui.kernels.gpu: the PyTorch references against the CPU code they stand for, and
the Triton kernels against the references (in Triton's interpreter on CPU; on a real GPU
with ``-m gpu``)."""
import pytest
import torch
import torch.nn.functional as F

from miaotui import kernels
from miaotui.config import MiaotuiError
from miaotui.kernels import gpu
from miaotui.layers import quant
from miaotui.layers.activation import gated, get_activation
from miaotui.layers.attention import Attention, AttentionMetadata, KVCache
from miaotui.layers.norm import RMSNorm
from miaotui.layers.rotary import RotaryEmbedding, apply_rotary


# --- scenarios -------------------------------------------------------------------------

def paged_case(lens, block_size=4, kvh=2, groups=2, d=16, dtype=torch.float32, seed=0,
               device="cpu", spare_blocks=3):
    """Caches full of random values (so unused slots hold garbage a kernel must not read
    as context), and per sequence a block table of shuffled blocks, padded with 0."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lens]
    nblocks = sum(need) + spare_blocks
    perm = torch.randperm(nblocks, generator=g)
    width = max(max(need), 1)
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    at = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[at:at + n].to(torch.int32)
        at += n
    S = nblocks * block_size
    kc = torch.randn(S, kvh, d, generator=g).to(dtype)
    vc = torch.randn(S, kvh, d, generator=g).to(dtype)
    return tables.to(device), kc.to(device), vc.to(device), kvh * groups


def slots_of(tables, seq, pos, block_size):
    return tables[seq].long()[pos // block_size] * block_size + pos % block_size


# --- references against the CPU code ---------------------------------------------------

def test_store_kv_ref_matches_kvcache_write_and_skips_padding():
    T, kvh, d = 6, 2, 8
    k, v = torch.randn(T, kvh, d), torch.randn(T, kvh, d)
    slots = torch.tensor([5, 0, -1, 9, 3, -1])
    cache = KVCache(12, kvh, d, torch.float32)
    keep = slots >= 0
    cache.write(slots[keep], k[keep], v[keep])
    kc, vc = torch.zeros(12, kvh, d), torch.zeros(12, kvh, d)
    gpu.store_kv_ref(k, v, kc, vc, slots)
    assert torch.equal(kc, cache.k) and torch.equal(vc, cache.v)


def _cpu_attention(q, kc, vc, tables, seq, pos, block_size, window, scale):
    """layers/attention.py's C++ kernel: token t at pos[t] of sequence seq[t]."""
    k = kernels.load()
    if k is None:
        pytest.skip("the C++ kernels are off")
    out = k.paged_attention(q.contiguous(), kc, vc, None, None, tables.long().contiguous(),
                            seq.long(), pos.long(), block_size, window, scale)
    return out.view(q.shape)


@pytest.mark.parametrize("window", [0, 5])
def test_decode_ref_matches_cpu_kernel(window):
    lens = [7, 1, 13, 4]
    tables, kc, vc, H = paged_case(lens, block_size=4)
    q = torch.randn(len(lens), H, 16)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    ref = gpu.paged_decode_attention_ref(q, kc, vc, tables, seq_lens, 4, 0.3, window)
    cpu = _cpu_attention(q, kc, vc, tables, torch.arange(len(lens)), seq_lens - 1, 4, window, 0.3)
    torch.testing.assert_close(ref, cpu, rtol=1e-5, atol=1e-5)


def test_decode_ref_matches_attention_module_and_zeroes_padding_rows():
    """The module's PyTorch decode path (padded gather + mask), and seq_len 0 -> zeros."""
    lens, bs = [5, 9, 2], 4
    tables, kc, vc, H = paged_case(lens, block_size=bs, kvh=2, groups=3)
    attn = Attention(H, 2, 16, 0.25)
    attn.cache = KVCache(kc.shape[0], 2, 16, torch.float32)
    attn.cache.k.copy_(kc)
    attn.cache.v.copy_(vc)
    L = max(lens)
    kpos = torch.arange(L)
    dslots = torch.stack([slots_of(tables, i, kpos, bs) for i in range(len(lens))])
    mask = (kpos[None, :] < torch.tensor(lens)[:, None])[:, None, None, :]
    q = torch.randn(len(lens), H, 16)
    # the module writes the step's K/V first: write what is there already
    last = torch.stack([slots_of(tables, i, torch.tensor(n - 1), bs) for i, n in enumerate(lens)])
    meta = AttentionMetadata(slot_mapping=last, decode_slots=dslots, decode_mask=mask)
    want = attn(q, kc[last], vc[last], meta).view(q.shape)
    seq_lens = torch.tensor(lens + [0], dtype=torch.int32)
    tab = torch.cat([tables, torch.zeros(1, tables.shape[1], dtype=torch.int32)])
    got = gpu.paged_decode_attention_ref(torch.cat([q, torch.randn(1, H, 16)]), kc, vc, tab,
                                         seq_lens, bs, 0.25)
    torch.testing.assert_close(got[:3], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[3], torch.zeros(H, 16))


@pytest.mark.parametrize("window", [0, 3])
def test_prefill_ref_matches_cpu_kernel(window):
    """Chunks of three sequences, two of them starting after cached tokens."""
    bs = 4
    starts, chunk = [0, 6, 3], [5, 4, 7]
    lens = [s + c for s, c in zip(starts, chunk)]
    tables, kc, vc, H = paged_case(lens, block_size=bs)
    cu = torch.tensor([0, 5, 9, 16], dtype=torch.int32)
    q = torch.randn(16, H, 16)
    seq = torch.repeat_interleave(torch.arange(3), torch.tensor(chunk))
    pos = torch.cat([torch.arange(s, s + c) for s, c in zip(starts, chunk)])
    ref = gpu.paged_prefill_attention_ref(q, kc, vc, tables, cu, torch.tensor(starts, dtype=torch.int32),
                                          bs, 0.3, window)
    cpu = _cpu_attention(q, kc, vc, tables, seq, pos, bs, window, 0.3)
    torch.testing.assert_close(ref, cpu, rtol=1e-5, atol=1e-5)


def test_decode_ref_in_chunks_of_rows(monkeypatch):
    """A long batch is gathered a chunk of rows at a time: the same result."""
    lens = [5, 9, 2, 7, 1]
    tables, kc, vc, H = paged_case(lens, block_size=4)
    q, sl = torch.randn(5, H, 16), torch.tensor(lens, dtype=torch.int32)
    whole = gpu.paged_decode_attention_ref(q, kc, vc, tables, sl, 4, 0.3)
    monkeypatch.setattr(gpu, "_GATHER_ELEMENTS", 2 * tables.shape[1] * 4 * 2 * 16)   # two rows
    torch.testing.assert_close(gpu.paged_decode_attention_ref(q, kc, vc, tables, sl, 4, 0.3), whole,
                               rtol=1e-6, atol=1e-6)


def test_softcap_ref():
    tables, kc, vc, H = paged_case([6], block_size=4, kvh=1, groups=1)
    q = torch.randn(1, H, 16) * 4
    got = gpu.paged_decode_attention_ref(q, kc, vc, tables, torch.tensor([6], dtype=torch.int32), 4, 1.0,
                                         softcap=2.0)
    k, v = kc[slots_of(tables, 0, torch.arange(6), 4), 0], vc[slots_of(tables, 0, torch.arange(6), 4), 0]
    s = q[0, 0] @ k.T
    want = torch.softmax(2.0 * torch.tanh(s / 2.0), -1) @ v
    torch.testing.assert_close(got[0, 0], want, rtol=1e-5, atol=1e-5)


def int_weights():
    """One weight of each layout quant.py makes (block sizes, scale dtypes, min or not)."""
    torch.manual_seed(0)
    w = torch.randn(24, 128)
    ws = {
        "int8_row": quant.quantize_int8(torch.randn(24, 100)),   # one scale per (padded) row
        "int4_sym32": quant.quantize_int4(w, 32, symmetric=True),
        "int4_asym64": quant.quantize_int4(w, 64, symmetric=False),
        "int4_asym128": quant.quantize_int4(w, 128, symmetric=False),
    }
    q8 = torch.randint(-128, 128, (24, 256), dtype=torch.int8)
    for block, sdt, mn in ((16, torch.float32, False), (32, torch.float16, True), (256, torch.float32, False)):
        scale = (torch.rand(24, 256 // block) * 0.02).to(sdt)
        m = (torch.randn(24, 256 // block) * 0.01).to(sdt) if mn else None
        ws[f"int8_b{block}_{str(sdt)[6:]}{'_min' if mn else ''}"] = quant.Int8Weight(q8, scale, m, block, 256)
    q4 = torch.randint(0, 256, (24, 128), dtype=torch.uint8)
    ws["int4_b32_f32_min"] = quant.Int4Weight(q4, torch.rand(24, 8) * 0.1, torch.randn(24, 8) * 0.1, 32, 256)
    return ws


@pytest.mark.parametrize("name", list(int_weights()))
def test_quant_matmul_ref_matches_dequantize(name):
    w = int_weights()[name]
    x = torch.randn(5, w.in_features)
    want = x @ w.dequantize().T
    torch.testing.assert_close(gpu.quant_matmul_ref(x, w), want, rtol=1e-5, atol=1e-4)
    xb = x.to(torch.bfloat16)
    got = gpu.quant_matmul_ref(xb, w)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), xb.float() @ w.dequantize().T, rtol=1e-2, atol=1e-2)


def test_norms_ref_match_rmsnorm():
    norm = RMSNorm(32, 1e-6)
    norm.load(torch.randn(32))
    x, r = torch.randn(7, 32), torch.randn(7, 32)
    with torch.no_grad():
        torch.testing.assert_close(gpu.rms_norm_ref(x, norm.weight, 1e-6), norm(x), rtol=1e-6, atol=1e-6)
        normed, res = gpu.add_rms_norm_ref(x, r, norm.weight, 1e-6)
        assert torch.equal(res, x + r)
        torch.testing.assert_close(normed, norm(x + r), rtol=1e-6, atol=1e-6)
    gem = RMSNorm(32, 1e-6, weight_offset=1.0)      # gemma: (1 + w), folded at load
    w = torch.randn(32)
    gem.load(w)
    with torch.no_grad():
        torch.testing.assert_close(gpu.rms_norm_ref(x, w, 1e-6, offset=1.0), gem(x), rtol=1e-6, atol=1e-6)


def test_rotary_ref_matches_apply_rotary_in_place_on_a_view():
    rope = RotaryEmbedding(16, 64, 10000.0)
    pos = torch.tensor([0, 3, 17, 40])
    cos, sin = rope.lookup(pos)
    qkv = torch.randn(4, 6 + 2 * 2, 16)
    want = apply_rotary(qkv[:, :8].clone(), cos, sin)
    q, k = qkv[:, :6], qkv[:, 6:8]
    gpu.rotary_ref(q, k, cos, sin)
    torch.testing.assert_close(qkv[:, :8], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_gated_ref_matches_activation(act):
    x = torch.randn(5, 2 * 24)
    fn = gpu.silu_mul if act == "silu" else gpu.gelu_tanh_mul
    torch.testing.assert_close(fn(x), gated(get_activation(act), x), rtol=1e-6, atol=1e-6)


def test_int8_cache_is_refused():
    with pytest.raises(MiaotuiError, match="int8"):
        gpu.store_kv(torch.randn(1, 1, 8), torch.randn(1, 1, 8), torch.zeros(4, 1, 8, dtype=torch.int8),
                     torch.zeros(4, 1, 8, dtype=torch.int8), torch.tensor([0]))


def test_use_triton_is_off_for_plain_cpu_tensors(monkeypatch):
    monkeypatch.delenv("MIAOTUI_TRITON_CPU", raising=False)
    assert not gpu.use_triton(torch.zeros(1))


# --- Triton kernels against the references, in Triton's interpreter ---------------------

# bf16 runs in the interpreter too, with two differences from a GPU: its tl.dot gets float32
# operands (numpy has no bfloat16 matmul), and it truncates float32 to bfloat16 where the GPU
# rounds to nearest. Tolerances: float32 1e-5 (only the order of the sums differs),
# bfloat16 a few of its ulps (2**-8 relative).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=4e-3, atol=4e-3)}
DTYPES = [torch.float32, torch.bfloat16]
ALL_DTYPES = DTYPES + [torch.float16]


@pytest.fixture
def interp(monkeypatch):
    """The Triton-on-CPU test mode for one test (the env is restored after it)."""
    if not gpu.triton_available():
        pytest.skip("triton is not importable here (pip install triton)")
    from miaotui.kernels import triton_ops
    if not triton_ops.interpreted():
        pytest.skip("triton was imported without TRITON_INTERPRET=1 (conftest.py sets it "
                    "when there is no GPU): its kernels are compiled for a GPU")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MIAOTUI_TRITON_CPU", "1")
    assert gpu.use_triton(torch.zeros(1))   # so no test below compares the reference with itself


def close(got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_store_kv_triton(interp, dtype):
    T, kvh, d = 5, 2, 16
    qkv = torch.randn(T, 4 + 2 * kvh, d).to(dtype)
    k, v = qkv[:, 4:4 + kvh], qkv[:, 4 + kvh:]        # strided views, as the model splits them
    slots = torch.tensor([7, -1, 0, 12, -1], dtype=torch.int32)
    caches = [torch.randn(16, kvh, d).to(dtype) for _ in range(2)]
    want = [c.clone() for c in caches]
    gpu.store_kv(k, v, *caches, slots)
    gpu.store_kv_ref(k, v, *want, slots)
    assert torch.equal(caches[0], want[0]) and torch.equal(caches[1], want[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window,splits,softcap", [(0, 1, 0.0), (5, 1, 0.0), (0, 3, 0.0), (6, 2, 3.0)])
def test_decode_attention_triton(interp, dtype, window, splits, softcap):
    """Rows of different lengths (a padding row among them), GQA groups of 3, shuffled
    block tables; one program per row, or the keys split across programs and merged."""
    from miaotui.kernels import triton_ops
    lens = [7, 1, 0, 23, 12]
    tables, kc, vc, H = paged_case(lens, block_size=4, kvh=2, groups=3, dtype=dtype)
    q = torch.randn(len(lens), H, 16).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    got = triton_ops.paged_decode_attention(q, kc, vc, tables, seq_lens, 4, 0.3, window, softcap,
                                            splits=splits)
    close(got, gpu.paged_decode_attention_ref(q, kc, vc, tables, seq_lens, 4, 0.3, window, softcap), dtype)
    assert torch.equal(got[2], torch.zeros_like(got[2]))
    if splits == 1:   # and through the dispatching API
        close(gpu.paged_decode_attention(q, kc, vc, tables, seq_lens, 4, 0.3, window, softcap), got, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (4, 0.0), (0, 2.5)])
def test_prefill_attention_triton(interp, dtype, window, softcap):
    """Four chunks: from position 0, after 9 and 3 cached tokens, and an empty one; query
    tiles that straddle chunk ends; GQA groups of 2, block size 8."""
    starts, chunk = [0, 9, 3, 5], [13, 4, 0, 6]
    lens = [s + c for s, c in zip(starts, chunk)]
    tables, kc, vc, H = paged_case(lens, block_size=8, kvh=2, groups=2, d=32, dtype=dtype)
    cu = torch.tensor([0, 13, 17, 17, 23], dtype=torch.int32)
    st = torch.tensor(starts, dtype=torch.int32)
    q = torch.randn(23, H, 32).to(dtype)
    got = gpu.paged_prefill_attention(q, kc, vc, tables, cu, st, 8, 0.2, window, softcap)
    close(got, gpu.paged_prefill_attention_ref(q, kc, vc, tables, cu, st, 8, 0.2, window, softcap), dtype)


def test_prefill_attention_triton_window_narrower_than_a_key_tile(interp):
    """Without GQA a tile holds 32 queries: with window 2 the later ones see no key in the
    first key tile (a row whose running max is still -inf must not turn into NaN)."""
    tables, kc, vc, H = paged_case([40], block_size=4, kvh=2, groups=1)
    cu, st = torch.tensor([0, 40], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    q = torch.randn(40, H, 16)
    got = gpu.paged_prefill_attention(q, kc, vc, tables, cu, st, 4, 0.3, 2)
    close(got, gpu.paged_prefill_attention_ref(q, kc, vc, tables, cu, st, 4, 0.3, 2), torch.float32)


def test_prefill_and_decode_kernels_agree_on_a_token(interp):
    """The last prompt token computed as a prefill row equals it computed as a decode row."""
    from miaotui.kernels import triton_ops
    tables, kc, vc, H = paged_case([19], block_size=4, kvh=1, groups=4)
    q = torch.randn(6, H, 16)
    pre = triton_ops.paged_prefill_attention(q, kc, vc, tables, torch.tensor([0, 6], dtype=torch.int32),
                                             torch.tensor([13], dtype=torch.int32), 4, 0.25,
                                             max_seqlen_q=6)
    dec = triton_ops.paged_decode_attention(q[5:], kc, vc, tables, torch.tensor([19], dtype=torch.int32), 4,
                                            0.25, splits=1)
    torch.testing.assert_close(pre[5:], dec, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(int_weights()))
def test_quant_matmul_triton(interp, name):
    """Every layout, through the GEMV kernel (M 1 and 3) and the tl.dot GEMM (M 9)."""
    w = int_weights()[name]
    for M in (1, 3, 9):
        x = torch.randn(M, w.in_features)
        close(gpu.quant_matmul(x, w), gpu.quant_matmul_ref(x, w), torch.float32)


@pytest.mark.parametrize("M", [2, 20])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quant_matmul_triton_16bit(interp, M, dtype):
    w = int_weights()["int4_asym64"]
    x = torch.randn(M, w.in_features).to(dtype)
    got, want = gpu.quant_matmul(x, w), gpu.quant_matmul_ref(x, w)
    assert got.dtype == dtype
    # the GEMM rounds W to bfloat16 for tl.dot: compare against the size of the output
    err = (got.float() - want.float()).abs().max() / want.float().abs().max()
    assert err < 1e-2


def test_quant_matmul_triton_odd_block(interp):
    """A block that no tile size divides (quant.py makes none): the per-element scale path."""
    q8 = torch.randint(-128, 128, (24, 192), dtype=torch.int8)
    w = quant.Int8Weight(q8, torch.rand(24, 2) * 0.01, torch.randn(24, 2) * 0.01, 96, 192)
    for M in (1, 9):
        x = torch.randn(M, 192)
        close(gpu.quant_matmul(x, w), gpu.quant_matmul_ref(x, w), torch.float32)


def test_quant_matmul_split_k(interp, monkeypatch):
    """The GEMV's split over K (on the GPU for small N), forced here."""
    from miaotui.kernels import triton_ops
    monkeypatch.setattr(triton_ops, "_qmm_config", lambda x, M, N, KP: (False, 1, 16, 32, 3, 4))
    w = int_weights()["int8_b16_float32"]
    x = torch.randn(1, w.in_features)
    close(gpu.quant_matmul(x, w), gpu.quant_matmul_ref(x, w), torch.float32)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_norms_triton(interp, dtype):
    x, r = torch.randn(5, 48).to(dtype), torch.randn(5, 48).to(dtype)
    w = torch.randn(48)
    for off in (0.0, 1.0):
        close(gpu.rms_norm(x, w, 1e-6, off), gpu.rms_norm_ref(x, w, 1e-6, off), dtype)
        (n1, r1), (n2, r2) = gpu.add_rms_norm(x, r, w, 1e-6, off), gpu.add_rms_norm_ref(x, r, w, 1e-6, off)
        close(r1, r2, dtype)     # equal in float32; bfloat16: the interpreter truncates the sum
        close(n1, n2, dtype)
        assert dtype != torch.float32 or torch.equal(r1, r2)
    heads = torch.randn(3, 4, 16).to(dtype)          # q_norm: per head of [T, H, D]
    close(gpu.rms_norm(heads, w[:16], 1e-6), gpu.rms_norm_ref(heads, w[:16], 1e-6), dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_rotary_triton(interp, dtype):
    rope = RotaryEmbedding(32, 64, 10000.0)
    cos, sin = rope.lookup(torch.tensor([0, 5, 33]))
    qkv = torch.randn(3, 6 + 2 * 2, 32).to(dtype)
    want = qkv.clone()
    gpu.rotary(qkv[:, :6], qkv[:, 6:8], cos, sin)
    gpu.rotary_ref(want[:, :6], want[:, 6:8], cos, sin)
    close(qkv, want, dtype)
    assert torch.equal(qkv[:, 8:], want[:, 8:])       # v untouched


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_gated_triton(interp, dtype):
    x = torch.randn(4, 2 * 40).to(dtype) * 3
    close(gpu.silu_mul(x), gpu.gated_ref(x, "silu"), dtype)
    close(gpu.gelu_tanh_mul(x), gpu.gated_ref(x, "gelu_tanh"), dtype)


# --- on a real GPU (pytest -m gpu; scripts/gpu_check.sh) ---------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or not gpu.triton_available(),
                                reason="needs a CUDA GPU and triton")


def rel_err(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6)).item()


@pytest.fixture
def cuda():
    from miaotui.kernels import triton_ops
    assert not triton_ops.interpreted(), "TRITON_INTERPRET=1 is set: the kernels are not compiled"
    return torch.device("cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("B", [1, 8, 64])
def test_gpu_decode_attention_llama3_shape(cuda, B):
    """Llama-3-8B heads (32 q, 8 kv, 128), contexts up to 4k, bf16, block 16."""
    g = torch.Generator().manual_seed(B)
    lens = torch.randint(1, 4096, (B,), generator=g).tolist()
    lens[0] = 4096
    tables, kc, vc, H = paged_case(lens, block_size=16, kvh=8, groups=4, d=128, dtype=torch.bfloat16,
                                   device=cuda)
    q = torch.randn(B, H, 128, device=cuda, dtype=torch.bfloat16)
    sl = torch.tensor(lens, dtype=torch.int32, device=cuda)
    for window in (0, 1024):
        got = gpu.paged_decode_attention(q, kc, vc, tables, sl, 16, 128 ** -0.5, window)
        want = gpu.paged_decode_attention_ref(q, kc, vc, tables, sl, 16, 128 ** -0.5, window)
        assert rel_err(got, want) < 2e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("d,groups", [(128, 4), (64, 8), (256, 2)])
def test_gpu_prefill_attention(cuda, d, groups):
    starts, chunk = [0, 700, 37], [1000, 512, 1]
    lens = [s + c for s, c in zip(starts, chunk)]
    tables, kc, vc, H = paged_case(lens, block_size=16, kvh=4, groups=groups, d=d, dtype=torch.bfloat16,
                                   device=cuda)
    cu = torch.tensor([0, 1000, 1512, 1513], dtype=torch.int32, device=cuda)
    st = torch.tensor(starts, dtype=torch.int32, device=cuda)
    q = torch.randn(1513, H, d, device=cuda, dtype=torch.bfloat16)
    for window, cap in ((0, 0.0), (256, 0.0), (0, 50.0)):
        got = gpu.paged_prefill_attention(q, kc, vc, tables, cu, st, 16, d ** -0.5, window, cap)
        want = gpu.paged_prefill_attention_ref(q, kc, vc, tables, cu, st, 16, d ** -0.5, window, cap)
        assert rel_err(got, want) < 2e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("M", [1, 4, 16, 512])
def test_gpu_quant_matmul(cuda, M):
    torch.manual_seed(M)
    w = torch.randn(4096, 4096) * 0.02
    for qw in (quant.quantize_int8(w), quant.quantize_int4(w, 32, symmetric=True),
               quant.quantize_int4(w, 128, symmetric=False)):
        for name in ("q", "scale", "min"):
            if getattr(qw, name) is not None:
                setattr(qw, name, getattr(qw, name).to(cuda))
        x = torch.randn(M, 4096, device=cuda, dtype=torch.bfloat16)
        assert rel_err(gpu.quant_matmul(x, qw), gpu.quant_matmul_ref(x, qw)) < 1e-2


@pytest.mark.gpu
@needs_cuda
def test_gpu_elementwise(cuda):
    x = torch.randn(64, 4096, device=cuda, dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.randn(4096, device=cuda)
    assert rel_err(gpu.rms_norm(x, w, 1e-5), gpu.rms_norm_ref(x, w, 1e-5)) < 1e-2
    n1, r1 = gpu.add_rms_norm(x, r, w, 1e-5)
    n2, r2 = gpu.add_rms_norm_ref(x, r, w, 1e-5)
    assert torch.equal(r1, r2) and rel_err(n1, n2) < 1e-2
    gu = torch.randn(64, 2 * 14336, device=cuda, dtype=torch.bfloat16)
    assert rel_err(gpu.silu_mul(gu), gpu.gated_ref(gu, "silu")) < 1e-2
    assert rel_err(gpu.gelu_tanh_mul(gu), gpu.gated_ref(gu, "gelu_tanh")) < 1e-2
    rope = RotaryEmbedding(128, 4096, 500000.0).to(cuda)
    cos, sin = rope.lookup(torch.arange(64, device=cuda) * 50)
    qkv = torch.randn(64, 48, 128, device=cuda, dtype=torch.bfloat16)
    want = qkv.clone()
    gpu.rotary(qkv[:, :32], qkv[:, 32:40], cos, sin)
    gpu.rotary_ref(want[:, :32], want[:, 32:40], cos, sin)
    assert rel_err(qkv, want) < 1e-2


@pytest.mark.gpu
@needs_cuda
def test_gpu_kernels_replay_in_a_cuda_graph(cuda):
    """Decode attention + a quantized matmul captured once, replayed on new inputs."""
    lens = [300, 17, 0, 1000]
    tables, kc, vc, H = paged_case(lens, block_size=16, kvh=8, groups=4, d=128, dtype=torch.bfloat16,
                                   device=cuda)
    sl = torch.tensor(lens, dtype=torch.int32, device=cuda)
    q = torch.randn(4, H, 128, device=cuda, dtype=torch.bfloat16)
    qw = quant.quantize_int4(torch.randn(1024, H * 128) * 0.02, 32)
    qw.q, qw.scale = qw.q.to(cuda), qw.scale.to(cuda)
    step = lambda: gpu.quant_matmul(gpu.paged_decode_attention(q, kc, vc, tables, sl, 16, 0.1).view(4, -1), qw)  # noqa: E731
    step()                                    # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    q.copy_(torch.randn_like(q))
    sl.copy_(torch.tensor([301, 18, 0, 999], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, step())


def test_kernels_compile_for_sm90():
    """The interpreter never runs Triton's compiler: compile the bf16 variants for an H100/H200
    here (scripts/triton_compile_check.py, in a process without TRITON_INTERPRET)."""
    import os
    import subprocess
    import sys
    if not gpu.triton_available():
        pytest.skip("triton is not importable here (pip install triton)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, os.path.join(root, "scripts", "triton_compile_check.py"), "--quick"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "variants compiled for sm_90" in r.stdout
