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
from miaotui.layers.quant import exact_activations, int8_prompt
from miaotui.layers.sampler import Sampler, make_logprobs


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, num_blocks: int,
                 block_size: int, eos_ids: set[int], kv_dtype: torch.dtype = torch.float32,
                 device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.model, self.cfg = model, cfg
        self.block_size = block_size
        self.num_blocks, self.kv_dtype = num_blocks, kv_dtype
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
        self.verifier = None       # set by the engine when it speculates (engine/speculative.py)
        self.prefill_int8 = False  # EngineConfig.prefill_int8: prompts with int8 activations
        if kernels.load() is not None:
            kernels.load().set_threads(torch.get_num_threads())
        self.window = cfg.attention_window
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

    def _padded_tables(self, batch: list[tuple[Sequence, int]]) -> tuple[list[int], list[list[int]]]:
        """For n new tokens per sequence: context lengths after them, and block tables
        padded to the longest (with block 0)."""
        lens = [s.num_computed_tokens + n for s, n in batch]
        nblk = -(-max(lens) // self.block_size)
        return lens, [s.block_table[:nblk] + [0] * (nblk - min(nblk, len(s.block_table))) for s, _ in batch]

    def _prefill_masks(self, chunk: PrefillChunk, L: int, C: int) -> None:
        q_pos = torch.arange(chunk.first_pos, chunk.first_pos + L).unsqueeze(1)
        k_pos = torch.arange(C).unsqueeze(0)
        if chunk.ctx_slots is not None:
            chunk.mask = k_pos <= q_pos
        chunk.sliding_mask = chunk.mask
        if self.window is not None and C > self.window:
            chunk.sliding_mask = (k_pos <= q_pos) & (k_pos > q_pos - self.window)

    @staticmethod
    def _inputs(seq: Sequence, start: int, n: int) -> list[int]:
        """Token ids at positions start..start+n: known tokens, then this step's guesses."""
        ids = seq.token_ids[start:start + n]
        return ids + seq.spec_tokens[:n - len(ids)] if len(ids) < n else ids

    def prepare(self, batch: list[tuple[Sequence, int]], decode: bool):
        """Flatten one phase of the batch: prompt chunks (``decode`` False) or generated
        tokens (True: usually one per sequence; with speculation, the guesses after it)."""
        ids, pos, slots, chunks = [], [], [], []
        row = 0
        for seq, n in batch:
            start = seq.num_computed_tokens
            ids.extend(self._inputs(seq, start, n))
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
        lens, tables = self._padded_tables(batch)
        tables = torch.tensor(tables)
        if self.kernel_attention:
            meta.tables, meta.token_pos = tables, positions
            meta.token_seq = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor([n for _, n in batch]))
            meta.block_size, meta.window = self.block_size, self.window or 0
        elif decode:  # the PyTorch fallback's padded gather, a row per token
            rows = [i for i, (_, n) in enumerate(batch) for _ in range(n)]
            self._decode_masks(meta, (positions + 1).tolist(), tables[rows])
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
    def run(self, batch: list[tuple[Sequence, int]]) -> dict[int, list[int]]:
        """The step's forward passes. Returns {seq_id: new tokens} for sequences that
        reached the end of their known tokens (a finished prompt, or a decode): one sampled
        token, or with speculation the accepted guesses and one more."""
        prompt = [(s, n) for s, n in batch if s.num_computed_tokens < s.num_prompt_tokens]
        decode = [(s, n) for s, n in batch if s.num_computed_tokens >= s.num_prompt_tokens]
        assert all(s.num_computed_tokens + n <= s.num_prompt_tokens for s, n in prompt), \
            "a prompt chunk never reaches into generated tokens"
        assert all(n == 1 or s.num_computed_tokens + n == len(s) + len(s.spec_tokens) for s, n in decode), \
            "generated tokens are computed one at a time, or a caught-up one with its guesses"
        out = {}
        if prompt:
            with exact_activations(True), int8_prompt(self.prefill_int8):
                out.update(self._forward(prompt, *self.prepare(prompt, decode=False)))
        if decode:
            out.update(self._decode(decode))
        return out

    def _decode(self, decode: list[tuple[Sequence, int]]) -> dict[int, list[int]]:
        """Generated tokens through the decode path: the fused C++ step, else the PyTorch
        modules with int8 activations. Every token is its own row (its own position and
        context), so a guess is computed exactly as it would be alone in a later step."""
        # rows that give logits: the last of a plain decode, every row of a verification
        # (a token replayed after preemption samples nothing: it is not the last)
        want, plain, verify, row = [], [], [], 0
        for s, n in decode:
            k = len(s.spec_tokens)
            if s.num_computed_tokens + n == len(s) + k:
                (verify if k else plain).append((s, len(want), len(want) + k + 1))
                want.extend(range(row + n - 1 - k, row + n))
            row += n
        if not want:   # (replayed tokens only: their K/V is all this step needs)
            self._decode_logits(decode, want, row)
            return {}
        logits = self._decode_logits(decode, want, row)
        out = {}
        if plain:
            rows = [r for _, r, _ in plain]
            sub = logits if len(rows) == len(logits) else logits[rows]
            seqs = [s for s, _, _ in plain]
            out.update((s.seq_id, [t]) for s, t in zip(seqs, self.sampler(sub, seqs)))
        for s, r0, r1 in verify:
            out[s.seq_id] = self.verifier(logits[r0:r1].cpu(), s)   # (.cpu(): the GPU path's)
        return out

    def _decode_logits(self, decode: list[tuple[Sequence, int]], want: list[int], rows: int):
        """Logits of the decode rows ``want`` (of ``rows``): the fused C++ step, else the
        PyTorch modules with int8 activations (engine/gpu_runner.py: the GPU path)."""
        if self.decoder is not None:
            logits = self._decode_fused(decode)
            return logits if len(want) == rows else logits[want]
        with exact_activations(False):
            ids, positions, meta = self.prepare(decode, decode=True)
            hidden = self.model(ids.to(self.device), positions.to(self.device), meta)
            return self.model.compute_logits(hidden[want]) if want else None

    def _decode_lists(self, decode: list[tuple[Sequence, int]], tables: list[list[int]]):
        """Per decode row, as plain lists: token id, position, slot, context length and its
        sequence's block table (a row of ``tables``)."""
        bs = self.block_size
        ids, pos, slots, lens, rows = [], [], [], [], []
        for (s, n), table in zip(decode, tables):
            start = s.num_computed_tokens
            ids.extend(self._inputs(s, start, n))
            for p in range(start, start + n):
                pos.append(p)
                slots.append(table[p // bs] * bs + p % bs)
                lens.append(p + 1)
                rows.append(table)
        return ids, pos, slots, lens, rows

    def _decode_fused(self, decode: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Logits of every decode row through the C++ decoder, the metadata as plain lists."""
        ids, pos, slots, lens, tables = self._decode_lists(decode, self._padded_tables(decode)[1])
        # token ids, positions, slots, lengths: one tensor (each construction costs ~15 us)
        meta = torch.tensor([ids, pos, slots, lens])
        return self.decoder(meta[0], meta[1], meta[2], torch.tensor(tables), meta[3])

    def _forward(self, ordered, input_ids, positions, meta) -> dict[int, list[int]]:
        """One pass of the PyTorch model over prompt chunks; samples the rows that end their
        sequence's known tokens."""
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
        return {s.seq_id: [t] for s, t in zip(sample_seqs, tokens)}

    def _prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor, n: int) -> None:
        """Log-probs of prompt tokens start+1 .. start+n given their prefixes (for scoring)."""
        start = seq.num_computed_tokens
        # entry i is token i's; None for token 0 (no context) and for tokens whose K/V came
        # from the prefix cache (their predecessors' hidden states were never computed);
        # after preemption the entries from `start` on are computed again
        del seq.prompt_logprobs[start + 1:]
        seq.prompt_logprobs.extend([None] * (start + 1 - len(seq.prompt_logprobs)))
        targets = seq.token_ids[start + 1:min(start + n + 1, seq.num_prompt_tokens)]
        if not targets:
            return
        k = seq.params.prompt_logprobs
        for s0 in range(0, len(targets), 256):  # bounded memory with large vocabularies
            lp = torch.log_softmax(self.model.compute_logits(hidden[s0:s0 + 256][:len(targets) - s0]).float(), -1)
            for i, t in enumerate(targets[s0:s0 + 256]):
                seq.prompt_logprobs.append(make_logprobs(lp[i], t, k))
