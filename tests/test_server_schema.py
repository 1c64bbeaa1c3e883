"""Schemathesis over the server's own /openapi.json: requests generated from the declared
bodies and parameters must never get a 5xx, and every answer must match its declared
schema, status code and content type.

Bounded: a few examples per operation, a tiny model with a 64-token context (so no
generation is long), and only the loopback server started here is contacted.
"""
from __future__ import annotations

import time

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

from miaotui.llm import LLM  # noqa: E402
from test_server import KV, serve  # noqa: E402

CHECKS = [schemathesis.checks.not_a_server_error, schemathesis.checks.response_schema_conformance,
          schemathesis.checks.status_code_conformance,
          schemathesis.checks.content_type_conformance]
BUDGET_S = 20           # for all operations together (they take ~11 s on a busy 2-core machine)
_start: list[float] = []


@pytest.fixture(scope="module")
def api_schema(tiny_llama_dir):
    engine = LLM(tiny_llama_dir[0], kv_cache_memory=KV, max_model_len=64).engine
    with serve(engine, "tiny") as base:
        yield schemathesis.openapi.from_url(f"{base}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=12, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck), database=None)
def test_openapi_conformance(case):
    if not _start:
        _start.append(time.monotonic())
    if time.monotonic() - _start[0] > BUDGET_S:
        return                       # out of time: the remaining examples pass untried
    case.call_and_validate(checks=CHECKS, timeout=30)
