"""Speculative decoding: guess a few tokens cheaply, verify them in one pass of the model.

A decode step reads every weight once per step; verifying k guessed tokens of a sequence
in the same step reads them once too. Each step, for every running sequence that is caught
up (its last token not yet computed), a proposer guesses up to ``k`` next tokens; the
scheduler gives the sequence 1 + k slots; the model runner computes the last token and the
guesses through the decode path, every token its own row, exactly as each would be
computed alone in a later step (the kernels compute a row the same way whatever the
batch); :class:`Verifier` keeps the longest prefix the target model agrees with, plus one
token of its own. The engine then releases the blocks of rejected guesses
(``BlockManager.trim``). Guesses never enter ``token_ids`` or the prefix cache unverified.

Exactness: greedy, the output is token for token the plain output (the logits of each row
are the plain step's, bit for bit). Sampled, the standard rejection rule with a
deterministic guess x (the proposers below are greedy): accept x with probability p(x),
else draw from p with x removed, renormalized; all accepted, draw the bonus token from the
last row. The tokens' distribution is the target's, p being exactly the distribution the
plain sampler draws from (temperature, top-k, top-p, min-p).

Proposers (``method``):
  ``ngram``     prompt lookup: the last n tokens (n = prompt_lookup_max .. prompt_lookup_min)
                matched against the prompt and the text so far; the tokens that followed
                the latest earlier match are the guesses. No weights, no cost.
  ``draft``     a smaller model with the same vocabulary (``model=``), with its own paged
                KV cache, run greedily k steps ahead through its own model runner.
  ``self-int4`` the target's own weights re-quantized to int4 as the draft: no second
                checkpoint, a quarter of fp32's bytes per token.

Adaptive: per sequence, k follows acceptance (all of ``num_tokens`` after a fully
accepted step, the accepted count + 1 after a rejection), and a sequence whose guesses fail
twice in a row stops speculating for a while (8 steps, doubling up to 128 while it keeps
failing), so free text is not made slower by guesses that do not pay. Sequences with penalties (their logits depend on the tokens before each row),
``min_tokens`` still pending, or a structured-output constraint do not speculate.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from miaotui.config import MiaotuiError
from miaotui.engine.sequence import Sequence
from miaotui.layers.sampler import _filter, make_logprobs

METHODS = ("ngram", "draft", "self-int4")


@dataclass
class SpeculativeConfig:
    method: str = "ngram"
    num_tokens: int = 4                 # the most guesses a step verifies per sequence
    prompt_lookup_max: int = 4          # ngram: longest suffix matched
    prompt_lookup_min: int = 2          # ngram: shortest (a 1-token match guesses badly)
    model: str | None = None            # draft: the draft model (path, as LLM's model)
    quantization: str | None = None     # draft: as LLM's (None: as stored)
    adaptive: bool = True               # k follows acceptance; failing sequences pause

    @classmethod
    def parse(cls, spec) -> SpeculativeConfig | None:
        """From LLM(speculative=...): None, a method name, a dict, or a SpeculativeConfig."""
        if spec is None or isinstance(spec, cls):
            return spec
        if isinstance(spec, str):
            spec = {"method": spec}
        if not isinstance(spec, dict):
            raise MiaotuiError(f"speculative must be a method name or a dict, not {type(spec).__name__}")
        unknown = set(spec) - set(cls.__dataclass_fields__)
        if unknown:
            raise MiaotuiError(f"unknown speculative option(s): {', '.join(sorted(unknown))} "
                               f"(known: {', '.join(cls.__dataclass_fields__)})")
        cfg = cls(**spec)
        if cfg.method not in METHODS:
            raise MiaotuiError(f"unknown speculative method {cfg.method!r} (choose from {', '.join(METHODS)})")
        if not 1 <= cfg.num_tokens <= 16:
            raise MiaotuiError(f"speculative num_tokens must be in 1..16, not {cfg.num_tokens}")
        if not 1 <= cfg.prompt_lookup_min <= cfg.prompt_lookup_max:
            raise MiaotuiError("speculative needs 1 <= prompt_lookup_min <= prompt_lookup_max")
        if cfg.method == "draft" and not cfg.model:
            raise MiaotuiError('speculative method "draft" needs model= (a smaller model with the same vocabulary)')
        return cfg


def ngram_lookup(tokens: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    """The tokens that followed the latest earlier occurrence of the longest suffix
    (n_max .. n_min tokens) of ``tokens``, at most k of them."""
    L = len(tokens)
    if L < n_min + 1 or k < 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        # windows starting at 0..L-n-1 (the suffix itself excluded)
        hits = np.flatnonzero(arr[:L - n] == arr[L - n])
        for j in range(1, n):
            if not len(hits):
                break
            hits = hits[arr[hits + j] == arr[L - n + j]]
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start:start + k]
    return []


class Verifier:
    """Turns a sequence's verification rows into its new tokens (see the module doc)."""

    def __init__(self, eos_ids: set[int]):
        self.eos_ids = eos_ids

    def __call__(self, logits: torch.Tensor, seq: Sequence) -> list[int]:
        """logits [k + 1, V]: row i scores the token after the last token and guesses < i."""
        guesses, p = seq.spec_tokens, seq.params
        logits = logits.float()
        if p.greedy:
            # numpy's argmax, as the sampler's: the same first-max ties
            best = logits.numpy().argmax(-1).tolist()
            out = []
            for g, b in zip(guesses, best):
                out.append(b)
                if g != b:
                    break
            else:
                out.append(best[len(guesses)])
        else:
            out = []
            for i in range(len(guesses) + 1):
                probs = _filter(logits[i] / p.temperature, p.top_k, p.top_p, p.min_p).softmax(-1)
                if i < len(guesses):
                    g = guesses[i]
                    u = torch.rand((), generator=seq.generator)
                    if float(u) < float(probs[g]):
                        out.append(g)
                        continue
                    probs = probs.clone()
                    probs[g] = 0.0       # p - q with q the guess's point mass, renormalized below
                noise = torch.empty_like(probs).exponential_(generator=seq.generator)
                out.append(int((probs / noise).argmax()))
                break
        if p.logprobs is not None:
            lp = torch.log_softmax(logits[:len(out)], -1)
            seq.logprobs.extend(make_logprobs(lp[i], t, p.logprobs) for i, t in enumerate(out))
        seq.spec_steps += 1
        seq.spec_proposed += len(guesses)
        seq.spec_accepted += len(out) - 1
        return out


class NgramProposer:
    def __init__(self, cfg: SpeculativeConfig):
        self.cfg = cfg

    def propose(self, batch: list[tuple[Sequence, int]]) -> None:
        for seq, k in batch:
            seq.spec_tokens = ngram_lookup(seq.token_ids, k, self.cfg.prompt_lookup_max, self.cfg.prompt_lookup_min)

    def release(self, seq: Sequence) -> None:
        pass


class DraftProposer:
    """A draft model run greedily ahead of the target, in its own KV pool.

    Each target sequence has a shadow sequence on the draft side holding the verified
    tokens and the draft's guesses. Before proposing, the shadow is cut back to the verified
    tokens (its K/V up to the first rejected guess stay valid); the tokens it has not
    computed (the prompt the first time, then the accepted guess and the bonus token) go
    through the draft in one pass, which yields the first guess; each further guess is one
    more draft step, all shadows of the step batched together.
    """

    def __init__(self, model, model_cfg, num_blocks: int, block_size: int, eos_ids: set[int], kv_dtype):
        from miaotui.engine.block_manager import BlockManager
        from miaotui.engine.model_runner import ModelRunner
        from miaotui.sampling_params import SamplingParams
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=True)
        self.runner = ModelRunner(model, model_cfg, num_blocks, block_size, eos_ids, kv_dtype)
        self.params = SamplingParams(temperature=0.0, max_tokens=None)
        self.shadows: dict[int, Sequence] = {}

    def release(self, seq: Sequence) -> None:
        sh = self.shadows.pop(seq.seq_id, None)
        if sh is not None:
            self.bm.free_seq(sh)

    def _sync(self, seq: Sequence) -> Sequence | None:
        sh = self.shadows.get(seq.seq_id)
        if sh is None:
            sh = Sequence(seq.request_id, seq.index, seq.token_ids[:seq.num_prompt_tokens], self.params, 0)
            if not self.bm.can_allocate(sh):
                return None
            self.bm.allocate(sh)
            sh.synced = sh.num_prompt_tokens
            self.shadows[seq.seq_id] = sh
        # the common prefix of the shadow's tokens and the verified ones: the tokens synced
        # last time agree; past them, the draft's guesses up to the first rejected one
        common, end = sh.synced, min(len(sh), len(seq))
        while common < end and sh.token_ids[common] == seq.token_ids[common]:
            common += 1
        sh.token_ids = sh.token_ids[:common] + seq.token_ids[common:]
        sh.synced = len(seq)
        sh.num_computed_tokens = min(sh.num_computed_tokens, common, len(sh) - 1)
        self.bm.trim(sh)
        return sh

    def _todo(self, sh: Sequence) -> int:
        if sh.num_computed_tokens < sh.num_prompt_tokens:
            return sh.num_prompt_tokens - sh.num_computed_tokens
        return len(sh) - sh.num_computed_tokens

    @torch.inference_mode()
    def propose(self, batch: list[tuple[Sequence, int]]) -> None:
        active = []
        for seq, k in batch:
            sh = self._sync(seq)
            seq.spec_tokens = []
            if sh is not None:
                active.append((seq, sh, k))
        while active:
            step = []
            for seq, sh, k in active:
                n = self._todo(sh)
                sh.spec_k = 0
                if self.bm.can_append(sh):
                    self.bm.append_slots(sh)
                    step.append((sh, n))
            if not step:
                break
            tokens = self.runner.run(step)
            for sh, n in step:
                sh.num_computed_tokens += n
                self.bm.register_full_blocks(sh)   # a shared system prompt is drafted once
            nxt = []
            for seq, sh, k in active:
                new = tokens.get(sh.seq_id)
                if new is None:
                    if sh.num_computed_tokens < len(sh):   # the prompt part: go on
                        nxt.append((seq, sh, k))
                    continue
                sh.token_ids.append(new[0])
                seq.spec_tokens.append(new[0])
                if len(seq.spec_tokens) < k:
                    nxt.append((seq, sh, k))
            active = nxt


class Speculator:
    """The engine's side of speculation: who guesses how many, proposing, the statistics."""

    PAUSE_MIN, PAUSE_MAX = 8, 128

    def __init__(self, cfg: SpeculativeConfig, proposer, max_model_len: int):
        self.cfg, self.proposer = cfg, proposer
        self.max_model_len = max_model_len
        self.state: dict[int, list] = {}   # seq_id -> [k, pause_left, next_pause, fails]
        self.stats = {"steps": 0, "proposed": 0, "accepted": 0}
        self.propose_s = 0.0               # time spent guessing (the draft's passes), for profiles

    @staticmethod
    def eligible(seq: Sequence) -> bool:
        p = seq.params
        return (p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty
                and seq.num_output_tokens >= max(1, p.min_tokens) and seq.constraint is None
                and seq.num_computed_tokens == len(seq) - 1)

    def plan(self, running: list[Sequence]) -> None:
        """Before scheduling: how many guesses each running sequence may verify."""
        for seq in running:
            seq.spec_k, seq.spec_tokens = 0, []
            if not self.eligible(seq):
                continue
            st = self.state.setdefault(seq.seq_id, [self.cfg.num_tokens, 0, self.PAUSE_MIN, 0])
            if st[1] > 0:
                st[1] -= 1
                continue
            # never past max_tokens or the context: the last guess's bonus token must fit
            room = min(seq.max_new_tokens - seq.num_output_tokens, self.max_model_len - len(seq)) - 1
            seq.spec_k = max(0, min(st[0], room))
            if seq.spec_k and isinstance(self.proposer, NgramProposer):  # free: guess now, exactly
                self.proposer.propose([(seq, seq.spec_k)])
                seq.spec_k = len(seq.spec_tokens)

    def propose(self, batch: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]]:
        """After scheduling: the guesses of the sequences that got room for them; the batch
        with each such sequence's count set to 1 + its guesses."""
        want = []
        for s, n in batch:
            if s.spec_k and n > 1:
                want.append((s, n - 1))
            else:
                s.spec_k, s.spec_tokens = 0, []
        if not isinstance(self.proposer, NgramProposer):
            t0 = time.perf_counter()
            self.proposer.propose(want)
            self.propose_s += time.perf_counter() - t0
        for s, k in want:
            s.spec_tokens = s.spec_tokens[:k]
        return [(s, 1 + len(s.spec_tokens)) if s.spec_k else (s, n) for s, n in batch]

    def observe(self, seq: Sequence, proposed: int, accepted: int) -> None:
        """After verification: adapt the sequence's k, pause it if its guesses keep failing."""
        self.stats["steps"] += 1
        self.stats["proposed"] += proposed
        self.stats["accepted"] += accepted
        st = self.state.get(seq.seq_id)
        if st is None or not self.cfg.adaptive:
            return
        st[0] = self.cfg.num_tokens if accepted == proposed else max(1, accepted + 1)
        st[3] = st[3] + 1 if accepted == 0 else 0
        if st[3] >= 2:                       # two fruitless steps in a row: pause, longer each time
            st[1], st[2], st[3] = st[2], min(self.PAUSE_MAX, 2 * st[2]), 0
        elif accepted:
            st[2] = self.PAUSE_MIN

    def release(self, seq: Sequence) -> None:
        self.state.pop(seq.seq_id, None)
        self.proposer.release(seq)


def build(cfg: SpeculativeConfig, engine) -> Speculator:
    """The speculator for an engine: its proposer, with a draft model loaded if needed."""
    if cfg.method == "ngram":
        proposer = NgramProposer(cfg)
    else:
        from miaotui.loader import build_model, open_checkpoint
        path = engine.model_path if cfg.method == "self-int4" else cfg.model
        ckpt = open_checkpoint(path)
        quant = "int4" if cfg.method == "self-int4" else (None if cfg.quantization == "gguf" else cfg.quantization)
        dcfg = ckpt.config
        if dcfg.vocab_size != engine.model_config.vocab_size:
            raise MiaotuiError(f"the draft model's vocabulary ({dcfg.vocab_size} tokens) is not the "
                               f"target's ({engine.model_config.vocab_size}): they must share a tokenizer")
        if engine.config.progress:
            import sys
            print(f"[miaotui] loading the draft model ({cfg.method}: {path})", file=sys.stderr)
        model = build_model(ckpt, torch.float32, quant, engine.config.group_size, engine.config.progress)
        del ckpt
        proposer = DraftProposer(model, dcfg, engine.runner.num_blocks, engine.config.block_size,
                                 engine.eos_ids, engine.runner.kv_dtype)
    return Speculator(cfg, proposer, engine.max_model_len)


def request_metrics(seqs: list[Sequence]) -> dict:
    """Acceptance of a request's guesses, for RequestOutput.metrics."""
    steps = sum(s.spec_steps for s in seqs)
    proposed = sum(s.spec_proposed for s in seqs)
    accepted = sum(s.spec_accepted for s in seqs)
    return {"spec_steps": steps, "spec_proposed": proposed, "spec_accepted": accepted,
            "acceptance_rate": accepted / proposed if proposed else None,
            # guesses accepted per verification step (the step's own token not counted)
            "mean_accepted_length": accepted / steps if steps else None}
