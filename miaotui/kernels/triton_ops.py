"""Triton kernels behind miaotui/kernels/gpu.py (the CUDA path), written for H100/H200.

* ``store_kv``: one program per token copies its K and V heads into their cache slot
  (slot -1, a CUDA graph's padding row, is skipped).
* ``_attention_kernel`` (paged attention, decode and prefill in one kernel): a program
  takes one KV head and the query heads that share it (GQA: K/V are read once for the
  group), and walks the keys of its sequence's paged cache in tiles of BLOCK_N, gathering
  slots through the block table, with an online (flash) softmax in float32. Decode: one
  query row per program; when the batch gives too few programs to fill the GPU, the keys
  of a row are split across SPLITS programs whose partial results ``_merge_kernel`` merges
  by their log-sum-exp (flash-decoding). Prefill: a tile of BLOCK_M queries of one
  sequence per program, causal, reading its keys straight from the cache (no K/V copies).
* ``_quant_matmul_kernel``: x @ W.T for Int8Weight / Int4Weight (Q4_0 nibble order), the
  weight dequantized in registers (scale * q (+ min), as quant.py), float32 accumulation.
  A GEMV form (broadcast multiply + reduce, W streamed once, split over K when N is small)
  for M <= 4 rows, a tiled GEMM (tl.dot, W dequantized to the activation's 16-bit dtype)
  for more.
* ``_rms_norm_kernel`` (optionally fused with the residual add), ``_rotary_kernel`` (q and
  k heads of a token, in place), ``_gated_kernel`` (silu/gelu_tanh(gate) * up).

Not batch-invariant on the GPU: quant_matmul picks GEMV or GEMM (and a split) by M and N,
and decode attention picks SPLITS by the batch size, so a row's last bits can depend on the
batch (the CPU kernels promise invariance; this path does not).

Tests run these kernels on CPU in Triton's interpreter, which triton picks when it is
first imported with TRITON_INTERPRET=1 (tests/conftest.py sets it on machines without a
GPU); the kernels then see numpy arrays. Block sizes are fixed per shape (no autotune:
CUDA-graph capture wants no benchmarking runs); the interpreter gets small ones so the
tests stay fast.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_SMS = 132   # H100/H200 streaming multiprocessors (read from the device when there is one)


def interpreted() -> bool:
    """Whether these kernels run in Triton's interpreter (TRITON_INTERPRET=1 was set when
    triton was first imported): then they take CPU tensors, and only those."""
    return not isinstance(_store_kv_kernel, triton.runtime.JITFunction)


def _p2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def _sms(t: torch.Tensor) -> int:
    return _device_sms(t.device.index or 0) if t.device.type == "cuda" else _SMS


@functools.lru_cache(maxsize=None)
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _dot_types(dtype: torch.dtype):
    """(operand dtype, input_precision) of tl.dot for activations of ``dtype``: 16-bit
    stays 16-bit; float32 stays float32 (TF32 would cost ~3 decimal digits). The
    interpreter's 16-bit dot is wrong (numpy has no bfloat16): there, float32."""
    if dtype == torch.float32 or interpreted():
        return tl.float32, "ieee"
    return _TL[dtype], "tf32"


# --- KV cache --------------------------------------------------------------------------

@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, sk_t, sk_h, sv_t, sv_h,
                     sc_s, sc_h, KVH, D, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    # (slot + 0 * h: a tensor comparison; the interpreter mistypes scalar & tensor masks)
    mask = (h < KVH) & (d < D) & (slot + 0 * h >= 0)
    k = tl.load(k_ptr + t * sk_t + h * sk_h + d, mask=mask)
    v = tl.load(v_ptr + t * sv_t + h * sv_h + d, mask=mask)
    dst = slot * sc_s + h * sc_h + d
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


def _last_dim_contiguous(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    T, KVH, D = k.shape
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("store_kv: the caches must be contiguous")
    k, v = _last_dim_contiguous(k, v)
    _store_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping.contiguous(), k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), k_cache.stride(0), k_cache.stride(1), KVH, D,
        BLOCK_H=_p2(KVH), BLOCK_D=_p2(D), num_warps=4)


# --- paged attention -------------------------------------------------------------------

@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, tab_ptr, a_ptr, b_ptr, out_ptr, lse_ptr,
                      sq_t, sq_h, sk_s, sk_h, sv_s, sv_h, st_row, so_t, so_h, so_s,
                      sl_t, sl_h, scale_log2, softcap, window, block_size, G, D,
                      DECODE: tl.constexpr, SPLITS: tl.constexpr, SOFTCAP: tl.constexpr,
                      DOT_TY: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """DECODE: program (split, row, kv head); a = seq_lens. Else program (query tile,
    sequence, kv head); a = cu_seqlens_q, b = start_pos. Rows of the tile are
    (query m, grouped head g) pairs, BLOCK_M * BLOCK_G of them."""
    pid = tl.program_id(0)
    seq = tl.program_id(1)
    kh = tl.program_id(2)
    r = tl.arange(0, BLOCK_M * BLOCK_G)
    mi = r // BLOCK_G
    gi = r % BLOCK_G
    if DECODE:
        n = tl.load(a_ptr + seq)
        tok = seq + mi
        qpos = n - 1 + mi
        rmask = (gi < G) & (qpos >= 0)      # seq_len 0: a padding row, its output zeros
        smask = gi < G
        lo = tl.where(window > 0, tl.maximum(n - window, 0), 0)
        per = tl.cdiv(tl.cdiv(tl.maximum(n - lo, 0), BLOCK_N), SPLITS) * BLOCK_N
        k_lo = lo + pid * per
        k_hi = tl.minimum(k_lo + per, n)
    else:
        q0 = tl.load(a_ptr + seq)
        q1 = tl.load(a_ptr + seq + 1)
        start = tl.load(b_ptr + seq)
        tok = q0 + pid * BLOCK_M + mi
        qpos = start + tok - q0
        rmask = (tok < q1) & (gi < G)
        smask = rmask
        first = start + pid * BLOCK_M
        end = start + q1 - q0
        k_lo = tl.where(window > 0, tl.maximum(first - window + 1, 0), 0)
        k_hi = tl.where(first < end, tl.minimum(end, first + BLOCK_M), 0)
    head = kh * G + gi
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(q_ptr + tok.to(tl.int64)[:, None] * sq_t + head[:, None] * sq_h + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    q = q.to(DOT_TY)
    m_i = tl.full([BLOCK_M * BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M * BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_M * BLOCK_G, BLOCK_D], tl.float32)
    tab = tab_ptr + seq.to(tl.int64) * st_row
    for k0 in range(k_lo, k_hi, BLOCK_N):
        pos = k0 + tl.arange(0, BLOCK_N)
        pmask = pos < k_hi
        blk = tl.load(tab + pos // block_size, mask=pmask, other=0).to(tl.int64)
        slot = blk * block_size + pos % block_size
        kv_mask = pmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + slot[:, None] * sk_s + kh * sk_h + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(DOT_TY)), input_precision=PREC)          # [rows, BLOCK_N] float32
        if SOFTCAP:   # softcap * tanh(s * scale / softcap), tanh(y) = 1 - 2 / (exp(2y) + 1)
            y = s * (scale_log2 / softcap)                          # y * log2(e)
            s = softcap * (1.0 - 2.0 / (tl.exp2(2.0 * y) + 1.0)) * 1.4426950408889634
        else:
            s = s * scale_log2
        valid = (pos[None, :] <= qpos[:, None]) & pmask[None, :]
        valid = valid & ((pos[None, :] > qpos[:, None] - window) | (window <= 0))
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + slot[:, None] * sv_s + kh * sv_h + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_TY), v.to(DOT_TY), input_precision=PREC)
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    dst = tok.to(tl.int64)[:, None] * so_t + head[:, None] * so_h + d[None, :]
    if SPLITS == 1:
        tl.store(out_ptr + dst, o.to(out_ptr.dtype.element_ty), mask=smask[:, None] & dmask[None, :])
    else:   # partial result of this split and its log2-sum-exp2, merged by _merge_kernel
        tl.store(out_ptr + dst + pid * so_s, o, mask=smask[:, None] & dmask[None, :])
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + tok * sl_t + head * sl_h + pid, lse, mask=smask)


@triton.jit
def _merge_kernel(part_ptr, lse_ptr, out_ptr, H, D, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """One (row, head): the splits' partial outputs weighted by exp2(lse - max)."""
    row = tl.program_id(0)            # b * H + h
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr + row * SPLITS + s, mask=s < SPLITS, other=float("-inf"))
    mx = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(mx == float("-inf"), 0.0, mx))
    part = tl.load(part_ptr + (row * SPLITS + s)[:, None] * D + d[None, :],
                   mask=(s < SPLITS)[:, None] & (d < D)[None, :], other=0.0)
    tot = tl.sum(w, 0)
    o = tl.sum(part * w[:, None], 0) / tl.where(tot > 0, tot, 1.0)
    tl.store(out_ptr + row * D + d, o.to(out_ptr.dtype.element_ty), mask=d < D)


def _attn_blocks(q: torch.Tensor, D: int, G: int, rows: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_G, BLOCK_N, num_warps) for ~rows query rows per program."""
    bg = _p2(G)
    if q.device.type != "cuda":
        return (1, max(bg, 16), 16, 4) if rows == 1 else (max(1, 32 // bg), bg, 16, 4)
    bd = _p2(D)
    if q.dtype == torch.float32:   # full-precision tl.dot runs on FMA units: small tiles
        return (1, max(bg, 16), 16, 4) if rows == 1 else (max(1, 32 // bg), bg, 16, 4)
    if rows == 1:   # decode: the group padded to tl.dot's 16 rows
        return 1, max(bg, 16), 64 if bd <= 128 else 32, 4
    if bd > 128:
        return max(1, 64 // bg), bg, 32, 8
    return max(1, 128 // bg), bg, 64, 8


def _launch_attention(q, k_cache, v_cache, tables, a, b, grid_rows, block_size, scale, window,
                      softcap, decode: bool, splits: int, out, part, lse, blocks):
    BM, BG, BN, warps = blocks
    H, D = q.shape[1], q.shape[2]
    KVH = k_cache.shape[1]
    dst = part if splits > 1 else out
    dot_ty, prec = _dot_types(k_cache.dtype)
    ntiles = splits if decode else grid_rows[1]
    _attention_kernel[(ntiles, grid_rows[0], KVH)](
        q, k_cache, v_cache, tables, a, b, dst, lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
        v_cache.stride(1), tables.stride(0), dst.stride(0), dst.stride(1),
        part.stride(2) if splits > 1 else 0, lse.stride(0) if splits > 1 else 0,
        lse.stride(1) if splits > 1 else 0,
        scale * _LOG2E, float(softcap), int(window), int(block_size), H // KVH, D,
        DECODE=decode, SPLITS=splits, SOFTCAP=softcap > 0, DOT_TY=dot_ty, PREC=prec,
        BLOCK_M=BM, BLOCK_G=BG, BLOCK_D=_p2(D), BLOCK_N=BN, num_warps=warps)


def _check_cache(k_cache, v_cache, tables):
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or tables.stride(-1) != 1:
        raise ValueError("paged attention: the caches and block tables must be contiguous")


def decode_splits(q: torch.Tensor, kvh: int, max_keys: int, block_n: int) -> int:
    """How many programs share a row's keys: enough (row, kv head, split) programs to fill
    the GPU twice, each with at least 4 key tiles. Depends on the batch size: not batch-invariant."""
    progs = q.shape[0] * kvh
    want = max(1, (2 * _sms(q)) // max(1, progs))
    return int(min(want, max(1, max_keys // (4 * block_n)), 16))


def paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, block_size, scale, window=0,
                           softcap=0.0, splits: int | None = None):
    """``splits``: how many programs share a row's keys (None: decode_splits)."""
    _check_cache(k_cache, v_cache, tables)
    B, H, D = q.shape
    q = _last_dim_contiguous(q)[0]
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    blocks = _attn_blocks(q, D, H // k_cache.shape[1], 1)
    max_keys = min(tables.shape[1] * block_size, window) if window > 0 else tables.shape[1] * block_size
    splits = splits or decode_splits(q, k_cache.shape[1], max_keys, blocks[2])
    part = lse = out
    if splits > 1:
        part = torch.empty(B, H, splits, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
    _launch_attention(q, k_cache, v_cache, tables, seq_lens, seq_lens, (B, 1), block_size, scale,
                      window, softcap, True, splits, out, part, lse, blocks)
    if splits > 1:
        _merge_kernel[(B * H,)](part, lse, out, H, D, SPLITS=splits, BLOCK_S=_p2(splits),
                                      BLOCK_D=_p2(D), num_warps=4)
    return out


def paged_prefill_attention(q, k_cache, v_cache, tables, cu_seqlens_q, start_pos, block_size,
                            scale, window=0, softcap=0.0, max_seqlen_q: int | None = None):
    """``max_seqlen_q``: the longest chunk, if the caller knows it (saves a device sync)."""
    _check_cache(k_cache, v_cache, tables)
    T, H, D = q.shape
    q = _last_dim_contiguous(q)[0]
    out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    N = cu_seqlens_q.shape[0] - 1
    if T == 0 or N == 0:
        return out
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    blocks = _attn_blocks(q, D, H // k_cache.shape[1], 2)
    _launch_attention(q, k_cache, v_cache, tables, cu_seqlens_q, start_pos,
                      (N, triton.cdiv(max_seqlen_q, blocks[0])), block_size, scale, window,
                      softcap, False, 1, out, out, out, blocks)
    return out


# --- quantized matmul ------------------------------------------------------------------

@triton.jit
def _quant_matmul_kernel(x_ptr, q_ptr, s_ptr, mn_ptr, y_ptr, M, N, K, KP, sx_m, sq_n, ss_n,
                         sy_s, sy_m, group, offset, k_per_split,
                         BITS: tl.constexpr, HAS_MIN: tl.constexpr, SCALES: tl.constexpr,
                         GROUP: tl.constexpr, DOT: tl.constexpr,
                         DOT_TY: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """y[split] [M, N] (+)= x[:, ks] @ W[:, ks].T over this program's K range. W[n, k] =
    scale[n, k // group] * (q - offset) (+ min); int4: value k of a 32-block sits in byte
    k % 16 of its 16 bytes, low nibble for k % 32 < 16, high nibble else. SCALES: how a
    tile finds its scales: 1, one per row (group a multiple of BLOCK_K, or one per row);
    2, GROUP (a constexpr power of two) divides BLOCK_K, the tile reshaped by blocks;
    0, one gathered per element (any other group)."""
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    ps = tl.program_id(2)
    m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = m < M
    nmask = n < N
    rows_q = q_ptr + n.to(tl.int64)[:, None] * sq_n
    rows_s = n.to(tl.int64) * ss_n
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_lo = ps * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, KP)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < k_hi
        wmask = nmask[:, None] & kmask[None, :]
        if BITS == 4:
            byte = tl.load(rows_q + ((k // 32) * 16 + k % 16)[None, :], mask=wmask, other=0)
            ints = ((byte.to(tl.int32) >> (((k % 32) // 16) * 4)[None, :]) & 15).to(tl.float32)
        else:
            ints = tl.load(rows_q + k[None, :], mask=wmask, other=0).to(tl.float32)
        if SCALES == 1:
            sidx = rows_s + k0 // group
            w = (ints - offset) * tl.load(s_ptr + sidx, mask=nmask, other=0.0).to(tl.float32)[:, None]
            if HAS_MIN:
                w = w + tl.load(mn_ptr + sidx, mask=nmask, other=0.0).to(tl.float32)[:, None]
        elif SCALES == 2:
            b = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
            sidx = rows_s[:, None] + b[None, :]
            smask = nmask[:, None] & (b * GROUP < k_hi)[None, :]
            sc = tl.load(s_ptr + sidx, mask=smask, other=0.0).to(tl.float32)
            w = tl.reshape(ints - offset, [BLOCK_N, BLOCK_K // GROUP, GROUP]) * sc[:, :, None]
            if HAS_MIN:
                w = w + tl.load(mn_ptr + sidx, mask=smask, other=0.0).to(tl.float32)[:, :, None]
            w = tl.reshape(w, [BLOCK_N, BLOCK_K])
        else:
            sidx = rows_s[:, None] + (k // group)[None, :]
            w = (ints - offset) * tl.load(s_ptr + sidx, mask=wmask, other=0.0).to(tl.float32)
            if HAS_MIN:
                w = w + tl.load(mn_ptr + sidx, mask=wmask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + m.to(tl.int64)[:, None] * sx_m + k[None, :],
                    mask=mmask[:, None] & (k < K)[None, :], other=0.0)
        if DOT:
            acc = tl.dot(x.to(DOT_TY), tl.trans(w.to(DOT_TY)), acc, input_precision=PREC)
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], 2)
    dst = y_ptr + ps * sy_s + m.to(tl.int64)[:, None] * sy_m + n[None, :]
    tl.store(dst, acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def _qmm_config(x: torch.Tensor, M: int, N: int, KP: int):
    """(DOT, BLOCK_M, BLOCK_N, BLOCK_K, splits, num_warps), chosen by M and N (not
    batch-invariant: a row's bits depend on M's path). The GPU sizes keep every variant
    free of register spills on sm_90 (checked with ptxas); not tuned on a GPU yet."""
    gpu = x.device.type == "cuda"
    if M <= 4:   # GEMV: W streamed once; split K when N alone gives too few programs
        if not gpu:
            return False, _p2(M), 16, 64, 1, 4
        bn, bk, warps = (8, 256, 2) if M <= 2 else (16, 128, 4)
        progs = triton.cdiv(N, bn)
        splits = max(1, min((2 * _sms(x)) // progs, KP // (4 * bk), 8))
        return False, _p2(M), bn, bk, splits, warps
    if not gpu:
        return True, 16, 16, 32, 1, 4
    if x.dtype == torch.float32:   # full-precision tl.dot runs on FMA units: small tiles
        return True, 16 if M <= 16 else 32 if M <= 32 else 64, 32, 32, 1, 4
    bm = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
    return True, bm, 64, 64, 1, 8


def quant_matmul(x: torch.Tensor, w) -> torch.Tensor:
    lead = x.shape[:-1]
    x = x.reshape(-1, w.in_features)
    x = _last_dim_contiguous(x)[0]
    M, N, KP = x.shape[0], w.out_features, w.padded_in
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y.view(*lead, N)
    dot, bm, bn, bk, splits, warps = _qmm_config(x, M, N, KP)
    k_per_split = triton.cdiv(triton.cdiv(KP, splits), bk) * bk
    splits = triton.cdiv(KP, k_per_split)
    dst = y if splits == 1 else torch.empty(splits, M, N, dtype=torch.float32, device=x.device)
    mn = w.min if w.min is not None else w.scale
    dot_ty, prec = _dot_types(x.dtype)
    g = w.block_size
    nblk = w.scale.shape[1]
    scales = (1 if nblk == 1 or g % bk == 0 else
              2 if bk % g == 0 and g & (g - 1) == 0 else 0)
    _quant_matmul_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn), splits)](
        x, w.q, w.scale, mn, dst, M, N, w.in_features, KP, x.stride(0), w.q.stride(0),
        w.scale.stride(0), dst.stride(0) if splits > 1 else 0, dst.stride(-2), w.block_size,
        float(w.offset), k_per_split,
        BITS=w.bits, HAS_MIN=w.min is not None, SCALES=scales, GROUP=g if scales == 2 else 1,
        DOT=dot, DOT_TY=dot_ty, PREC=prec,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    if splits > 1:
        y = dst.sum(0).to(x.dtype)
    return y.view(*lead, N)


# --- norms, rotary, activations --------------------------------------------------------

@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, ro_ptr, sx, sr, sy, sro, N, eps, offset,
                     ADD: tl.constexpr, BLOCK: tl.constexpr):
    """Row i: (x + r, rounded to r's dtype, when ADD) normalised; the sum is stored too."""
    i = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    mask = c < N
    x = tl.load(x_ptr + i * sx + c, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        s = x + tl.load(r_ptr + i * sr + c, mask=mask, other=0.0).to(tl.float32)
        s = s.to(ro_ptr.dtype.element_ty)
        tl.store(ro_ptr + i * sro + c, s, mask=mask)
        x = s.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
    w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32) + offset
    tl.store(y_ptr + i * sy + c, (w * (x * inv)).to(y_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _norm_warps(n: int) -> int:
    return 4 if n <= 2048 else 8 if n <= 8192 else 16


def rms_norm(x, weight, eps, offset=0.0):
    x2 = _rows(x)
    y = torch.empty_like(x2)
    if x2.shape[0]:
        N = x2.shape[1]
        _rms_norm_kernel[(x2.shape[0],)](
            x2, x2, weight, y, y, x2.stride(0), 0, y.stride(0), 0, N, float(eps), float(offset),
            ADD=False, BLOCK=_p2(N), num_warps=_norm_warps(N))
    return y.view(x.shape)


def add_rms_norm(x, residual, weight, eps, offset=0.0):
    x2, r2 = _rows(x), _rows(residual)
    y = torch.empty_like(x2)
    r_out = torch.empty_like(r2)
    if x2.shape[0]:
        N = x2.shape[1]
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, y, r_out, x2.stride(0), r2.stride(0), y.stride(0), r_out.stride(0), N,
            float(eps), float(offset), ADD=True, BLOCK=_p2(N), num_warps=_norm_warps(N))
    return y.view(x.shape), r_out.view(residual.shape)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, sx_t, sx_h, sc_t, HEADS, HALF,
                   BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Token t's heads of x rotated in place: (x1 c - x2 s, x2 c + x1 s)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < HEADS) & (d < HALF)
    c = tl.load(cos_ptr + t * sc_t + d, mask=d < HALF, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + t * sc_t + d, mask=d < HALF, other=0.0).to(tl.float32)
    p1 = x_ptr + t * sx_t + h * sx_h + d
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * c - x2 * s).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, (x2 * c + x1 * s).to(x_ptr.dtype.element_ty), mask=mask)


def rotary(q, k, cos, sin):
    T = q.shape[0]
    if T == 0:
        return q, k
    c = cos.reshape(T, -1).float().contiguous()
    s = sin.reshape(T, -1).float().contiguous()
    half = c.shape[1]
    for x in (q, k):
        if x.stride(-1) != 1 or x.shape[-1] != 2 * half:
            raise ValueError(f"rotary: needs a contiguous last dim of {2 * half}, got {tuple(x.shape)}")
        _rotary_kernel[(T,)](x, c, s, x.stride(0), x.stride(1), c.stride(0), x.shape[1], half,
                                   BLOCK_H=_p2(x.shape[1]), BLOCK_D=_p2(half), num_warps=4)
    return q, k


@triton.jit
def _gated_kernel(x_ptr, y_ptr, sx, sy, I, GELU: tl.constexpr, BLOCK: tl.constexpr):
    """y[i, c] = act(x[i, c]) * x[i, I + c]."""
    i = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < I
    g = tl.load(x_ptr + i * sx + c, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + i * sx + I + c, mask=mask, other=0.0).to(tl.float32)
    if GELU:   # 0.5 g (1 + tanh(z)) = g * sigmoid(2z), z = sqrt(2/pi) (g + 0.044715 g^3)
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = g / (1.0 + tl.exp(-2.0 * z))
    else:
        a = g / (1.0 + tl.exp(-g))
    tl.store(y_ptr + i * sy + c, (a * u).to(y_ptr.dtype.element_ty), mask=mask)


def gated_act(x: torch.Tensor, act: str) -> torch.Tensor:
    x2 = _rows(x)
    I = x2.shape[1] // 2
    y = torch.empty(x2.shape[0], I, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = min(1024, _p2(I)) if x.device.type == "cuda" else min(256, _p2(I))
        _gated_kernel[(x2.shape[0], triton.cdiv(I, block))](
            x2, y, x2.stride(0), y.stride(0), I, GELU=act == "gelu_tanh", BLOCK=block, num_warps=4)
    return y.view(*x.shape[:-1], I)


__all__ = ["store_kv", "paged_decode_attention", "paged_prefill_attention", "quant_matmul",
           "rms_norm", "add_rms_norm", "rotary", "gated_act", "decode_splits"]
