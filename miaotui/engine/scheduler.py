"""Continuous batching: which sequences run this step, and how many tokens each computes.

Every step first serves the running sequences in arrival order (a decode computes one
token, an unfinished prefill its next chunk), then admits waiting ones while the token
budget, the sequence cap and the free blocks allow. When a running sequence needs a block
and none is free, the newest running sequence is preempted: its blocks are freed and it
is recomputed later (its prefix blocks often survive in the prefix cache).
"""
from __future__ import annotations

from collections import deque

from miaotui.engine.block_manager import BlockManager
from miaotui.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        budget = self.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            while not self.bm.can_append(seq):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.bm.append_slots(seq)
                n = min(seq.num_to_compute, budget)
                batch.append((seq, n))
                budget -= n
                i += 1
                continue
            break
        while (self.waiting and budget > 0 and not preempted
               and len(self.running) < self.max_num_seqs and self.bm.can_allocate(self.waiting[0])):
            seq = self.waiting.popleft()
            self.bm.allocate(seq, use_cache=seq.params.prompt_logprobs is None)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_to_compute, budget)
            batch.append((seq, n))
            budget -= n
        return batch

    def _preempt(self, seq: Sequence) -> None:
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
