"""An asyncio front for LLMEngine, for the HTTP server.

The engine is not thread-safe, so one background thread owns it: it runs ``step()`` while
there is work and sleeps on a condition otherwise. Coroutines never touch the engine;
they queue commands (add, abort) for that thread, and it hands each step's outputs back
to per-request asyncio queues with ``loop.call_soon_threadsafe``.
"""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import AsyncIterator, Callable

from miaotui.engine.llm_engine import LLMEngine, RequestOutput
from miaotui.sampling_params import SamplingParams


class RequestStream:
    """The outputs of one or more requests submitted together, in the order they arrive.

    Iterate it until every request has finished; call :meth:`abort` when giving up early
    (for example on client disconnect) so the engine frees their KV blocks at once.
    """

    def __init__(self, engine: "AsyncEngine", request_ids: list[str]):
        self._engine = engine
        self.request_ids = list(request_ids)
        self.unfinished = set(request_ids)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.loop = asyncio.get_running_loop()

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if not self.unfinished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.unfinished.clear()        # the engine thread already dropped these requests
            raise item
        if item.finished:
            self.unfinished.discard(item.request_id)
        return item

    @property
    def finished(self) -> bool:
        return not self.unfinished

    def abort(self) -> None:
        if self.unfinished:
            self._engine._submit(lambda ids=list(self.unfinished): self._engine._abort(ids))
            self.unfinished.clear()

    def _put(self, item) -> None:
        """Called from the engine thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:               # the event loop is gone; nobody is listening
            pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._cond = threading.Condition()
        self._commands: deque[Callable[[], None]] = deque()
        self._streams: dict[str, RequestStream] = {}   # owned by the engine thread
        self._queued_adds = 0                           # requests not yet seen by the thread
        self._stopped = False
        self.snapshot = self._snapshot()                # replaced after commands and steps
        self._thread = threading.Thread(target=self._loop, name="miaotui-engine", daemon=True)
        self._thread.start()

    # ---- the event-loop side ------------------------------------------------------------
    async def add_requests(self, requests: list[tuple[str, str | list[int], SamplingParams]]
                           ) -> RequestStream:
        """Submit (request_id, prompt, params) triples as one group and wait until the
        engine has accepted them all. If one is invalid, none is kept and its
        MiaotuiError is raised here."""
        stream = RequestStream(self, [rid for rid, _, _ in requests])
        accepted = stream.loop.create_future()

        def add():
            with self._cond:
                self._queued_adds -= len(requests)
            added = []
            try:
                for rid, prompt, params in requests:
                    self.engine.add_request(rid, prompt, params)
                    self._streams[rid] = stream
                    added.append(rid)
            except Exception as exc:
                self._abort(added)
                stream.loop.call_soon_threadsafe(_resolve, accepted, exc)
            else:
                stream.loop.call_soon_threadsafe(_resolve, accepted, None)

        self._submit(add, adds=len(requests))
        try:
            await accepted
        except asyncio.CancelledError:
            stream.abort()                 # queued after the add, so it runs after it
            raise
        return stream

    async def generate(self, request_id: str, prompt: str | list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs until it finishes; abort it if the caller stops early."""
        stream = await self.add_requests([(request_id, prompt, params)])
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    @property
    def num_waiting(self) -> int:
        """Sequences waiting for a slot, counting requests not yet handed to the engine."""
        return self.snapshot["waiting"] + self._queued_adds

    def shutdown(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def _submit(self, command: Callable[[], None], adds: int = 0) -> None:
        with self._cond:
            self._commands.append(command)
            self._queued_adds += adds
            self._cond.notify()

    # ---- the engine thread --------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._commands or self.engine.has_unfinished() or self._stopped):
                    self._cond.wait()
                if self._stopped:
                    break
                commands = list(self._commands)
                self._commands.clear()
            for command in commands:
                command()
            if commands:    # admissions and aborts show at once, not after a (long) step
                self.snapshot = self._snapshot()
            if self.engine.has_unfinished():
                self._step()
            self.snapshot = self._snapshot()
        self._fail_all(RuntimeError("the engine was shut down"))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:           # a batch failed: fail its requests, keep serving
            self._fail_all(exc)
            return
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            for o in out.outputs:          # the engine keeps appending to these lists
                if o.logprobs is not None:
                    o.logprobs = list(o.logprobs)
            if out.prompt_logprobs is not None:
                out.prompt_logprobs = list(out.prompt_logprobs)
            if out.finished:
                del self._streams[out.request_id]
            stream._put(out)

    def _abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.engine.abort(rid)
            self._streams.pop(rid, None)

    def _fail_all(self, exc: BaseException) -> None:
        streams = set(self._streams.values())
        self._abort(list(self._streams))
        for stream in streams:
            stream._put(exc)

    def _snapshot(self) -> dict:
        e = self.engine
        if hasattr(e, "snapshot"):     # a data-parallel front sums its replicas'
            return e.snapshot()
        bm = e.block_manager
        return {"running": len(e.scheduler.running), "waiting": len(e.scheduler.waiting),
                "kv_usage": e.kv_usage(), "prefix_queries": bm.prefix_queries,
                "prefix_hits": bm.prefix_hits, "prompt_tokens": e.stats["prompt_tokens"],
                "generation_tokens": e.stats["generated_tokens"],
                "preemptions": e.scheduler.num_preemptions,
                "spec": dict(e.speculator.stats) if e.speculator is not None else None}


def _resolve(future: asyncio.Future, exc: BaseException | None) -> None:
    if not future.done():
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)
