"""Structured output (engine/structured.py) and tool-call parsing (serve/tools.py).

The grammar alone must keep a random model valid: 50 seeded random JSON schemas each
produce JSON that parses and validates, on the tiny random Llama and on the default model,
all 50 batched through one generate call.
"""
from __future__ import annotations

import json
import random
import re

import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from miaotui.config import MiaotuiError  # noqa: E402
from miaotui.llm import LLM  # noqa: E402
from miaotui.sampling_params import InvalidParams, SamplingParams, StructuredOutputParams  # noqa: E402
from miaotui.serve import tools as T  # noqa: E402

KV = 64 << 20
PATTERNS = [r"^[a-z]{2,6}$", r"^[0-9]{3}-[0-9]{4}$", r"^[A-Z][a-z]{1,5}$", r"^(yes|no)-[0-9]{1,2}$"]
WORDS = ["red", "green", "blue", "north", "south", "alpha", "beta", "x y", "a\"b", "é"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A JSON schema: nested objects, arrays with min/max items, enums, numbers with
    ranges, strings with patterns or lengths (all bounded, so an answer can end)."""
    kinds = ["string", "pattern", "integer", "number", "enum", "boolean", "array"]
    if depth < 2:
        kinds += ["object", "object"]
    kind = rng.choice(kinds)
    if kind == "object" or depth == 0:
        props = {f"{rng.choice(['id', 'name', 'size', 'tag', 'k'])}_{i}": random_schema(rng, depth + 1)
                 for i in range(rng.randint(1, 4))}
        required = [k for k in props if rng.random() < 0.7] or list(props)[:1]
        return {"type": "object", "properties": props, "required": required, "additionalProperties": False}
    if kind == "string":
        lo = rng.randint(0, 3)
        return {"type": "string", "minLength": lo, "maxLength": lo + rng.randint(1, 8)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(PATTERNS)}
    if kind == "integer":
        lo = rng.randint(-100, 100)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 1000)}
    if kind == "number":
        lo = rng.choice([-1.0, 0.0, 2.5, -40.0])
        return {"type": "number", "minimum": lo, "maximum": lo + rng.choice([1.0, 10.0, 300.0])}
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(1, 4))}
    if kind == "boolean":
        return {"type": "boolean"}
    lo = rng.randint(0, 2)
    return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": lo,
            "maxItems": lo + rng.randint(0, 3)}


SCHEMAS = [random_schema(random.Random(seed)) for seed in range(50)]


def check_valid(outputs, schemas):
    for out, schema in zip(outputs, schemas):
        o = out.outputs[0]
        assert o.finish_reason == "stop", (schema, o.text)
        jsonschema.validate(json.loads(o.text), schema)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return LLM(tiny_llama_dir[0], kv_cache_memory=KV)


@pytest.fixture(scope="module")
def smollm(smollm2_path):
    return LLM(smollm2_path, kv_cache_memory=KV, max_num_seqs=64)


def test_schema_generator_covers_the_features():
    text = json.dumps(SCHEMAS)
    for feature in ('"pattern"', '"enum"', '"minItems"', '"maximum"', '"number"', '"boolean"'):
        assert feature in text
    assert sum('"properties": {"' in json.dumps(s["properties"]) for s in SCHEMAS) > 10   # nesting


def test_random_schemas_on_random_model(tiny):
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=600, structured_output={"json": s})
              for i, s in enumerate(SCHEMAS)]
    check_valid(tiny.generate(["Data:"] * len(SCHEMAS), params), SCHEMAS)


def test_random_schemas_on_default_model(smollm):
    prompt = smollm.apply_chat_template([{"role": "user", "content": "Reply with a JSON object."}])
    # A number's digits are unbounded in JSON, and this model, once in a fraction, writes
    # digits until max_tokens (which leaves the JSON unfinished); a frequency penalty lets
    # it end them (so does "multipleOf" in the schema)
    params = [SamplingParams(temperature=0.0, frequency_penalty=1.0, max_tokens=200,
                             structured_output=StructuredOutputParams(json=s)) for s in SCHEMAS]
    check_valid(smollm.generate([prompt] * len(SCHEMAS), params), SCHEMAS)


def test_choice_regex_and_grammars(tiny):
    cases = [({"choice": ["yes", "no", "maybe not"]}, lambda t: t in ("yes", "no", "maybe not")),
             ({"regex": r"[0-9]{3}-[a-z]{2,4}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
             ({"regex": r"(cat|dog)s? (run|sleep)"}, lambda t: re.fullmatch(r"(cat|dog)s? (run|sleep)", t)),
             ({"grammar": 'start: "a" ("b" | "c")+ "."'}, lambda t: re.fullmatch(r"a[bc]+\.", t)),
             ({"grammar": 'root ::= "<" [0-9]+ ">"'}, lambda t: re.fullmatch(r"<[0-9]+>", t))]   # GBNF
    for spec, ok in cases:
        params = [SamplingParams(temperature=1.0, seed=s, max_tokens=300, structured_output=spec)
                  for s in range(8)]
        for out in tiny.generate(["x"] * 8, params):
            o = out.outputs[0]
            assert o.finish_reason == "stop" and ok(o.text), (spec, o.text)


def test_json_object_on_default_model(smollm):
    """Any JSON object (unbounded: a random model's strings need not end, a real one's do)."""
    prompt = smollm.apply_chat_template([{"role": "user", "content": "Describe a cat as JSON."}])
    # (greedy, a 135M model may repeat a list item until max_tokens: the penalty stops that)
    o = smollm.generate(prompt, SamplingParams(temperature=0, max_tokens=120, frequency_penalty=1.0,
                                               structured_output={"json_object": True}))[0].outputs[0]
    assert o.finish_reason == "stop" and isinstance(json.loads(o.text), dict), o.text


def test_batch_invariance_and_both_decode_paths(tiny_llama_dir, monkeypatch):
    """A constrained request's tokens are the same alone or batched with unconstrained
    ones, whose tokens the mask does not touch; the fused C++ decode step and the PyTorch
    path give the same constrained tokens."""
    schema = SCHEMAS[3]
    prompts = ["one", "two two", "three three three"]
    free = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    bound = [SamplingParams(temperature=0.0, max_tokens=300, structured_output={"json": schema}),
             SamplingParams(temperature=0.8, seed=7, max_tokens=300, structured_output={"regex": "[a-z ]{5,40}"})]
    results = []
    for fused in ("1", "0"):
        monkeypatch.setenv("MIAOTUI_FUSED_DECODE", fused)
        llm = LLM(tiny_llama_dir[0], kv_cache_memory=KV)
        assert (llm.engine.runner.decoder is not None) == (fused == "1")
        alone = [llm.generate(p, b)[0].outputs[0].token_ids for p, b in zip(prompts, bound)]
        free_alone = [llm.generate(p, free)[0].outputs[0].token_ids for p in prompts]
        mixed = llm.generate(prompts + prompts[:2], [free] * 3 + bound)
        assert [m.outputs[0].token_ids for m in mixed[:3]] == free_alone
        assert [m.outputs[0].token_ids for m in mixed[3:]] == alone
        results.append(alone)
    assert results[0] == results[1]


def test_grammar_cache_and_max_tokens(tiny):
    grammars = tiny.engine.grammars
    spec = {"json": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}}
    tiny.generate("x", SamplingParams(max_tokens=3, structured_output=spec))
    compiled = grammars.compiled
    out = tiny.generate(["x", "y"], SamplingParams(max_tokens=3, n=2, seed=1, structured_output=dict(spec)))
    assert grammars.compiled == compiled                      # the same schema: compiled once
    for o in out[0].outputs + out[1].outputs:                  # cut mid-grammar: just stops
        assert o.finish_reason == "length" and len(o.token_ids) == 3 and o.text.startswith('{"a')


def test_invalid_specs_are_refused(tiny):
    for bad in [dict(), dict(json={}, regex="a"), dict(choice=[]), dict(json="{not json"),
                dict(regex=""), dict(choice=["a", 3])]:
        with pytest.raises(InvalidParams):
            StructuredOutputParams(**bad)
    with pytest.raises(InvalidParams):
        SamplingParams(structured_output={"schema": {}})
    for spec in [{"regex": "(("}, {"grammar": "start: undefined_rule"},
                 {"json": {"type": "object", "properties": {"a": {"type": "strin"}}}}]:
        with pytest.raises(MiaotuiError):
            tiny.generate("x", SamplingParams(max_tokens=2, structured_output=spec))
    assert not tiny.engine.has_unfinished()


# ---- tool calls ---------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_parse_tool_calls_whole_and_streamed():
    fmt = T.FORMATS["hermes"]
    text = "Let me check.\n" + CALL + "\n" + CALL.replace("Paris", "Oslo") + " <tool_callx> done"
    content, calls = T.parse_tool_calls(fmt, text)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})]
    assert content == "Let me check.\n\n <tool_callx> done"
    for step in (1, 3, 7):          # streamed in pieces: the same split
        parser = T.ToolCallParser(fmt)
        pieces = [parser.feed(text[i:i + step]) for i in range(0, len(text), step)] + [parser.finish()]
        assert "".join(p[0] for p in pieces) == "Let me check.\n\n <tool_callx> done"
        assert [c["arguments"] for p in pieces for c in p[1]] == [c["arguments"] for c in calls]
    assert T.parse_tool_calls(fmt, "no calls here") == ("no calls here", [])
    assert T.parse_tool_calls(fmt, "<tool_call>{broken") == ("<tool_call>{broken", [])
    llama = T.FORMATS["llama3"]
    content, calls = T.parse_tool_calls(llama, ' {"name": "f", "parameters": {"x": 1}}')
    assert content is None and calls[0]["name"] == "f" and json.loads(calls[0]["arguments"]) == {"x": 1}
    assert T.parse_tool_calls(llama, "Hello {x}") == ("Hello {x}", [])
    llama31 = ('{% if tools %}<|start_header_id|>{% endif %}{{ \'{"name": "\' + c.name + \'", "parameters": \' }}'
               "<|eot_id|>")
    assert T.tool_format(llama31).name == "llama3" and T.tool_format(None).name == "hermes"
    grammar = T.call_grammar(llama, [WEATHER], "get_weather")
    assert '"parameters"' in grammar and "<tool_call>" not in grammar


def test_tools_rendered_through_the_template(smollm):
    tok = smollm.tokenizer
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1", "name": "get_weather"}]
    text = T.render(tok, msgs, [WEATHER])   # SmolLM2-135M's template knows no tools: hermes turns
    assert text.startswith("<|im_start|>system\nYou can call functions")
    assert json.dumps(WEATHER) in text and CALL in text
    assert "<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    # a template that renders tools itself gets them as transformers passes them
    own = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}"
           "{{ m.role }}:{{ m.content }}{% for c in m.tool_calls or [] %}"
           "{{ c.function.arguments.city }}{% endfor %};{% endfor %}")
    saved = tok.chat_template, tok.chat_template_source
    try:
        tok.set_chat_template(own)
        assert T.render(tok, msgs, [WEATHER]) == "[get_weather]user:Weather in Paris?;assistant:Paris;tool:{\"temp\": 21};"
        assert T.tool_format(own).name == "hermes"
    finally:
        tok.set_chat_template(*saved)


def test_forced_call_grammar(smollm):
    """tool_choice required/named: the answer is a call whose arguments follow the schema."""
    other = {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"], "additionalProperties": False}}}
    fmt = T.FORMATS["hermes"]
    text = T.render(smollm.tokenizer, [{"role": "user", "content": "What is 2 + 3?"}], [WEATHER, other])
    prompt = smollm.tokenizer.encode(text, add_special_tokens=False)
    for only in (None, "add", "get_weather"):
        spec = {"grammar": T.call_grammar(fmt, [WEATHER, other], only)}
        o = smollm.generate(prompt, SamplingParams(temperature=0, max_tokens=60, structured_output=spec))[0].outputs[0]
        content, calls = T.parse_tool_calls(fmt, o.text)
        assert o.finish_reason == "stop" and content is None and len(calls) == 1, o.text
        tool = next(t for t in (WEATHER, other) if t["function"]["name"] == calls[0]["name"])
        assert only in (None, calls[0]["name"])
        jsonschema.validate(json.loads(calls[0]["arguments"]), tool["function"]["parameters"])
    # parallel calls: several (this model repeats its call until max_tokens; all but the
    # cut one parse and follow the schema)
    spec = {"grammar": T.call_grammar(fmt, [WEATHER, other], parallel=True)}
    o = smollm.generate(prompt, SamplingParams(temperature=0, max_tokens=60, structured_output=spec))[0].outputs[0]
    content, calls = T.parse_tool_calls(fmt, o.text)
    assert "</tool_call>\n<tool_call>" in o.text and calls and all(json.loads(c["arguments"]) == {"a": 2, "b": 3} for c in calls), o.text


def test_forced_calls_keep_a_random_model_valid(tiny):
    """The forced-call grammar in both formats holds even a random model to a valid call."""
    for fmt in T.FORMATS.values():
        spec = {"grammar": T.call_grammar(fmt, [WEATHER], "get_weather")}
        params = [SamplingParams(temperature=1.0, seed=s, max_tokens=200, structured_output=spec) for s in range(4)]
        for out in tiny.generate(["x"] * 4, params):
            content, calls = T.parse_tool_calls(fmt, out.outputs[0].text)
            assert out.outputs[0].finish_reason == "stop" and content is None and len(calls) == 1
            jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])


def test_masks_touch_constrained_rows_only_and_allow_eos_at_the_end(tiny):
    import torch
    from miaotui.engine.structured import apply_masks
    tok, grammars = tiny.tokenizer, tiny.engine.grammars
    eos = sorted(tiny.engine.eos_ids)[0]
    V = tiny.engine.model_config.vocab_size
    choice = grammars.constraint(StructuredOutputParams(choice=["ab", "a"]))
    obj = grammars.constraint(StructuredOutputParams(json={"type": "object"}))
    logits = torch.randn(3, V)
    free_row = logits[1].clone()
    apply_masks(logits, [0, 2], [choice, obj])
    assert torch.equal(logits[1], free_row)                         # unconstrained: untouched
    allowed = lambda row: {tok.decode([t]) for t in torch.nonzero(row > float("-inf")).flatten().tolist()}  # noqa: E731
    assert allowed(logits[0]) == {"a"} and allowed(logits[2]) == {"{"}    # no EOS: incomplete
    assert not choice.advance(tok.encode("a", add_special_tokens=False)[0])   # "a": complete, "ab" may follow
    logits = torch.zeros(1, V)
    apply_masks(logits, [0], [choice])
    assert set(torch.nonzero(logits[0] == 0).flatten().tolist()) == {eos, tok.encode("b", add_special_tokens=False)[0]}
    assert choice.advance(tok.encode("b", add_special_tokens=False)[0])       # "ab": nothing more
