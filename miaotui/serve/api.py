"""The OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models,
/health and /metrics; and a web chat page at / (static files in serve/static).

Every request is checked in the same order (Host and Origin, API key, Content-Type, JSON,
valid Unicode, unsupported fields, schema, model name, sampling parameters, prompt bytes,
context window, queue room) and any failure becomes an OpenAI-style error body with a 4xx
status (503 when the waiting queue is full). Prompts are tokenized in a worker thread, so
a long one does not hold up other requests. Accepted requests go to the
:class:`AsyncEngine`; a client that disconnects has its requests aborted at once.

With no API key, a web page could still reach a local server; three checks stop that:
POSTs must be application/json (which a page cannot send cross-site without a CORS
preflight), cross-origin requests are refused unless their origin is allowed, and when the
server is bound to loopback the Host header must name loopback (DNS rebinding).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import os
import urllib.parse
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import (FileResponse, JSONResponse, PlainTextResponse, Response,
                               StreamingResponse)
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from miaotui.config import MiaotuiError
from miaotui.engine.async_engine import AsyncEngine, RequestStream
from miaotui.engine.llm_engine import CompletionOutput, LLMEngine, RequestOutput
from miaotui.engine.sequence import Logprob
from miaotui.sampling_params import InvalidParams, SamplingParams, StructuredOutputParams
from miaotui.serve import protocol as P
from miaotui.serve import tools as T
from miaotui.serve.cli import is_loopback
from miaotui.serve.metrics import Metrics, RequestTimer

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/")


class APIError(Exception):
    """Becomes {"error": {...}} with the given status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.body = P.ErrorResponse(error=P.ErrorInfo(message=message, type=type, param=param, code=code))


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body.model_dump(), status_code=err.status, headers=err.headers)


@dataclass
class _Job:
    """One HTTP generation request: its prompts, the options that shape the answer, and
    the engine requests (one per prompt) it became."""
    id: str
    prompts: list[tuple[str, list[int]]]         # (text, token ids) per prompt
    n: int
    logprobs: int | None = None
    echo: bool = False
    include_usage: bool = False
    tool_format: T.ToolFormat | None = None          # chat with tools: parse calls in this format
    stream: RequestStream | None = None
    timer: RequestTimer | None = None
    created: int = field(default_factory=P.now)      # the same in every chunk of a stream
    finals: dict[str, RequestOutput] = field(default_factory=dict)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)   # log-prob text offsets

    def request_id(self, prompt_index: int) -> str:
        return f"{self.id}-{prompt_index}"

    def prompt_index(self, request_id: str) -> int:
        return int(request_id.rsplit("-", 1)[1])

    def usage(self) -> P.Usage:
        prompt = sum(len(ids) for _, ids in self.prompts)
        completion = sum(len(o.token_ids) for out in self.finals.values() for o in out.outputs)
        return P.Usage(prompt_tokens=prompt, completion_tokens=completion,
                       total_tokens=prompt + completion)


class _Server:
    def __init__(self, engine: AsyncEngine, model_name: str, api_key: str | None,
                 max_waiting: int):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.api_key = api_key
        self.max_waiting = max_waiting
        self.max_model_len = engine.engine.max_model_len
        # No token stands for more bytes than this, so a longer text cannot fit the context.
        self.max_prompt_bytes = self.max_model_len * self.tokenizer.max_token_bytes
        self.metrics = Metrics(engine)
        self._token_texts: dict[int, str] = {}

    # ---- checks -------------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 self.api_key.encode()):
            raise APIError(401, "missing or incorrect API key (send 'Authorization: Bearer KEY')",
                           "authentication_error", code="invalid_api_key")

    async def parse(self, request: Request, schema: type[BaseModel]):
        self.check_auth(request)
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            raise APIError(415, "the request body must be JSON, sent with "
                           "'Content-Type: application/json'", code="unsupported_media_type")
        try:
            body = json.loads(await request.body(), parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:   # includes JSON and UTF-8 decode errors
            raise APIError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        _check_unicode(body)
        unsupported = P.unsupported_field(body)
        if unsupported:
            raise APIError(400, f"{unsupported} is not supported by this server", param=unsupported)
        try:
            req = schema.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise APIError(400, f"{where}: {first['msg']}", param=str(first["loc"][0])) from None
        if req.model is not None and req.model != self.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                           f"{self.model_name!r}", param="model", code="model_not_found")
        return req

    def sampling_params(self, req: P.SamplingRequest, max_tokens: int | None,
                        logprobs: int | None = None, prompt_logprobs: int | None = None,
                        structured_output: StructuredOutputParams | None = None) -> SamplingParams:
        def pick(value, default):
            return default if value is None else value
        try:
            return SamplingParams(
                n=req.n, max_tokens=max_tokens, temperature=pick(req.temperature, 1.0),
                top_p=pick(req.top_p, 1.0), top_k=pick(req.top_k, 0), min_p=pick(req.min_p, 0.0),
                seed=req.seed, stop=req.stop, presence_penalty=pick(req.presence_penalty, 0.0),
                frequency_penalty=pick(req.frequency_penalty, 0.0),
                repetition_penalty=pick(req.repetition_penalty, 1.0), ignore_eos=req.ignore_eos,
                min_tokens=req.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                structured_output=structured_output)
        except InvalidParams as exc:
            raise APIError(400, str(exc), param=exc.param) from None

    # ---- structured output --------------------------------------------------------------
    GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
              "guided_grammar": "grammar"}

    def structured_output(self, req: P.SamplingRequest) -> tuple[StructuredOutputParams | None, str | None]:
        """The request's output constraint (response_format or one guided_* field) and the
        field that asked for it."""
        fmt = req.response_format
        given = (["response_format"] if fmt is not None and fmt.type != "text" else []) + \
            [name for name in self.GUIDED if getattr(req, name) is not None]
        if not given:
            return None, None
        if len(given) > 1:
            raise APIError(400, f"{given[0]} and {given[1]} cannot be combined", param=given[1])
        name = given[0]
        try:
            if name != "response_format":
                return StructuredOutputParams(**{self.GUIDED[name]: getattr(req, name)}), name
            if fmt.type == "json_object":
                return StructuredOutputParams(json_object=True), name
            if fmt.json_schema is None:
                raise APIError(400, "response_format: type json_schema needs a json_schema",
                               param="response_format")
            schema = fmt.json_schema.schema_
            return StructuredOutputParams(json=schema if schema is not None else {"type": "object"}), name
        except InvalidParams as exc:
            raise APIError(400, f"{name}: {_reason(exc)}", param=name) from None

    async def compile_grammar(self, spec: StructuredOutputParams, param: str) -> None:
        """Compile (or find cached) the grammar off the event loop; a bad one is a 400."""
        try:
            await asyncio.to_thread(self.engine.engine.grammars.compile, spec)
        except InvalidParams as exc:
            raise APIError(400, f"{param}: {_reason(exc)}", param=param) from None

    async def encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, tokenized off the event loop; a text too long to fit the
        context window in any tokenization is refused without tokenizing it."""
        size = len(text.encode())
        if size > self.max_prompt_bytes:
            raise APIError(400, f"the prompt is {size} bytes, more than this model's context "
                           f"window of {self.max_model_len} tokens can hold", param=param,
                           code="context_length_exceeded")
        return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens)

    def check_length(self, ids: list[int], max_tokens: int | None, param: str) -> None:
        need = len(ids) + (1 if max_tokens is None else max_tokens)
        if need > self.max_model_len:
            asked = "at least 1" if max_tokens is None else str(max_tokens)
            raise APIError(400, f"this model's context window is {self.max_model_len} tokens, but "
                           f"{len(ids)} prompt tokens + {asked} completion tokens were requested",
                           param=param, code="context_length_exceeded")

    async def submit(self, job: _Job, params: SamplingParams) -> None:
        failure = self.engine.engine.failure()
        if failure:
            raise APIError(503, f"the engine has failed: {failure}", "server_error", code="engine_failed")
        if self.engine.num_waiting >= self.max_waiting:
            raise APIError(503, "the server is busy, retry shortly", "server_overloaded",
                           code="queue_full", headers={"Retry-After": "1"})
        job.timer = RequestTimer(self.metrics)
        requests = [(job.request_id(i), ids, params) for i, (_, ids) in enumerate(job.prompts)]
        try:
            job.stream = await self.engine.add_requests(requests)
        except MiaotuiError as exc:
            raise APIError(400, str(exc)) from None

    def head(self, job: _Job) -> dict:
        """The fields every response and chunk of `job` shares."""
        return {"id": job.id, "created": job.created, "model": self.model_name}

    # ---- token text and log-probs -------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def legacy_logprobs(self, token_ids: list[int], entries: list[Logprob | None],
                        offset: int) -> P.CompletionLogprobs:
        """Completions format; `offset` is where the first token starts in prompt + text."""
        out = P.CompletionLogprobs()
        for token_id, entry in zip(token_ids, entries):
            text = self.token_text(token_id)
            out.tokens.append(text)
            out.text_offset.append(offset)
            offset += len(text)
            if entry is None:             # the first prompt token has no context
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            top = {self.token_text(t): lp for t, lp in entry.top.items()}
            top.setdefault(text, entry.logprob)
            out.token_logprobs.append(entry.logprob)
            out.top_logprobs.append(top)
        return out

    def chat_logprobs(self, entries: list[Logprob]) -> P.ChatLogprobs:
        def item(token_id: int, logprob: float) -> dict:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
        return P.ChatLogprobs(content=[
            P.TokenLogprob(**item(e.token_id, e.logprob),
                           top_logprobs=[P.TopLogprob(**item(t, lp)) for t, lp in e.top.items()])
            for e in entries])

    # ---- running a job ------------------------------------------------------------------
    async def outputs(self, job: _Job) -> AsyncIterator[RequestOutput]:
        """The job's outputs as they come; aborts the job if the consumer stops early."""
        try:
            async for out in job.stream:
                job.timer.on_output(out)
                if out.finished:
                    job.finals[out.request_id] = out
                yield out
            job.timer.done([o.finish_reason for out in job.finals.values() for o in out.outputs])
        finally:
            if not job.stream.finished:
                job.stream.abort()
                job.timer.aborted()

    async def collect(self, request: Request, job: _Job) -> None:
        """Run the job to the end, unless the client disconnects first."""
        async def drain():
            async for _ in self.outputs(job):
                pass
        task = asyncio.ensure_future(drain())
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if not task.done() or task.cancelled():
            raise APIError(499, "the client disconnected", code="client_closed_request")
        try:
            task.result()
        except MiaotuiError as exc:
            raise APIError(400, str(exc)) from None

    def sse(self, events: AsyncIterator[BaseModel]) -> StreamingResponse:
        async def body():
            try:
                async for event in events:
                    yield f"data: {event.model_dump_json()}\n\n"
            except Exception as exc:      # the engine failed after the response started
                err = APIError(500, f"generation failed: {exc}", "server_error")
                yield f"data: {err.body.model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- /v1/completions ----------------------------------------------------------------
    async def completion_prompts(self, prompt) -> list[tuple[str, list[int]]]:
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        prompts = []
        for p in prompt:
            if isinstance(p, str):
                prompts.append((p, await self.encode(p, "prompt")))
            else:
                bad = [t for t in p if not 0 <= t < self.engine.engine.model_config.vocab_size]
                if bad:
                    raise APIError(400, f"token id {bad[0]} is outside the vocabulary", param="prompt")
                prompts.append((self.tokenizer.decode(p), p))
            if not prompts[-1][1]:
                raise APIError(400, "prompt must not be empty", param="prompt")
        return prompts

    async def completions(self, request: Request) -> Response:
        req: P.CompletionRequest = await self.parse(request, P.CompletionRequest)
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of must equal n", param="best_of")
        prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
        spec, spec_field = self.structured_output(req)
        params = self.sampling_params(req, req.max_tokens, req.logprobs, prompt_logprobs, spec)
        if spec is not None:
            await self.compile_grammar(spec, spec_field)
        job = _Job(P.random_id("cmpl"), await self.completion_prompts(req.prompt), req.n,
                   req.logprobs, req.echo,
                   bool(req.stream_options and req.stream_options.include_usage))
        for _, ids in job.prompts:
            self.check_length(ids, req.max_tokens, "max_tokens")
        await self.submit(job, params)
        if req.stream:
            return self.sse(self.completion_chunks(job))
        await self.collect(request, job)
        choices = []
        for rid, out in sorted(job.finals.items(), key=lambda kv: job.prompt_index(kv[0])):
            for o in out.outputs:
                choices.append(self.completion_choice(job, out, o, o.text, o.token_ids, o.logprobs,
                                                      True, o.finish_reason))
        return JSONResponse(P.CompletionResponse(**self.head(job), choices=choices,
                                                 usage=job.usage()).model_dump())

    def completion_choice(self, job: _Job, out: RequestOutput, o: CompletionOutput, text: str,
                          token_ids: list[int], entries: list[Logprob] | None, with_echo: bool,
                          finish_reason: str | None) -> P.CompletionChoice:
        """A choice carrying `text` (the new tokens `token_ids`), echoed prompt first if asked."""
        i = job.prompt_index(out.request_id)
        prompt_text, prompt_ids = job.prompts[i]
        logprobs = None
        if job.logprobs is not None:
            key = (out.request_id, o.index)
            start = job.offsets.get(key, len(prompt_text))     # text offsets run over prompt + text
            logprobs = self.legacy_logprobs(token_ids, entries or [], start)
            job.offsets[key] = start + sum(len(t) for t in logprobs.tokens)
            if with_echo and job.echo:
                head = self.legacy_logprobs(prompt_ids, out.prompt_logprobs or [], 0)
                for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    setattr(logprobs, name, getattr(head, name) + getattr(logprobs, name))
        if with_echo and job.echo:
            text = prompt_text + text
        return P.CompletionChoice(index=i * job.n + o.index, text=text, logprobs=logprobs,
                                  finish_reason=finish_reason)

    async def completion_chunks(self, job: _Job) -> AsyncIterator[P.CompletionResponse]:
        echoed: set[tuple[str, int]] = set()
        async for out in self.outputs(job):
            choices = []
            for o in out.outputs:
                new_ids = o.delta_token_ids
                entries = o.logprobs[len(o.token_ids) - len(new_ids):] if o.logprobs else None
                echo = job.echo and (o.token_ids or out.finished) and (out.request_id, o.index) not in echoed
                if echo:
                    echoed.add((out.request_id, o.index))
                if o.delta_text or o.finish_reason or echo or (job.logprobs is not None and new_ids):
                    choices.append(self.completion_choice(job, out, o, o.delta_text, new_ids, entries,
                                                          echo, o.finish_reason))
            if choices:
                yield P.CompletionResponse(**self.head(job), choices=choices)
        if job.include_usage:
            yield P.CompletionResponse(**self.head(job), choices=[], usage=job.usage())

    # ---- /v1/chat/completions -----------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        req: P.ChatCompletionRequest = await self.parse(request, P.ChatCompletionRequest)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        tools, tool_format, spec, spec_field = self.chat_tools(req)
        try:
            text = T.render(self.tokenizer, T.conversation(req.messages), tools)
        except MiaotuiError as exc:
            raise APIError(400, str(exc), param="messages") from None
        ids = await self.encode(text, "messages", add_special_tokens=False)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        try:
            params = self.sampling_params(req, max_tokens, logprobs, structured_output=spec)
        except APIError as err:
            if err.body.error.param == "logprobs":
                err.body.error.param = "top_logprobs"
            raise
        if spec is not None:
            await self.compile_grammar(spec, spec_field)
        job = _Job(P.random_id("chatcmpl"), [(text, ids)], req.n, logprobs,
                   include_usage=bool(req.stream_options and req.stream_options.include_usage),
                   tool_format=tool_format)
        self.check_length(ids, max_tokens, "max_completion_tokens"
                          if req.max_completion_tokens is not None else "max_tokens")
        await self.submit(job, params)
        if req.stream:
            return self.sse(self.chat_chunks(job))
        await self.collect(request, job)
        out = job.finals[job.request_id(0)]
        choices = []
        for o in out.outputs:
            content, calls = o.text, []
            if job.tool_format is not None:
                content, calls = T.parse_tool_calls(job.tool_format, o.text)
            message = P.ChatResponseMessage(content=content, tool_calls=[_tool_call(c) for c in calls] or None)
            choices.append(P.ChatChoice(
                index=o.index, message=message,
                logprobs=self.chat_logprobs(o.logprobs) if logprobs is not None else None,
                finish_reason="tool_calls" if calls and o.finish_reason == "stop" else o.finish_reason))
        return JSONResponse(P.ChatCompletionResponse(**self.head(job),
                                                     choices=choices, usage=job.usage()).model_dump())

    async def chat_chunks(self, job: _Job) -> AsyncIterator[P.ChatCompletionChunk]:
        def chunk(choices):
            return P.ChatCompletionChunk(**self.head(job), choices=choices)
        yield chunk([P.ChatChunkChoice(index=i, delta=P.ChatDelta(role="assistant", content=""))
                     for i in range(job.n)])
        calls = {i: _StreamedCalls(job.tool_format) for i in range(job.n)} if job.tool_format else {}
        async for out in self.outputs(job):
            choices = []
            for o in out.outputs:
                new_ids = o.delta_token_ids
                logprobs = None
                if job.logprobs is not None and new_ids:
                    logprobs = self.chat_logprobs(o.logprobs[len(o.token_ids) - len(new_ids):])
                text, tool_calls, finish = o.delta_text, None, o.finish_reason
                if calls:
                    text, tool_calls, finish = calls[o.index].feed(o.delta_text, o.finish_reason)
                if text or logprobs or finish or tool_calls:
                    delta = P.ChatDelta(content=text or None, tool_calls=tool_calls)
                    choices.append(P.ChatChunkChoice(index=o.index, delta=delta, logprobs=logprobs,
                                                     finish_reason=finish))
            if choices:
                yield chunk(choices)
        if job.include_usage:
            yield P.ChatCompletionChunk(**self.head(job), choices=[], usage=job.usage())


    def chat_tools(self, req: P.ChatCompletionRequest):
        """(tools for the prompt, the call format to parse or None, the output constraint,
        the field that asked for it) of a chat request."""
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
        spec, spec_field = self.structured_output(req)
        for i, m in enumerate(req.messages):
            if m.role == "tool" and not m.tool_call_id:
                raise APIError(400, f"messages.{i}: a tool message needs tool_call_id", param="messages")
        if choice == "none":
            return tools, None, spec, spec_field
        if not tools:
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        fmt = (T.tool_format(self.tokenizer.chat_template)
               if T.template_renders_tools(self.tokenizer.chat_template) else T.FORMATS["hermes"])
        if choice == "auto":
            return tools, fmt, spec, spec_field
        named = choice.function.name if isinstance(choice, P.NamedToolChoice) else None
        if named is not None and named not in {t["function"]["name"] for t in tools}:
            raise APIError(400, f"tool_choice names {named!r}, which is not in tools", param="tool_choice")
        if spec is not None:
            raise APIError(400, f"tool_choice {'required' if named is None else 'a function'} and "
                           f"{spec_field} cannot be combined", param=spec_field)
        grammar = T.call_grammar(fmt, tools, named, bool(req.parallel_tool_calls))
        return tools, fmt, StructuredOutputParams(grammar=grammar), "tools"


class _StreamedCalls:
    """One streamed choice's tool calls: content deltas outside calls, a tool_calls delta
    (with its index) as each call completes, finish_reason "tool_calls" if any was made.
    Whitespace around calls is held back and dropped when calls were made."""

    def __init__(self, fmt: T.ToolFormat):
        self.parser = T.ToolCallParser(fmt)
        self.pending = ""

    def feed(self, delta: str, finish_reason: str | None):
        text, calls = self.parser.feed(delta)
        if finish_reason is not None:
            more, last = self.parser.finish()
            text, calls = text + more, calls + last
        start = len(self.parser.calls) - len(calls)
        text, self.pending = self.pending + text, ""
        if not text.strip() and not (finish_reason and not self.parser.calls):
            text, self.pending = "", text
        deltas = [P.ToolCallDelta(index=start + k, id=c["id"], type="function",
                                  function=P.FunctionCallDelta(name=c["name"], arguments=c["arguments"]))
                  for k, c in enumerate(calls)] or None
        if finish_reason == "stop" and self.parser.calls:
            finish_reason = "tool_calls"
        return text, deltas, finish_reason


def _tool_call(call: dict) -> P.ToolCall:
    return P.ToolCall(id=call["id"], function=P.FunctionCall(name=call["name"], arguments=call["arguments"]))


def _reason(exc: InvalidParams) -> str:
    """InvalidParams' message without its "structured_output: " prefix."""
    return str(exc).split(": ", 1)[1] if ": " in str(exc) else str(exc)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _check_unicode(body: dict) -> None:
    """Refuse text with a lone surrogate: JSON can spell one ("\\ud800") but it is not
    Unicode, so no tokenizer (nor a UTF-8 response echoing it) can take it."""
    def refuse(path: tuple, text: str, at: int):
        where = ".".join(map(str, path)) or "the request body"
        raise APIError(400, f"{where}: the text has a lone surrogate (\\u{ord(text[at]):04x}) at "
                       f"character {at}, which is not valid Unicode",
                       param=str(path[0]) if path else None)

    stack: list[tuple[tuple, object]] = [((), body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for key in value:               # keys are text too; check them before naming them
                if (at := _lone_surrogate(key)) is not None:
                    refuse(path, key, at)
            stack.extend((path + (key,), item) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend((path + (i,), item) for i, item in enumerate(value))
        elif isinstance(value, str) and (at := _lone_surrogate(value)) is not None:
            refuse(path, value, at)


def _lone_surrogate(text: str) -> int | None:
    """Where `text` has its first lone surrogate, if it has one."""
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        return exc.start
    return None


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the request body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _SiteGuard:
    """ASGI middleware: refuse requests a web page could send on a user's behalf.

    When the server is bound to loopback, the Host header must name a loopback address
    with the server's port (a DNS-rebinding page sends its own name). A request with an
    Origin header (sent by browsers on cross-origin and POST requests) must come from an
    allowed origin; none is allowed by default, except the server's own (see same_origin).
    """
    LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}

    def __init__(self, app, host: str, allowed_origins: list[str], trust_any_host: bool = False):
        self.app, self.allowed_origins, self.trust_any_host = app, allowed_origins, trust_any_host
        self.check_host = is_loopback(host)
        self.host_names = self.LOOPBACK_NAMES | {host.lower()}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self.refusal(scope)
            if refusal is not None:
                return await _error_response(refusal)(scope, receive, send)
        await self.app(scope, receive, send)

    def refusal(self, scope) -> APIError | None:
        headers = Headers(scope=scope)
        host = headers.get("host")
        if self.check_host and host is not None and not self.host_allowed(host, scope.get("server")):
            return APIError(403, "the Host header must name this server's loopback address "
                            "(localhost, 127.0.0.1 or [::1] and its port)", "permission_error",
                            code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and "*" not in self.allowed_origins and origin not in self.allowed_origins \
                and not self.same_origin(origin, host, scope):
            return APIError(403, f"requests from the web origin {origin!r} are not allowed "
                            "(see miaotui serve --allowed-origins)", "permission_error",
                            code="origin_not_allowed")
        return None

    def same_origin(self, origin: str, host: str | None, scope) -> bool:
        """The request comes from a page this server served (its web chat page at /): the
        Origin is this very scheme://Host, and Host cannot have been set by DNS rebinding,
        i.e. it names an IP address or localhost (with an API key, any name: a rebinding
        page does not know the key)."""
        if host is None or origin.lower() != f"{scope.get('scheme', 'http')}://{host}".lower():
            return False
        if self.trust_any_host:
            return True
        try:
            name = urllib.parse.urlsplit("//" + host).hostname or ""
            ipaddress.ip_address(name)
        except ValueError:
            return name == "localhost"
        return True

    def host_allowed(self, host: str, server: tuple | None) -> bool:
        """`host` (NAME[:PORT], NAME an IPv6 address in brackets) names this server."""
        try:
            url = urllib.parse.urlsplit("//" + host)
            port = url.port or 80
        except ValueError:                           # a port that is not a number
            return False
        return url.hostname in self.host_names and (server is None or port == server[1])


class _CountRequests:
    """ASGI middleware: count every HTTP response by path and status code."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            path = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.requests.labels(path, str(status)).inc()


def create_app(engine: LLMEngine | AsyncEngine, served_model_name: str, api_key: str | None = None,
               max_waiting: int = 128, host: str = "127.0.0.1",
               allowed_origins: Sequence[str] = ()) -> FastAPI:
    """The FastAPI app serving `engine` under `served_model_name`.

    `host` is the address the server is bound to (a loopback one turns on the Host check);
    `allowed_origins` are the web origins allowed to call it (CORS), or ["*"] for any.
    Given an LLMEngine, the app wraps it in an AsyncEngine and stops that at shutdown.
    """
    if max_waiting < 1:
        raise MiaotuiError("max_waiting must be at least 1")
    owned = not isinstance(engine, AsyncEngine)   # an LLMEngine or a data-parallel DPEngine
    async_engine = AsyncEngine(engine) if owned else engine
    server = _Server(async_engine, served_model_name, api_key, max_waiting)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if owned:
            async_engine.shutdown()

    app = FastAPI(title="miaotui", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    # the last added runs first: count every request, then guard, then answer CORS preflights
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins),
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    app.add_middleware(_SiteGuard, host=host, allowed_origins=list(allowed_origins),
                       trust_any_host=api_key is not None)
    app.add_middleware(_CountRequests, metrics=server.metrics)

    @app.exception_handler(APIError)
    async def on_api_error(request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(HTTPException)
    async def on_http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(exc.status_code, str(exc.detail), kind, headers=exc.headers))

    @app.exception_handler(Exception)
    async def on_bug(request, exc: Exception):
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}", "server_error"))

    app.post("/v1/completions", **_generation_docs(P.CompletionRequest, P.CompletionResponse,
                                                   P.CompletionResponse))(server.completions)
    app.post("/v1/chat/completions", **_generation_docs(
        P.ChatCompletionRequest, P.ChatCompletionResponse, P.ChatCompletionChunk))(server.chat_completions)

    @app.get("/v1/models", response_model=P.ModelList, responses=_errors(401, 403))
    async def models(request: Request):
        server.check_auth(request)
        return P.ModelList(data=[P.ModelCard(id=served_model_name, max_model_len=server.max_model_len)])

    @app.get("/health", response_model=P.Health, response_model_exclude_none=True,
             responses={503: {"model": P.Health, "description": "The engine has stopped"},
                        **_errors(403)})
    async def health():
        if not async_engine._thread.is_alive():
            return JSONResponse(P.Health(status="engine stopped").model_dump(), status_code=503)
        failure = async_engine.engine.failure()   # a distributed worker died
        if failure:
            return JSONResponse(P.Health(status="engine failed", reason=failure).model_dump(exclude_none=True), status_code=503)
        return P.Health(status="ok")

    @app.get("/metrics", response_class=PlainTextResponse, responses=_errors(403),
             description="Prometheus metrics, in the text exposition format")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    _add_chat_page(app)
    app.openapi = lambda: _openapi(app)
    return app


STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


def _add_chat_page(app: FastAPI) -> None:
    """The web chat page: GET / and its files under /static (miaotui/serve/static, shipped
    as package data; plain files, nothing fetched from elsewhere)."""
    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), media_type="text/html",
                            headers=_PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


# The page loads only its own files and talks only to this server; no frames, no plugins.
_PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'self'; "
                 "style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; "
                 "base-uri 'none'; frame-ancestors 'none'; form-action 'none'",
                 "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


_ERRORS = {400: "The request is invalid", 401: "Missing or wrong API key",
           403: "Refused Host or Origin header (cross-site protection)",
           404: "No such model", 415: "The body is not application/json",
           503: "The waiting queue is full; retry after Retry-After seconds"}
# models the schema names by reference that FastAPI does not see: request bodies and chunks
_REFERENCED_MODELS = [(P.CompletionRequest, "validation"), (P.ChatCompletionRequest, "validation"),
                      (P.ChatCompletionChunk, "serialization")]


def _errors(*statuses: int) -> dict:
    return {s: {"model": P.ErrorResponse, "description": _ERRORS[s]} for s in statuses}


def _generation_docs(request: type[BaseModel], response: type[BaseModel],
                     chunk: type[BaseModel]) -> dict:
    """OpenAPI for a generation route: the handler parses its body itself (to check it in
    order and answer OpenAI-style errors), so the body and answers are declared here."""
    def ref(model: type[BaseModel]) -> dict:
        return {"$ref": f"#/components/schemas/{model.__name__}"}
    event = {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
        {"const": "[DONE]"},
        {"type": "string", "contentMediaType": "application/json",
         "contentSchema": {"anyOf": [ref(chunk), ref(P.ErrorResponse)]}}]}}}
    return dict(
        response_class=JSONResponse,
        openapi_extra={"requestBody": {"required": True,
                                       "content": {"application/json": {"schema": ref(request)}}}},
        responses={200: {"model": response,
                         "description": f"A {response.__name__}, or with stream: true, events "
                                        f"each carrying a {chunk.__name__} (an ErrorResponse if "
                                        "generation fails) and then [DONE]",
                         "content": {"text/event-stream": {"schema": event}}},
                   **_errors(400, 401, 403, 404, 415, 503)})


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema plus the models the generation routes declare by reference."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, defs = models_json_schema(_REFERENCED_MODELS, ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        app.openapi_schema = schema
    return app.openapi_schema
