"""Tokenizers from a Hugging Face directory or GGUF metadata, chat templates, streaming decode.

Both sources end up as a `tokenizers.Tokenizer` (the Rust backend) wrapped in :class:`Tokenizer`,
which adds BOS/EOS handling, the end-of-sequence set used to stop generation, and chat templates.
"""
from __future__ import annotations

import functools
import json
import os
import re
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

# Pre-tokenizers of byte-level BPE vocabularies, keyed by tokenizer.ggml.pre, as llama.cpp
# defines them (src/llama-vocab.cpp): regexes applied in turn, each splitting every piece into
# its matches and the text between them; then whether a piece that is itself a token is taken
# whole ("ignore_merges"). Where llama.cpp rewrote a pattern for std::regex, the original
# (tokenizer.json) pattern is used: Oniguruma, which `tokenizers` uses, runs it as written.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _char_class(spec: str) -> str:
    """A regex character class from hex code points and ranges ("41-5a b5 ...")."""
    char = lambda h: re.escape(chr(int(h, 16)))  # noqa: E731
    return "[" + "".join("-".join(map(char, item.split("-"))) for item in spec.split()) + "]"


# DeepSeek LLM's letters and punctuation (llama.cpp spells them out, for std::regex).
_DEEPSEEK_LETTERS = _char_class(
    "41-5a 61-7a b5 c0-d6 d8-f6 f8-1ba 1bc-1bf 1c4-293 295-2af 370-373 376 377 37b-37d 37f "
    "386 388-38a 38c 38e-3a1 3a3-3f5 3f7-481 48a-52f 531-556 10a0-10c5 13a0-13f5 13f8-13fd "
    "1c90-1cba 1cbd-1cbf 1d00-1d2b 1d6b-1d77 1d79-1d9a 1e00-1f15 1f18-1f1d 1f20-1f45 "
    "1f48-1f4d 1f50-1f57 1f59 1f5b 1f5d 1f5f-1f7d 1f80-1fb4 1fb6-1fbc 1fbe 1fc2-1fc4 "
    "1fc6-1fcc 1fd0-1fd3 1fd6-1fdb 1fe0-1fec 1ff2-1ff4 1ff6-1ffc 2102 2107 210a-2113 2115 "
    "2119-211d 2124 2126 2128 212a-212d 212f-2134 2139 213c-213f 2145-2149 214e 2183 2184 "
    "2c00-2c7b 2c7e-2ce4 2ceb-2cee 2cf2 2cf3 a640-a66d a680-a69b a722-a76f a771-a787 "
    "a78b-a78e ab70-abbf fb00-fb06 fb13-fb17 ff21-ff3a ff41-ff5a 10400-1044f 104b0-104d3 "
    "104d8-104fb 10c80-10cb2 10cc0-10cf2 118a0-118df 1e900-1e943")
_DEEPSEEK_PUNCT = _char_class("21-2f 3a-7e ff01-ff0f ff1a-ff5e 2018-201f 3000-3002")
_CJK = _char_class("4e00-9fa5 800-4e00 ac00-d7ff")  # CJK, and the blocks llama.cpp groups with it
_DEEPSEEK_LLM = [r"[\r\n]", r"\s?" + _DEEPSEEK_LETTERS + "+", r"\s?" + _DEEPSEEK_PUNCT + "+", r"\s+$",
                 _CJK + "+", r"\p{N}+"]
_DEEPSEEK_CODER = [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK + "+", r"\p{N}"]
_PRE_TOKENIZERS: dict[str, tuple[list[str], bool]] = {
    "default": ([r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"], False),
    "llama-bpe": ([_LLAMA3], True),        # Llama 3
    "qwen2": ([_QWEN2], False),            # Qwen2, Qwen3
    "qwen35": ([_QWEN35], False),
    "gpt-2": ([_GPT2], False),
    "smollm": ([r"\p{N}", _GPT2], False),  # SmolLM; also StarCoder's and Command-R's
    "tekken": ([_TEKKEN], True),           # Mistral NeMo and later Mistral models
    "falcon": ([r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"], False),
    "deepseek-llm": (_DEEPSEEK_LLM, False),
    "deepseek-coder": (_DEEPSEEK_CODER, False),
}
# Names llama.cpp gives the same pre-tokenizer (one branch of its tokenizer.ggml.pre switch).
_PRE_ALIASES = {
    **dict.fromkeys(["llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano"], "llama-bpe"),
    **dict.fromkeys(["deepseek-r1-qwen", "kormo", "f2llmv2"], "qwen2"),
    **dict.fromkeys(["phi-2", "mpt", "olmo", "jais", "exaone4", "gigachat", "a.x-4.0", "mellum"], "gpt-2"),
    **dict.fromkeys(["starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"], "smollm"),
}


def gguf_pre_tokenizers() -> list[str]:
    """The tokenizer.ggml.pre values of byte-level GGUF vocabularies miaotui tokenizes."""
    return sorted([*_PRE_TOKENIZERS, *_PRE_ALIASES])


def _byte_chars() -> dict[int, str]:
    """GPT-2's table of printable stand-ins for the 256 byte values of a byte-level vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def _pre_name(pre) -> str:
    """The tokenizer.ggml.pre value under which _PRE_TOKENIZERS has this one (none: "default")."""
    return _PRE_ALIASES.get(pre, pre or "default")


def _byte_level_pre_tokenizer(pre) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """The pre-tokenizer a byte-level vocabulary was trained with, and its ignore_merges flag."""
    name = _pre_name(pre)
    if name not in _PRE_TOKENIZERS:
        raise MiaotuiError(
            f"unsupported GGUF pre-tokenizer tokenizer.ggml.pre={pre!r}: miaotui would split the text "
            f"differently from the model's own tokenizer (supported: {', '.join(gguf_pre_tokenizers())})")
    patterns, ignore_merges = _PRE_TOKENIZERS[name]
    steps = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps), ignore_merges


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
    """GPT-2 style byte-level BPE; returns the backend and the tokens as its vocabulary spells them.
    Control and user-defined tokens keep their stored text: they are matched in the raw text."""
    chars = _byte_chars()
    alphabet = set(chars.values())
    spelled = [t if set(t) <= alphabet or k in (CONTROL, USER_DEFINED, UNKNOWN)
               else "".join(chars[b] for b in t.encode()) for t, k in zip(tokens, types)]
    pre_tokenizer, ignore_merges = _byte_level_pre_tokenizer(_gguf_field(reader, "tokenizer.ggml.pre"))
    backend = Backend(models.BPE({t: i for i, t in enumerate(spelled)}, _gguf_merges(reader),
                                 ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tokenizer
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
    escape = normalizers.Replace(" ", "▁")
    if _gguf_field(reader, "tokenizer.ggml.add_space_prefix", True):
        # SentencePiece's dummy prefix: a space before every run of text (the text at the start
        # and after each special token), even one that starts with a space: " Hello" is
        # "▁▁Hello". Metaspace(prepend_scheme=...) skips text already starting with a space.
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), escape])
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        backend.normalizer = escape
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


# --- built-in chat templates -----------------------------------------------------------------------
# For model files that carry none (llama.cpp keeps such a list too, src/llama-chat.cpp). Each is
# the model family's official Hugging Face template, shortened where it only formats tools.
_ALTERNATE = ("{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
              "{% endif %}")
_SYSTEM_FIRST = ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
                 "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}"
                 "{% set loop_messages = messages %}{% endif %}")
_BUILTIN_CHAT_TEMPLATES = {
    # SmolLM, Qwen2/3 and other ChatML models (no default system prompt).
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
               " + '<|im_end|>' + '\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    # Gemma 2/3 (google/gemma-3-*-it): the system prompt opens the first user turn.
    "gemma": ("{{ bos_token }}" + _SYSTEM_FIRST.replace("set system = messages[0]['content']",
                                                        "set system = messages[0]['content'] + '\n\n'")
              + "{% for message in loop_messages %}" + _ALTERNATE
              + "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
              "{{ '<start_of_turn>' + role + '\n' + (system if loop.first else '') }}"
              "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
    # Llama 3.x Instruct.
    "llama-3": ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role']"
                " + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
                "{% endif %}"),
    # Llama 2 Chat: <<SYS>> inside the first [INST], BOS before every user turn.
    "llama-2": (_SYSTEM_FIRST + "{% for message in loop_messages %}" + _ALTERNATE
                + "{% if loop.first and system %}{% set content = '<<SYS>>\n' + system + '\n<</SYS>>\n\n'"
                " + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
                "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
                "{% else %}{{ ' ' + content | trim + ' ' + eos_token }}{% endif %}{% endfor %}"),
    # Mistral Instruct v0.1-v0.3 ([INST] ... [/INST]; a system prompt opens the first user turn).
    "mistral": ("{{ bos_token }}" + _SYSTEM_FIRST + "{% for message in loop_messages %}" + _ALTERNATE
                + "{% if message['role'] == 'user' %}{{ '[INST] ' + (system + '\n\n' if loop.first and system"
                " else '') + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
                "{% endif %}{% endfor %}"),
    # Zephyr / TinyLlama-Chat.
    "zephyr": ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token"
               " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
}


def builtin_chat_templates() -> list[str]:
    """Names of the built-in chat templates (for `chat_template=` / `--chat-template NAME`)."""
    return sorted(_BUILTIN_CHAT_TEMPLATES)


def load_chat_template(value: str) -> str:
    """A chat template given as a Jinja file's path, a built-in name, or the template itself
    (text containing '{{' or '{%'); returns its Jinja source."""
    if os.path.isfile(value):
        try:
            with open(value, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise MiaotuiError(f"cannot read chat template {value}: {exc}") from None
    if value in _BUILTIN_CHAT_TEMPLATES:
        return _BUILTIN_CHAT_TEMPLATES[value]
    if "{{" in value or "{%" in value:
        return value
    raise MiaotuiError(f"chat template {value!r} is neither a file nor a built-in template "
                       f"({', '.join(builtin_chat_templates())}) nor Jinja text")


def guess_chat_template(tokenizer: "Tokenizer", architecture: str | None = None) -> str | None:
    """The built-in template for a model file without one, from its special tokens and its
    architecture (as llama.cpp guesses); None when nothing fits (GPT-2 has no chat format)."""
    def has(*tokens):
        return all(tokenizer.backend.token_to_id(t) is not None for t in tokens)
    arch = (architecture or "").lower()
    if has("<start_of_turn>", "<end_of_turn>") or arch.startswith("gemma"):
        return "gemma"
    if has("<|im_start|>", "<|im_end|>") or arch.startswith("qwen"):
        return "chatml"
    if has("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        return "llama-3"
    if has("[INST]", "[/INST]"):
        return "mistral"
    if arch in ("llama", "mistral") and tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>":
        return "llama-2"  # a SentencePiece Llama; Llama 2 Chat's format is the usual one
    return None


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
        self._eos_ids = {i for i in (eos_token_id, *extra_eos_ids) if i is not None}
        self.eos_token_ids: set[int] = set(self._eos_ids)
        self.chat_template: str | None = None
        self.chat_template_source = "none"
        self.set_chat_template(chat_template, "the model's")

    def set_chat_template(self, template: str | None, source: str = "given") -> None:
        """Use this Jinja chat template (None: none); the tokens it ends turns with stop generation.
        `source` says where it came from (for messages): "the model's", "built-in 'gemma'", a path."""
        self.chat_template = template or None
        self.chat_template_source = source if template else "none"
        self._template = None
        turn_ends = {self.backend.token_to_id(t) for t in END_OF_TURN_TOKENS if t in (template or "")}
        self.eos_token_ids = self._eos_ids | {i for i in turn_ends if i is not None}

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
        # llama.cpp's default when the file does not say (Llama 3 and Tekken vocabularies add BOS).
        pre = _pre_name(_gguf_field(reader, "tokenizer.ggml.pre"))
        add_bos = kind == "llama" or pre in ("llama-bpe", "tekken")
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
                   add_bos=bool(_gguf_field(reader, "tokenizer.ggml.add_bos_token", add_bos)),
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
            raise MiaotuiError("this model has no chat template; pass chat_template= (a Jinja file or one of "
                               f"{', '.join(builtin_chat_templates())}) or use a plain prompt")
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
