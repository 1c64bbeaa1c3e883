"""The step loop: requests in, token deltas out.

``add_request`` validates and queues, ``step`` runs one scheduled batch through the model
and returns the progress of every request it touched, ``abort`` cancels. ``LLM`` and the
HTTP server are thin fronts over these four calls.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from miaotui.config import MiaotuiError
from miaotui.engine import speculative
from miaotui.engine.block_manager import BlockManager
from miaotui.engine.model_runner import ModelRunner
from miaotui.engine.scheduler import Scheduler
from miaotui.engine.sequence import Logprob, Sequence, Status
from miaotui.engine.speculative import SpeculativeConfig
from miaotui.sampling_params import SamplingParams

DTYPES = {"auto": torch.float32, "float32": torch.float32, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DEFAULT_MAX_MODEL_LEN = 4096   # as llama.cpp's default context; a 32k-context model would
DEFAULT_KV_FRACTION = 0.25     # otherwise reserve ~1 GB of KV per sequence
DEFAULT_KV_SEQS = 4            # full-length sequences the default pool holds (llama-server's slots)
KV_DTYPES = {"auto": None, "int8": torch.int8, "fp32": torch.float32, "float32": torch.float32,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@dataclass
class EngineConfig:
    model: str | None = None
    # weights' storage ("auto": as stored, fp32 or 16-bit); compute is fp32 on CPU. On CUDA
    # the compute dtype: "auto" = the checkpoint's 16-bit dtype, else bfloat16
    dtype: str = "auto"
    quantization: str | None = None      # None (as stored) | "none" | "int8" | "int4"
    group_size: int = 32
    kv_cache_dtype: str = "auto"         # "auto" (= model dtype) | "int8"
    # The KV pool. None: room for min(max_num_seqs, DEFAULT_KV_SEQS) sequences of
    # max_model_len tokens each, at most DEFAULT_KV_FRACTION of available memory (more
    # sequences share it; when it runs out the newest is preempted). Given: exactly this
    # many bytes, or this fraction (< 1) of available memory.
    kv_cache_memory: float | None = None
    # The whole process in this many bytes (int, or text: "1GiB", "800M"): the runtime
    # (measured), the weights and one step's workspace come first, the KV pool gets the rest
    # (at least one max_model_len sequence, else an error). Excludes kv_cache_memory.
    memory_budget: float | str | None = None
    block_size: int = 16
    max_num_seqs: int = 64               # sequences scheduled together; CLI generate/chat: 1
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None     # None: the model's, at most DEFAULT_MAX_MODEL_LEN
    enable_prefix_caching: bool = True
    # while streams decode, keep a step within ~this many decode-only steps by cutting long
    # prompts into smaller chunks (None: off, prompts take the whole token budget)
    max_decode_delay: float | None = None
    num_threads: int | None = None
    # prompt tokens through quantized weights with int8 activations (an int8 GEMM, as
    # llama.cpp does): faster prefill for a small perplexity cost; off: float32, exact
    prefill_int8: bool = False
    progress: bool = False
    chat_template: str | None = None     # Jinja file, built-in name or Jinja text; replaces the model's
    # speculative decoding: None, a method ("ngram", "draft", "self-int4") or a dict of
    # engine/speculative.py's SpeculativeConfig, e.g. {"method": "ngram", "num_tokens": 4}
    speculative: dict | str | None = None
    # tensor parallel (miaotui/distributed): ranks that split the model; under torchrun, its
    # world size. Spawned workers meet rank 0 at dist_addr:dist_port (default: a free local port)
    tensor_parallel_size: int = 1
    dist_addr: str | None = None
    dist_port: int | None = None
    dist_timeout: float = 60.0           # seconds to wait for every rank at start-up
    # the device (engine/gpu_runner.py): "auto" (cuda when torch.cuda.is_available()), "cpu",
    # "cuda" or "cuda:N"
    device: str = "auto"
    # CUDA: the share of the device's memory this engine may use; the KV pool gets what the
    # weights and a profiled step leave of it (as vLLM's), unless kv_cache_memory is given
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False          # CUDA: no CUDA graphs for decode steps
    load_format: str = "auto"            # "auto": the checkpoint's weights; "dummy": random ones
                                         # made on the device (config.json + tokenizer only)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[Logprob] | None = None
    delta_text: str = ""                 # new text since the previous RequestOutput
    delta_token_ids: list[int] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[Logprob | None] | None = None
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)


class _Request:
    def __init__(self, request_id, prompt, prompt_ids, params, seqs):
        self.request_id, self.prompt, self.prompt_ids, self.params = request_id, prompt, prompt_ids, params
        self.seqs: list[Sequence] = seqs
        self.sent: list[tuple[int, int]] = [(0, 0)] * len(seqs)   # (chars, tokens) already reported
        self.arrival = time.monotonic()
        self.first_token_time: float | None = None


def kv_pool_blocks(config: EngineConfig, max_model_len: int, per_token: int) -> int:
    """KV blocks to allocate: kv_cache_memory's worth when given, else enough for
    min(max_num_seqs, DEFAULT_KV_SEQS) sequences of max_model_len tokens (as llama.cpp sizes
    its context from n_ctx), at most DEFAULT_KV_FRACTION of available memory."""
    block_bytes = per_token * config.block_size
    budget = config.kv_cache_memory
    if budget is not None:
        if budget < 1:
            import psutil
            budget = budget * psutil.virtual_memory().available
        return int(budget // block_bytes)
    import psutil
    want = min(config.max_num_seqs, DEFAULT_KV_SEQS) * -(-max_model_len // config.block_size)
    cap = int(DEFAULT_KV_FRACTION * psutil.virtual_memory().available // block_bytes)
    return max(1, min(want, cap))


def resolve_device(config: EngineConfig) -> torch.device:
    """The engine's device from EngineConfig.device, after checking the GPU options (a
    MiaotuiError for a bad value, or for CUDA asked where there is none)."""
    name = config.device
    if not isinstance(name, str) or not (name in ("auto", "cpu", "cuda") or
                                         (name.startswith("cuda:") and name[5:].isdigit())):
        raise MiaotuiError(f"unknown device {name!r} (choose from auto, cpu, cuda, cuda:N)")
    u = config.gpu_memory_utilization
    if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
        raise MiaotuiError(f"gpu_memory_utilization must be in (0, 1], not {u!r}")
    if config.load_format not in ("auto", "dummy"):
        raise MiaotuiError(f"unknown load_format {config.load_format!r} (auto, dummy)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
            raise MiaotuiError(f"device {name!r} asked for, but no CUDA device is available ({build}); "
                               "use device='cpu' (or 'auto')")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise MiaotuiError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
        if config.tensor_parallel_size > 1:
            raise MiaotuiError("tensor parallel runs on CPU only; on CUDA use tensor_parallel_size=1")
        if config.memory_budget is not None:
            raise MiaotuiError("memory_budget sizes a CPU process; on CUDA use gpu_memory_utilization")
        spec = config.speculative
        method = spec.get("method") if isinstance(spec, dict) else spec
        if method in ("draft", "self-int4"):
            raise MiaotuiError(f"speculative method {method!r} runs on CPU only; on CUDA use 'ngram'")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


class LLMEngine:
    def __init__(self, config: EngineConfig):
        from miaotui.loader import build_model, load_tokenizer, open_checkpoint
        self.config = config
        self.device = resolve_device(config)
        from miaotui.engine import gpu_runner
        self.gpu_path = gpu_runner.wanted(self.device.type)
        if self.gpu_path and config.prefill_int8:
            raise MiaotuiError("prefill_int8 is a CPU option (the C++ int8 prompt GEMM); "
                               "the GPU path computes prompts in its compute dtype")
        self.tp = None
        if config.tensor_parallel_size > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            if config.prefill_int8:   # the workers' runners would compute prompts in float32
                raise MiaotuiError("prefill_int8 is not supported with tensor parallelism")
            from miaotui.distributed.worker import TPDriver
            self.tp = TPDriver(config)   # workers started, the group joined, the config sent
        ranks = self.tp.group.size if self.tp else 1
        torch.set_num_threads(config.num_threads or max(1, (os.cpu_count() or 1) // ranks))
        if config.dtype not in DTYPES:
            raise MiaotuiError(f"unknown dtype {config.dtype!r} (choose from {', '.join(DTYPES)})")
        if config.kv_cache_dtype not in KV_DTYPES:
            raise MiaotuiError(f"unknown kv_cache_dtype {config.kv_cache_dtype!r}")
        if config.quantization not in (None, "none", "int8", "int4", "gguf"):
            raise MiaotuiError(f"unknown quantization {config.quantization!r} (none, int8, int4)")
        ckpt = open_checkpoint(config.model, weights=config.load_format != "dummy")
        self.model_path = ckpt.path
        self.model_config = cfg = ckpt.config
        self.tokenizer = load_tokenizer(ckpt, config.chat_template)
        from miaotui.bench import memory   # the breakdown's runtime: torch, Python, tokenizer
        self.rss_before_weights = memory.current_rss()
        dtype = DTYPES[config.dtype]
        if config.dtype == "auto" and self.device.type == "cuda":
            stored = getattr(ckpt, "hf_config", {}).get("torch_dtype") or getattr(ckpt, "hf_config", {}).get("dtype")
            dtype = torch.float16 if stored == "float16" else torch.bfloat16
        quant = None if config.quantization == "gguf" else config.quantization
        if config.load_format == "dummy":
            from miaotui.loader.placement import random_model
            self.model = random_model(cfg, dtype, self.device, gpu_path=self.gpu_path)
        elif self.gpu_path:   # loaded as stored (a tied head stays tied), cast once by move_model
            self.model = build_model(ckpt, torch.float32, quant, config.group_size, config.progress,
                                     keep_16bit=True)
        else:
            self.model = build_model(ckpt, dtype, quant, config.group_size, config.progress,
                                     keep_16bit=config.dtype == "auto", tp=self.tp.group if self.tp else None)
        if self.gpu_path:
            from miaotui.loader.placement import move_model
            move_model(self.model, self.device, dtype)
        del ckpt   # unmap the checkpoint file before the KV pool is allocated: a lower peak
        self.max_model_len = min(config.max_model_len or DEFAULT_MAX_MODEL_LEN,
                                 cfg.max_position_embeddings)
        self.eos_ids = set(cfg.eos_token_ids) | set(self.tokenizer.eos_token_ids)
        kv_auto = dtype if dtype != torch.bfloat16 or self.gpu_path else torch.float32
        kv_dtype = KV_DTYPES[config.kv_cache_dtype] or kv_auto
        per_token = ModelRunner.kv_bytes_per_token(cfg, kv_dtype)
        if self.device.type == "cuda":
            num_blocks = self._cuda_blocks(per_token, dtype, kv_dtype)
        elif config.memory_budget is not None:
            num_blocks = self._budget_blocks(per_token)
        else:
            num_blocks = kv_pool_blocks(config, self.max_model_len, per_token)
        if num_blocks < 1:
            raise MiaotuiError(f"kv_cache_memory {config.kv_cache_memory} is too small for one block")
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_decode_delay)
        if self.tp:   # the workers build their runners alike
            self.tp.send_pool(num_blocks, kv_dtype, dtype)
        if self.gpu_path:
            self.runner = gpu_runner.GPURunner(
                self.model, cfg, num_blocks, config.block_size, self.eos_ids, kv_dtype, self.device, dtype,
                self.max_model_len, config.max_num_seqs, config.enforce_eager, config.progress)
        else:
            self.runner = ModelRunner(self.model, cfg, num_blocks, config.block_size, self.eos_ids, kv_dtype,
                                      dtype=dtype)
        self.runner.prefill_int8 = config.prefill_int8
        if self.tp:   # each step goes to the workers first
            self.runner = self.tp.start(self.runner)
        self.requests: dict[str, _Request] = {}
        self._grammars = None
        self.stats = {"prompt_tokens": 0, "computed_prefill_tokens": 0, "cached_prompt_tokens": 0,
                      "generated_tokens": 0, "steps": 0, "max_step_tokens": 0, "max_step_seqs": 0}
        self.speculator = None
        spec = SpeculativeConfig.parse(config.speculative)
        if spec is not None:
            self.speculator = speculative.build(spec, self)
            self.runner.verifier = speculative.Verifier(self.eos_ids)
            self.scheduler.on_finish = self.speculator.release

    def _cuda_blocks(self, per_token: int, dtype: torch.dtype, kv_dtype: torch.dtype) -> int:
        """KV blocks on a CUDA device: kv_cache_memory's worth when given (bytes, or a
        fraction < 1 of the device's free memory), else what gpu_memory_utilization leaves
        after the weights and a profiled step (gpu_runner.profile_kv_bytes)."""
        from miaotui.bench.memory import fmt_bytes
        from miaotui.engine.gpu_runner import profile_kv_bytes
        c = self.config
        if c.kv_cache_memory is not None:
            budget = c.kv_cache_memory
            if budget < 1:
                budget *= torch.cuda.mem_get_info(self.device)[0]
        else:
            step = min(c.max_num_batched_tokens, self.max_model_len)
            budget = profile_kv_bytes(self.model, self.model_config, dtype, kv_dtype, self.device,
                                      c.gpu_memory_utilization, step, c.max_num_seqs, not c.enforce_eager)
        need = self.max_model_len * per_token
        if budget < need:
            raise MiaotuiError(
                f"the KV cache gets {fmt_bytes(max(budget, 0))} of GPU memory but one {self.max_model_len}-token "
                f"sequence needs {fmt_bytes(need)}; raise gpu_memory_utilization "
                f"({c.gpu_memory_utilization}) or kv_cache_memory, or lower max_model_len")
        return int(budget // (per_token * c.block_size))

    def _budget_blocks(self, per_token: int) -> int:
        """KV blocks that memory_budget leaves after the runtime, the weights and a step."""
        from miaotui.bench import memory
        c = self.config
        if c.kv_cache_memory is not None:
            raise MiaotuiError("give memory_budget or kv_cache_memory, not both")
        budget = memory.parse_bytes(c.memory_budget)
        weights = sum(memory.model_bytes(self.model).values())
        step = min(c.max_num_batched_tokens, self.max_model_len)
        work = memory.workspace_bytes(self.model_config, step, min(c.max_num_seqs, step))
        left = memory.kv_budget(budget, self.rss_before_weights, weights, work)
        need = self.max_model_len * per_token
        if left < need:
            f = memory.fmt_bytes
            raise MiaotuiError(
                f"memory budget {f(budget)} is too small: runtime {f(self.rss_before_weights)} + weights "
                f"{f(weights)} + workspace {f(work)} leave {f(max(left, 0))} for the KV cache, but one "
                f"{self.max_model_len}-token sequence needs {f(need)}; raise the budget or lower max_model_len")
        return int(left // (per_token * c.block_size))

    # ---- requests -----------------------------------------------------------------------
    def check_request(self, prompt: str | list[int], params: SamplingParams
                      ) -> tuple[str | None, list[int], int]:
        """(text, token ids, tokens to generate at most) of a valid request, else MiaotuiError.
        Reads only tokenizer, model_config, max_model_len and block_manager (the data
        parallel front has them too)."""
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise MiaotuiError(f"prompt token id {bad[0]} is outside the vocabulary "
                                   f"(0..{self.model_config.vocab_size - 1})")
        if not ids:
            raise MiaotuiError("the prompt is empty")
        room = self.max_model_len - len(ids)
        if room < 0 or (room == 0 and params.max_tokens != 0):
            raise MiaotuiError(f"the prompt has {len(ids)} tokens, more than the context window "
                               f"allows ({self.max_model_len} tokens including the answer)")
        max_new = room if params.max_tokens is None else min(params.max_tokens, room)
        need = self.block_manager.blocks_needed(len(ids) + max_new)
        if need > self.block_manager.num_blocks:
            raise MiaotuiError(f"the request needs {need} KV-cache blocks but the pool holds "
                               f"{self.block_manager.num_blocks}; raise kv_cache_memory")
        return text, ids, max_new

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise MiaotuiError(f"request id {request_id!r} is already in use")
        text, ids, max_new = self.check_request(prompt, params)
        seqs = [Sequence(request_id, i, ids, params, max_new) for i in range(params.n)]
        from miaotui.loader.tokenizer import IncrementalDetokenizer
        for s in seqs:
            s.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
            if params.structured_output is not None:
                s.constraint = self.grammars.constraint(params.structured_output)
        req = _Request(request_id, text, ids, params, seqs)
        self.requests[request_id] = req
        self.stats["prompt_tokens"] += len(ids)
        if max_new == 0:   # scoring only: compute the prompt, sample nothing
            for s in seqs[1:]:
                s.status = Status.FINISHED
                s.finish_reason = "length"
            seqs[0].max_new_tokens = 0
            self.scheduler.add(seqs[0])
            return
        for s in seqs:
            self.scheduler.add(s)

    @property
    def grammars(self):
        """The structured-output grammar compiler for this model's tokenizer (llguidance)."""
        from miaotui.engine.structured import GrammarCompiler
        with GrammarCompiler.creation_lock:   # the server's worker threads may ask first
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_ids)
        return self._grammars

    def abort(self, request_id: str) -> bool:
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for s in req.seqs:
            if not s.finished:
                s.finish_reason = "abort"
                self.scheduler.finish(s)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- the step -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        spec = self.speculator
        if spec is not None:
            spec.plan(self.scheduler.running)
        batch = self.scheduler.schedule()
        if not batch:
            return []
        t0 = time.monotonic()
        if spec is not None:
            batch = spec.propose(batch)
        tokens = self.runner.run(batch)
        self.stats["steps"] += 1
        st = self.stats   # the largest step so far: what the workspace has held (bench/memory.py)
        st["max_step_tokens"] = max(st["max_step_tokens"], sum(n for _, n in batch))
        st["max_step_seqs"] = max(st["max_step_seqs"], len(batch))
        touched: dict[str, _Request] = {}
        done = []   # (sequence, tokens it computed) for the scheduler's step-time model
        now = time.monotonic()
        for seq, n in batch:
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.stats["computed_prefill_tokens"] += n
            new = tokens.get(seq.seq_id)
            guessed = len(seq.spec_tokens)
            if guessed:  # verified: the last token and the accepted guesses are computed
                n = len(new)
                spec.observe(seq, guessed, n - 1)
                seq.spec_k, seq.spec_tokens = 0, []
            seq.num_computed_tokens += n
            done.append((seq, n))
            self.block_manager.register_full_blocks(seq)
            req = self.requests[seq.request_id]
            touched[req.request_id] = req
            if new is None:
                continue
            if seq.max_new_tokens == 0:
                seq.finish_reason = "length"
                self.scheduler.finish(seq)
                continue
            for t in new:
                self._append_token(seq, t, now)
                if seq.finished:
                    del seq.logprobs[seq.num_output_tokens:]   # past a stop: not output
                    break
            if guessed and not seq.finished:
                self.block_manager.trim(seq)   # the rejected guesses' blocks
            if req.first_token_time is None:
                req.first_token_time = now
        self.scheduler.observe(done, now - t0)
        return [self._output(req) for req in touched.values()]

    def _append_token(self, seq: Sequence, token: int, now: float) -> None:
        p = seq.params
        seq.token_ids.append(token)
        self.stats["generated_tokens"] += 1
        seq.text += seq.detokenizer.add([token])
        # structured output: the grammar is complete (or, never with the mask, broken)
        grammar_done = seq.constraint is not None and seq.constraint.advance(token)
        if token in p.stop_token_ids:  # (the sampler masks them before min_tokens)
            seq.finish_reason, seq.stop_reason = "stop", token
        elif token in self.eos_ids and not p.ignore_eos:
            seq.finish_reason = "stop"
        elif p.stop_list and self._check_stop_strings(seq):
            seq.finish_reason = "stop"
        elif grammar_done:
            seq.finish_reason = "stop"
        elif seq.num_output_tokens >= seq.max_new_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)

    @staticmethod
    def _check_stop_strings(seq: Sequence) -> bool:
        p = seq.params
        for stop in p.stop_list:
            idx = seq.text.find(stop)
            if idx != -1:
                seq.text = seq.text[:idx + len(stop)] if p.include_stop_str_in_output else seq.text[:idx]
                seq.stop_reason = stop
                return True
        return False

    def _visible_text(self, seq: Sequence) -> str:
        """Text safe to stream: while running, hold back a tail that may start a stop string."""
        if seq.finished or not seq.params.stop_list:
            return seq.text
        hold = max(len(s) for s in seq.params.stop_list) - 1
        return seq.text[:len(seq.text) - hold] if hold else seq.text

    def _output(self, req: _Request) -> RequestOutput:
        outs = []
        for i, s in enumerate(req.seqs):
            text = self._visible_text(s)
            sent_chars, sent_toks = req.sent[i]
            out_ids = s.output_ids
            outs.append(CompletionOutput(
                index=s.index, text=text, token_ids=out_ids, finish_reason=s.finish_reason,
                stop_reason=s.stop_reason, logprobs=s.logprobs if s.params.logprobs is not None else None,
                delta_text=text[sent_chars:], delta_token_ids=out_ids[sent_toks:]))
            req.sent[i] = (len(text), len(out_ids))
        finished = all(s.finished for s in req.seqs)
        if finished:
            self.requests.pop(req.request_id, None)
        first = req.seqs[0]
        metrics = {"arrival": req.arrival, "first_token": req.first_token_time,
                   "now": time.monotonic()}
        if self.speculator is not None:
            metrics.update(speculative.request_metrics(req.seqs))
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, finished,
                             first.prompt_logprobs if req.params.prompt_logprobs is not None else None,
                             first.num_cached_tokens, metrics)

    # ---- convenience --------------------------------------------------------------------
    def failure(self) -> str | None:
        """Why the engine cannot run any more (a tensor-parallel worker died), else None."""
        return self.tp.failed if self.tp else None

    def close(self) -> None:
        """Stop tensor-parallel workers (also done at exit)."""
        if self.tp:
            self.tp.shutdown()

    def kv_usage(self) -> float:
        return self.block_manager.usage()

    def pool_is_full(self) -> bool:
        """True when every block is free again (no leak)."""
        return self.block_manager.num_free_blocks == self.block_manager.num_blocks
