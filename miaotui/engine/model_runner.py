"""Owns the model, the KV cache and the device: turns a scheduled batch into tensors,
runs one forward pass, and samples.
"""
from __future__ import annotations

import torch

from miaotui.config import ModelConfig
from miaotui.engine.sequence import Sequence
from miaotui.layers.attention import AttentionMetadata, KVCache, PrefillChunk
from miaotui.layers.quant import exact_activations
from miaotui.layers.sampler import Sampler, make_logprobs


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, num_blocks: int,
                 block_size: int, eos_ids: set[int], kv_dtype: torch.dtype = torch.float32,
                 device: str = "cpu"):
        self.model, self.cfg = model, cfg
        self.block_size = block_size
        self.device = device
        self.caches = []
        for attn in model.attention_layers():
            attn.cache = KVCache(num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim, kv_dtype, device)
            self.caches.append(attn.cache)
        self.sampler = Sampler(eos_ids)
        from miaotui import kernels
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

    def _decode_tables(self, seqs: list[Sequence]) -> tuple[list[int], list[list[int]], list[int]]:
        """For one new token per sequence: context lengths, block tables padded to the longest
        (with block 0) and the slot each token's K/V goes to."""
        bs = self.block_size
        lens = [s.num_computed_tokens + 1 for s in seqs]
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

    def prepare(self, batch: list[tuple[Sequence, int]]):
        """Flatten the batch (prefill chunks first, then single-token decodes)."""
        prefills = [(s, n) for s, n in batch if n > 1]
        decodes = [(s, n) for s, n in batch if n == 1]
        ids, pos, slots, chunks = [], [], [], []
        row = 0
        for seq, n in prefills:
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start:start + n])
            pos.append(torch.arange(start, start + n))
            slots.append(self._slots(seq, start, start + n))
            chunk = PrefillChunk(row, row + n, start, self._slots(seq, 0, start + n) if start else None)
            self._prefill_masks(chunk, n, start + n)
            chunks.append(chunk)
            row += n
        meta = AttentionMetadata(slot_mapping=None, prefills=chunks, num_prefill_tokens=row)
        if decodes:
            lens, tables, dslot = self._decode_tables([s for s, _ in decodes])
            lens, tables = torch.tensor(lens), torch.tensor(tables)
            max_len = int(lens.max())
            k_pos = torch.arange(max_len)
            dslots = tables[:, k_pos // self.block_size] * self.block_size + k_pos % self.block_size
            cur = (lens - 1).unsqueeze(1)
            valid = k_pos.unsqueeze(0) <= cur
            uniform = bool((lens == max_len).all())
            meta.decode_slots = dslots
            meta.decode_mask = None if uniform else valid[:, None, None, :]
            meta.decode_sliding_mask = meta.decode_mask
            if self.window is not None and max_len > self.window:
                meta.decode_sliding_mask = (valid & (k_pos.unsqueeze(0) > cur - self.window))[:, None, None, :]
            for s, _ in decodes:  # a one-token prefill chunk too: not always the last token
                ids.append(s.token_ids[s.num_computed_tokens])
            pos.append(lens - 1)
            slots.append(torch.tensor(dslot))
        meta.slot_mapping = torch.cat(slots)
        input_ids = torch.tensor(ids, dtype=torch.long)
        positions = torch.cat(pos)
        return prefills + decodes, input_ids, positions, meta

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]) -> dict[int, int]:
        """One forward pass. Returns {seq_id: sampled token} for sequences that reached
        the end of their known tokens (a finished prefill, or a decode)."""
        if self.decoder is not None and all(n == 1 and (s.params.prompt_logprobs is None or
                                                      s.num_computed_tokens >= s.num_prompt_tokens)
                                            for s, n in batch):
            return self._decode_fused([s for s, _ in batch])
        ordered, input_ids, positions, meta = self.prepare(batch)
        with exact_activations(bool(meta.prefills)):
            return self._forward(ordered, input_ids, positions, meta)

    def _decode_fused(self, seqs: list[Sequence]) -> dict[int, int]:
        """One token per sequence through the C++ decoder, the metadata as plain lists. A
        one-token prefill chunk is such a token too; it samples only at the prompt's end."""
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
