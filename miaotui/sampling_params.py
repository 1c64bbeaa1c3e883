"""Sampling parameters, in vLLM's shape, validated up front."""
from __future__ import annotations

import json as _json
from dataclasses import dataclass, field

from miaotui.config import MiaotuiError


class InvalidParams(MiaotuiError, ValueError):
    """A sampling parameter is out of range; `param` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass
class StructuredOutputParams:
    """Constrain the output to a language (vLLM's guided decoding): exactly one of a JSON
    schema (`json`, a dict or its JSON text), any JSON object (`json_object`), a `regex`
    (Rust regex syntax, matched in full), one of the strings in `choice`, or a `grammar`
    (Lark, as llguidance reads it, or GBNF)."""
    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self):
        given = [n for n in ("json", "regex", "choice", "grammar") if getattr(self, n) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise InvalidParams("structured_output", "give exactly one of json, json_object, regex, "
                                f"choice, grammar (got {', '.join(given) or 'none'})")
        if isinstance(self.json, str):
            try:
                self.json = _json.loads(self.json)
            except ValueError as exc:
                raise InvalidParams("structured_output", f"json: the schema is not valid JSON ({exc})") from None
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise InvalidParams("structured_output", "json: a schema is a JSON object")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise InvalidParams("structured_output", "choice: a non-empty list of non-empty strings")
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not (isinstance(getattr(self, name), str) and getattr(self, name)):
                raise InvalidParams("structured_output", f"{name}: a non-empty string")

    @property
    def key(self) -> tuple:
        """What identifies the compiled grammar (the cache key)."""
        if self.json is not None:
            return ("json", _json.dumps(self.json, sort_keys=True))
        if self.json_object:
            return ("json_object",)
        if self.choice is not None:
            return ("choice", tuple(self.choice))
        return ("regex", self.regex) if self.regex is not None else ("grammar", self.grammar)


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16          # None: up to the end of the context window
    temperature: float = 1.0             # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                       # 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None          # top-N log-probs per generated token (0: just the chosen)
    prompt_logprobs: int | None = None   # log-probs of the prompt tokens (scoring)
    # prompt tokens before this index need no log-prob: they may come from the prefix cache
    # (their entries are then None), so candidates scored after a shared prefix compute it once
    prompt_logprobs_start: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # a grammar the output must follow (a StructuredOutputParams, or a dict of its fields)
    structured_output: StructuredOutputParams | dict | None = None
    stop_list: list[str] = field(init=False, repr=False)

    def __post_init__(self):
        self.stop_list = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.structured_output, dict):
            try:
                self.structured_output = StructuredOutputParams(**self.structured_output)
            except TypeError as exc:
                raise InvalidParams("structured_output", str(exc)) from None
        checks = [
            ("n", self.n >= 1, "must be >= 1"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 0, "must be >= 0"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be -1, 0 (off) or a positive integer"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "must be in (0, 10]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("min_tokens", self.min_tokens >= 0, "must be >= 0"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             "must be in [0, 20]"),
            ("prompt_logprobs_start", self.prompt_logprobs_start >= 0, "must be >= 0"),
            ("stop", all(isinstance(s, str) and s for s in self.stop_list), "must be non-empty strings"),
        ]
        for name, ok, msg in checks:
            if not ok:
                raise InvalidParams(name, f"{msg} (got {getattr(self, name)!r})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
