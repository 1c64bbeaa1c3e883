"""GGUF checkpoints (llama.cpp's format): metadata -> ModelConfig, tensors -> Hugging Face names.

The header is parsed here directly from a memory map (following the GGUF spec): ``gguf.GGUFReader``
builds one numpy view per vocabulary entry and takes tens of seconds on a 256k vocabulary, so it
is only built when ``GGUFCheckpoint.reader`` is first used. Tensor data is never read eagerly.

Conventions of llama.cpp's converter that are undone here, so tensors carry transformers' values:

* ``llama`` arch: the rows of ``attn_q``/``attn_k`` are permuted per head (the rotary pairs
  (i, i + d/2) are interleaved to (2i, 2i + 1)). The inverse is a pure row permutation, so it is
  applied to quantized data too: every row of a GGUF tensor is a whole number of blocks.
* ``gemma3``: RMSNorm weights are stored as ``1 + w``; we subtract the 1.
* ``gpt2``: the Conv1D weights (``[in, out]`` in transformers) are stored transposed, as
  ``[out, in]`` rows; ``tensors()`` transposes them back, ``raw_tensors()`` keeps the rows.
* llama3 rope scaling is stored as a ``rope_freqs`` tensor of per-frequency divisors; it is turned
  back into the llama3 parameters of ``ModelConfig.rope_scaling`` and not yielded as a weight.

Memory: tensors are read from the map one at a time, and once the consumer has taken a tensor
(the generator resumes) its pages are dropped from this process (``release_pages``), so a
model is never resident twice, as the file's pages and as the engine's repacked copy; only
one tensor's file pages are resident at a time. Dropping is always safe: the mapping is
read-only and file-backed, so a page read again is faulted back in from the page cache.
"""
from __future__ import annotations

import math
import mmap
import os
import re
import struct
from typing import Any, Iterator, NamedTuple

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from miaotui.config import FAMILIES, MiaotuiError, ModelConfig

SUPPORTED_ARCHS = ("gemma3", "gpt2", "llama", "qwen2", "qwen3")
SUPPORTED_TYPES = frozenset({QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0,
                             QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K})
GEMMA3_DEFAULT_SWA_PATTERN = 6          # llama.cpp's built-in value for gemma3 (every 6th layer global)
GEMMA3_DEFAULT_LOCAL_THETA = 10000.0    # llama.cpp's built-in rope base of gemma3 sliding layers


class GGUFRaw(NamedTuple):
    """One tensor as stored, not dequantized.

    data: the reader's array: float32/float16 values for F32/F16, else uint8 bytes with shape
    ``(rows, bytes_per_row)`` (whole quantization blocks per row). qtype: its GGML type.
    shape: logical ``(out, in)`` (torch order; ``(n,)`` for vectors). hf_transposed: True for
    GPT-2 Conv1D weights, whose transformers tensor is the transpose ``(in, out)`` of this matrix.
    """
    data: np.ndarray
    qtype: QT
    shape: tuple
    hf_transposed: bool = False
    source: tuple | None = None   # (file path, byte offset) of data as stored, when it is
                                  # exactly the file's bytes (not un-permuted or shifted)
    release: object = None        # with source: release(offset, nbytes) drops those bytes' pages


class _TensorInfo(NamedTuple):
    name: str            # GGUF name
    shape: tuple         # torch order (ggml dims reversed)
    qtype: QT
    offset: int          # absolute offset in the file
    nbytes: int


# ---- header parsing -----------------------------------------------------------------------------
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
_NP_SCALAR = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
              10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


class _Truncated(Exception):
    pass


class _Cursor:
    """Reads little-endian GGUF values from a buffer, raising _Truncated past its end."""

    def __init__(self, buf, pos: int = 0):
        self.buf, self.pos, self.size = buf, pos, len(buf)

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > self.size:
            raise _Truncated
        self.pos = start + n
        return start

    def unpack(self, fmt: str):
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        start = self.take(n)
        return bytes(self.buf[start:start + n]).decode("utf-8", errors="replace")

    def _strings(self, count: int) -> list[str]:
        """An array of strings (a vocabulary: hot, so kept to plain slicing)."""
        buf, pos, size, out = self.buf, self.pos, self.size, []
        length = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > size:
                raise _Truncated
            end = pos + 8 + length(buf, pos)[0]
            if end > size:
                raise _Truncated
            out.append(bytes(buf[pos + 8:end]).decode("utf-8", errors="replace"))
            pos = end
        self.pos = pos
        return out

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if etype in _NP_SCALAR:
                dt = np.dtype(_NP_SCALAR[etype])
                start = self.take(count * dt.itemsize)
                return np.frombuffer(self.buf, dt, count, start).copy()
            if count > self.size:  # every element needs at least one byte
                raise _Truncated
            if etype == _STRING:
                return self._strings(count)
            return [self.value(etype) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {vtype}")


RELEASE_ALIGN = 2 << 20   # the kernel maps file pages in folios of up to 2 MiB around a fault


def release_pages(buf: mmap.mmap, offset: int, nbytes: int) -> None:
    """Drop this process's resident pages of buf[offset:offset + nbytes] and of the 2 MiB
    around it (a fault maps a whole folio, neighbours included): they no longer count in its
    RSS. Nothing is lost; see the module docstring."""
    start = offset // RELEASE_ALIGN * RELEASE_ALIGN
    end = min(len(buf), -(-(offset + nbytes) // RELEASE_ALIGN) * RELEASE_ALIGN)
    if end > start and hasattr(mmap, "MADV_DONTNEED"):
        try:
            buf.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):  # not supported here: the pages stay until unmapped
            pass


def _parse_metadata(buf, path: str) -> tuple[dict, _Cursor, int]:
    """The key/value section: (metadata, a cursor after it, the tensor count)."""
    cur = _Cursor(buf)
    magic = bytes(buf[:4])
    if magic != b"GGUF":
        raise MiaotuiError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    cur.take(4)
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise MiaotuiError(f"{path}: unsupported GGUF version {version} (only 2 and 3, little-endian)")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.unpack("<I"))
    return meta, cur, n_tensors


def read_gguf_metadata(path: str) -> dict:
    """Only the metadata of a GGUF file, whatever its architecture (e.g. a vocabulary-only
    file, for Tokenizer.from_gguf); much faster than gguf.GGUFReader on large vocabularies."""
    with open(path, "rb") as f:
        buf = f.read()
    try:
        return _parse_metadata(buf, path)[0]
    except (_Truncated, struct.error):
        raise MiaotuiError(f"{path} is truncated or corrupt (its header runs past the end of the file)") from None


def _parse_header(buf, path: str) -> tuple[dict, list[_TensorInfo]]:
    meta, cur, n_tensors = _parse_metadata(buf, path)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise MiaotuiError(f"{path}: unsupported GGUF architecture {arch!r} "
                           f"(supported: {', '.join(SUPPORTED_ARCHS)})")
    raw_infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I")
        if n_dims > 8:
            raise ValueError(f"tensor {name} has {n_dims} dimensions")
        dims = [cur.unpack("<Q") for _ in range(n_dims)]
        raw_infos.append((name, tuple(reversed(dims)), cur.unpack("<I"), cur.unpack("<Q")))
    align = int(meta.get("general.alignment", 32)) or 32
    data_start = -(-cur.pos // align) * align
    infos = []
    for name, shape, type_id, rel in raw_infos:
        try:
            qtype = QT(type_id)
        except ValueError:
            raise MiaotuiError(f"{path}: tensor {name} has unknown GGML type id {type_id}") from None
        if qtype not in SUPPORTED_TYPES:
            raise MiaotuiError(f"{path}: tensor {name} has unsupported type {qtype.name} (supported: "
                               f"{', '.join(sorted(t.name for t in SUPPORTED_TYPES))})")
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if shape and shape[-1] % block:
            raise MiaotuiError(f"{path}: tensor {name} row length {shape[-1]} is not a multiple of "
                               f"the {qtype.name} block size {block}")
        nbytes = math.prod(shape) // block * type_size
        infos.append(_TensorInfo(name, shape, qtype, data_start + rel, nbytes))
    size = len(buf)
    for t in infos:
        if t.offset + t.nbytes > size:
            raise MiaotuiError(f"{path} is truncated: tensor {t.name} ends at byte "
                               f"{t.offset + t.nbytes} but the file has {size} bytes")
    return meta, infos


# ---- name mapping -------------------------------------------------------------------------------
_LLAMA_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA3_LAYER = {**_LLAMA_LAYER, "ffn_norm": "pre_feedforward_layernorm",
                 "post_attention_norm": "post_attention_layernorm",
                 "post_ffw_norm": "post_feedforward_layernorm"}
_GPT2_LAYER = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
               "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
_LLAMA_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GPT2_GLOBAL = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe",
                "output_norm": "transformer.ln_f", "output": "lm_head"}
_GPT2_CONV1D = {"attn_qkv", "attn_output", "ffn_up", "ffn_down"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"([a-z0-9_]+)\.(weight|bias)$")


def _hf_name(arch: str, gguf_name: str) -> tuple[str, str] | None:
    """(HF name, GGUF base name such as 'attn_q'), or None when the tensor is unknown."""
    gpt2 = arch == "gpt2"
    m = _BLOCK_RE.match(gguf_name)
    if m:
        layer, base, kind = m.groups()
        table = _GPT2_LAYER if gpt2 else _GEMMA3_LAYER if arch == "gemma3" else _LLAMA_LAYER
        if base not in table:
            return None
        prefix = f"transformer.h.{layer}" if gpt2 else f"model.layers.{layer}"
        return f"{prefix}.{table[base]}.{kind}", base
    m = _GLOBAL_RE.match(gguf_name)
    table = _GPT2_GLOBAL if gpt2 else _LLAMA_GLOBAL
    if m and m.group(1) in table:
        return f"{table[m.group(1)]}.{m.group(2)}", m.group(1)
    return None


def _unpermute_rows(a: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head q/k row interleave; `a` is [rows, ...] with rows = heads * d."""
    rows = a.shape[0]
    if n_heads <= 0 or rows % (2 * n_heads):
        raise MiaotuiError(f"cannot un-permute {rows} rows into {n_heads} heads")
    half = rows // n_heads // 2
    return np.ascontiguousarray(
        a.reshape(n_heads, half, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape))


# ---- config -------------------------------------------------------------------------------------
def _scalar(v: Any) -> Any:
    """A per-layer array with one distinct value -> that value."""
    if isinstance(v, (np.ndarray, list)):
        vals = set(np.asarray(v).tolist())
        if len(vals) != 1:
            raise MiaotuiError(f"per-layer values {sorted(vals)} are not supported")
        return vals.pop()
    return v


def _llama3_scaling(factors: np.ndarray, theta: float, head_dim: int) -> dict:
    """Recover llama3 rope parameters from llama.cpp's rope_freqs divisors.

    Divisors are 1 (high frequencies), `factor` (low) and a smooth blend in between, where
    ``smooth = (L / wavelen - low) / (high - low)``. Scaling L, low and high together changes
    nothing, so low_freq_factor is taken as 1 (Llama 3.x's value); high_freq_factor and L are
    fitted from the blended entries (high defaults to 4 when fewer than two exist). The result is
    checked by recomputing the divisors.
    """
    r = factors.astype(np.float64)
    inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if len(r) != len(inv):
        raise MiaotuiError(f"rope_freqs has {len(r)} entries, expected {len(inv)}")
    factor = float(r.max())
    x = inv / (2 * math.pi)  # 1 / wavelen
    mid = (r > 1 + 1e-4) & (r < factor * (1 - 1e-4))
    low, high = 1.0, 4.0
    if mid.any():
        s = (1 / r[mid] - 1 / factor) / (1 - 1 / factor)
        if mid.sum() >= 2:  # s = a * x + b with a = L / (high - low), b = -low / (high - low)
            a, b = np.polyfit(x[mid], s, 1)
            high = round(low - 1 / b, 4) if b < 0 else high
        old_len = float(np.mean(((high - low) * s + low) / x[mid]))
    else:  # any L between the two groups of wavelengths reproduces the divisors
        lo_bound = high * 2 * math.pi / inv[r <= 1 + 1e-4].min() if (r <= 1 + 1e-4).any() else 1.0
        hi_bound = low * 2 * math.pi / inv[r >= factor * (1 - 1e-4)].max()
        old_len = math.sqrt(lo_bound * hi_bound)
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
               "high_freq_factor": high, "original_max_position_embeddings": int(round(old_len))}
    if not np.allclose(_llama3_divisors(inv, scaling), r, rtol=1e-3):
        raise MiaotuiError("rope_freqs does not follow llama3 rope scaling; cannot represent it")
    return scaling


def _llama3_divisors(inv: np.ndarray, sc: dict) -> np.ndarray:
    """Per-frequency divisors of llama3 scaling (used to check the fit)."""
    factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old_len = sc["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = (old_len / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_len / high, 1.0, np.where(wavelen > old_len / low, factor, blended))


def _build_config(arch: str, meta: dict, infos: dict[str, _TensorInfo],
                  rope_freqs: np.ndarray | None) -> ModelConfig:
    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    def need(key):
        v = get(key)
        if v is None:
            raise MiaotuiError(f"GGUF metadata lacks {arch}.{key}")
        return _scalar(v)

    hidden, n_layers, n_heads = need("embedding_length"), need("block_count"), need("attention.head_count")
    n_kv = _scalar(get("attention.head_count_kv", n_heads))
    head_dim = get("attention.key_length") or (get("rope.dimension_count") if arch == "llama" else None)
    head_dim = int(head_dim or hidden // n_heads)

    vocab = get("vocab_size")
    if vocab is None and "tokenizer.ggml.tokens" in meta:
        vocab = len(meta["tokenizer.ggml.tokens"])
    if vocab is None:
        vocab = infos["token_embd.weight"].shape[0]

    theta = float(get("rope.freq_base", 10000.0))
    scaling = None
    stype = get("rope.scaling.type")
    if stype and stype != "none":
        scaling = {"rope_type": stype, "factor": float(get("rope.scaling.factor", 1.0))}
        if get("rope.scaling.original_context_length") is not None:
            scaling["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
    if rope_freqs is not None:
        scaling = _llama3_scaling(rope_freqs, theta, head_dim)

    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                             "tokenizer.ggml.eom_token_id") if meta.get(k) is not None]
    cfg = ModelConfig(
        family=FAMILIES[arch], model_type=arch, vocab_size=int(vocab), hidden_size=int(hidden),
        intermediate_size=int(_scalar(get("feed_forward_length", 4 * hidden))),
        num_layers=int(n_layers), num_heads=int(n_heads), num_kv_heads=int(n_kv), head_dim=head_dim,
        max_position_embeddings=int(get("context_length", 2048)),
        rope_theta=theta, rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in infos,
        qkv_bias=any(n in infos for n in ("blk.0.attn_q.bias", "blk.0.attn_qkv.bias")),
        o_bias="blk.0.attn_output.bias" in infos, mlp_bias="blk.0.ffn_up.bias" in infos,
        qk_norm="blk.0.attn_q_norm.weight" in infos,
        final_logit_softcapping=get("final_logit_softcapping"),
        attn_logit_softcapping=get("attn_logit_softcapping"),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=list(dict.fromkeys(int(e) for e in eos)),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )
    if arch == "gpt2":
        cfg.norm_eps = float(get("attention.layer_norm_epsilon", 1e-5))
        cfg.hidden_act = "gelu_new"
    else:
        cfg.norm_eps = float(get("attention.layer_norm_rms_epsilon", 1e-6 if arch == "gemma3" else 1e-5))
    window = get("attention.sliding_window")
    if arch == "gemma3":
        cfg.hidden_act = "gelu_pytorch_tanh"
        cfg.rope_local_theta = float(get("rope.freq_base_swa", GEMMA3_DEFAULT_LOCAL_THETA))
        cfg.sliding_window = int(window) if window else None
        pattern = get("attention.sliding_window_pattern", GEMMA3_DEFAULT_SWA_PATTERN)
        if isinstance(pattern, (np.ndarray, list)):  # one bool per layer, True = sliding
            cfg.layer_types = ["sliding_attention" if p else "full_attention" for p in pattern]
        else:
            cfg.layer_types = ["full_attention" if (i + 1) % int(pattern) == 0 else "sliding_attention"
                               for i in range(cfg.num_layers)]
        # llama.cpp scales queries by 1/sqrt(head_dim), except Gemma 3 27B (62 layers): hidden/heads
        cfg.query_pre_attn_scalar = float(hidden // n_heads if n_layers == 62 else head_dim)
    elif window and arch != "gpt2":
        cfg.sliding_window = int(window)
        cfg.layer_types = ["sliding_attention"] * cfg.num_layers
    scale = get("attention.scale")
    if scale:
        cfg.query_pre_attn_scalar = 1.0 / float(scale) ** 2
    return cfg


# ---- the checkpoint -----------------------------------------------------------------------------
class GGUFCheckpoint:
    """A GGUF file: its config, and its tensors under Hugging Face names (read lazily).

    ``metadata`` holds every key/value of the header: scalars as Python values, numeric arrays as
    numpy arrays, string arrays (the vocabulary, merges) as lists of str. It is a fast
    alternative to ``reader.fields``.
    """

    def __init__(self, path: str | os.PathLike):
        path = self.path = os.fspath(path)
        if not os.path.exists(path):
            raise MiaotuiError(f"GGUF file not found: {path}")
        if not os.path.isfile(path):
            raise MiaotuiError(f"{path} is not a file")
        with open(path, "rb") as f:
            try:
                self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # empty file
                raise MiaotuiError(f"{path} is not a GGUF file (it is empty)") from None
        try:
            self.metadata, infos = _parse_header(self._buf, path)
        except (_Truncated, struct.error):
            raise MiaotuiError(f"{path} is truncated or corrupt (its header runs past the end of the file)") from None
        except (ValueError, UnicodeDecodeError, OverflowError, MemoryError) as e:
            raise MiaotuiError(f"{path} is a corrupt GGUF file ({e})") from None
        arch = self.arch = self.metadata["general.architecture"]
        self._infos = {t.name: t for t in infos}
        rope_freqs = self._infos.pop("rope_freqs.weight", None)
        self._names: dict[str, str] = {}  # GGUF name -> HF name
        for t in self._infos.values():
            mapped = _hf_name(arch, t.name)
            if mapped is None:
                raise MiaotuiError(f"{path}: unexpected tensor {t.name} for architecture {arch}")
            self._names[t.name] = mapped[0]
        freqs = None if rope_freqs is None else self._dequant(rope_freqs).ravel()
        self.config: ModelConfig = _build_config(arch, self.metadata, self._infos, freqs)
        self._reader: gguf.GGUFReader | None = None

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({self.path!r}, arch={self.arch}, tensors={len(self._names)})"

    @property
    def reader(self) -> gguf.GGUFReader:
        """gguf's own reader of the file (built on first use: slow on large vocabularies)."""
        if self._reader is None:
            self._reader = gguf.GGUFReader(self.path)
        return self._reader

    def tensor_names(self) -> list[str]:
        """HF names of the weights, in file order."""
        return list(self._names.values())

    # -- reading --
    def _stored(self, t: _TensorInfo) -> np.ndarray:
        """The tensor's bytes as the reader presents them (a read-only view of the map)."""
        if t.qtype == QT.F32:
            return np.frombuffer(self._buf, np.float32, t.nbytes // 4, t.offset).reshape(t.shape)
        if t.qtype == QT.F16:
            return np.frombuffer(self._buf, np.float16, t.nbytes // 2, t.offset).reshape(t.shape)
        rows = math.prod(t.shape[:-1]) if len(t.shape) > 1 else 1
        a = np.frombuffer(self._buf, np.uint8, t.nbytes, t.offset)
        return a.reshape(*t.shape[:-1], t.nbytes // rows) if len(t.shape) > 1 else a

    def _dequant(self, t: _TensorInfo) -> np.ndarray:
        data = self._stored(t)
        if t.qtype == QT.F32:
            return data.copy()
        return gguf.quants.dequantize(data, t.qtype).astype(np.float32, copy=False).reshape(t.shape)

    def _rows_fixed(self, t: _TensorInfo, data: np.ndarray) -> np.ndarray:
        """Apply the row un-permutation of llama q/k (weights and biases) to stored rows."""
        if self.arch == "llama" and re.search(r"\.attn_[qk]\.(weight|bias)$", t.name):
            heads = self.config.num_heads if ".attn_q." in t.name else self.config.num_kv_heads
            return _unpermute_rows(data, heads)
        return data

    def _is_gemma_norm(self, t: _TensorInfo) -> bool:
        return self.arch == "gemma3" and t.name.endswith("norm.weight")

    def _is_conv1d(self, t: _TensorInfo) -> bool:
        return (self.arch == "gpt2" and t.name.endswith(".weight")
                and t.name.split(".")[-2] in _GPT2_CONV1D)

    def tensors(self, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor in HF layout with transformers' values), dequantized."""
        from tqdm import tqdm
        items = tqdm(self._infos.values(), total=len(self._infos), desc=f"loading {os.path.basename(self.path)}",
                     unit="tensor", leave=False, disable=not progress)
        for t in items:
            w = self._rows_fixed(t, self._dequant(t))
            if self._is_gemma_norm(t):
                w = w - np.float32(1.0)
            if self._is_conv1d(t):
                w = w.T
            # _dequant copies: the tensor never points into the map
            yield self._names[t.name], torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
            release_pages(self._buf, t.offset, t.nbytes)

    def _releaser(self, base: int):
        """release(offset, nbytes) for the bytes of the tensor stored at file offset `base`."""
        return lambda offset, nbytes: release_pages(self._buf, base + offset, nbytes)

    def raw_tensors(self) -> Iterator[tuple[str, GGUFRaw]]:
        """(HF name, GGUFRaw) without dequantizing.

        The llama q/k un-permutation is applied to whole rows of blocks (a copy); gemma3 norm
        weights (F32 vectors) come back as F32 with the 1 subtracted, so every raw tensor holds
        transformers' values. GPT-2 Conv1D weights stay [out, in] rows, flagged hf_transposed.

        ``data`` may be a view of the file's map, valid until the next tensor is asked for:
        the consumer copies (repacks) what it keeps before that; the pages are then dropped
        from memory (``release_pages``).
        """
        for t in self._infos.values():
            stored = self._stored(t)
            data, qtype = self._rows_fixed(t, stored), t.qtype
            if self._is_gemma_norm(t):
                data, qtype = self._dequant(t) - np.float32(1.0), QT.F32
            source = release = None
            if data is stored:
                source = (self.path, t.offset)
                release = self._releaser(t.offset)
            yield self._names[t.name], GGUFRaw(data, qtype, tuple(t.shape), self._is_conv1d(t), source, release)
            release_pages(self._buf, t.offset, t.nbytes)


def load_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Open a GGUF file: parse its metadata and check it; tensors are read when iterated."""
    return GGUFCheckpoint(path)
