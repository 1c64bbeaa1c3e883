"""Weight-only quantized weights: int8, int4 and GGUF's block formats, kept small in memory.

A :class:`QuantWeight` holds an [out, in] weight as small integers with one float scale
(and for some formats a float min) per block of ``block_size`` inputs, and computes
``x @ W.T`` straight from them. Two layouts cover every format:

  Int8Weight  q int8  [out, in]     w = scale * q (+ min)
  Int4Weight  q uint8 [out, in/2]   w = scale * (q - 8), or scale * q + min when it has a min
              In each block of 32 inputs, byte i holds value i in its low nibble and
              value i+16 in its high one (the order of GGUF's Q4_0).
  Int5Weight  q uint8 [out, 5in/8]  w = scale * (q - 16), or scale * q + min when it has a min
              A row is its low four bits as Int4Weight's (in/2 bytes), then each block's
              fifth bits as 4 bytes, bit i for value i (GGUF's Q5_0/Q5_1 qs and qh).

``scale``/``min`` are [out, in/block_size], float16 where that is exact, else float32.
GGUF tensors are repacked into these layouts losslessly: ``dequantize()`` is bit-exact
with ``gguf.quants.dequantize``. Bytes per weight (``nbytes()``), GGUF's own in brackets:

  quantize_int8      int8, one float32 scale per row             1.0
  quantize_int4      int4, float16 scale (+ min) per 32/64/128   0.56 / 0.53 / 0.52 (+ min)
  Q8_0, Q4_0, Q4_1   as stored in the file                       1.06, 0.56, 0.63
  Q5_0, Q5_1         as stored in the file                       0.69, 0.75
  Q4_K               int4, float32 scale + min per 32            0.75           (0.56)
  Q5_K               int8, float32 scale + min per 32            1.25           (0.69)
  Q6_K               int8, float32 scale per 16                  1.25           (0.82)
  Q8_K               int8, float32 scale per 256                 1.02

(The K-quants' two-level scales become one float32 per block, their product.) The decode
kernel unpacks Int5Weight's values to int8 in registers and then does the int8 arithmetic,
so a Q5 tensor gives the bits it gave when it was repacked to int8, reading 35% fewer bytes.

``matmul`` picks one of three paths, by what the step computes, never by its size (so a
token's result does not depend on what else is in the batch):

* C++ kernels (miaotui/kernels), decode (the default mode): x is quantized to int8 per
  block of 32 on the fly (x ~ dx * xq, dx = max|x| / 127) and each block's dot product is
  an integer one (AVX2 maddubs), scaled by scale * dx. The weights stream once. The price
  is the activation rounding, at most dx/2 per element, so
  |y - x @ W.T| <= sum_k |W[n, k]| * dx(k) / 2 (tests/test_quant.py checks this bound).
  For Gaussian x that is ~0.5% relative RMS error: about int8 weight rounding's (~0.7%),
  far below 4-bit weights' (~8%).
* C++ kernels, inside ``exact_activations()`` (prompt tokens): W dequantized to float32
  bit-exactly, a block of rows at a time, into the packed panels of matmul_cpu.cpp's
  batch-invariant GEMM (``qf32_gemm``; dense float32 weights take ``f32_gemm``), and
  multiplied by the float32 activations.
* C++ kernels, inside ``exact_activations()`` and ``int8_prompt()`` (prompt tokens with
  ``EngineConfig.prefill_int8``, off by default): x rounded to int8 as for decode, then an
  int8 GEMM with exact integer block sums (``qgemm_int8``: AVX-512 VNNI, else AVX2 maddubs).
* No kernels (``MIAOTUI_NO_KERNELS=1``, no AVX2, no compiler): tiles of W dequantized by
  PyTorch, then BLAS (this fallback is not batch-invariant: BLAS picks kernels by shape).
"""
from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from miaotui import kernels
from miaotui.layers.device import on_gpu

_TILE_BYTES = 16 << 20  # float32 weight rows dequantized at a time on the BLAS path
_EMPTY = torch.empty(0)
_mode = threading.local()


@contextmanager
def _setting(name: str, value: bool):
    """Set one of this thread's matmul settings for the block, restoring it after."""
    prev = getattr(_mode, name, False)
    setattr(_mode, name, value)
    try:
        yield
    finally:
        setattr(_mode, name, prev)


def exact_activations(on: bool = True):
    """Within this block, matmuls keep activations in float32.

    The model runner uses it for prompt tokens: int8 activations (what llama.cpp does, and
    what the decode kernel does) cost SmolLM2-135M its answer to "What is the capital of
    France?" when applied to the prompt, while decode tolerates them.
    """
    return _setting("exact", on)


def exact_mode() -> bool:
    """Inside exact_activations(): prompt tokens, computed by the packed prefill GEMM."""
    return getattr(_mode, "exact", False)


def int8_prompt(on: bool = True):
    """Within exact_activations(), quantized weights take the int8-activation prefill GEMM
    (``EngineConfig.prefill_int8``, as llama.cpp does for prompts) instead of the float32
    one: 1.5-2x faster on AVX-512 VNNI, at an activation rounding like decode's. Dense
    weights keep the float32 GEMM. The engine sets it for every prompt, so a prompt row's
    result still depends on its own request only."""
    return _setting("int8_prompt", on)


def int8_prompt_mode() -> bool:
    return getattr(_mode, "int8_prompt", False)


def _ceil32(k: int) -> int:
    return (k + 31) // 32 * 32


class QuantWeight:
    """A quantized [out_features, in_features] weight; see the module docstring."""

    bits: int

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, min: torch.Tensor | None,
                 block_size: int, in_features: int):
        self.q = q.contiguous()
        self.scale = scale.contiguous()
        self.min = None if min is None else min.to(scale.dtype).contiguous()
        self.block_size = block_size          # inputs per scale (16, 32, ..., or a whole row)
        self.in_features = in_features
        self.out_features = q.shape[0]
        self.padded_in = q.shape[1] * 8 // self.bits  # in_features rounded up to 32
        if (self.padded_in % 32 or self.padded_in - in_features >= 32
                or tuple(self.scale.shape) != (self.out_features, self.padded_in // block_size)):
            raise ValueError(f"inconsistent {type(self).__name__}: q {tuple(q.shape)}, scale "
                             f"{tuple(scale.shape)}, block {block_size}, in {in_features}")

    # subclasses: the integer values [rows, padded_in] of stored rows q, offset already taken
    def _ints(self, q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def offset(self) -> float:
        """Subtracted from every stored value before scaling (8 for int4, 16 for int5
        without a min)."""
        if self.min is not None or self.bits == 8:
            return 0.0
        return 8.0 if self.bits == 4 else 16.0

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.out_features}x{self.in_features}, block "
                f"{self.block_size}, {self.scale.dtype}{', min' if self.min is not None else ''})")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.min)
                   if t is not None)

    def _values(self, q: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor | None) -> torch.Tensor:
        """Stored rows (q, their scales and mins) as float32 [rows, padded_in]: scale * q (+ min)."""
        rows, nblk = q.shape[0], scale.shape[1]
        v = self._ints(q).view(rows, nblk, -1).float()
        w = v * scale[:, :, None].float()  # a multiply, then an add: as gguf does
        if mn is not None:
            w = w + mn[:, :, None].float()
        return w.view(rows, self.padded_in)

    def _dequant_rows(self, n0: int, n1: int) -> torch.Tensor:
        """Rows n0..n1 as float32 [rows, padded_in], in PyTorch."""
        return self._values(self.q[n0:n1], self.scale[n0:n1],
                            None if self.min is None else self.min[n0:n1])

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (any shape) as float32 [*ids.shape, in_features]: bit-identical to
        ``dequantize()[ids]``, touching only those rows (an embedding lookup)."""
        flat = ids.reshape(-1)
        k = None if on_gpu(self.q) else kernels.load()
        if k is not None:   # the same bits as the PyTorch ops below, one call
            w = k.dequant_ids(*self._kernel_args(), flat.long().contiguous())
        else:
            pick = lambda t: None if t is None else t.index_select(0, flat)  # noqa: E731
            w = self._values(pick(self.q), pick(self.scale), pick(self.min))
        if self.padded_in != self.in_features:
            w = w[:, :self.in_features]
        return w.reshape(*ids.shape, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 [out_features, in_features] (the C++ kernel gives the same
        bits ~10x faster: a GGUF embedding table is dequantized at every load)."""
        k = kernels.load()
        w = (self._dequant_rows(0, self.out_features) if k is None
             else k.dequant(*self._kernel_args(), 0, self.out_features))
        return w if self.padded_in == self.in_features else w[:, :self.in_features].contiguous()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> float32 [..., out_features], x @ dequantize().T."""
        lead = x.shape[:-1]
        if on_gpu(x):   # miaotui.kernels.gpu: the output in x's dtype
            from miaotui.kernels import gpu
            return gpu.quant_matmul(x.reshape(-1, self.in_features), self).view(*lead, self.out_features)
        x = x.reshape(-1, self.in_features).float().contiguous()
        k = kernels.load()
        if k is None:
            y = self._matmul_tiles(x, self._dequant_rows)
        elif exact_mode() and int8_prompt_mode():
            y = self._matmul_int8(k, x, k.qgemm_int8)
        elif exact_mode():
            y = k.qf32_gemm(x, *self._kernel_args())
        else:
            y = self._matmul_int8(k, x)
        return y.view(*lead, self.out_features)

    def to(self, device) -> QuantWeight:
        """Move the stored blocks to ``device`` (in place; they stay quantized)."""
        self.q, self.scale = self.q.to(device), self.scale.to(device)
        self.min = None if self.min is None else self.min.to(device)
        return self

    def _kernel_args(self) -> tuple:
        m = _EMPTY if self.min is None else self.min
        return self.q, self.scale, m, self.block_size, self.bits, self.offset

    def _matmul_int8(self, k, x: torch.Tensor, kernel=None) -> torch.Tensor:
        """A C++ int8-activation kernel: the decode one (qmatmul), or the prompt GEMM."""
        if self.padded_in != self.in_features:
            x = F.pad(x, (0, self.padded_in - self.in_features))
        return (kernel or k.qmatmul)(x, *self._kernel_args())

    def _matmul_tiles(self, x: torch.Tensor, dequant_rows) -> torch.Tensor:
        """x @ W.T with W dequantized to float32 a tile of rows at a time."""
        n, kin = self.out_features, self.in_features
        rows = max(1, _TILE_BYTES // (4 * self.padded_in))
        if rows >= n:
            return x @ dequant_rows(0, n)[:, :kin].t()
        y = x.new_empty(x.shape[0], n)
        for n0 in range(0, n, rows):
            n1 = min(n, n0 + rows)
            y[:, n0:n1] = x @ dequant_rows(n0, n1)[:, :kin].t()
        return y

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {"q": self.q, "scale": self.scale,
              "meta": torch.tensor([self.bits, self.out_features, self.in_features, self.block_size])}
        if self.min is not None:
            sd["min"] = self.min
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> QuantWeight:
        bits, _, in_features, block = (int(v) for v in sd["meta"])
        sub = {8: Int8Weight, 5: Int5Weight, 4: Int4Weight}[bits]
        return sub(sd["q"], sd["scale"], sd.get("min"), block, in_features)


class Int8Weight(QuantWeight):
    """int8 values, w = scale * q (+ min)."""

    bits = 8

    def _ints(self, q: torch.Tensor) -> torch.Tensor:
        return q


class Int4Weight(QuantWeight):
    """4-bit values packed two a byte, w = scale * (q - 8), or scale * q + min."""

    bits = 4

    def _ints(self, q: torch.Tensor) -> torch.Tensor:
        v = _unpack_int4(q).view(torch.int8)
        return v - 8 if self.min is None else v


class Int5Weight(QuantWeight):
    """5-bit values: four low bits packed as Int4Weight's, then a bit plane of the fifth
    bits (4 bytes a block of 32); w = scale * (q - 16), or scale * q + min."""

    bits = 5

    def _ints(self, q: torch.Tensor) -> torch.Tensor:
        half = self.padded_in // 2
        v = _unpack_int4(q[:, :half].contiguous()) | (_bits(q[:, half:], self.padded_in) << 4)
        v = v.view(torch.int8)
        return v - 16 if self.min is None else v

    def as_int8(self) -> Int8Weight:
        """The same values as an Int8Weight (the CUDA kernels have no 5-bit layout)."""
        return Int8Weight(self._ints(self.q), self.scale, self.min, self.block_size, self.in_features)


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, k/2] -> values uint8 [rows, k]."""
    b = packed.view(packed.shape[0], -1, 16)
    return torch.cat([b & 15, b >> 4], dim=-1).view(packed.shape[0], -1)


def _pack_int4(v: torch.Tensor) -> torch.Tensor:
    """values 0..15 [rows, k] -> uint8 [rows, k/2]."""
    b = v.to(torch.uint8).view(v.shape[0], -1, 32)
    return (b[..., :16] | (b[..., 16:] << 4)).view(v.shape[0], -1)


def _scale_dtype(*ts: torch.Tensor) -> torch.dtype:
    """float16 when every value is zero or a normal float16 number, else float32."""
    a = torch.cat([t.abs().flatten() for t in ts])
    a = a[a > 0]
    ok = a.numel() == 0 or (a.min() >= 2.0 ** -14 and a.max() <= 65504)
    return torch.float16 if ok else torch.float32


# --- quantizing float weights ----------------------------------------------------------

def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """Symmetric int8 with one float32 scale per output row; any in_features."""
    w = w.detach().float()
    n, k = w.shape
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    q = torch.where(scale > 0, w / scale, 0.0).round().clamp(-127, 127).to(torch.int8)
    kp = _ceil32(k)
    return Int8Weight(F.pad(q, (0, kp - k)), scale, None, kp, k)


def quantize_int4(w: torch.Tensor, group_size: int = 32, symmetric: bool = True) -> Int4Weight:
    """4-bit, one scale per ``group_size`` inputs (32, 64 or 128).

    symmetric: w ~ scale * (q - 8), q in 0..15; the scale maps the group's largest
    magnitude to -8 (as GGUF's Q4_0). Otherwise w ~ scale * q + min (a zero point kept
    as a float), scale = (max - min) / 15.
    """
    if group_size not in (32, 64, 128):
        raise ValueError(f"group_size must be 32, 64 or 128, not {group_size}")
    w = w.detach().float()
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}")
    g = w.view(n, k // group_size, group_size)
    if symmetric:
        big = g.gather(-1, g.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
        scale = big / -8
        scale = scale.to(_scale_dtype(scale))
        s = scale.float()[..., None]
        q = torch.where(s != 0, g / s, 0.0).round().clamp(-8, 7) + 8
        mn = None
    else:
        scale, mn = _fit_asymmetric(g)
        dt = _scale_dtype(scale, mn)
        scale, mn = scale.to(dt), mn.to(dt)
        s = scale.float()[..., None]
        q = torch.where(s != 0, (g - mn.float()[..., None]) / s, 0.0).round().clamp(0, 15)
    return Int4Weight(_pack_int4(q.view(n, k)), scale, mn, group_size, k)


def _fit_asymmetric(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of g [..., G], the scale and min of w ~ scale * q + min (q in 0..15) with
    the least squared error among a few candidate grids, each refitted by least squares for
    its rounding (as llama.cpp does for its K-quants). The grids split the group's range in
    15, 14, ..., 8 steps: on weights that were 4-bit already (Gemma's Q4_K_M file), a group
    that does not use both end values of its old grid gets that grid back exactly, where
    min-max (15 steps) would round every value a second time. Rows go in chunks that stay
    in cache."""
    scale, mn = torch.empty(g.shape[:-1]), torch.empty(g.shape[:-1])
    rows = max(1, (1 << 20) // max(1, g[0].numel()))
    for r0 in range(0, g.shape[0], rows):
        scale[r0:r0 + rows], mn[r0:r0 + rows] = _fit_chunk(g[r0:r0 + rows])
    return scale, mn


def _fit_chunk(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    wm = g.mean(-1, keepdim=True)
    syy = ((g - wm) ** 2).sum(-1, keepdim=True)
    best_err = torch.full_like(lo, float("inf"))
    best_s, best_m = (hi - lo) / 15, lo
    for steps in range(15, 7, -1):
        s = (hi - lo) / steps
        q = torch.where(s > 0, (g - lo) / s, 0.0).round_().clamp_(0, 15)
        qmean = q.mean(-1, keepdim=True)
        q -= qmean                                          # centred: the fit is a regression
        sxx = (q * q).sum(-1, keepdim=True)
        sxy = (q * g).sum(-1, keepdim=True)
        s_fit = torch.where(sxx > 0, sxy / sxx.clamp_min(1e-30), 0.0)
        err = syy - s_fit * sxy                             # residual sum of squares
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s_fit, best_s)
        best_m = torch.where(better, wm - s_fit * qmean, best_m)
    return best_s.squeeze(-1).clamp_min(0), best_m.squeeze(-1)


# --- GGUF ------------------------------------------------------------------------------

def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte ``at`` of each block, as [blocks, 1] float16."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16)


def _nibbles(b: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes of a Q4_0-style block -> its 32 values (low nibbles first)."""
    return torch.cat([b & 15, b >> 4], dim=-1)


def _bits(b: torch.Tensor, n: int) -> torch.Tensor:
    """Bit i of little-endian bytes b [..., n/8], for i < n: [..., n] uint8 0/1."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((b[..., None] >> shifts) & 1).flatten(-2)[..., :n]


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins (as float32)."""
    d, m, md = s.reshape(-1, 3, 4).unbind(1)
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=-1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=-1)
    return sc.float(), mn.float()


def _k_low4(qs: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: 128 bytes -> 8 sub-blocks of 32 four-bit values: chunk c of 32 bytes
    holds sub-block 2c in its low nibbles and 2c+1 in its high ones."""
    c = qs.reshape(-1, 4, 1, 32)
    return torch.cat([c & 15, c >> 4], dim=2).view(-1, 8, 32)


def _repack(qt, blk: torch.Tensor, n: int, k: int) -> QuantWeight:
    """GGUF blocks [n * k / block, bytes] -> an Int8Weight or Int4Weight, losslessly."""
    T = _gguf().GGMLQuantizationType
    if qt == T.Q8_0:
        return Int8Weight(blk[:, 2:].contiguous().view(torch.int8).view(n, k),
                          _f16(blk, 0).view(n, -1), None, 32, k)
    if qt == T.Q4_0:
        return Int4Weight(blk[:, 2:].reshape(n, k // 2), _f16(blk, 0).view(n, -1), None, 32, k)
    if qt == T.Q4_1:
        return Int4Weight(blk[:, 4:].reshape(n, k // 2), _f16(blk, 0).view(n, -1),
                          _f16(blk, 2).view(n, -1), 32, k)
    if qt in (T.Q5_0, T.Q5_1):  # scale (+ min), qh (fifth bits), qs (low nibbles): kept as stored
        at = 2 if qt == T.Q5_0 else 4
        q = torch.cat([blk[:, at + 4:].reshape(n, k // 2), blk[:, at:at + 4].reshape(n, k // 8)], dim=1)
        mn = _f16(blk, 2).view(n, -1) if qt == T.Q5_1 else None
        return Int5Weight(q, _f16(blk, 0).view(n, -1), mn, 32, k)
    if qt in (T.Q4_K, T.Q5_K):  # w = d * sc * q - dmin * m per sub-block of 32
        sc, mn = _k_scales(blk[:, 4:16])
        scale = (_f16(blk, 0).float() * sc).view(n, -1)
        mins = -(_f16(blk, 2).float() * mn).view(n, -1)
        if qt == T.Q4_K:
            return Int4Weight(_pack_int4(_k_low4(blk[:, 16:]).reshape(n, k)), scale, mins, 32, k)
        qh = blk[:, 16:48].reshape(-1, 1, 32)  # bit s of byte i: value i of sub-block s
        high = (qh >> torch.arange(8, dtype=torch.uint8)[:, None]) & 1
        q = _k_low4(blk[:, 48:]) | (high << 4)
        return Int8Weight(q.view(torch.int8).reshape(n, k), scale, mins, 32, k)
    if qt == T.Q6_K:  # w = d * sc * (q - 32) per sub-block of 16
        low = torch.cat([blk[:, :128].view(-1, 2, 1, 64) & 15,
                         blk[:, :128].view(-1, 2, 1, 64) >> 4], dim=2).view(-1, 256)
        h = blk[:, 128:192].view(-1, 2, 1, 32)
        high = torch.cat([(h >> s) & 3 for s in (0, 2, 4, 6)], dim=2).view(-1, 256)
        q = (low | (high << 4)).view(torch.int8) - 32
        scale = _f16(blk, 208).float() * blk[:, 192:208].view(torch.int8).float()
        return Int8Weight(q.view(n, k), scale.view(n, -1), None, 16, k)
    if qt == T.Q8_K:  # float32 d, 256 int8, then 16 int16 sums (not needed)
        d = blk[:, :4].contiguous().view(torch.float32)
        return Int8Weight(blk[:, 4:260].contiguous().view(torch.int8).view(n, k),
                          d.view(n, -1), None, 256, k)
    raise ValueError(f"GGUF type {T(qt).name} is not supported (supported: "
                     f"{', '.join(t.name for t in supported_gguf_types())})")


def _gguf():
    import gguf
    return gguf


def supported_gguf_types() -> tuple:
    """The GGUF quantized types from_gguf keeps quantized."""
    T = _gguf().GGMLQuantizationType
    return (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_K)


def _raw_blocks(data: np.ndarray, qtype, shape: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
    gguf = _gguf()
    qt = gguf.GGMLQuantizationType(qtype)
    n, k = (int(s) for s in shape)
    block, size = gguf.GGML_QUANT_SIZES[qt]
    if k % block:
        raise ValueError(f"{qt.name}: in_features {k} is not a multiple of the block size {block}")
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if raw.size != n * k // block * size:
        raise ValueError(f"{qt.name} {shape}: expected {n * k // block * size} bytes, got {raw.size}")
    with warnings.catch_warnings():  # read-only memmaps: we never write to them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(raw).view(-1, size), n, k


_REPACK_CHUNK = 8 << 20   # file bytes repacked at a time when their pages can be released


def from_gguf(data: np.ndarray, qtype, shape: tuple[int, int], release=None) -> QuantWeight:
    """A GGUF tensor (raw data as gguf.GGUFReader gives it, rows = out_features) kept
    quantized: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, Q8_K. The result owns its
    memory: nothing in it points into ``data`` (often a view of a file's map).

    ``release(offset, nbytes)``, when given, drops the pages of data[offset:offset + nbytes]
    (bytes): a large tensor is then repacked a few MiB of rows at a time straight into its
    final tensors, each chunk's file pages released once copied, so the file's bytes and the
    repacked copy are never both resident (a 32000 x 2048 Q8_0 head: 70 MB less at the peak)."""
    blk, n, k = _raw_blocks(data, qtype, shape)
    qt = _gguf().GGMLQuantizationType(qtype)
    per_row = blk.shape[0] // n                     # blocks per row
    rows = max(1, _REPACK_CHUNK // (per_row * blk.shape[1]))
    if release is not None and rows < n:
        return _repack_chunked(qt, blk, n, k, rows, release)
    w = _repack(qt, blk, n, k)
    src = blk.untyped_storage().data_ptr()
    for name in ("q", "scale", "min"):
        t = getattr(w, name)
        if t is not None and t.untyped_storage().data_ptr() == src:
            setattr(w, name, t.clone())   # a view of the blocks (e.g. one block per row)
    return w


def _repack_chunked(qt, blk: torch.Tensor, n: int, k: int, rows: int, release) -> QuantWeight:
    """from_gguf a chunk of `rows` rows at a time into preallocated tensors (see there)."""
    per_row, row_bytes = blk.shape[0] // n, blk.shape[0] // n * blk.shape[1]
    w = None
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        part = _repack(qt, blk[r0 * per_row:r1 * per_row], r1 - r0, k)
        if w is None:   # the first chunk tells the layout
            full = [None if t is None else torch.empty((n, *t.shape[1:]), dtype=t.dtype)
                    for t in (part.q, part.scale, part.min)]
            w = type(part)(*full, part.block_size, k)
        for name in ("q", "scale", "min"):
            if getattr(part, name) is not None:
                getattr(w, name)[r0:r1] = getattr(part, name)
        release(r0 * row_bytes, (r1 - r0) * row_bytes)
    return w


def dequantize_gguf(data: np.ndarray, qtype, shape: tuple[int, int], keep_16bit: bool = False) -> torch.Tensor:
    """A GGUF tensor as float32 [out, in], bit-exact with gguf.quants.dequantize; F16 and
    BF16 tensors stay 16-bit with `keep_16bit` (a copy either way)."""
    T = _gguf().GGMLQuantizationType
    qt = T(qtype)
    n, k = (int(s) for s in shape)
    if qt in (T.F32, T.F16, T.BF16):
        dt = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}[qt]
        blk, _, _ = _raw_blocks(data, qt, shape)
        return blk.reshape(-1).view(dt).view(n, k).to(dt if keep_16bit else torch.float32, copy=True)
    return from_gguf(data, qt, shape).dequantize()
