"""Where the memory goes: a breakdown of every resident byte, beside the measured peak.

The parts of a running engine's resident set (RSS):

* runtime: the process before any weight is loaded: the Python interpreter, torch's
  libraries (~210 MB: ``import torch`` alone), the tokenizer. Measured (``current_rss``
  when the engine starts loading weights); ``estimate`` measures its own process so far.
* weights: the matmul weights as the engine holds them (GGUF blocks repacked, see
  layers/quant.py; float weights as float32), and beside them what the file stores for
  them, so that a repacking that grows a format (K-quants, F16 widened to float32) shows.
* embedding: the token embedding as stored (layers/embedding.py); a tied head shares it;
  an untied GGUF table is not held (rows are read from the file on lookup).
* other weights: norms, biases, rotary tables.
* KV pool: allocated, and resident: the pool is not zeroed (the kernels read only written
  slots), so only the blocks that were ever written occupy memory. Measured page by page
  with ``mincore`` on a running engine; in an estimate, the tokens asked for.
* workspace: one engine step's activations (the largest step run so far; at most
  ``max_num_batched_tokens`` tokens and a logits row per sequence); the allocator reuses
  the freed memory step after step.
* while loading: the tensors loaded so far, plus one tensor's file pages and its copy
  (loader/ drops each tensor's pages once it is copied), at the worst moment of the load.

The predicted peak is runtime + max(weights + KV + workspace, the load's worst moment); the
measured peak is the kernel's high-water mark of the RSS (VmHWM in /proc/self/status).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from miaotui.config import MiaotuiError

ACT_BYTES = 4   # activations are float32 on the CPU


# ---- measuring ----------------------------------------------------------------------------------
def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS), RssAnon, RssFile of this process in bytes (Linux);
    elsewhere the RSS from psutil and the peak from getrusage."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    if "VmRSS" not in out:
        import resource

        import psutil
        out["VmRSS"] = psutil.Process().memory_info().rss
        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def current_rss() -> int:
    return proc_status()["VmRSS"]


def peak_rss() -> int:
    """The high-water mark of this process's RSS (VmHWM)."""
    return proc_status()["VmHWM"]


_libc = None


def resident_bytes(t) -> int:
    """Bytes of tensor t's memory that are resident (mincore, page by page; pages it shares
    with neighbours count whole). Without mincore: its size."""
    global _libc
    n = t.untyped_storage().nbytes()
    addr = t.untyped_storage().data_ptr()
    if n == 0:
        return 0
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        page = mmap.PAGESIZE
        start, end = addr // page * page, -(-(addr + n) // page) * page
        npages = (end - start) // page
        vec = (ctypes.c_ubyte * npages)()
        if _libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(end - start), vec) != 0:
            return n
    except (OSError, AttributeError):
        return n
    import numpy as np
    resident = int((np.frombuffer(vec, np.uint8) & 1).sum()) * page
    return min(n, resident)


def _libc_handle():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def return_freed_memory() -> None:
    """Hand the allocator's free memory back to the system (glibc's malloc_trim). Loading
    frees one temporary per tensor; glibc keeps such memory for reuse (its mmap threshold
    rises with the sizes freed), so without this it stays in the RSS."""
    try:
        _libc_handle().malloc_trim(ctypes.c_size_t(0))
    except (OSError, AttributeError):   # not glibc
        pass


_M_MMAP_THRESHOLD = -3   # glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1


@contextmanager
def unpooled_large_allocations(threshold: int = 1 << 20):
    """While the block runs, glibc serves allocations of `threshold` bytes and more with
    their own mappings, returned to the system when freed. Loading frees a temporary per
    tensor; glibc would otherwise keep them for reuse (its mmap threshold rising to 32 MiB
    with the sizes freed) and a TinyLlama Q8_0 load peaked ~100 MB above what it keeps.
    Afterwards the threshold stays at 32 MiB (glibc's own ceiling), the freed memory is
    trimmed, and the trim threshold is set to 32 MiB as well: a threshold set by hand
    freezes the trim threshold at 128 KiB, and every prompt step then handed its freed
    activations back to the system and faulted them in again (SmolLM2 F32 pp512: 480-750k
    page faults for five prompts instead of 190k, and up to 1.4x slower). 32 MiB holds a
    TinyLlama prompt's largest activation and keeps its peak RSS where it was (64 MiB
    added 17 MiB)."""
    try:
        ok = _libc_handle().mallopt(_M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):   # not glibc
        ok = 0
    try:
        yield
    finally:
        if ok:
            _libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            _libc.mallopt(_M_TRIM_THRESHOLD, 32 << 20)
        return_freed_memory()


def parse_bytes(text) -> int:
    """'1GiB', '1G', '512MB', '1.5e9', 123 -> bytes (K/M/G/T are powers of 1024)."""
    s = str(text).strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(s[-1:], 1)
    try:
        value = float(s[:-1] if mult > 1 else s) * mult
    except ValueError:
        raise MiaotuiError(f"bad size {text!r} (examples: 1GiB, 512M, 1.5e9)") from None
    if not value > 0:
        raise MiaotuiError(f"bad size {text!r}: must be positive")
    return int(value)


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.0f} MiB" if abs(n) < 2**30 else f"{n / 2**30:.2f} GiB"


# ---- the parts ----------------------------------------------------------------------------------
@dataclass
class Breakdown:
    runtime: int            # torch + Python + tokenizer (RSS before the weights)
    weights_stored: int     # what the checkpoint stores for the matmul weights (head included)
    weights: int            # the matmul weights as held (repacked), head included unless tied
    embedding: int          # the token embedding as held (a tied head shares it)
    other_weights: int      # norms, biases, rotary tables
    kv_pool: int            # KV cache allocated
    kv_resident: int        # KV cache resident (written blocks; an estimate: the tokens asked for)
    workspace: int          # one step's activations at most (the largest step run, if any)
    load_peak: int          # weights while loading, at the worst moment: those loaded so far,
                            # one tensor's file pages and its copy
    workspace_bound: int = 0      # a step of max_num_batched_tokens tokens
    peak_rss: int | None = None   # measured (VmHWM), None in an estimate
    rss: int | None = None        # measured now

    @property
    def repacked_extra(self) -> int:
        """What repacking added over the file's bytes (K-quants, F16 -> F32), may be < 0."""
        return self.weights - self.weights_stored

    @property
    def predicted_peak(self) -> int:
        resident = self.runtime + self.weights + self.embedding + self.other_weights
        return self.runtime + max(resident - self.runtime + self.kv_resident + self.workspace, self.load_peak)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["repacked_extra"] = self.repacked_extra
        d["predicted_peak"] = self.predicted_peak
        if self.peak_rss:
            d["predicted_over_measured"] = self.predicted_peak / self.peak_rss
        return d

    def lines(self) -> list[str]:
        f = fmt_bytes
        out = [f"  runtime (Python, torch, tokenizer)  {f(self.runtime):>10}",
               f"  weights (matmuls, as held)          {f(self.weights):>10}   (file: {f(self.weights_stored)},"
               f" repacking {'+' if self.repacked_extra >= 0 else '-'}{f(abs(self.repacked_extra))})",
               f"  embedding (as stored)               {f(self.embedding):>10}",
               f"  norms, biases, rotary tables        {f(self.other_weights):>10}",
               f"  KV cache                            {f(self.kv_resident):>10}   (pool {f(self.kv_pool)} allocated)",
               f"  workspace (one step)                {f(self.workspace):>10}   "
               f"(at most {f(max(self.workspace_bound, self.workspace))}: max_num_batched_tokens)",
               f"  while loading, at most              {f(self.load_peak):>10}   (weights so far + one tensor's file pages)",
               f"  predicted peak                      {f(self.predicted_peak):>10}"]
        if self.peak_rss:
            out.append(f"  measured peak RSS (VmHWM)           {f(self.peak_rss):>10}   "
                       f"(predicted / measured {self.predicted_peak / self.peak_rss:.2f})")
        return out

    def describe(self) -> str:
        return "memory:\n" + "\n".join(self.lines())


def workspace_bytes(cfg, step_tokens: int, logit_rows: int) -> int:
    """Peak activations of one step of `step_tokens` tokens: one layer's intermediates live
    at a time (residual, normed x, q/k/v, attention out, gate/up, activation) and the logits
    of `logit_rows` rows."""
    from miaotui.models.llama import MLP_ROWS   # the MLP takes prompt rows this many at a time
    h, i = cfg.hidden_size, cfg.intermediate_size
    per_token = 3 * h + 2 * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size
    return ACT_BYTES * (step_tokens * per_token + min(step_tokens, MLP_ROWS) * 3 * i
                        + logit_rows * cfg.vocab_size)


# bytes per GGUF block once repacked (layers/quant.py): as stored for Q8_0/Q4_0/Q4_1/Q5_0/Q5_1,
# more for the K-quants, whose two-level scales become one float32 per block of 16 or 32
REPACKED_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24,
                        "Q4_K": 192, "Q5_K": 320, "Q6_K": 320, "Q8_K": 260}
_FLOAT_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


@dataclass
class WeightSizes:
    """A checkpoint's weights as the engine holds them (GGUF kept quantized)."""
    layers: int          # decoder-layer matmul weights
    head: int            # the output head (0 when tied: it reads the embedding)
    embed: int           # the token embedding
    other: int           # vectors: norms, biases
    stored: int          # what the file stores for the matmul weights (head included)
    largest: int         # the largest tensor as held
    load_peak: int       # the worst moment of the load: tensors held so far + one tensor's pages and copies


def gguf_weight_sizes(path: str) -> WeightSizes:
    """From the GGUF header alone (no tensor data read)."""
    import gguf

    from miaotui.loader.gguf_loader import load_gguf
    infos = load_gguf(path)._infos.values()
    tied = not any(t.name == "output.weight" for t in infos)
    sizes = dict(layers=0, head=0, embed=0, other=0, stored=0, largest=0, load_peak=0)
    held_so_far = 0
    for t in infos:
        name, q = t.name, t.qtype.name
        n = _numel(t.shape)
        if name == "token_embd.weight" and not tied:
            held = 0   # rows read from the file on lookup (layers/embedding.py)
        elif name == "token_embd.weight":
            held = (n // gguf.GGML_QUANT_SIZES[t.qtype][0] * REPACKED_BLOCK_BYTES[q] if q in REPACKED_BLOCK_BYTES
                    else n * 4)   # a float table: widened, shared with the head
            sizes["embed"] += held
        elif len(t.shape) == 2 and name != "position_embd.weight":
            held = (n // gguf.GGML_QUANT_SIZES[t.qtype][0] * REPACKED_BLOCK_BYTES[q]
                    if q in REPACKED_BLOCK_BYTES else 4 * n)
            sizes["head" if name == "output.weight" else "layers"] += held
            sizes["stored"] += t.nbytes
        else:
            held = 4 * n
            sizes["other"] += held
        sizes["largest"] = max(sizes["largest"], held)
        # file pages (whole 2 MiB folios) + the copy beside what is held already
        sizes["load_peak"] = max(sizes["load_peak"], held_so_far + held + t.nbytes + (4 << 20))
        held_so_far += held
    return WeightSizes(**sizes)


def hf_weight_sizes(path: str, cfg, quantization: str | None = None, dtype: str = "auto") -> WeightSizes:
    """From the safetensors headers and the config: float weights as float32 (or `dtype`),
    the embedding as stored, int8/int4 as `quantization` makes them."""
    from miaotui.bench.roofline import weight_format
    from miaotui.loader.hf import HFCheckpoint
    info = HFCheckpoint(path).tensor_info()
    fmt = weight_format(quantization if quantization in ("int8", "int4") else None, dtype)
    head_fmt = weight_format("int8") if quantization in ("int8", "int4") else fmt
    tied = cfg.tie_word_embeddings
    sizes = dict(layers=0, head=0, embed=0, other=0, stored=0, largest=0, load_peak=0)
    held_so_far = 0
    for name, (dt, shape, nbytes, _) in sorted(info.items(), key=lambda kv: kv[1][3]):   # file order
        if "embed_tokens" in name or name.endswith("wte.weight"):
            held = _numel(shape) * (4 if tied or dt not in ("F16", "BF16") else 2)
            sizes["embed"] += held
        elif len(shape) == 2 and not name.endswith("wpe.weight"):
            held = (head_fmt if "lm_head" in name else fmt).nbytes(*shape)
            sizes["head" if "lm_head" in name else "layers"] += held
            sizes["stored"] += nbytes
        else:
            held = 4 * _numel(shape)
            sizes["other"] += held
        sizes["largest"] = max(sizes["largest"], held)
        # file pages + the tensor read from them + what it is converted into
        sizes["load_peak"] = max(sizes["load_peak"], held_so_far + held + 2 * nbytes + (4 << 20))
        held_so_far += held
    if tied and quantization in ("int8", "int4"):   # the tied head gets its own int8 copy
        sizes["head"] = head_fmt.nbytes(cfg.vocab_size, cfg.hidden_size)
    return WeightSizes(**sizes)


def weight_sizes(path: str, cfg, quantization: str | None = None, dtype: str = "auto") -> WeightSizes:
    if os.path.isdir(path):
        return hf_weight_sizes(path, cfg, quantization, dtype)
    if quantization not in (None, "gguf"):
        raise MiaotuiError("sizes of a re-quantized GGUF file are not predicted; load it and use "
                           "`miaotui bench latency` for its breakdown")
    return gguf_weight_sizes(path)


# ---- a running engine ---------------------------------------------------------------------------
def model_bytes(model) -> dict[str, int]:
    """A loaded model's tensors by part: "weights" (matmuls, repacked; a head tied to the
    embedding counted once, as the embedding), "embedding", "other" (norms, biases, rotary
    tables). Each storage counted once."""
    from miaotui.layers.embedding import Embedding
    from miaotui.layers.linear import Linear
    seen: set[int] = set()

    def size(t) -> int:
        if t is None or t.untyped_storage().data_ptr() in seen:
            return 0
        seen.add(t.untyped_storage().data_ptr())
        return t.untyped_storage().nbytes()

    def qsize(q) -> int:
        return sum(size(p.q) + size(p.scale) + size(p.min) for p in getattr(q, "parts", [q]))

    def held(m) -> int:
        return qsize(m.qweight) if m.qweight is not None else size(m.weight)

    out = {"embedding": sum(held(m) for m in model.modules() if isinstance(m, Embedding))}
    out["weights"] = sum(held(m) for m in model.modules() if isinstance(m, Linear))
    out["other"] = sum(size(t) for t in [*model.parameters(), *model.buffers()])
    return out


def engine_breakdown(engine) -> Breakdown:
    """The parts of a loaded LLMEngine, measured (tensor sizes; the KV pool's resident
    pages), beside its process's peak RSS."""
    import torch
    cfg, ec = engine.model_config, engine.config
    parts = model_bytes(engine.model)
    caches = engine.runner.caches
    kv_tensors = [t for c in caches for t in (c.k, c.v, getattr(c, "k_scale", None), getattr(c, "v_scale", None))
                  if isinstance(t, torch.Tensor)]
    kv_pool = sum(t.untyped_storage().nbytes() for t in kv_tensors)
    kv_res = sum(resident_bytes(t) for t in kv_tensors)
    step = min(ec.max_num_batched_tokens, engine.max_model_len)
    bound = workspace_bytes(cfg, step, min(ec.max_num_seqs, step))
    stats = getattr(engine, "stats", {})
    ws = (workspace_bytes(cfg, stats["max_step_tokens"], stats["max_step_seqs"])
          if stats.get("max_step_tokens") else bound)   # the largest step run so far
    st = proc_status()
    try:
        file = weight_sizes(engine.model_path, cfg, None)
        stored, load_peak = file.stored, file.load_peak
    except (MiaotuiError, OSError, ValueError, KeyError):
        stored = load_peak = 0
    return Breakdown(runtime=getattr(engine, "rss_before_weights", 0), weights_stored=stored,
                     weights=parts["weights"], embedding=parts["embedding"], other_weights=parts["other"],
                     kv_pool=kv_pool, kv_resident=kv_res, workspace=ws, workspace_bound=bound,
                     load_peak=load_peak, peak_rss=st.get("VmHWM"), rss=st.get("VmRSS"))


def _numel(shape) -> int:
    n = 1
    for s in shape or ():
        n *= int(s)
    return n


# ---- before loading -----------------------------------------------------------------------------
def estimate_breakdown(path: str, cfg, quantization: str | None, kv_per_token: int,
                       kv_tokens: int, kv_pool_tokens: int, step_tokens: int, logit_rows: int,
                       runtime: int | None = None, dtype: str = "auto") -> Breakdown:
    """The parts of an engine on checkpoint `path`, without loading it: weights from the
    file's tensor table (as the engine will hold them), KV for `kv_tokens` written tokens
    of a pool of `kv_pool_tokens`, the workspace of a step, and this process's RSS as the
    runtime (call it with torch imported and the tokenizer loaded)."""
    w = weight_sizes(path, cfg, quantization, dtype)
    rotary = 4 * cfg.max_position_embeddings * cfg.head_dim   # cos and sin tables
    return Breakdown(runtime=current_rss() if runtime is None else runtime, weights_stored=w.stored,
                     weights=w.layers + w.head, embedding=w.embed, other_weights=w.other + rotary,
                     kv_pool=kv_pool_tokens * kv_per_token, kv_resident=kv_tokens * kv_per_token,
                     workspace=workspace_bytes(cfg, step_tokens, logit_rows), load_peak=w.load_peak,
                     workspace_bound=workspace_bytes(cfg, step_tokens, logit_rows))


# ---- a budget -----------------------------------------------------------------------------------
def kv_budget(budget: int, runtime: int, weights: int, workspace: int) -> int:
    """What a memory budget leaves for the KV pool."""
    return budget - runtime - weights - workspace
