"""Running one model over several processes: rank 0 owns the engine (scheduler, block
manager, sampler); every other rank only runs the model on its shard and keeps its KV heads.

Start-up: ranks join a process group (``torchrun``'s environment, or workers that rank 0
spawns itself for ``--tensor-parallel-size N``); rank 0 broadcasts the EngineConfig, every
rank builds its shard (``tp.shard_model``), rank 0 broadcasts the KV pool size. Each step
rank 0 broadcasts the batch as plain tuples (what the model runner reads of each sequence:
the token window, positions, block table); every rank then runs the same
``ModelRunner.run`` so the collectives inside the model match up, and only rank 0 samples.
"""
from __future__ import annotations

import os
import socket
import sys
import time
import types
from datetime import timedelta

import torch
import torch.distributed as dist

from miaotui.config import MiaotuiError
from miaotui.distributed.tp import TPGroup, backend

STEP_TIMEOUT = timedelta(hours=24)   # collectives: a worker waits for the next step while idle


class WorkerDied(MiaotuiError):
    """A tensor-parallel process stopped; the engine cannot continue."""


# ---- the process group ------------------------------------------------------------------
def join(rank: int, size: int, addr: str, port: int, timeout: float) -> TPGroup:
    """Join (rank 0: host) the rendezvous at addr:port; a clear error after `timeout` s."""
    if dist.is_initialized():
        return TPGroup(dist.get_rank(), dist.get_world_size())
    try:
        # under torchrun's c10d rendezvous its agent already hosts the store at addr:port
        host = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        store = dist.TCPStore(addr, port, size, is_master=host, timeout=timedelta(seconds=timeout),
                              wait_for_workers=False)
        dist.init_process_group(backend(), store=store, rank=rank, world_size=size, timeout=STEP_TIMEOUT)
        dist.barrier()   # every rank is in (bounded by the store's timeout while connecting)
    except Exception as e:    # DistStoreError, DistNetworkError, RuntimeError
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise MiaotuiError(f"rank {rank} of {size}: no rendezvous with the other processes at "
                           f"{addr}:{port} within {timeout:g}s ({type(e).__name__}: {first})") from None
    return TPGroup(rank, size)


def env_world() -> tuple[int, int, str, int] | None:
    """(rank, world size, master address, port) under torchrun, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
            os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- what a worker sees of a sequence ----------------------------------------------------
class _Window:
    """token_ids[offset:offset+len(tokens)] of a sequence, indexed by absolute position."""

    def __init__(self, offset: int, tokens: list[int]):
        self.offset, self.tokens = offset, tokens

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.tokens[i.start - self.offset:i.stop - self.offset]
        return self.tokens[i - self.offset]


class WorkerSeq:
    """The fields of a Sequence that ModelRunner.run reads."""

    def __init__(self, seq_id, offset, tokens, length, computed, num_prompt, table, prompt_logprobs,
                 spec_tokens=()):
        self.seq_id, self.num_computed_tokens, self.num_prompt_tokens = seq_id, computed, num_prompt
        self.spec_tokens = list(spec_tokens)   # speculative decoding: this step's guesses
        self.token_ids, self.length, self.block_table = _Window(offset, tokens), length, table
        self.params = types.SimpleNamespace(prompt_logprobs=prompt_logprobs)
        self.prompt_logprobs: list = []   # computed for the collectives' sake, not kept

    def __len__(self) -> int:
        return self.length


def pack(batch) -> list[tuple]:
    """The step's batch as plain tuples for the workers."""
    out = []
    for s, n in batch:
        c = s.num_computed_tokens
        end = min(c + n + 1, len(s))
        out.append(((s.seq_id, c, s.token_ids[c:end], len(s), c, s.num_prompt_tokens, s.block_table,
                     s.params.prompt_logprobs, s.spec_tokens), n))
    return out


def _broadcast(obj=None):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _NoSampler:
    """Workers do not sample (nor verify guesses): rank 0 does, on the gathered logits."""

    def __call__(self, logits, seqs):
        return [0] * len(seqs)


def _no_verify(logits, seq):
    return [0]


# ---- rank 0 --------------------------------------------------------------------------------
class TPDriver:
    """Rank 0's side: starts the group, and in front of the model runner, hands each
    step's batch to the workers before running it."""

    def __init__(self, config):
        self.procs = []
        size = config.tensor_parallel_size
        world = env_world()
        if world is not None:                       # torchrun: the ranks are already started
            rank, wsize, addr, port = world
            if rank != 0:
                raise MiaotuiError("only rank 0 builds the engine; other ranks run miaotui.distributed.worker.serve")
            if size not in (1, wsize):
                raise MiaotuiError(f"--tensor-parallel-size {size} != torchrun's world size {wsize}")
            size = wsize
        else:
            addr, port = config.dist_addr or "127.0.0.1", config.dist_port or free_port()
            # fresh interpreters (not multiprocessing's spawn, which re-imports the caller's
            # main module, nor fork, unsafe once OpenMP threads exist)
            import subprocess
            for r in range(1, size):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "miaotui.distributed.worker", str(r), str(size), addr, str(port),
                     str(config.dist_timeout)], stdin=subprocess.DEVNULL))
        self.runner = None
        self.failed: str | None = None
        try:
            self.group = join(0, size, addr, port, config.dist_timeout)
        except MiaotuiError:
            self.failed = "no rendezvous"
            self.shutdown()
            raise
        self._collective(_broadcast, config)

    def send_pool(self, num_blocks: int, kv_dtype, dtype) -> None:
        self._collective(_broadcast, (num_blocks, kv_dtype, dtype))

    def start(self, runner) -> "TPDriver":
        self._collective(dist.barrier)              # every shard loaded
        self.runner = runner
        import atexit
        atexit.register(self.shutdown)
        return self

    def _check(self) -> None:
        if self.failed:
            raise WorkerDied(self.failed)
        for r, p in enumerate(self.procs, 1):
            if p.poll() is not None:
                self.failed = f"tensor-parallel worker (rank {r}, pid {p.pid}) exited with code {p.returncode}"
                raise WorkerDied(self.failed)

    def run(self, batch):
        return self._collective(lambda: (_broadcast(pack(batch)), self.runner.run(batch))[1])

    def _collective(self, fn, *args):
        """fn(*args); a failed collective (a worker died or failed) becomes WorkerDied."""
        self._check()
        try:
            return fn(*args)
        except (RuntimeError, dist.DistError) as e:
            time.sleep(0.2)                          # let a dead process's exit code show
            try:
                self._check()
            except WorkerDied:
                raise
            self.failed = f"tensor-parallel step failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            raise WorkerDied(self.failed) from None

    def __getattr__(self, name):                     # everything else is the runner's
        return getattr(self.runner, name)

    @property
    def verifier(self):                              # set by the engine when it speculates
        return self.runner.verifier

    @verifier.setter
    def verifier(self, v):
        self.runner.verifier = v

    def shutdown(self) -> None:
        """Tell the workers to stop (they exit when rank 0 goes away in any case)."""
        if self.runner is not None and not self.failed:
            try:
                _broadcast(None)
            except Exception:
                pass
        self.runner = None
        for p in self.procs:
            try:
                p.wait(timeout=0.1 if self.failed else 10)
            except Exception:
                p.kill()
                p.wait()
        try:
            dist.destroy_process_group()
        except Exception:
            pass


# ---- the other ranks -----------------------------------------------------------------------
def spawned_worker(argv: list[str]) -> int:
    """`python -m miaotui.distributed.worker RANK SIZE ADDR PORT TIMEOUT` (started by TPDriver)."""
    rank, size, addr, port, timeout = int(argv[0]), int(argv[1]), argv[2], int(argv[3]), float(argv[4])
    try:
        serve(join(rank, size, addr, port, timeout))
    except MiaotuiError as e:
        print(f"miaotui: error: {e}", file=sys.stderr)
        return 2
    return 0


def serve(group: TPGroup) -> None:
    """A worker rank: load this rank's shard as rank 0's config says, then run the model
    on every step rank 0 broadcasts until it says stop (None)."""
    from miaotui.engine.llm_engine import DTYPES
    from miaotui.engine.model_runner import ModelRunner
    from miaotui.loader import build_model, open_checkpoint
    config = _broadcast()
    torch.set_num_threads(config.num_threads or max(1, (os.cpu_count() or 1) // group.size))
    ckpt = open_checkpoint(config.model)
    quant = None if config.quantization == "gguf" else config.quantization
    model = build_model(ckpt, DTYPES[config.dtype], quant, config.group_size, tp=group)
    del ckpt
    num_blocks, kv_dtype, dtype = _broadcast()
    runner = ModelRunner(model, model.cfg, num_blocks, config.block_size, set(), kv_dtype, dtype=dtype)
    runner.sampler, runner.verifier = _NoSampler(), _no_verify
    dist.barrier()
    while True:
        try:
            msg = _broadcast()
        except (RuntimeError, dist.DistError):       # rank 0 went away
            break
        if msg is None:
            break
        runner.run([(WorkerSeq(*t), n) for t, n in msg])
    try:
        dist.destroy_process_group()
    except Exception:
        pass


def torchrun_worker_main(timeout: float) -> bool:
    """Under torchrun on a rank other than 0: be a worker, return True (the caller exits)."""
    world = env_world()
    if world is None or world[0] == 0:
        return False
    rank, size, addr, port = world
    serve(join(rank, size, addr, port, timeout))
    return True


if __name__ == "__main__":
    sys.exit(spawned_worker(sys.argv[1:]))
