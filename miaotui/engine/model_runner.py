"""Owns the model, the KV cache and the device: turns a scheduled batch into tensors,
runs the forward passes, and samples.

Which code computes a token depends on that token's own request only: prompt tokens go
through the prefill path (the PyTorch modules, float32 activations), generated tokens
through the decode path (the fused C++ step where the model has one, else the PyTorch
modules with int8 activations for quantized weights), whatever else the step holds. A
step with both runs the two parts one after the other. With every kernel computing a row
the same way whatever the batch, a request's tokens are then the same batched or alone,
chunked or not, with its prefix from the cache or computed.
"""
from __future__ import annotations

import torch

from miaotui import kernels
from miaotui.config import ModelConfig
from miaotui.engine.sequence import Sequence
from miaotui.layers.attention import AttentionMetadata, KVCache, PrefillChunk
from miaotui.layers.quant import exact_activations
from miaotui.layers.sampler import Sampler, make_logprobs


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, num_blocks: int,
                 block_size: int, eos_ids: set[int], kv_dtype: torch.dtype = torch.float32,
                 device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.model, self.cfg = model, cfg
        self.block_size = block_size
        self.device = device
        # attention through the C++ kernel (else PyTorch's SDPA, not batch-invariant)
        self.kernel_attention = (kernels.load() is not None and device == "cpu" and dtype == torch.float32
                                 and cfg.head_dim % 8 == 0 and kv_dtype in (torch.float32, torch.float16, torch.int8))
        self.caches = []
        for attn in model.attention_layers():  # the kernels read only written slots: no zeroing
            attn.cache = KVCache(num_blocks * block_size, attn.num_kv_heads, cfg.head_dim, kv_dtype, device,
                                 zeroed=not self.kernel_attention)
            self.caches.append(attn.cache)
        self.sampler = Sampler(eos_ids)
        if kernels.load() is not None:
            kernels.load().set_threads(torch.get_num_threads())
        self.window = cfg.sliding_window if cfg.layer_types and "sliding_attention" in cfg.layer_types else None
        from miaotui.engine.cpu_decoder import CPUDecoder
        self.decoder = CPUDecoder.build(model, self.caches, block_size) if device == "cpu" else None

    @staticmethod
    def kv_bytes_per_token(cfg: ModelConfig, kv_dtype: torch.dtype) -> int:
        elem = torch.tensor([], dtype=kv_dtype).element_size()
        per = 2 * cfg.num_kv_heads * cfg.head_dim * elem
        if kv_dtype == torch.int8:
            per += 2 * cfg.num_kv_heads * 4
        return per * cfg.num_layers

    def _slots(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        table = torch.tensor(seq.block_table, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _decode_tables(self, seqs: list[Sequence], counts: list[int] | None = None
                       ) -> tuple[list[int], list[list[int]], list[int]]:
        """For ``counts`` new tokens per sequence (default one): context lengths after them,
        block tables padded to the longest (with block 0) and the slot of each last token."""
        bs = self.block_size
        lens = [s.num_computed_tokens + (1 if counts is None else c) for s, c in
                zip(seqs, counts or [1] * len(seqs))]
        nblk = -(-max(lens) // bs)
        tables = [s.block_table[:nblk] + [0] * (nblk - min(nblk, len(s.block_table))) for s in seqs]
        slots = [t[(n - 1) // bs] * bs + (n - 1) % bs for t, n in zip(tables, lens)]
        return lens, tables, slots

    def _prefill_masks(self, chunk: PrefillChunk, L: int, C: int) -> None:
        q_pos = torch.arange(chunk.first_pos, chunk.first_pos + L).unsqueeze(1)
        k_pos = torch.arange(C).unsqueeze(0)
        if chunk.ctx_slots is not None:
            chunk.mask = k_pos <= q_pos
        chunk.sliding_mask = chunk.mask
        if self.window is not None and C > self.window:
            chunk.sliding_mask = (k_pos <= q_pos) & (k_pos > q_pos - self.window)

    def prepare(self, batch: list[tuple[Sequence, int]], decode: bool):
        """Flatten one phase of the batch: prompt chunks (``decode`` False) or one generated
        token per sequence (True)."""
        ids, pos, slots, chunks = [], [], [], []
        row = 0
        for seq, n in batch:
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start:start + n])
            pos.append(torch.arange(start, start + n))
            slots.append(self._slots(seq, start, start + n))
            if not decode and not self.kernel_attention:  # the PyTorch fallback's SDPA per chunk
                chunk = PrefillChunk(row, row + n, start, self._slots(seq, 0, start + n) if start else None)
                self._prefill_masks(chunk, n, start + n)
                chunks.append(chunk)
            row += n
        meta = AttentionMetadata(slot_mapping=torch.cat(slots), prefills=chunks,
                                 num_prefill_tokens=0 if decode else row)
        positions = torch.cat(pos)
        lens, tables, _ = self._decode_tables([s for s, _ in batch], [n for _, n in batch])
        tables = torch.tensor(tables)
        if self.kernel_attention:
            meta.tables, meta.token_pos = tables, positions
            meta.token_seq = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor([n for _, n in batch]))
            meta.block_size, meta.window = self.block_size, self.window or 0
        elif decode:  # the PyTorch fallback's padded gather
            self._decode_masks(meta, lens, tables)
        return torch.tensor(ids, dtype=torch.long), positions, meta

    def _decode_masks(self, meta: AttentionMetadata, lens: list[int], tables: torch.Tensor) -> None:
        lens = torch.tensor(lens)
        max_len = int(lens.max())
        k_pos = torch.arange(max_len)
        meta.decode_slots = tables[:, k_pos // self.block_size] * self.block_size + k_pos % self.block_size
        cur = (lens - 1).unsqueeze(1)
        valid = k_pos.unsqueeze(0) <= cur
        meta.decode_mask = None if bool((lens == max_len).all()) else valid[:, None, None, :]
        meta.decode_sliding_mask = meta.decode_mask
        if self.window is not None and max_len > self.window:
            meta.decode_sliding_mask = (valid & (k_pos.unsqueeze(0) > cur - self.window))[:, None, None, :]

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]) -> dict[int, int]:
        """The step's forward passes. Returns {seq_id: sampled token} for sequences that
        reached the end of their known tokens (a finished prompt, or a decode)."""
        prompt = [(s, n) for s, n in batch if s.num_computed_tokens < s.num_prompt_tokens]
        decode = [(s, n) for s, n in batch if s.num_computed_tokens >= s.num_prompt_tokens]
        assert all(n == 1 for _, n in decode), "generated tokens are computed one at a time"
        assert all(s.num_computed_tokens + n <= s.num_prompt_tokens for s, n in prompt), \
            "a prompt chunk never reaches into generated tokens"
        out = {}
        if prompt:
            with exact_activations(True):
                out.update(self._forward(prompt, *self.prepare(prompt, decode=False)))
        if decode and self.decoder is not None:
            out.update(self._decode_fused([s for s, _ in decode]))
        elif decode:
            with exact_activations(False):
                out.update(self._forward(decode, *self.prepare(decode, decode=True)))
        return out

    def _decode_fused(self, seqs: list[Sequence]) -> dict[int, int]:
        """One generated token per sequence through the C++ decoder, the metadata as plain
        lists. A token replayed after preemption samples nothing (it is not the last)."""
        lens, tables, slots = self._decode_tables(seqs)
        # token ids, positions, slots, lengths: one tensor (each construction costs ~15 us)
        ids = [s.token_ids[n - 1] for s, n in zip(seqs, lens)]
        meta = torch.tensor([ids, [n - 1 for n in lens], slots, lens])
        logits = self.decoder(meta[0], meta[1], meta[2], torch.tensor(tables), meta[3])
        rows = [i for i, (s, n) in enumerate(zip(seqs, lens)) if n == len(s)]
        if not rows:
            return {}
        if len(rows) < len(seqs):
            logits, seqs = logits[rows], [seqs[i] for i in rows]
        tokens = self.sampler(logits, seqs)
        return {s.seq_id: t for s, t in zip(seqs, tokens)}

    def _forward(self, ordered, input_ids, positions, meta) -> dict[int, int]:
        """One pass of the PyTorch model over a phase's tokens; samples the rows that end
        their sequence's known tokens."""
        hidden = self.model(input_ids.to(self.device), positions.to(self.device), meta)
        rows, sample_seqs = [], []
        end = 0
        for seq, n in ordered:
            end += n
            if seq.params.prompt_logprobs is not None and seq.num_computed_tokens < seq.num_prompt_tokens:
                self._prompt_logprobs(seq, hidden[end - n:end], n)
            if seq.num_computed_tokens + n == len(seq):
                rows.append(end - 1)
                sample_seqs.append(seq)
        if not rows:
            return {}
        logits = self.model.compute_logits(hidden[rows])
        tokens = self.sampler(logits, sample_seqs)
        return {s.seq_id: t for s, t in zip(sample_seqs, tokens)}

    def _prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor, n: int) -> None:
        """Log-probs of prompt tokens start+1 .. start+n given their prefixes (for scoring)."""
        start = seq.num_computed_tokens
        if start == 0:
            seq.prompt_logprobs.append(None)          # the first token has no context
        targets = seq.token_ids[start + 1:min(start + n + 1, seq.num_prompt_tokens)]
        if not targets:
            return
        k = seq.params.prompt_logprobs
        for s0 in range(0, len(targets), 256):  # bounded memory with large vocabularies
            lp = torch.log_softmax(self.model.compute_logits(hidden[s0:s0 + 256][:len(targets) - s0]).float(), -1)
            for i, t in enumerate(targets[s0:s0 + 256]):
                seq.prompt_logprobs.append(make_logprobs(lp[i], t, k))
