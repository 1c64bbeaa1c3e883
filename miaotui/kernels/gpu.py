"""The CUDA path's kernels: one function per operation, Triton on the GPU, PyTorch elsewhere.

Each function runs its Triton kernel (miaotui/kernels/triton_ops.py) when ``use_triton(t)``
says so: the tensor is on a CUDA device and triton imports, or the Triton-on-CPU test mode
is on (``MIAOTUI_TRITON_CPU=1`` together with ``TRITON_INTERPRET=1``: the kernels then run
in Triton's interpreter on CPU tensors, which is how tests/test_gpu_kernels.py checks them
without a GPU). Otherwise it runs the PyTorch reference beside it, which has the same
semantics, runs on any device, and is what the tests compare the kernels against.

Activations are bfloat16, float16 or float32; arithmetic is float32; outputs have the
activation's dtype. The KV cache layout is layers/attention.py's KVCache: one pool of
slots ``[num_blocks * block_size, kv_heads, head_dim]`` per layer, a sequence's positions
living in the blocks its table names (slot = table[pos // block_size] * block_size +
pos % block_size). The int8 KV cache is CPU-only (these functions refuse it).

  store_kv                 K/V of the step's tokens into their slots (slot -1: skip)
  paged_decode_attention   one query row per decode token, over its sequence's cache
  paged_prefill_attention  packed prompt chunks, causal over cache + chunk
  quant_matmul             x @ W.T straight from Int8Weight / Int4Weight
  rms_norm, add_rms_norm   RMSNorm, optionally fused with the residual add
  rotary                   rotate-half rotary embedding of q and k, in place
  silu_mul, gelu_tanh_mul  act(gate) * up of a [M, 2I] gate|up tensor

On the GPU, batch invariance is NOT promised (unlike the CPU kernels): quant_matmul picks
its GEMV or GEMM kernel by the number of rows, and decode attention splits long contexts
across programs when the batch is small, so a row's last bits may depend on the batch.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from miaotui.config import MiaotuiError

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_GATHER_ELEMENTS = 1 << 27   # the attention reference gathers K (and V) this many floats at a time


# --- dispatch --------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when triton and our kernels import (never raises)."""
    try:
        from miaotui.kernels import triton_ops  # noqa: F401
        return True
    except Exception:   # triton missing, or too old for a feature we use
        return False


def triton_cpu_mode() -> bool:
    """The test mode: Triton kernels on CPU tensors, in Triton's interpreter (which triton
    chooses when it is first imported, so TRITON_INTERPRET=1 must be set before that)."""
    on = lambda name: os.environ.get(name, "") not in ("", "0")  # noqa: E731
    return (on("MIAOTUI_TRITON_CPU") and on("TRITON_INTERPRET") and triton_available()
            and _ops().interpreted())


def use_triton(t: torch.Tensor) -> bool:
    """Whether the operation on tensor ``t`` runs its Triton kernel (else the reference)."""
    if t.device.type == "cuda":
        return triton_available()
    return t.device.type == "cpu" and triton_cpu_mode()


def _ops():
    from miaotui.kernels import triton_ops
    return triton_ops


def _check_float(name: str, *ts: torch.Tensor) -> None:
    for t in ts:
        if t.dtype not in _FLOATS:
            raise MiaotuiError(f"{name}: {t.dtype} tensors are not supported on the GPU path "
                               f"(float32, float16, bfloat16; the int8 KV cache is CPU-only)")


# --- KV cache --------------------------------------------------------------------------

def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k, v [T, KVH, D] into the caches [S, KVH, D] at slot_mapping [T] (-1: skip)."""
    _check_float("store_kv", k_cache, v_cache)
    if k.shape[0] == 0:
        return
    if use_triton(k):
        return _ops().store_kv(k, v, k_cache, v_cache, slot_mapping)
    return store_kv_ref(k, v, k_cache, v_cache, slot_mapping)


def store_kv_ref(k, v, k_cache, v_cache, slot_mapping) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.index_copy_(0, slots, v[keep].to(v_cache.dtype))


# --- attention -------------------------------------------------------------------------

def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                           scale: float, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """q [B, H, D], one query per row, attends to its row's positions
    max(0, seq_len - window) .. seq_len - 1 (window 0: all) -> [B, H, D].

    tables [B, max_blocks] int32: the row's sequence's block table; seq_lens [B] int32 =
    the query's position + 1 (0: a padding row, whose output is zeros). GQA: head h reads
    kv head h // (H // KVH). softcap > 0: scores = softcap * tanh(scores / softcap)."""
    _check_float("paged_decode_attention", q, k_cache, v_cache)
    if use_triton(q):
        return _ops().paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, block_size,
                                             scale, window, softcap)
    return paged_decode_attention_ref(q, k_cache, v_cache, tables, seq_lens, block_size,
                                      scale, window, softcap)


def paged_decode_attention_ref(q, k_cache, v_cache, tables, seq_lens, block_size, scale,
                               window=0, softcap=0.0) -> torch.Tensor:
    B, H, D = q.shape
    L = tables.shape[1] * block_size
    rows = max(1, _GATHER_ELEMENTS // max(1, L * k_cache.shape[1] * D))
    if B > rows:   # rows a chunk at a time: each row gathers its whole table's keys
        return torch.cat([paged_decode_attention_ref(q[i:i + rows], k_cache, v_cache, tables[i:i + rows],
                                                     seq_lens[i:i + rows], block_size, scale, window, softcap)
                          for i in range(0, B, rows)])
    kvh = k_cache.shape[1]
    if B == 0:
        return q.clone()
    pos = torch.arange(L, device=q.device)
    slots = tables.long()[:, pos // block_size] * block_size + pos % block_size    # [B, L]
    k = k_cache[slots].float()                                                     # [B, L, KVH, D]
    v = v_cache[slots].float()
    qg = q.float().view(B, kvh, H // kvh, D)
    s = torch.einsum("bkgd,blkd->bkgl", qg, k) * scale                            # [B, KVH, g, L]
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    n = seq_lens.long()[:, None]
    valid = pos[None, :] < n
    if window > 0:
        valid &= pos[None, :] >= n - window
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)                                   # padding rows: 0
    o = torch.einsum("bkgl,blkd->bkgd", p, v)
    return o.reshape(B, H, D).to(q.dtype)


def _token_rows(cu_seqlens_q: torch.Tensor, start_pos: torch.Tensor, T: int):
    """Per packed token: its sequence's index and its position."""
    t = torch.arange(T, device=cu_seqlens_q.device)
    seq = torch.searchsorted(cu_seqlens_q[1:].long(), t, right=True)
    return seq, start_pos.long()[seq] + t - cu_seqlens_q.long()[seq]


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            start_pos: torch.Tensor, block_size: int, scale: float,
                            window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """q [T, H, D]: the chunks of N sequences packed back to back (cu_seqlens_q [N+1]),
    chunk i's first token at position start_pos[i]; the chunk's K/V and everything before
    it are in the cache (store_kv runs first). The query at position p attends to the
    positions (p - window, p] (window 0: [0, p]) -> [T, H, D]."""
    _check_float("paged_prefill_attention", q, k_cache, v_cache)
    if use_triton(q):
        return _ops().paged_prefill_attention(q, k_cache, v_cache, tables, cu_seqlens_q,
                                              start_pos, block_size, scale, window, softcap)
    return paged_prefill_attention_ref(q, k_cache, v_cache, tables, cu_seqlens_q, start_pos,
                                       block_size, scale, window, softcap)


def paged_prefill_attention_ref(q, k_cache, v_cache, tables, cu_seqlens_q, start_pos,
                                block_size, scale, window=0, softcap=0.0) -> torch.Tensor:
    # each token is a decode query of its own: same semantics, one row per token
    seq, pos = _token_rows(cu_seqlens_q, start_pos, q.shape[0])
    return paged_decode_attention_ref(q, k_cache, v_cache, tables[seq], pos + 1, block_size,
                                      scale, window, softcap)


# --- quantized matmul ------------------------------------------------------------------

def quant_matmul(x: torch.Tensor, w) -> torch.Tensor:
    """x [M, K] @ W.T for a quant.Int8Weight / Int4Weight (or a linear.RowStack of them)
    -> [M, N] in x's dtype, the weight dequantized on the fly, float32 accumulation."""
    _check_float("quant_matmul", x)
    if hasattr(w, "parts"):   # RowStack: parts of different formats side by side
        return torch.cat([quant_matmul(x, p) for p in w.parts], dim=-1)
    if x.shape[-1] != w.in_features:
        raise MiaotuiError(f"quant_matmul: x has {x.shape[-1]} features, the weight {w.in_features}")
    if use_triton(x):
        return _ops().quant_matmul(x, w)
    return quant_matmul_ref(x, w)


def quant_matmul_ref(x: torch.Tensor, w) -> torch.Tensor:
    # the weight's own PyTorch dequantization (bit-exact with dequantize()), a tile at a time
    x2 = x.reshape(-1, w.in_features).float()
    return w._matmul_tiles(x2, w._dequant_rows).to(x.dtype).view(*x.shape[:-1], w.out_features)


# --- norms -----------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """(weight + offset) * x / sqrt(mean(x^2) + eps) over the last dim."""
    _check_float("rms_norm", x)
    if use_triton(x):
        return _ops().rms_norm(x, weight, eps, offset)
    return rms_norm_ref(x, weight, eps, offset)


def rms_norm_ref(x, weight, eps, offset=0.0) -> torch.Tensor:
    xf = x.float()
    w = weight.float() + offset if offset else weight.float()
    return (w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the residual add fused into the norm. The sum
    is rounded to residual's dtype before it is normalised, as the unfused ops would."""
    _check_float("add_rms_norm", x, residual)
    if use_triton(x):
        return _ops().add_rms_norm(x, residual, weight, eps, offset)
    return add_rms_norm_ref(x, residual, weight, eps, offset)


def add_rms_norm_ref(x, residual, weight, eps, offset=0.0):
    r = (x.float() + residual.float()).to(residual.dtype)
    return rms_norm_ref(r, weight, eps, offset).to(x.dtype), r


# --- rotary, activations ---------------------------------------------------------------

def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q [T, H, D] and k [T, KVH, D] IN PLACE (views are fine, e.g. slices of a
    fused qkv; the last dim must be contiguous) with cos, sin [T, D/2] or [T, 1, D/2]
    (RotaryEmbedding.lookup), layers/rotary.py:apply_rotary's rotate-half layout. Returns
    (q, k)."""
    _check_float("rotary", q, k)
    if use_triton(q):
        return _ops().rotary(q, k, cos, sin)
    return rotary_ref(q, k, cos, sin)


def rotary_ref(q, k, cos, sin):
    from miaotui.layers.rotary import apply_rotary
    c, s = cos.reshape(cos.shape[0], 1, -1).float(), sin.reshape(sin.shape[0], 1, -1).float()
    for x in (q, k):
        x.copy_(apply_rotary(x.float(), c, s))
    return q, k


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x [M, 2I] = [gate | up] -> silu(gate) * up, [M, I]."""
    _check_float("silu_mul", x)
    if use_triton(x):
        return _ops().gated_act(x, "silu")
    return gated_ref(x, "silu")


def gelu_tanh_mul(x: torch.Tensor) -> torch.Tensor:
    """x [M, 2I] = [gate | up] -> gelu_tanh(gate) * up, [M, I]."""
    _check_float("gelu_tanh_mul", x)
    if use_triton(x):
        return _ops().gated_act(x, "gelu_tanh")
    return gated_ref(x, "gelu_tanh")


def gated_ref(x: torch.Tensor, act: str) -> torch.Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    a = F.silu(gate) if act == "silu" else F.gelu(gate, approximate="tanh")
    return (a * up).to(x.dtype)
