"""KV-cache block allocation with prefix caching.

The pool is ``num_blocks`` fixed-size blocks. A full block whose tokens are known is
registered under a hash chained with the previous block's hash, so a later sequence with
the same prefix maps the same physical block (reference counted) instead of recomputing
it. Freed blocks keep their content and hash until reused: the free list is an LRU, the
least recently freed block is taken first, and taking a block evicts its hash.
"""
from __future__ import annotations

from collections import OrderedDict

from miaotui.engine.sequence import Sequence


class Block:
    __slots__ = ("id", "ref_count", "hash", "tokens")

    def __init__(self, block_id: int):
        self.id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.tokens: tuple[int, ...] | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}        # hash -> block id
        self.prefix_queries = 0                 # prompt tokens looked up
        self.prefix_hits = 0                    # prompt tokens found in the cache

    # ---- queries ------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @staticmethod
    def chain_hash(prev: int | None, tokens: tuple[int, ...]) -> int:
        return hash((prev, tokens))

    # ---- allocation ---------------------------------------------------------------------
    def _take_new(self) -> int:
        """Take the least recently freed block, evicting whatever prefix it cached."""
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]
        block.hash, block.tokens, block.ref_count = None, None, 1
        return block_id

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_needed(len(seq)) <= len(self.free)

    def allocate(self, seq: Sequence, use_cache: bool = True, max_cached: int | None = None) -> None:
        """Blocks for all of the sequence's current tokens, reusing cached full blocks (at
        most `max_cached` tokens' worth, when given).

        The last token is never taken from the cache: its logits must be computed. Only
        blocks of the prompt are looked up (see ``register_full_blocks``).
        """
        assert not seq.block_table
        bs = self.block_size
        cacheable = min(len(seq) - 1, seq.num_prompt_tokens,
                        len(seq) if max_cached is None else max_cached) // bs
        if not (self.enable_prefix_caching and use_cache):
            cacheable = 0
        prev, num_hit = None, 0
        for i in range(cacheable):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = self.chain_hash(prev, tokens)
            bid = self.cached.get(h)
            if bid is None or self.blocks[bid].tokens != tokens:
                break
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self.free[bid]
            block.ref_count += 1
            seq.block_table.append(bid)
            prev, num_hit = h, num_hit + 1
        for _ in range(self.blocks_needed(len(seq)) - num_hit):
            seq.block_table.append(self._take_new())
        seq.num_cached_tokens = seq.num_computed_tokens = num_hit * bs
        seq.num_hashed_blocks, seq.last_block_hash = num_hit, prev
        self.prefix_queries += len(seq)
        self.prefix_hits += num_hit * bs

    def can_append(self, seq: Sequence) -> bool:
        return self.blocks_needed(seq.num_slots) - len(seq.block_table) <= len(self.free)

    def append_slots(self, seq: Sequence) -> None:
        """Make sure the sequence has blocks for all its tokens (decode adds one at a time)
        and for the guesses it will verify this step."""
        while len(seq.block_table) < self.blocks_needed(seq.num_slots):
            seq.block_table.append(self._take_new())

    def trim(self, seq: Sequence) -> None:
        """Release the blocks past the sequence's computed tokens (those that held rejected
        guesses), so the pool is as plain decoding would have left it. They never carry a
        hash: only prompt blocks are registered."""
        keep = self.blocks_needed(seq.num_computed_tokens)
        while len(seq.block_table) > keep:
            bid = seq.block_table.pop()
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[bid] = None
                self.free.move_to_end(bid, last=False)

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: put every newly completed, computed block of the prompt into the
        prefix cache. Blocks holding generated tokens are not shared: their K/V came from the
        decode path, and a request whose prompt holds those tokens computes them through
        the prefill path when alone, so reusing them would change its output."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed_tokens, seq.num_prompt_tokens) // bs
        # the chain goes on from the sequence's own last hash: its block may not carry it
        # (a twin computed at the same time registered the hash first)
        prev = seq.last_block_hash
        for i in range(seq.num_hashed_blocks, full):
            block = self.blocks[seq.block_table[i]]
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = self.chain_hash(prev, tokens)
            if block.hash is None and h not in self.cached:
                block.hash, block.tokens = h, tokens
                self.cached[h] = block.id
            prev = h
        seq.num_hashed_blocks, seq.last_block_hash = max(full, seq.num_hashed_blocks), prev

    def free_seq(self, seq: Sequence) -> None:
        """Return the sequence's blocks; the tail first, so shared prefixes stay cached longest."""
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[bid] = None
                if block.hash is None:  # nothing worth keeping: reuse it first
                    self.free.move_to_end(bid, last=False)
        seq.block_table = []
        seq.num_hashed_blocks, seq.last_block_hash = 0, None
