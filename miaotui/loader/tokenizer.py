"""Tokenizers from a Hugging Face directory or GGUF metadata, chat templates, streaming decode.

Both sources end up as a `tokenizers.Tokenizer` (the Rust backend) wrapped in :class:`Tokenizer`,
which adds BOS/EOS handling, the end-of-sequence set used to stop generation, and chat templates.
"""
from __future__ import annotations

import functools
import json
import os
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from miaotui.config import MiaotuiError

# llama.cpp token types (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Tokens that close a chat turn; they stop generation when the chat template writes them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|end|>")

# Split patterns of byte-level BPE vocabularies, keyed by tokenizer.ggml.pre.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}


def _byte_chars() -> dict[int, str]:
    """GPT-2's table of printable stand-ins for the 256 byte values of a byte-level vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def _byte_level_pre_tokenizer(pre: str):
    """The pre-tokenizer a byte-level vocabulary was trained with (GPT-2's when unknown)."""
    if pre in _SPLITS:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # digits one by one, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    return gpt2


def _gguf_field(reader, key: str, default=None):
    """A metadata value from a GGUFReader or from GGUFCheckpoint.metadata (a dict, much faster)."""
    if isinstance(reader, dict):
        value = reader.get(key, default)
        return value.tolist() if hasattr(value, "tolist") else value
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _sentencepiece_merges(tokens, types, ranks, vocab) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece vocabulary: every split of a token into two tokens,
    best-ranked token first (then longer left piece), so BPE reproduces SentencePiece's choices."""
    ranked = []
    for index, token in enumerate(tokens):
        if len(token) < 2 or types[index] not in (NORMAL, USER_DEFINED):
            continue
        for cut in range(1, len(token)):
            left = token[:cut]
            if left in vocab and token[cut:] in vocab:
                ranked.append((ranks[index], -cut, cut - len(token), index, left, token[cut:]))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _gguf_merges(reader) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) for m in _gguf_field(reader, "tokenizer.ggml.merges", [])]


def _byte_level_backend(reader, tokens, types):
    """GPT-2 style byte-level BPE; returns the backend and the tokens as its vocabulary spells them."""
    chars = _byte_chars()
    alphabet = set(chars.values())
    spelled = [t if set(t) <= alphabet else "".join(chars[b] for b in t.encode()) for t in tokens]
    backend = Backend(models.BPE({t: i for i, t in enumerate(spelled)}, _gguf_merges(reader)))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(_gguf_field(reader, "tokenizer.ggml.pre", "default"))
    backend.decoder = decoders.ByteLevel()
    return backend, spelled


def _sentencepiece_backend(reader, tokens, types):
    """SentencePiece BPE (scores, byte fallback) as BPE; returns the backend and its spellings."""
    # Whitespace-only tokens are stored with real spaces; the model text uses "▁".
    taken = set(tokens)
    spelled = [t.replace(" ", "▁") if " " in t and not t.strip() and t.replace(" ", "▁") not in taken
               else t for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    merges = _gguf_merges(reader)
    if not merges:
        # Gemma's scores do not follow its merge order; its token order does.
        by_position = str(_gguf_field(reader, "general.architecture", "")).startswith("gemma")
        scores = _gguf_field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        ranks = range(len(tokens)) if by_position else [-s for s in scores]
        merges = _sentencepiece_merges(spelled, types, ranks, vocab)
    unk_id = _gguf_field(reader, "tokenizer.ggml.unknown_token_id")
    unk = None if unk_id is None else spelled[unk_id]
    backend = Backend(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if _gguf_field(reader, "tokenizer.ggml.add_space_prefix", True):
        backend.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme="first", split=False)
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence(steps)
    return backend, spelled


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _as_list(value) -> list:
    return value if isinstance(value, list) else [] if value is None else [value]


def _json_file(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise MiaotuiError(f"cannot read {path}: {exc}") from None


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _pick_template(value) -> str | None:
    """A chat template, or the "default" one of a list of named templates."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value}
        return named.get("default") or next(iter(named.values()), None)
    return value


def _dir_chat_template(path: str, config: dict) -> str | None:
    """chat_template.jinja, else chat_template.json, else tokenizer_config.json's template."""
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    from_json = _json_file(os.path.join(path, "chat_template.json")).get("chat_template")
    return _pick_template(from_json) or _pick_template(config.get("chat_template"))


class _GenerationTag(jinja2.ext.Extension):
    """HF's `{% generation %}...{% endgeneration %}` marker, rendered as a plain block."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _tojson(value, indent=None, separators=None, sort_keys=False, ensure_ascii=False):
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys,
                      ensure_ascii=ensure_ascii)


class Tokenizer:
    """A text <-> token-id converter plus the special tokens and chat template of a model."""

    def __init__(self, backend: Backend, *, bos_token_id=None, eos_token_id=None,
                 pad_token_id=None, add_bos=False, add_eos=False, chat_template=None,
                 extra_eos_ids=()):
        self.backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.pad_token_id = pad_token_id
        self.bos_token = backend.id_to_token(bos_token_id) if bos_token_id is not None else None
        self.eos_token = backend.id_to_token(eos_token_id) if eos_token_id is not None else None
        self.add_bos, self.add_eos = add_bos, add_eos
        self.chat_template: str | None = chat_template or None
        self._template = None
        turn_ends = {backend.token_to_id(t) for t in END_OF_TURN_TOKENS if t in (chat_template or "")}
        eos = {eos_token_id, *extra_eos_ids, *turn_ends}
        self.eos_token_ids: set[int] = {i for i in eos if i is not None}

    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        """Load a Hugging Face tokenizer directory (tokenizer.json and its companion files)."""
        if not os.path.isdir(path):
            raise MiaotuiError(f"tokenizer directory not found: {path}")
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise MiaotuiError(f"{path} has no tokenizer.json")
        try:
            backend = Backend.from_file(file)
        except Exception as exc:  # the Rust side raises a bare Exception on bad JSON
            raise MiaotuiError(f"{file} is not a valid tokenizer file ({_first_line(exc)})") from None
        config = _json_file(os.path.join(path, "tokenizer_config.json"))
        special = {**_json_file(os.path.join(path, "special_tokens_map.json")), **config}
        generation = _json_file(os.path.join(path, "generation_config.json"))

        def token_id(name: str):
            """Id of the named special token, else the first one generation_config.json gives."""
            text = _token_text(special.get(f"{name}_token"))
            found = backend.token_to_id(text) if text is not None else None
            return found if found is not None else next(iter(_as_list(generation.get(f"{name}_token_id"))), None)

        bos, eos, pad = token_id("bos"), token_id("eos"), token_id("pad")
        # Without explicit flags, do what tokenizer.json's post-processor does.
        plain = backend.encode("a", add_special_tokens=False).ids
        full = backend.encode("a").ids
        add_bos = config.get("add_bos_token", bos is not None and full[:1] == [bos] != plain[:1])
        add_eos = config.get("add_eos_token", eos is not None and full[-1:] == [eos] != plain[-1:])
        return cls(backend, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                   add_bos=bool(add_bos), add_eos=bool(add_eos),
                   chat_template=_dir_chat_template(path, config),
                   extra_eos_ids=_as_list(generation.get("eos_token_id")))

    @classmethod
    def from_gguf(cls, reader) -> "Tokenizer":
        """Build the tokenizer a GGUF file describes in its tokenizer.ggml.* metadata
        (`reader`: a gguf.GGUFReader, or the metadata dict of miaotui's GGUF loader)."""
        kind = _gguf_field(reader, "tokenizer.ggml.model")
        tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
        if kind not in ("gpt2", "llama") or not tokens:
            raise MiaotuiError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")
        types = _gguf_field(reader, "tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        build = _byte_level_backend if kind == "gpt2" else _sentencepiece_backend
        backend, spelled = build(reader, tokens, types)
        # Control tokens stay whole and are special; user-defined ones stay whole but are text.
        unchanged = [(t, k) for t, s, k in zip(tokens, spelled, types) if t == s]
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                    for t, k in unchanged if k in (CONTROL, UNKNOWN)])
        backend.add_tokens([AddedToken(t, normalized=False, special=False)
                            for t, k in unchanged if k == USER_DEFINED])
        return cls(backend,
                   bos_token_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id"),
                   eos_token_id=_gguf_field(reader, "tokenizer.ggml.eos_token_id"),
                   pad_token_id=_gguf_field(reader, "tokenizer.ggml.padding_token_id"),
                   add_bos=bool(_gguf_field(reader, "tokenizer.ggml.add_bos_token", kind == "llama")),
                   add_eos=bool(_gguf_field(reader, "tokenizer.ggml.add_eos_token", False)),
                   chat_template=_gguf_field(reader, "tokenizer.chat_template"))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with special tokens, BOS/EOS as the model wants (never doubled).

        Runs through encode_batch, which releases the GIL (encode does not): a long prompt
        tokenized in a worker thread then leaves the other threads running."""
        ids = self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        if add_special_tokens:
            if self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
                ids.insert(0, self.bos_token_id)
            if self.add_eos and self.eos_token_id is not None and ids[-1:] != [self.eos_token_id]:
                ids.append(self.eos_token_id)
        return ids

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """UTF-8 length of the longest vocabulary entry. No token stands for more bytes of
        text, so a text of B bytes has at least B / max_token_bytes tokens."""
        vocab = self.backend.get_vocab(with_added_tokens=True)
        return max(len(t.encode("utf-8", "surrogatepass")) for t in vocab)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [self.backend.id_to_token(i) for i in ids]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs) -> str:
        """Render a conversation to prompt text with the model's Jinja chat template."""
        if not self.chat_template:
            raise MiaotuiError("this model has no chat template; use a plain prompt instead")
        try:
            if self._template is None:
                env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                    extensions=[jinja2.ext.loopcontrols, _GenerationTag])
                env.filters["tojson"] = _tojson
                env.globals["raise_exception"] = _raise_exception
                env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
                self._template = env.from_string(self.chat_template)
            tokens = {"bos_token": self.bos_token, "eos_token": self.eos_token}
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **{k: v for k, v in tokens.items() if v is not None}, **kwargs)
        except Exception as exc:  # any failure inside user-supplied template code
            raise MiaotuiError(f"chat template failed: {_first_line(exc)}") from None


class IncrementalDetokenizer:
    """Turns generated ids, a few at a time, into text deltas.

    Each step decodes only a short window (the last emitted tokens plus the new ones) and emits
    the text beyond the window's known part, holding it back while it ends in U+FFFD (an
    incomplete UTF-8 character). The deltas add up to ``tokenizer.decode(generated ids)``, as
    with HF's TextStreamer; `prompt_ids` is accepted for interface compatibility but, for that
    reason, does not change the text.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.prompt_ids = list(prompt_ids or [])
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._start = 0  # the window starts here ...
        self._read = 0   # ... and ids before this are already text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _pending(self) -> str:
        """Text of ids not yet emitted, decoded in the context of the last emitted ones."""
        known = self._decode(self.ids[self._start:self._read])
        window = self._decode(self.ids[self._start:])
        return window[len(known):] if len(window) > len(known) else ""

    def _emit(self, delta: str) -> str:
        if delta:
            self._start, self._read = self._read, len(self.ids)
            self.text += delta
        return delta

    def add(self, new_ids: list[int]) -> str:
        """Append ids; return the newly completed text ("" while a character is incomplete)."""
        self.ids.extend(new_ids)
        delta = self._pending()
        return "" if delta.endswith("\ufffd") else self._emit(delta)

    def flush(self) -> str:
        """At the end of a stream, return held-back text (an invalid byte sequence as U+FFFD)."""
        return self._emit(self._pending())
