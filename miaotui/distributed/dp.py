"""Data parallel: N engine replicas, each a process with its own model copy, KV pool and
threads, behind one engine-like front (``DPEngine``) that the OpenAI server drives like an
LLMEngine (``miaotui serve --data-parallel-size N``).

Routing: a request goes to the replica that already holds the longest run of its first
prompt blocks (the same chained block hashes as the prefix cache: a shared system prompt,
a chat's earlier turns) unless that replica has ``slack`` more requests in flight than
the least-loaded one; otherwise to the least-loaded. Each replica is an ordinary LLMEngine,
so a request's tokens are the same whichever replica computes it (batch invariance).

The front and each replica talk over a socket pair (pickled messages): the front sends
("add", id, prompt, params), ("abort", id), ("stop",); a replica answers each step with
("out", [RequestOutput], stats). A replica that dies (EOF) fails the front cleanly.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections import OrderedDict
from dataclasses import replace
from multiprocessing.connection import Connection, wait

from miaotui.config import MiaotuiError
from miaotui.distributed.worker import WorkerDied

MAX_PREFIX_BLOCKS = 32        # prompt blocks hashed for routing
MAX_ROUTES = 1 << 16          # remembered block hashes (oldest forgotten first)


class _Pool:
    """What LLMEngine.check_request reads of a block manager."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


class DPEngine:
    def __init__(self, config, size: int, slack: int = 4, timeout: float = 600.0):
        from miaotui.loader import load_tokenizer, open_checkpoint
        if size < 1:
            raise MiaotuiError("data parallel size must be at least 1")
        threads = config.num_threads or max(1, (os.cpu_count() or 1) // (size * config.tensor_parallel_size))
        self.config = replace(config, num_threads=threads, progress=False)
        self.size, self.slack = size, slack
        self.failed: str | None = None
        self.conns: list[Connection] = []
        self.procs: list[subprocess.Popen] = []
        for i in range(size):
            mine, theirs = socket.socketpair()
            self.procs.append(subprocess.Popen([sys.executable, "-m", "miaotui.distributed.dp", str(theirs.fileno())],
                                               pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL))
            theirs.close()
            self.conns.append(Connection(mine.detach()))
        ckpt = open_checkpoint(config.model)          # the tokenizer only: weights stay unread
        self.model_path, self.model_config = ckpt.path, ckpt.config
        self.tokenizer = load_tokenizer(ckpt, config.chat_template)
        del ckpt
        infos = []
        try:
            for c in self.conns:
                c.send(self.config)
            for i, c in enumerate(self.conns):
                if not c.poll(timeout):
                    raise MiaotuiError(f"data-parallel replica {i} did not start within {timeout:g}s")
                kind, info = c.recv()
                if kind == "error":
                    raise MiaotuiError(f"data-parallel replica {i}: {info}")
                infos.append(info)
        except (EOFError, OSError):
            self.close()
            raise WorkerDied("a data-parallel replica exited while loading") from None
        except MiaotuiError:
            self.close()
            raise
        self.max_model_len = infos[0]["max_model_len"]
        self.block_size = self.config.block_size
        self.block_manager = _Pool(min(i["num_blocks"] for i in infos), self.block_size)
        self.owner: dict[str, int] = {}             # request id -> replica
        self.load = [0] * size                      # requests in flight per replica
        self.routes: OrderedDict[int, int] = OrderedDict()   # block hash -> replica
        self.stats = [dict(i["stats"]) for i in infos]
        self.routed = [0] * size

    # ---- what the server and LLM-style loops call ------------------------------------------
    def check_request(self, prompt, params):
        from miaotui.engine.llm_engine import LLMEngine
        return LLMEngine.check_request(self, prompt, params)

    def add_request(self, request_id: str, prompt, params) -> None:
        self._raise_if_failed()
        if request_id in self.owner:
            raise MiaotuiError(f"request id {request_id!r} is already in use")
        _, ids, _ = self.check_request(prompt, params)
        i = self.route(ids)
        self._send(i, ("add", request_id, prompt, params))
        self.owner[request_id] = i
        self.load[i] += 1
        self.routed[i] += 1

    def abort(self, request_id: str) -> bool:
        i = self.owner.pop(request_id, None)
        if i is None:
            return False
        self.load[i] -= 1
        if not self.failed:
            self._send(i, ("abort", request_id))
        return True

    def has_unfinished(self) -> bool:
        return bool(self.owner)

    def step(self, timeout: float = 0.05) -> list:
        """The outputs the replicas sent since the last call (waiting up to `timeout` for one)."""
        self._raise_if_failed()
        outs = []
        for c in wait(self.conns, timeout):
            i = self.conns.index(c)
            while True:
                try:
                    kind, payload, stats = c.recv()
                except (EOFError, OSError):
                    self._fail(i)
                if kind == "error":
                    self.failed = f"data-parallel replica {i} failed: {payload}"
                    raise WorkerDied(self.failed)
                self.stats[i] = stats
                for out in payload:
                    if out.finished and self.owner.pop(out.request_id, None) is not None:
                        self.load[i] -= 1
                    outs.append(out)
                if not c.poll(0):
                    break
        return outs

    def route(self, ids: list[int]) -> int:
        """The replica for a prompt: prefix owner unless too busy, else the least loaded."""
        from miaotui.engine.block_manager import BlockManager
        hashes, h = [], None
        for b in range(min(len(ids) // self.block_size, MAX_PREFIX_BLOCKS)):
            h = BlockManager.chain_hash(h, tuple(ids[b * self.block_size:(b + 1) * self.block_size]))
            hashes.append(h)
        least = min(range(self.size), key=lambda i: (self.load[i], self.routed[i]))
        best = next((self.routes[h] for h in reversed(hashes) if h in self.routes), None)
        pick = best if best is not None and self.load[best] <= self.load[least] + self.slack else least
        for h in hashes:
            self.routes[h] = pick
            self.routes.move_to_end(h)
        while len(self.routes) > MAX_ROUTES:
            self.routes.popitem(last=False)
        return pick

    def failure(self) -> str | None:
        for i, p in enumerate(self.procs):
            if self.failed is None and p.poll() is not None:
                self.failed = f"data-parallel replica {i} (pid {p.pid}) exited with code {p.returncode}"
        return self.failed

    def snapshot(self) -> dict:
        """The AsyncEngine's gauges, summed over the replicas (kv_usage: their mean)."""
        total = {k: sum(s[k] for s in self.stats) for k in self.stats[0]}
        total["kv_usage"] /= self.size
        return total

    def kv_usage(self) -> float:
        return self.snapshot()["kv_usage"]

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(("stop",))
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for c in self.conns:
            c.close()

    # ---- internals --------------------------------------------------------------------------
    def _send(self, i: int, msg) -> None:
        try:
            self.conns[i].send(msg)
        except OSError:
            self._fail(i)

    def _fail(self, i: int):
        self.procs[i].poll()
        code = self.procs[i].returncode
        self.failed = f"data-parallel replica {i} (pid {self.procs[i].pid}) " + (
            f"exited with code {code}" if code is not None else "closed its connection")
        raise WorkerDied(self.failed)

    def _raise_if_failed(self) -> None:
        if self.failure():
            raise WorkerDied(self.failed)


def _stats(engine) -> dict:
    bm = engine.block_manager
    return {"running": len(engine.scheduler.running), "waiting": len(engine.scheduler.waiting),
            "kv_usage": engine.kv_usage(), "prefix_queries": bm.prefix_queries,
            "prefix_hits": bm.prefix_hits, "prompt_tokens": engine.stats["prompt_tokens"],
            "generation_tokens": engine.stats["generated_tokens"],
            "preemptions": engine.scheduler.num_preemptions}


def replica_main(fd: int) -> int:
    """A replica: an LLMEngine driven by the front's messages."""
    from miaotui.engine.llm_engine import LLMEngine
    conn = Connection(fd)
    config = conn.recv()
    try:
        engine = LLMEngine(config)
    except Exception as e:    # noqa: BLE001  (reported to the front, which raises it)
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return 2
    conn.send(("ready", {"max_model_len": engine.max_model_len, "num_blocks": engine.block_manager.num_blocks,
                         "stats": _stats(engine)}))
    try:
        while True:
            if not engine.has_unfinished():
                conn.poll(None)
            while conn.poll(0):
                msg = conn.recv()
                if msg[0] == "add":
                    engine.add_request(*msg[1:])
                elif msg[0] == "abort":
                    engine.abort(msg[1])
                else:
                    return 0
            if engine.has_unfinished():
                outs = engine.step()
                conn.send(("out", outs, _stats(engine)))
    except (EOFError, OSError):          # the front went away
        return 0
    except Exception as e:    # noqa: BLE001
        conn.send(("error", f"{type(e).__name__}: {e}", None))
        return 2
    finally:
        engine.close()


if __name__ == "__main__":
    sys.exit(replica_main(int(sys.argv[1])))
