"""The model runner of the GPU path: the step's metadata as device tensors, the forward
passes through miaotui.kernels.gpu (layers/device.py), sampling on the device, and CUDA
graphs for decode steps.

The scheduler, block manager, prefix cache, chunked prefill, preemption and speculative
decoding are the CPU engine's, unchanged: this class only turns a scheduled batch into
device tensors. Prompt chunks are packed back to back (cu_seqlens_q, start_pos, a padded
block table per chunk) for ``gpu.paged_prefill_attention``; decode rows (one per generated
token, a sequence's speculative guesses being extra rows) carry their own block table row
and seq_len for ``gpu.paged_decode_attention``. Every layer writes its K/V (store_kv) before
attending.

CUDA graphs: at start-up the decode step (model forward + logits) is captured at a ladder
of batch sizes (``graph_sizes``) over static input buffers; a step with B rows pads to the
next captured size with padding rows (slot -1: nothing stored; seq_len 0: attention
outputs zeros) and replays. ``enforce_eager`` skips the capture; a step with more rows than
the largest size runs eagerly.

The test mode (``MIAOTUI_TRITON_CPU=1``, with ``TRITON_INTERPRET=1`` set before triton is
imported) runs this runner on CPU tensors (Triton's interpreter, or the PyTorch references
without triton), so the whole path is tested without a GPU; graphs need CUDA.
"""
from __future__ import annotations

import logging
import os
import time

import torch

from miaotui.config import MiaotuiError, ModelConfig
from miaotui.engine.model_runner import ModelRunner
from miaotui.engine.sequence import Sequence
from miaotui.layers.attention import AttentionMetadata, KVCache
from miaotui.layers.device import gpu_path
from miaotui.layers.sampler import Sampler

log = logging.getLogger("miaotui")

GRAPH_MAX_BATCH = 256   # decode batches above this run eagerly (their launch cost is amortised)
_LADDER = [1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256]
FLOAT_KV = (torch.float32, torch.float16, torch.bfloat16)


def wanted(device: str) -> bool:
    """Whether an engine on ``device`` ("cpu" | "cuda") takes the GPU path: on CUDA, or on
    CPU with MIAOTUI_TRITON_CPU=1 (the test mode: Triton's interpreter when TRITON_INTERPRET=1
    and triton imports, else the PyTorch references of miaotui.kernels.gpu)."""
    return device == "cuda" or (device == "cpu" and os.environ.get("MIAOTUI_TRITON_CPU", "") not in ("", "0"))


def graph_sizes(max_num_seqs: int, cap: int = GRAPH_MAX_BATCH) -> list[int]:
    """The decode batch sizes captured: the ladder up to min(max_num_seqs, cap), which
    is always the last size (a step never holds more plain decode rows than sequences)."""
    top = max(1, min(max_num_seqs, cap))
    return [s for s in _LADDER if s < top] + [top]


def pick_size(sizes: list[int], rows: int) -> int | None:
    """The smallest captured size holding ``rows`` decode rows, or None (run eagerly)."""
    return next((s for s in sizes if s >= rows), None)


class GPURunner(ModelRunner):
    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, num_blocks: int, block_size: int,
                 eos_ids: set[int], kv_dtype: torch.dtype, device: str | torch.device,
                 dtype: torch.dtype, max_model_len: int, max_num_seqs: int = 1,
                 enforce_eager: bool = False, progress: bool = False):
        if kv_dtype not in FLOAT_KV:
            raise MiaotuiError(f"kv_cache_dtype {kv_dtype} is not supported on the GPU path "
                               "(the int8 KV cache is CPU-only); use auto, bf16, fp16 or fp32")
        # (ModelRunner.__init__ is not called: it builds the CPU path's caches and decoder)
        self.model, self.cfg = model, cfg
        self.block_size, self.num_blocks, self.kv_dtype = block_size, num_blocks, kv_dtype
        self.device, self.dtype = torch.device(device), dtype
        self.kernel_attention, self.decoder, self.verifier = False, None, None
        self.window = cfg.attention_window
        self.max_blocks = -(-max_model_len // block_size)   # a block table's width in a graph
        self.caches = []
        for attn in model.attention_layers():   # zeroed: masked-out keys are finite
            attn.cache = KVCache(num_blocks * block_size, attn.num_kv_heads, cfg.head_dim, kv_dtype,
                                 self.device, zeroed=True)
            self.caches.append(attn.cache)
        self.sampler = Sampler(eos_ids)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_sizes: list[int] = []
        if self.device.type == "cuda" and not enforce_eager:
            self.capture(graph_sizes(max_num_seqs), progress)

    # ---- metadata -------------------------------------------------------------------------
    def _to_device(self, rows: list[list[int]], dtype=torch.long) -> torch.Tensor:
        return torch.tensor(rows, dtype=dtype).to(self.device, non_blocking=True)

    def prepare(self, batch: list[tuple[Sequence, int]], decode: bool = False):
        """Prompt chunks packed back to back: input ids, positions and the metadata of
        gpu.paged_prefill_attention, as device tensors."""
        assert not decode, "decode rows go through _decode_logits"
        bs = self.block_size
        ids, pos, slots, cu, starts = [], [], [], [0], []
        _, tables = self._padded_tables(batch)
        for (seq, n), table in zip(batch, tables):
            start = seq.num_computed_tokens
            ids.extend(self._inputs(seq, start, n))
            pos.extend(range(start, start + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            cu.append(cu[-1] + n)
            starts.append(start)
        flat = self._to_device([ids, pos, slots])
        meta = AttentionMetadata(slot_mapping=flat[2], num_prefill_tokens=len(ids), gpu="prefill",
                                 tables=self._to_device(tables, torch.int32),
                                 cu_seqlens_q=self._to_device(cu, torch.int32),
                                 start_pos=self._to_device(starts, torch.int32),
                                 max_seqlen_q=max(n for _, n in batch), block_size=bs, window=self.window or 0)
        return flat[0], flat[1], meta

    def _forward(self, ordered, input_ids, positions, meta) -> dict[int, list[int]]:
        with gpu_path(self.dtype):
            return super()._forward(ordered, input_ids, positions, meta)

    # ---- decode ---------------------------------------------------------------------------
    def decode_forward(self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor,
                       lens: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of B decode rows given as device tensors (what a graph captures):
        ids, pos, slots, lens [B] int64 (lens = position + 1; 0 and slot -1: a padding
        row), tables [B, width] int32."""
        meta = AttentionMetadata(slot_mapping=slots, gpu="decode", tables=tables, seq_lens=lens.int(),
                                 block_size=self.block_size, window=self.window or 0)
        with gpu_path(self.dtype):
            return self.model.compute_logits(self.model(ids, pos, meta))

    def _decode_logits(self, decode: list[tuple[Sequence, int]], want: list[int], rows: int,
                       pad_to: int | None = None):
        """Logits of the decode rows ``want``: replayed from the smallest captured graph
        that holds the step, else computed eagerly (``pad_to``: eagerly with padding rows
        up to that many, as a graph would run them; for tests)."""
        ids, pos, slots, lens, tables = self._decode_lists(decode, self._padded_tables(decode)[1])
        size = pick_size(self.graph_sizes, rows)
        n = size or pad_to or rows
        pad = n - rows
        flat = torch.tensor([ids + [0] * pad, pos + [0] * pad, slots + [-1] * pad, lens + [0] * pad])
        width = len(tables[0])
        tab = torch.tensor(tables + [[0] * width] * pad, dtype=torch.int32)
        if size is None:
            flat, tab = flat.to(self.device, non_blocking=True), tab.to(self.device, non_blocking=True)
            logits = self.decode_forward(flat[0], flat[1], flat[2], flat[3], tab)
        else:   # into the static buffers (columns past `width` are never read: seq_len bounds them)
            self.static[:, :n].copy_(flat, non_blocking=True)
            self.static_tables[:n, :width].copy_(tab, non_blocking=True)
            graph, logits = self.graphs[size]
            graph.replay()
        return logits[:rows] if len(want) == rows else logits[want]

    def static_buffers(self, rows: int) -> list[torch.Tensor]:
        """Allocate the graphs' inputs for up to ``rows`` decode rows, holding padding rows;
        returns their views for ``rows``: ids, positions, slots, lens, tables."""
        self.static = torch.zeros(4, rows, dtype=torch.long, device=self.device)
        self.static[2] = -1   # slots: padding rows store nothing
        self.static_tables = torch.zeros(rows, self.max_blocks, dtype=torch.int32, device=self.device)
        return [*self.static, self.static_tables]

    def capture(self, sizes: list[int], progress: bool = False) -> None:
        """Capture the decode step at each of ``sizes`` (largest first, sharing one memory
        pool) over static buffers holding padding rows."""
        t0 = time.perf_counter()
        top = sizes[-1]
        self.static_buffers(top)
        order = list(reversed(sizes))
        if progress:
            from tqdm import tqdm
            order = tqdm(order, desc="capturing CUDA graphs", unit="graph", leave=False)
        else:
            log.info("capturing CUDA graphs for decode batches of %d..%d rows (%d sizes)",
                     sizes[0], top, len(sizes))
        pool = None
        with torch.inference_mode():
            for bs in order:
                args = (*self.static[:, :bs], self.static_tables[:bs])
                self.decode_forward(*args)   # warm-up: kernels compiled outside the capture
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self.decode_forward(*args)
                pool = graph.pool()
                self.graphs[bs] = (graph, out)
        torch.cuda.synchronize(self.device)
        self.graph_sizes = sizes
        log.info("captured %d CUDA graphs in %.1f s", len(sizes), time.perf_counter() - t0)


def profile_kv_bytes(model: torch.nn.Module, cfg: ModelConfig, dtype: torch.dtype,
                     kv_dtype: torch.dtype, device: torch.device, utilization: float,
                     step_tokens: int, max_num_seqs: int, graphs: bool) -> int:
    """Bytes the KV pool may take on a CUDA device, as vLLM sizes it: ``utilization`` of
    the device's memory, minus the weights and the peak of one profiled step of
    ``step_tokens`` prompt tokens (its logits for ``max_num_seqs`` rows), minus memory
    outside PyTorch's allocator (the CUDA context), minus an estimate for the decode
    graphs (the profiled step's activations scaled to the largest captured batch)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    bs = 16
    nblk = -(-step_tokens // bs)
    saved = [a.cache for a in model.attention_layers()]
    for a in model.attention_layers():   # a pool for the profiled sequence only
        a.cache = KVCache(nblk * bs, a.num_kv_heads, cfg.head_dim, kv_dtype, device)
    try:
        ids = torch.zeros(step_tokens, dtype=torch.long, device=device)
        pos = torch.arange(step_tokens, device=device)
        meta = AttentionMetadata(slot_mapping=pos, num_prefill_tokens=step_tokens, gpu="prefill",
                                 tables=torch.arange(nblk, dtype=torch.int32, device=device)[None],
                                 cu_seqlens_q=torch.tensor([0, step_tokens], dtype=torch.int32, device=device),
                                 start_pos=torch.zeros(1, dtype=torch.int32, device=device),
                                 max_seqlen_q=step_tokens, block_size=bs)
        with torch.inference_mode(), gpu_path(dtype):
            hidden = model(ids, pos, meta)
            model.compute_logits(hidden[:min(max_num_seqs, step_tokens)])
        torch.cuda.synchronize(device)
    finally:
        for a, c in zip(model.attention_layers(), saved):
            a.cache = c
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    graph_rows = min(max_num_seqs, GRAPH_MAX_BATCH) if graphs else 0
    return kv_budget(total, free, torch.cuda.memory_reserved(device), base, peak, utilization,
                     step_tokens, graph_rows)


def kv_budget(total: int, free: int, reserved: int, base: int, peak: int, utilization: float,
              step_tokens: int, graph_rows: int) -> int:
    """The KV pool's bytes: utilization x total, minus the profiled peak (weights ``base``
    + the step's activations), minus what the device holds outside PyTorch's allocator
    (used - reserved: the CUDA context, cuBLAS workspaces), minus the decode graphs' pool,
    estimated as the step's activations scaled to ``graph_rows`` of ``step_tokens`` rows."""
    outside = max(0, (total - free) - reserved)
    graph = (peak - base) * min(1.0, graph_rows / step_tokens)
    return int(total * utilization - peak - outside - graph)
