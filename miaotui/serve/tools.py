"""Tool calling for chat completions: the tool list in the prompt, the model's call format,
a grammar that forces calls (tool_choice "required" or a named function), and a parser
that turns the output (whole or streamed) into OpenAI `tool_calls`.

Formats (:data:`FORMATS`): "hermes", the `<tool_call>{"name": ..., "arguments": ...}</tool_call>`
blocks of Qwen, SmolLM2 and other ChatML models, and "llama3", Llama 3.1's bare
`{"name": ..., "parameters": ...}` object. A chat template that renders tools itself gets
them as transformers passes them (`tools=[{"type": "function", "function": {...}}]`, calls
and tool results as messages); for one that does not (SmolLM2-135M's), the tools are
described in the system message and calls and results are written into the turns in the
hermes format.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from miaotui.engine.structured import JSON_OPTIONS


@dataclass(frozen=True)
class ToolFormat:
    name: str
    start: str          # opens a call ("" : the call is the whole answer)
    end: str            # closes it
    args_key: str       # the arguments' key in the call object


FORMATS = {"hermes": ToolFormat("hermes", "<tool_call>\n", "\n</tool_call>", "arguments"),
           "llama3": ToolFormat("llama3", "", "", "parameters")}


def tool_format(chat_template: str | None) -> ToolFormat:
    """The call format the chat template teaches its model (hermes unless it is Llama 3's)."""
    t = chat_template or ""
    if "tools" in t and ("<|python_tag|>" in t or ("<|start_header_id|>" in t and '"parameters"' in t)):
        return FORMATS["llama3"]
    return FORMATS["hermes"]


def template_renders_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _arguments(value):
    """Arguments as templates expect them: a dict when the JSON string holds one."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def conversation(messages: list) -> list[dict]:
    """Request messages (serve.protocol.ChatMessage) as transformers-style dicts."""
    names: dict[str, str] = {}
    out = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        msg = {"role": role, "content": m.text()}
        if m.role == "assistant" and m.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                                 for c in m.tool_calls]
            names.update({c.id: c.function.name for c in m.tool_calls})
        if m.role == "tool":
            msg["tool_call_id"] = m.tool_call_id
            msg["name"] = m.name or names.get(m.tool_call_id, "")
        out.append(msg)
    return out


def tools_system_prompt(tools: list[dict], fmt: ToolFormat) -> str:
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    example = json.dumps({"name": "the function's name", fmt.args_key: {"argument": "value"}})
    return ("You can call functions to answer. Their signatures, one JSON object a line, are "
            f"inside <tools></tools>:\n<tools>\n{lines}\n</tools>\n\n"
            "To call a function, write its name and arguments as a JSON object inside "
            f"<tool_call></tool_call> tags:\n{fmt.start}{example}{fmt.end}")


def _plain_turns(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The conversation for a template that knows nothing of tools (hermes format)."""
    fmt = FORMATS["hermes"]
    out: list[dict] = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [fmt.start + json.dumps({"name": c["function"]["name"],
                                             "arguments": c["function"]["arguments"]}, ensure_ascii=False) + fmt.end
                     for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(([m["content"]] if m["content"] else []) + calls)})
        elif m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("_tool"):        # results of one turn's calls: one user turn
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": True})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    for m in out:
        m.pop("_tool", None)
    if tools:
        prompt = tools_system_prompt(tools, fmt)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def render(tokenizer, messages: list[dict], tools: list[dict] | None) -> str:
    """Prompt text for a conversation that may carry tools, tool calls and tool results."""
    uses_tools = tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    if not uses_tools:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if template_renders_tools(tokenizer.chat_template):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools or None)
    return tokenizer.apply_chat_template(_plain_turns(messages, tools), add_generation_prompt=True)


def call_grammar(fmt: ToolFormat, tools: list[dict], only: str | None = None,
                 parallel: bool = False) -> str:
    """A Lark grammar (llguidance) for the answer when a call is required: one call (or
    several with `parallel`) of the tools, or of the function named `only`, with the
    arguments following each function's JSON schema."""
    options = [{"type": "object",
                "properties": {"name": {"const": t["function"]["name"]},
                               fmt.args_key: t["function"].get("parameters") or {"type": "object"}},
                "required": ["name", fmt.args_key], "additionalProperties": False}
               for t in tools if only is None or t["function"]["name"] == only]
    schema = {"anyOf": options, "x-guidance": JSON_OPTIONS}
    quote = json.dumps
    call = f'{quote(fmt.start) if fmt.start else ""} %json {json.dumps(schema)} {quote(fmt.end) if fmt.end else ""}'
    repeat = ' ("\\n" call)*' if parallel and not only and fmt.start else ""
    return f"start: call{repeat}\ncall: {call}\n"


@dataclass
class ToolCallParser:
    """Splits a model's output, fed in deltas, into content and tool calls.

    `feed` returns the content that is certainly not part of a call and the calls completed
    so far; a possible call start is held back until it is decided. `finish` flushes."""
    fmt: ToolFormat
    buffer: str = ""
    in_call: bool = False
    undecided: bool = True          # llama3: nothing but whitespace seen yet
    calls: list[dict] = field(default_factory=list)

    def _parse(self, body: str) -> dict | None:
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = next((obj[k] for k in (self.fmt.args_key, "arguments", "parameters") if k in obj), {})
        return {"id": new_call_id(), "name": obj["name"],
                "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        self.buffer += delta
        if not self.fmt.start:                 # llama3: the whole answer is one call, or text
            if self.undecided and self.buffer.strip():
                self.undecided = False
                self.in_call = self.buffer.lstrip().startswith("{")
            if self.in_call or self.undecided:
                return "", []
            text, self.buffer = self.buffer, ""
            return text, []
        content, done = [], []
        start, end = self.fmt.start.strip(), self.fmt.end.strip()
        while True:
            if not self.in_call:
                at = self.buffer.find(start)
                if at < 0:
                    hold = next((k for k in range(min(len(start) - 1, len(self.buffer)), 0, -1)
                                 if start.startswith(self.buffer[-k:])), 0)
                    content.append(self.buffer[:len(self.buffer) - hold])
                    self.buffer = self.buffer[len(self.buffer) - hold:]
                    break
                content.append(self.buffer[:at])
                self.buffer, self.in_call = self.buffer[at + len(start):], True
            at = self.buffer.find(end)
            if at < 0:
                break
            body, self.buffer, self.in_call = self.buffer[:at], self.buffer[at + len(end):], False
            call = self._parse(body)
            if call is None:
                content.append(start + body + end)     # not a call after all: it is text
            else:
                done.append(call)
        self.calls += done
        return "".join(content), done

    def finish(self) -> tuple[str, list[dict]]:
        """The rest: an unterminated call that parses counts as one, else it is text."""
        rest, self.buffer = self.buffer, ""
        if not self.in_call:
            return rest, []
        self.in_call = False
        call = self._parse(rest)
        if call is None:
            return (self.fmt.start.strip() + rest if self.fmt.start else rest), []
        self.calls.append(call)
        return "", [call]


def parse_tool_calls(fmt: ToolFormat, text: str) -> tuple[str | None, list[dict]]:
    """A finished answer as (content or None, calls)."""
    parser = ToolCallParser(fmt)
    content, calls = parser.feed(text)
    more, last = parser.finish()
    content += more
    calls += last
    return (content.strip() or None) if calls else content, calls
