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
