"""The OpenAI-compatible server, end to end: a real uvicorn server on a free loopback port,
driven by the official `openai` client (and raw httpx for malformed requests).

Most tests use the tiny random Llama; one uses the default SmolLM2 model.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time

import httpx
import openai
import pytest
import torch

from miaotui.config import MiaotuiError
from miaotui.llm import LLM
from miaotui.sampling_params import SamplingParams
from miaotui.serve.api import create_app
from miaotui.serve.cli import serve_in_thread

KEY = "test-key"
KV = 32 << 20          # a small KV pool keeps the tiny engines light


def serve(engine, name: str, **kwargs):
    """Serve create_app(engine) on a free loopback port; a context giving the base URL."""
    return serve_in_thread(create_app(engine, name, **kwargs))


def metric(base: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{base}/metrics").text
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    """(base URL, served engine, reference LLM, transformers model) for the tiny Llama."""
    path, hf_model = tiny_llama_dir
    ref = LLM(path, kv_cache_memory=KV)
    served = LLM(path, kv_cache_memory=KV).engine
    with serve(served, "tiny", api_key=KEY) as base:
        yield base, served, ref, hf_model


@pytest.fixture
def client(tiny):
    return openai.OpenAI(base_url=tiny[0] + "/v1", api_key=KEY, max_retries=0)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


# ---- the happy paths --------------------------------------------------------------------
def test_completions_match_llm(tiny, client):
    _, _, ref, _ = tiny
    want = ref.generate(["Hello there", "abc"], greedy(20))
    r = client.completions.create(model="tiny", prompt=["Hello there", "abc"], max_tokens=20,
                                  temperature=0)
    assert [c.text for c in r.choices] == [w.outputs[0].text for w in want]
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].finish_reason == want[0].outputs[0].finish_reason
    n_prompt = sum(len(w.prompt_token_ids) for w in want)
    n_out = sum(len(w.outputs[0].token_ids) for w in want)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, n_out)

    ids = want[0].prompt_token_ids           # a token-id prompt gives the same answer
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=20, temperature=0)
    assert r.choices[0].text == want[0].outputs[0].text

    stream = client.completions.create(model="tiny", prompt="Hello there", max_tokens=20,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want[0].outputs[0].text
    assert chunks[-1].usage.completion_tokens == len(want[0].outputs[0].token_ids)

    r = client.completions.create(model="tiny", prompt="abc", max_tokens=8, n=3, seed=7,
                                  temperature=1.0, logprobs=2, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 8
    # top 2 plus the chosen token, keyed by text (undecodable byte tokens may share a key)
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    assert lp.text_offset[0] == len("abc")


def test_chat_matches_llm(tiny, client):
    _, _, ref, _ = tiny
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    want = ref.chat(messages, greedy(12))[0]
    r = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=12,
                                       temperature=0, logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.outputs[0].text
    assert choice.finish_reason == want.outputs[0].finish_reason
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert len(choice.logprobs.content) == len(want.outputs[0].token_ids)
    assert all(len(t.top_logprobs) == 3 for t in choice.logprobs.content)
    first = choice.logprobs.content[0]       # greedy: the chosen token is the most likely one
    assert first.logprob == pytest.approx(first.top_logprobs[0].logprob)

    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.outputs[0].text
    assert chunks[-1].choices[0].finish_reason == want.outputs[0].finish_reason


def test_concurrent_streams(tiny):
    base, served, ref, _ = tiny
    prompts = [f"request number {i}: " + "xy" * (i % 7) for i in range(32)]
    want = [o.outputs[0].text for o in ref.generate(prompts, greedy(24))]

    async def one(aclient, prompt):
        stream = await aclient.completions.create(model="tiny", prompt=prompt, max_tokens=24,
                                                  temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main():
        async with openai.AsyncOpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0) as ac:
            return await asyncio.gather(*(one(ac, p) for p in prompts))

    got = asyncio.run(main())
    assert got == want
    assert wait_for(served.pool_is_full)
    assert metric(base, "miaotui_num_running_seqs") == 0


def test_disconnect_aborts_request(tiny):
    base, served, _, _ = tiny
    aborted = metric(base, "miaotui_requests_finished_total", '{reason="abort"}')
    body = {"model": "tiny", "prompt": "go on", "max_tokens": 900, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
        assert served.kv_usage() > 0
    # closing the response drops the connection: the server aborts the request
    assert wait_for(lambda: metric(base, "miaotui_requests_finished_total", '{reason="abort"}')
                    == aborted + 1)
    assert wait_for(served.pool_is_full)
    assert metric(base, "miaotui_kv_cache_usage_ratio") == 0


def test_disconnect_aborts_non_streaming_request(tiny):
    base, served, _, _ = tiny
    aborted = metric(base, "miaotui_requests_finished_total", '{reason="abort"}')
    # 16 x 900 tokens: long enough for the client to give up first, even at thousands of tok/s
    body = {"model": "tiny", "prompt": "go on", "max_tokens": 900, "ignore_eos": True, "n": 16}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/completions", json=body, headers=AUTH, timeout=0.5)
    assert wait_for(lambda: metric(base, "miaotui_requests_finished_total", '{reason="abort"}')
                    == aborted + 1)
    assert wait_for(served.pool_is_full)
    assert metric(base, "miaotui_http_requests_total", '{path="/v1/completions",status="499"}') >= 1


def test_async_engine_isolates_errors(tiny):
    """A bad request, a cancelled one and a failed step each affect only their own requests."""
    from miaotui.engine.async_engine import AsyncEngine
    engine = tiny[2].engine                   # the reference LLM's engine, borrowed
    want = tiny[2].generate("abc", greedy(30))[0].outputs[0].text

    async def text_of(rid, prompt, params):
        return "".join([o.outputs[0].delta_text async for o in ae.generate(rid, prompt, params)])

    async def main():
        good = asyncio.create_task(text_of("good", "abc", greedy(30)))
        doomed = asyncio.create_task(text_of("doomed", "xyz", greedy(500, ignore_eos=True)))
        with pytest.raises(MiaotuiError):
            await text_of("empty", [], greedy(5))
        await asyncio.sleep(0.2)
        doomed.cancel()
        assert await good == want
        engine.step = lambda: (_ for _ in ()).throw(RuntimeError("boom"))
        with pytest.raises(RuntimeError, match="boom"):
            await text_of("unlucky", "abc", greedy(5))
        del engine.step
        assert await text_of("after", "abc", greedy(30)) == want

    ae = AsyncEngine(engine)
    try:
        asyncio.run(main())
    finally:
        ae.shutdown()
    assert engine.pool_is_full() and not engine.has_unfinished()


def test_echo_logprobs_scoring(tiny, client):
    _, _, ref, hf_model = tiny
    text = "The quick brown fox"
    r = client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=2)
    choice = r.choices[0]
    assert choice.text == text and r.usage.completion_tokens == 0
    ids = ref.tokenizer.encode(text)
    with torch.no_grad():
        lp = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), -1)
    want = [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    lps = choice.logprobs
    assert lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
    assert lps.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    best = lp[0].topk(2)
    top1 = lps.top_logprobs[1]
    for token_id, value in zip(best.indices.tolist(), best.values.tolist()):
        assert top1[ref.tokenizer.decode([token_id])] == pytest.approx(value, abs=1e-4)


# ---- bad input --------------------------------------------------------------------------
AUTH = {"Authorization": f"Bearer {KEY}"}
C, CHAT = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
BAD = [  # (path, raw body or JSON, headers, status, param)
    (C, '{"model": "tiny", "prompt": ', AUTH, 400, None),
    (C, "[1, 2]", AUTH, 400, None),
    (C, {"model": "tiny"}, AUTH, 400, "prompt"),
    (C, {"model": "tiny", "prompt": "x", "max_tokens": "5"}, AUTH, 400, "max_tokens"),
    (C, {"model": "tiny", "prompt": "x", "temperature": True}, AUTH, 400, "temperature"),
    (C, {"model": "tiny", "prompt": "x", "temperature": -1}, AUTH, 400, "temperature"),
    (C, {"model": "tiny", "prompt": "x", "top_p": 0}, AUTH, 400, "top_p"),
    (C, {"model": "tiny", "prompt": "x", "max_tokens": -1}, AUTH, 400, "max_tokens"),
    (C, {"model": "tiny", "prompt": "x", "logprobs": 50}, AUTH, 400, "logprobs"),
    (C, {"model": "tiny", "prompt": "x", "n": 0}, AUTH, 400, "n"),
    (C, {"model": "tiny", "prompt": []}, AUTH, 400, "prompt"),
    (C, {"model": "tiny", "prompt": [5, 100000]}, AUTH, 400, "prompt"),
    (C, {"model": "tiny", "prompt": "x" * 1030}, AUTH, 400, "max_tokens"),
    (C, {"model": "tiny", "prompt": "x", "max_tokens": 1024}, AUTH, 400, "max_tokens"),
    (C, {"model": "gpt-4", "prompt": "x"}, AUTH, 404, "model"),
    (C, {"model": "tiny", "prompt": "x"}, {}, 401, None),
    (C, {"model": "tiny", "prompt": "x"}, {"Authorization": "Bearer wrong"}, 401, None),
    (CHAT, {"model": "tiny", "messages": []}, AUTH, 400, "messages"),
    (CHAT, {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, AUTH, 400, "messages"),
    (CHAT, {"model": "tiny", "messages": "hi"}, AUTH, 400, "messages"),
    (CHAT, {"model": "tiny", "messages": MSG, "max_completion_tokens": 5000}, AUTH, 400,
     "max_completion_tokens"),
    (CHAT, {"model": "tiny", "messages": MSG, "logprobs": True, "top_logprobs": 99}, AUTH, 400,
     "top_logprobs"),
    (CHAT, {"model": "nope", "messages": MSG}, AUTH, 404, "model"),
    # integer fields take integral floats only
    (C, {"model": "tiny", "prompt": "x", "max_tokens": 4.5}, AUTH, 400, "max_tokens"),
    (C, {"model": "tiny", "prompt": "x", "n": 1.5}, AUTH, 400, "n"),
    (CHAT, {"model": "tiny", "messages": MSG, "seed": 0.5}, AUTH, 400, "seed"),
    # OpenAI fields this server does not implement are refused by name, not ignored
    (CHAT, {"model": "tiny", "messages": MSG, "functions": [{"name": "f"}]}, AUTH, 400, "functions"),
    # structured output and tools: bad grammars, schemas and tool choices are 400s naming the field
    (CHAT, {"model": "tiny", "messages": MSG, "tool_choice": "required"}, AUTH, 400, "tool_choice"),
    (CHAT, {"model": "tiny", "messages": MSG, "tools": [TOOL], "tool_choice": {
        "type": "function", "function": {"name": "other"}}}, AUTH, 400, "tool_choice"),
    (CHAT, {"model": "tiny", "messages": MSG, "tools": [TOOL], "tool_choice": "maybe"}, AUTH, 400, "tool_choice"),
    (CHAT, {"model": "tiny", "messages": MSG, "tools": [{"type": "function", "function": {
        "name": "bad name!"}}]}, AUTH, 400, "tools"),
    (CHAT, {"model": "tiny", "messages": MSG, "tools": [TOOL], "tool_choice": "required",
            "guided_regex": "a+"}, AUTH, 400, "guided_regex"),
    (CHAT, {"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}, AUTH, 400, "messages"),
    (CHAT, {"model": "tiny", "messages": MSG, "response_format": {"type": "xml"}}, AUTH, 400, "response_format"),
    (CHAT, {"model": "tiny", "messages": MSG, "response_format": {"type": "json_schema"}}, AUTH, 400,
     "response_format"),
    (CHAT, {"model": "tiny", "messages": MSG, "response_format": {"type": "json_schema", "json_schema": {
        "name": "s", "schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}}}, AUTH, 400,
     "response_format"),
    (C, {"model": "tiny", "prompt": "x", "guided_json": "{not json"}, AUTH, 400, "guided_json"),
    (C, {"model": "tiny", "prompt": "x", "guided_regex": "(("}, AUTH, 400, "guided_regex"),
    (C, {"model": "tiny", "prompt": "x", "guided_choice": []}, AUTH, 400, "guided_choice"),
    (C, {"model": "tiny", "prompt": "x", "guided_grammar": "start: nothing_here"}, AUTH, 400, "guided_grammar"),
    (C, {"model": "tiny", "prompt": "x", "guided_regex": "a", "guided_choice": ["a"]}, AUTH, 400, "guided_choice"),
    (C, {"model": "tiny", "prompt": "x", "logit_bias": {"5": 1}}, AUTH, 400, "logit_bias"),
    (C, {"model": "tiny", "prompt": "x", "suffix": "end"}, AUTH, 400, "suffix"),
    ("/v1/models", None, {}, 401, None),
    ("/v1/nothing", {}, AUTH, 404, None),
]


@pytest.mark.parametrize("path,body,headers,status,param", BAD)
def test_bad_input(tiny, path, body, headers, status, param):
    base = tiny[0]
    if body is None:
        r = httpx.get(base + path, headers=headers)
    else:
        raw = body if isinstance(body, str) else json.dumps(body)
        r = httpx.post(base + path, content=raw, headers={**headers, "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_bad_input_via_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=2000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=MSG)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong").models.list()
    assert [m.id for m in client.models.list()] == ["tiny"]   # still serving


def test_queue_full_gives_503(tiny_llama_dir):
    engine = LLM(tiny_llama_dir[0], kv_cache_memory=KV, max_num_seqs=1).engine
    body = {"prompt": "x", "max_tokens": 300, "ignore_eos": True}

    async def main(base):
        async with httpx.AsyncClient(base_url=base, timeout=60) as h:
            # One request takes the only slot first; then five arrive at once: one may wait,
            # the rest must be turned away. (Sending all six at once is a race: they can all
            # be queued before the first is scheduled, leaving room for one only.)
            # (running, and a step done since: the server's view of the queue is refreshed
            # after each step, so the first step may still show it waiting)
            first = asyncio.create_task(h.post("/v1/completions", json=body))
            while not engine.scheduler.running or engine.stats["steps"] < 2:
                await asyncio.sleep(0.01)
            rest = await asyncio.gather(*(h.post("/v1/completions", json=body) for _ in range(5)))
            return [await first, *rest]

    with serve(engine, "tiny", max_waiting=1) as base:
        replies = asyncio.run(main(base))
        codes = sorted(r.status_code for r in replies)
        assert codes.count(200) >= 2 and 503 in codes, codes
        busy = next(r for r in replies if r.status_code == 503)
        assert busy.headers["Retry-After"] == "1" and busy.json()["error"]["code"] == "queue_full"
        assert metric(base, "miaotui_http_requests_total", '{path="/v1/completions",status="503"}') \
            == codes.count(503)
        assert httpx.get(base + "/health").json() == {"status": "ok"}
        assert wait_for(engine.pool_is_full)


# ---- the default model ------------------------------------------------------------------
def test_default_model_chat_and_stream():
    try:
        llm = LLM(kv_cache_memory=64 << 20)
    except MiaotuiError as exc:
        pytest.skip(f"default model unavailable: {exc}")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = llm.chat(messages, greedy(16))[0].outputs[0]
    want_completion = llm.generate("The capital of France is", greedy(8))[0].outputs[0].text
    with serve(llm.engine, "smollm2") as base:
        c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        r = c.chat.completions.create(model="smollm2", messages=messages, max_tokens=16,
                                      temperature=0)
        assert r.choices[0].message.content == want.text
        stream = c.completions.create(model="smollm2", prompt="The capital of France is",
                                      max_tokens=8, temperature=0, stream=True)
        assert "".join(ch.choices[0].text for ch in stream) == want_completion


# ---- hardening (issue 11) ---------------------------------------------------------------
SURROGATE_BODIES = [  # (path, raw JSON with a lone surrogate escape, the field it is in)
    (C, r'{"prompt": "a \ud800 b"}', "prompt"),
    (C, r'{"prompt": ["ok", "\udfff"]}', "prompt"),
    (C, r'{"prompt": "a", "stop": ["\ud800"]}', "stop"),
    (CHAT, r'{"messages": [{"role": "user", "content": "hi \ud83d"}]}', "messages"),
    (CHAT, r'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}',
     "messages"),
]


def test_lone_surrogate_is_400_and_keeps_the_connection(tiny):
    import http.client
    host, port = tiny[0].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {**AUTH, "Content-Type": "application/json"}
    sock = None
    try:
        for path, raw, param in SURROGATE_BODIES:
            conn.request("POST", path, body=raw.encode(), headers=headers)
            r = conn.getresponse()
            body = json.loads(r.read())
            assert r.status == 400, body
            assert body["error"]["param"] == param and "surrogate" in body["error"]["message"]
            sock = sock or conn.sock
            assert conn.sock is sock, "the server closed the keep-alive connection"
        conn.request("GET", "/v1/models", headers=AUTH)
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["data"][0]["id"] == "tiny"
        assert conn.sock is sock
    finally:
        conn.close()


def test_huge_prompt_is_refused_without_stalling_the_server(tiny):
    """A 10 MB prompt is refused by its byte length before tokenizing (tokenizing it took
    35 s on the event loop), and /health keeps answering meanwhile."""
    base = tiny[0]
    big = "hello world " * (10_000_000 // 12)
    replies = []

    def post(path, body):
        replies.append(httpx.post(base + path, json=body, headers=AUTH, timeout=120))

    for path, body, param in [(C, {"prompt": big, "max_tokens": 1}, "prompt"),
                              (CHAT, {"messages": [{"role": "user", "content": big}]}, "messages")]:
        thread = threading.Thread(target=post, args=(path, body))
        start = time.monotonic()
        thread.start()
        slowest = 0.0
        while thread.is_alive():
            t = time.monotonic()
            assert httpx.get(base + "/health", timeout=60).status_code == 200
            slowest = max(slowest, time.monotonic() - t)
            time.sleep(0.02)
        thread.join()
        r = replies.pop()
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
        assert r.json()["error"]["code"] == "context_length_exceeded"
        assert time.monotonic() - start < 10 and slowest < 1.0, (time.monotonic() - start, slowest)


def test_tokenizing_runs_off_the_event_loop(tiny, monkeypatch):
    base, served, _, _ = tiny
    real = served.tokenizer.encode

    def slow_encode(*args, **kwargs):
        time.sleep(2)          # a long prompt; like encode_batch, sleeping frees the GIL
        return real(*args, **kwargs)
    monkeypatch.setattr(served.tokenizer, "encode", slow_encode)
    replies = []
    thread = threading.Thread(target=lambda: replies.append(httpx.post(
        base + C, json={"prompt": "x", "max_tokens": 1}, headers=AUTH, timeout=30)))
    thread.start()
    time.sleep(0.5)
    t = time.monotonic()
    assert httpx.get(base + "/health", timeout=30).status_code == 200
    assert time.monotonic() - t < 1.0
    thread.join()
    assert replies[0].status_code == 200


def test_openapi_declares_bodies_and_responses(tiny):
    spec = httpx.get(tiny[0] + "/openapi.json").json()
    schemas = spec["components"]["schemas"]

    def ref(schema):
        name = schema["$ref"].rsplit("/", 1)[1]
        assert name in schemas
        return name

    for path, request, response in [(C, "CompletionRequest", "CompletionResponse"),
                                    (CHAT, "ChatCompletionRequest", "ChatCompletionResponse")]:
        op = spec["paths"][path]["post"]
        assert op["requestBody"]["required"] is True
        assert ref(op["requestBody"]["content"]["application/json"]["schema"]) == request
        ok = op["responses"]["200"]["content"]
        assert ref(ok["application/json"]["schema"]) == response
        assert "text/event-stream" in ok
        for status in ("400", "401", "404", "415", "503"):
            assert ref(op["responses"][status]["content"]["application/json"]["schema"]) \
                == "ErrorResponse"
    get = {path: spec["paths"][path]["get"]["responses"] for path in ("/v1/models", "/health")}
    assert ref(get["/v1/models"]["200"]["content"]["application/json"]["schema"]) == "ModelList"
    assert ref(get["/health"]["200"]["content"]["application/json"]["schema"]) == "Health"
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    # every reference resolves
    for name in re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(spec)):
        assert name in schemas


def test_integral_floats_are_integers(client):
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=4.0, n=2.0, logprobs=1.0,
                                  seed=3.0, temperature=1.0, extra_body={"top_k": 5.0})
    assert len(r.choices) == 2 and r.usage.completion_tokens <= 8
    assert all(len(c.logprobs.tokens) <= 4 for c in r.choices)
    r = client.chat.completions.create(model="tiny", messages=MSG, max_completion_tokens=3.0,
                                       logprobs=True, top_logprobs=2.0)
    assert r.usage.completion_tokens <= 3
    assert all(len(t.top_logprobs) == 2 for t in r.choices[0].logprobs.content)


def test_neutral_values_of_unsupported_fields_are_accepted(client):
    """Clients often send the defaults of fields this server lacks; those mean nothing."""
    from miaotui.serve.protocol import IGNORED
    ignored = {"user": "someone", "metadata": {"k": "v"}, "service_tier": "auto",
               "prompt_cache_key": "k", "safety_identifier": "s"}
    assert set(ignored) == set(IGNORED)
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2, tools=[],
                                       response_format={"type": "text"}, tool_choice="none",
                                       store=False, extra_body=ignored)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_posts_must_be_json(tiny):
    base = tiny[0]
    body = json.dumps({"prompt": "x", "max_tokens": 1})
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None):
        headers = {**AUTH, **({"Content-Type": ctype} if ctype else {})}
        r = httpx.post(base + C, content=body, headers=headers)
        assert r.status_code == 415, (ctype, r.text)
        assert r.json()["error"]["code"] == "unsupported_media_type"
    r = httpx.post(base + C, content=body,
                   headers={**AUTH, "Content-Type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 200, r.text


def test_host_header_is_checked_on_loopback(tiny):
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 sends
    Host: evil.example:PORT. Only loopback names with the server's port are served."""
    base = tiny[0]
    port = base.rsplit(":", 1)[1]
    for host in (f"evil.example:{port}", "evil.example", f"localhost:{int(port) + 1}",
                 f"127.0.0.1.evil.example:{port}"):
        for path in ("/health", "/v1/models", "/metrics"):
            r = httpx.get(base + path, headers={**AUTH, "Host": host})
            assert r.status_code == 403, (host, path, r.text)
            assert r.json()["error"]["code"] == "host_not_allowed"
        r = httpx.post(base + C, json={"prompt": "x", "max_tokens": 1}, headers={**AUTH, "Host": host})
        assert r.status_code == 403
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", f"LOCALHOST:{port}"):
        assert httpx.get(base + "/health", headers={"Host": host}).status_code == 200, host


def test_cross_origin_requests(tiny):
    base = tiny[0]
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    # no --allowed-origins: no CORS, and requests that carry a foreign Origin are refused
    r = httpx.options(base + C, headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(base + "/v1/models", headers={**AUTH, "Origin": "http://app.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"

    engine = tiny[2].engine       # the reference engine serves /v1/models here, no generation
    with serve(engine, "tiny", allowed_origins=["http://app.example"]) as other:
        r = httpx.options(other + C, headers=preflight)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://app.example"
        r = httpx.get(other + "/v1/models", headers={"Origin": "http://app.example"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://app.example"
        r = httpx.get(other + "/v1/models", headers={"Origin": "http://evil.example"})
        assert r.status_code == 403
    with serve(engine, "tiny", allowed_origins=["*"]) as other:
        r = httpx.get(other + "/v1/models", headers={"Origin": "http://anything.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


def test_allowed_origins_option():
    from miaotui.cli import build_parser
    from miaotui.serve.cli import parse_origins
    assert parse_origins(None) == []
    assert parse_origins("http://a.example, https://b.example:8443") == \
        ["http://a.example", "https://b.example:8443"]
    assert parse_origins("*") == ["*"]
    for bad in ("a.example", "http://a.example/path", "*,http://a.example"):
        with pytest.raises(MiaotuiError):
            parse_origins(bad)
    args = build_parser().parse_args(["serve", "--allowed-origins", "http://a.example"])
    assert args.allowed_origins == "http://a.example"
    assert build_parser().parse_args(["serve"]).allowed_origins is None


def test_stream_chunks_share_id_and_created(tiny, client, monkeypatch):
    from miaotui.serve import protocol as P

    class Clock:              # a clock that ticks a second at every reading
        now = 1_700_000_000

        @classmethod
        def time(cls):
            cls.now += 1
            return cls.now
    monkeypatch.setattr(P, "time", Clock)
    # Greedy and past EOS, so the streams' lengths do not hang on sampling (how many chunks a
    # sampled text takes varies with the tokens drawn: held-back UTF-8 bytes, an early EOS).
    chunks = list(client.completions.create(model="tiny", prompt="abc", max_tokens=6,
                                            temperature=0, extra_body={"ignore_eos": True},
                                            stream=True, stream_options={"include_usage": True}))
    chunks += list(client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6,
                                                  temperature=0, extra_body={"ignore_eos": True},
                                                  stream=True, stream_options={"include_usage": True}))
    for kind in ("text_completion", "chat.completion.chunk"):
        mine = [c for c in chunks if c.object == kind]
        # at least a text chunk and the usage chunk (chat: also the role chunk), each made
        # at a different tick of the clock
        assert len(mine) >= (2 if kind == "text_completion" else 3), (kind, len(mine))
        assert len({c.id for c in mine}) == 1 and len({c.created for c in mine}) == 1, kind


class StepGate:
    """Replaces engine.step: while closed, every step waits for a permit."""

    def __init__(self, engine):
        self.engine, self.real = engine, engine.step
        self.closed, self.blocked = True, False
        self.permits = threading.Semaphore(0)
        engine.step = self.step

    def step(self):
        if self.closed:
            self.blocked = True
            self.permits.acquire()
            self.blocked = False
        return self.real()

    def release(self):
        del self.engine.step
        self.closed = False
        self.permits.release(100)


def test_metrics_gauges_follow_admission_and_abort(tiny):
    """The gauges change when a request is admitted or aborted, not one engine step later."""
    base, served, _, _ = tiny
    body = {"prompt": "go on", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    aborted = metric(base, "miaotui_requests_finished_total", '{reason="abort"}')
    gate = StepGate(served)
    try:
        with contextlib.ExitStack() as stack:
            a = stack.enter_context(httpx.stream("POST", base + C, json=body, headers=AUTH, timeout=30))
            assert a.status_code == 200 and wait_for(lambda: gate.blocked)
            # A is admitted; the engine is stuck in the step that would schedule it
            assert metric(base, "miaotui_num_waiting_seqs") == 1
            gate.closed = False
            gate.permits.release()
            with contextlib.ExitStack() as b_stack:
                b = b_stack.enter_context(httpx.stream("POST", base + C, json=body, headers=AUTH,
                                                       timeout=30))
                assert b.status_code == 200
                assert wait_for(lambda: metric(base, "miaotui_num_running_seqs") == 2)
                gate.closed = True
                assert wait_for(lambda: gate.blocked)
                stack.close()      # A's client goes away; the server queues its abort
                assert wait_for(lambda: metric(base, "miaotui_requests_finished_total",
                                               '{reason="abort"}') == aborted + 1)
                gate.permits.release()   # one step; the abort runs after it, then the next blocks
                assert wait_for(lambda: metric(base, "miaotui_num_running_seqs") == 1, timeout=5)
                gate.release()
    finally:
        if "step" in vars(served):
            gate.release()
    assert wait_for(served.pool_is_full)


# ---- structured output and tool calls (issue 16) -----------------------------------------
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 99},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}


def test_structured_output_over_http(tiny, client):
    """response_format and guided_* on both endpoints, streamed or not, as LLM.generate."""
    import jsonschema
    _, _, ref, _ = tiny
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    want = ref.chat(MSG, greedy(300, structured_output={"json": PERSON}))[0].outputs[0].text
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=300, temperature=0,
                                       response_format=fmt)
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(want), PERSON)
    stream = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=300, temperature=0,
                                            response_format=fmt, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want
    r = client.completions.create(model="tiny", prompt="x", max_tokens=300, temperature=0,
                                  extra_body={"guided_json": PERSON})
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=300, seed=3,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "length" or isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(model="tiny", prompt=["a", "b"], n=3, max_tokens=10, seed=1,
                                  extra_body={"guided_choice": ["red", "green", "blue"]})
    assert len(r.choices) == 6 and all(c.text in ("red", "green", "blue") for c in r.choices)
    r = client.completions.create(model="tiny", prompt="a", n=4, max_tokens=20, seed=2,
                                  extra_body={"guided_regex": r"[0-9]{2,3}\.[a-z]{1,4}!"})
    assert all(re.fullmatch(r"[0-9]{2,3}\.[a-z]{1,4}!", c.text) for c in r.choices), r.choices
    r = client.completions.create(model="tiny", prompt="a", max_tokens=20, seed=2,
                                  extra_body={"guided_grammar": 'root ::= "go" ("!" | "?")'})
    assert r.choices[0].text in ("go!", "go?")


def test_auto_tool_calls_are_parsed(tiny, client):
    """tool_choice auto: calls in the answer become tool_calls (the answer forced here by a
    guided choice, as a random model would not write one), streamed as deltas with index."""
    answer = ('Sure. <tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
              '<tool_call>\n{"name": "f", "arguments": {"x": 2}}\n</tool_call>')
    kw = dict(model="tiny", messages=MSG, tools=[TOOL], max_tokens=200, temperature=0,
              extra_body={"guided_choice": [answer]})
    r = client.chat.completions.create(**kw)
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and m.content == "Sure."
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls] == \
        [("function", "f", {"x": 1}), ("function", "f", {"x": 2})]
    assert len({c.id for c in m.tool_calls}) == 2 and all(c.id.startswith("call_") for c in m.tool_calls)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == "Sure."
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == \
        [(0, "f", {"x": 1}), (1, "f", {"x": 2})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    r = client.chat.completions.create(**{**kw, "tool_choice": "none"})   # "none": no parsing
    assert r.choices[0].message.content == answer and not r.choices[0].message.tool_calls


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}


def test_tool_call_round_trip_default_model():
    """The official client against the default model: a required call and a named one
    (streamed), arguments valid for the tool's schema, then the tool's result sent back."""
    import jsonschema
    try:
        llm = LLM(kv_cache_memory=64 << 20)
    except MiaotuiError as exc:
        pytest.skip(f"default model unavailable: {exc}")
    schema = WEATHER_TOOL["function"]["parameters"]
    messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    with serve(llm.engine, "smollm2") as base:
        c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        r = c.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER_TOOL],
                                      tool_choice="required", max_tokens=80, temperature=0)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), schema)
        named = {"type": "function", "function": {"name": "get_weather"}}
        chunks = list(c.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER_TOOL],
                                                tool_choice=named, max_tokens=80, temperature=0, stream=True))
        deltas = [d for ch in chunks for d in (ch.choices[0].delta.tool_calls or [])]
        assert [(d.index, d.type, d.function.name) for d in deltas] == [(0, "function", "get_weather")]
        assert deltas[0].function.arguments == call.function.arguments     # greedy: same call
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        # the call and its result go back into the conversation
        messages += [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
        r = c.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER_TOOL],
                                      max_tokens=30, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
        assert r.choices[0].message.content or r.choices[0].message.tool_calls
        prompt = r.usage.prompt_tokens
        want = T_render_ids(llm, messages)
        assert prompt == len(want)      # the tool call and result were rendered into the prompt


def T_render_ids(llm, messages):
    """Token ids of the prompt the server renders for `messages` with the weather tool."""
    from miaotui.serve import protocol as P
    from miaotui.serve import tools as T
    msgs = [P.ChatMessage.model_validate(m) for m in messages]
    text = T.render(llm.tokenizer, T.conversation(msgs), [WEATHER_TOOL])
    assert '"temperature": 21' in text and "get_weather" in text
    return llm.tokenizer.encode(text, add_special_tokens=False)
