"""A Sequence is one stream of tokens being generated; a request with n > 1 has n of them."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum, auto

import torch

from miaotui.sampling_params import SamplingParams


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass
class Logprob:
    token_id: int
    logprob: float
    rank: int                                   # 1 = the most likely token
    top: dict[int, float] = field(default_factory=dict)


_ids = itertools.count()


class Sequence:
    def __init__(self, request_id: str, index: int, prompt_ids: list[int],
                 params: SamplingParams, max_new_tokens: int):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index
        self.params = params
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.max_new_tokens = max_new_tokens
        self.num_computed_tokens = 0             # tokens whose K/V are in the cache
        self.num_cached_tokens = 0               # of those, how many came from the prefix cache
        self.num_hashed_blocks = 0               # full blocks registered in the prefix cache
        self.last_block_hash: int | None = None  # the chained hash of the last of those
        self.block_table: list[int] = []
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[Logprob] = []
        self.prompt_logprobs: list[Logprob | None] = []
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator()
            self.generator.manual_seed(params.seed + index if params.seed is not None
                                       else torch.seed())
        self.constraint = None                   # structured output: its grammar matcher (engine/structured.py)
        self.detokenizer = None                  # set by the engine
        # speculative decoding (engine/speculative.py): guessed tokens this step may verify
        self.spec_k = 0                          # at most this many, set before scheduling
        self.spec_tokens: list[int] = []         # the guesses, never in token_ids until verified
        self.spec_proposed = self.spec_accepted = self.spec_steps = 0
        self.text = ""                           # generated text after stop-string handling

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_to_compute(self) -> int:
        """Tokens the next step may compute: the rest of the prompt (in chunks, through the
        prefill path), else one generated token (through the decode path; after preemption
        the generated tokens are replayed one a step, so their K/V are the decode path's);
        a caught-up sequence that speculates adds up to ``spec_k`` guesses, verified in the
        same decode-path pass (each token its own row, computed as it would be alone)."""
        if self.num_computed_tokens < self.num_prompt_tokens:
            return self.num_prompt_tokens - self.num_computed_tokens
        left = len(self.token_ids) - self.num_computed_tokens
        return 1 + self.spec_k if left == 1 else min(1, left)   # + guesses to verify

    @property
    def num_slots(self) -> int:
        """Tokens this sequence needs KV slots for: its own, plus the guesses of this step."""
        return len(self.token_ids) + self.spec_k

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED
