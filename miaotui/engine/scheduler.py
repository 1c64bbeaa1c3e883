"""Continuous batching: which sequences run this step, and how many tokens each computes.

Every step first serves the running sequences in arrival order (a decode computes one
token, an unfinished prefill its next chunk), then admits waiting ones while the token
budget, the sequence cap and the free blocks allow. When a running sequence needs a block
and none is free, the newest running sequence is preempted: its blocks are freed and it
is recomputed later (its prefix blocks often survive in the prefix cache).

With ``max_decode_delay`` set (the server's default), a long prompt cannot stall the
streams already decoding: while any sequence decodes, prompt tokens per step are capped,
and the cap adapts so that a step takes at most about that many times a decode-only step
(halved when a step ran long, grown slowly when there is room); within the cap the
shortest remaining prompts go first, so a short request is not queued behind a long one.
Since a token's result does not depend on how its prompt was chunked, this changes latency
only, never the text.
"""
from __future__ import annotations

from collections import deque

from miaotui.engine.block_manager import BlockManager
from miaotui.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_decode_delay: float | None = None):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_decode_delay = max_decode_delay
        self.prompt_cap = min(16, max_num_batched_tokens)  # prompt tokens a step may take while
                                                           # decoding: starts small, adapts
        self.decode_step_s: float | None = None   # running mean of decode-only steps
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.on_finish = None        # called with each sequence that finishes or is aborted

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        budget = self.max_num_batched_tokens
        decoding = any(s.num_computed_tokens >= s.num_prompt_tokens for s in self.running)
        capped = bool(self.max_decode_delay) and decoding
        cap = self.prompt_cap if capped else budget
        batch: list[tuple[Sequence, int]] = []
        prompts: list[Sequence] = []  # under the cap: prompt chunks, shortest rest first
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            while not self.bm.can_append(seq):
                if seq.spec_k:  # guesses never cost another sequence its place
                    seq.spec_k = 0
                    continue
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.bm.append_slots(seq)
                if capped and seq.num_computed_tokens < seq.num_prompt_tokens:
                    prompts.append(seq)
                else:
                    n = self._tokens(seq, budget, cap)
                    if n:
                        batch.append((seq, n))
                        budget -= n
                        cap -= n if seq.num_computed_tokens < seq.num_prompt_tokens else 0
                i += 1
                continue
            break
        while (self.waiting and budget > 0 and cap > 0 and not preempted
               and len(self.running) < self.max_num_seqs and self.bm.can_allocate(self.waiting[0])):
            seq = self.waiting.popleft()
            p = seq.params   # a scored prompt reuses cached blocks only before its scored part
            self.bm.allocate(seq, max_cached=None if p.prompt_logprobs is None
                             else max(p.prompt_logprobs_start - 1, 0))
            seq.status = Status.RUNNING
            self.running.append(seq)
            if capped:  # one a step: each holds its prompt's blocks while it waits its turn
                prompts.append(seq)
                break
            n = self._tokens(seq, budget, cap)
            batch.append((seq, n))
            budget -= n
            cap -= n
        # a short prompt (a 4-token question) is not kept waiting behind a long one's chunks
        for seq in sorted(prompts, key=lambda s: s.num_prompt_tokens - s.num_computed_tokens):
            n = self._tokens(seq, budget, cap)
            if n:
                batch.append((seq, n))
                budget -= n
                cap -= n
        return batch

    @staticmethod
    def _tokens(seq: Sequence, budget: int, cap: int) -> int:
        """This step's tokens for a sequence: its next prompt chunk (within the budget and
        the prompt cap) or one generated token."""
        if seq.num_computed_tokens < seq.num_prompt_tokens:
            return min(seq.num_to_compute, budget, cap)
        return min(seq.num_to_compute, budget)

    def observe(self, batch: list[tuple[Sequence, int]], seconds: float) -> None:
        """Adapt the prompt cap to how long a step with prompt tokens took next to a
        decode-only one (called by the engine after each step)."""
        if not self.max_decode_delay:
            return
        prompt = any(s.num_computed_tokens - n < s.num_prompt_tokens for s, n in batch)
        decode = any(s.num_computed_tokens - n >= s.num_prompt_tokens for s, n in batch)
        if decode and not prompt:
            m = self.decode_step_s
            self.decode_step_s = seconds if m is None else 0.8 * m + 0.2 * seconds
        elif decode and self.decode_step_s:
            ratio = seconds / self.decode_step_s
            if ratio > self.max_decode_delay:
                self.prompt_cap = max(1, int(self.prompt_cap * self.max_decode_delay / ratio / 1.25))
            elif ratio < 0.7 * self.max_decode_delay:
                self.prompt_cap = min(self.max_num_batched_tokens, self.prompt_cap + 1 + self.prompt_cap // 4)

    def _preempt(self, seq: Sequence) -> None:
        seq.spec_k, seq.spec_tokens = 0, []
        self.bm.free_seq(seq)
        seq.status = Status.WAITING
        seq.num_computed_tokens = 0
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and return its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free_seq(seq)
        seq.status = Status.FINISHED
        if self.on_finish is not None:
            self.on_finish(seq)
