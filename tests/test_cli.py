"""The `miaotui` command: arguments checked before anything loads, prompts from files and
stdin, the chat template by default, --version, defaults in --help, --debug anywhere."""
import io
import os
import subprocess
import sys
import time

import pytest

from miaotui import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*argv, stdin=None, timeout=60):
    env = {**os.environ, "PYTHONPATH": ROOT}
    code = ("import sys; from miaotui.cli import main\n"
            "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
            "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded', file=sys.stderr)\n"
            "sys.exit(rc)")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True,
                       text=True, input=stdin, timeout=timeout)
    return r, time.monotonic() - t0


@pytest.mark.parametrize("argv, message", [
    (["generate", "hi", "--temperature", "-1"], "--temperature: must be in [0, 100]"),
    (["generate", "hi", "--top-p", "2"], "--top-p: must be in (0, 1]"),
    (["generate", "hi", "--max-tokens", "-5"], "--max-tokens: must be >= 0"),
    (["generate", ""], "the prompt is empty"),
    (["generate", "   \n"], "the prompt is empty"),
    (["generate"], "no prompt"),
    (["generate", "hi", "--max-tokens", "0"], "--max-tokens 0 would generate nothing"),
    (["generate", "hi", "--raw", "--system", "be brief"], "cannot go with --raw"),
    (["generate", "-f", "/nonexistent/prompt.txt"], "cannot read /nonexistent/prompt.txt"),
    (["generate", "hi", "--model", "/nonexistent/model.gguf"], "model path not found"),
    (["generate", "hi", "--max-num-seqs", "0"], "--max-num-seqs: must be at least 1"),
    (["generate", "hi", "--max-model-len", "x"], "'x' is not an integer"),
    (["bench", "latency", "--prompt-len", "0"], "--prompt-len: must be at least 1"),
    (["perplexity", "--text", "t.txt", "--window", "1"], "--window: must be at least 2"),
    (["estimate", "--batch", "-2"], "--batch: must be at least 1"),
    (["generate", "hi", "--dtype", "float8"], "invalid choice: 'float8'"),
    (["chat", "--top-k", "-3"], "--top-k: must be"),
    (["serve", "--temperature", "1"], "unrecognized arguments"),
    (["serve", "--kv-cache-memory", "-1"], "--kv-cache-memory: must be"),
    (["generate", "hi", "--speculative", "draft"], "--speculative draft needs --draft-model"),
    (["generate", "hi", "--draft-model", "d.gguf"], "--draft-model needs --speculative draft"),
    (["generate", "hi", "--speculative", "draft", "--draft-model", "/nonexistent/d.gguf"],
     "draft model path not found"),
    (["serve", "--speculative", "ngram", "--num-spec-tokens", "40"], "--num-spec-tokens: must be at most 16"),
    (["generate", "hi", "--speculative", "medusa"], "invalid choice: 'medusa'"),
])
def test_bad_arguments_fail_before_loading(argv, message):
    r, seconds = run_cli(*argv)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert err[-1] == "torch not loaded"                      # nothing was loaded
    assert len(err) == 2 and message in err[0], err             # one line
    assert seconds < 10                                         # (well under 1 s on an idle machine)


def test_version_and_defaults_in_help():
    r, _ = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("miaotui 0.")
    r, _ = run_cli("generate", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for shown in ["(default: 256)", "(default: 0.0)", "(default: 1.0)", "(default: auto)",
                  "(default: 2048)"]:
        assert shown in text, shown
    for flag in ["--raw", "--system", "-f FILE", "--chat-template [FILE|NAME]", "--debug"]:
        assert flag in text, flag


def test_debug_after_the_subcommand_shows_the_traceback():
    r, _ = run_cli("generate", "hi", "--top-p", "2", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr
    r, _ = run_cli("--debug", "generate", "hi", "--top-p", "2")
    assert "Traceback" in r.stderr


@pytest.fixture
def ran(monkeypatch, tiny_llama_dir):
    """Run `generate` in-process on the tiny model; returns (prompt ids sent, stdout)."""
    sent = {}
    real_stream = cli.stream_to_stdout

    def spy(llm, prompt, params):
        sent["prompt"], sent["llm"], sent["params"] = prompt, llm, params
        real_stream(llm, prompt, params)

    monkeypatch.setattr(cli, "stream_to_stdout", spy)

    def run(*argv, stdin=None):
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        assert cli.main(["generate", *argv, "--model", tiny_llama_dir[0], "--max-tokens", "2"]) == 0
        return sent
    return run


def test_generate_applies_the_chat_template_by_default(ran):
    s = ran("hello")
    assert s["prompt"] == s["llm"].apply_chat_template([{"role": "user", "content": "hello"}])
    assert s["params"].max_tokens == 2
    s = ran("hello", "--system", "be brief")
    assert s["prompt"] == s["llm"].apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}])
    assert ran("hello", "--raw")["prompt"] == "hello"
    assert s["llm"].engine.config.max_num_seqs == 1        # one conversation: KV for one sequence


def test_generate_reads_long_prompts_from_a_file_or_stdin(ran, tmp_path):
    long = "word " * 50_000                     # 250 kB: past what one argv string may hold
    path = tmp_path / "prompt.txt"
    path.write_text("from a file")
    assert ran("-f", str(path), "--raw")["prompt"] == "from a file"
    assert ran("-", "--raw", stdin="from stdin")["prompt"] == "from stdin"
    assert len(long) > 131072                    # Linux's MAX_ARG_STRLEN
    path.write_text(long)
    assert cli.read_prompt(cli.build_parser().parse_args(["generate", "-f", str(path)])) == long


def test_chat_template_option_reaches_the_tokenizer(ran, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    s = ran("hello", "--chat-template", str(template))
    assert s["prompt"] == s["llm"].tokenizer.encode("[hello]", add_special_tokens=False)


def test_readme_commands_parse_and_the_chat_example_is_complete():
    """The README's commands are today's CLI, its first one relies on the default chat
    template, and its LLM.chat example passes max_tokens (the API default, 16 as in vLLM,
    cut the answer mid-sentence)."""
    import re
    import shlex
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    first = re.search(r"```bash\n(.*?)\n```", text, re.S).group(1)
    assert first.endswith('miaotui generate "What is the capital of France?"')
    parser = cli.build_parser()
    block = text.split("### Command line", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    for line in [first.split("&& ")[1]] + block.splitlines():
        argv = shlex.split(line.split("#")[0])[1:]
        if not argv or argv[0] in ("bench", "estimate") or "|" in argv or "<" in argv:
            continue
        args = parser.parse_args(argv)
        if hasattr(args, "prompt") and args.file is None:
            assert args.prompt, line
    chat = re.search(r"llm\.chat\((.*?)\)\n", text, re.S).group(1)
    assert "max_tokens=" in chat


@pytest.mark.parametrize("doc", ["README.md", "docs/benchmarks.md", "docs/architecture.md"])
def test_docs_name_files_that_exist(doc):
    """Every result file, script, image and relative link a page names is in the repository:
    a figure's JSON renamed or a script removed breaks the page's claim to be reproducible."""
    import re
    text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
    here = os.path.dirname(os.path.join(ROOT, doc))
    named = set(re.findall(r"(?<![\w./-])((?:results|scripts|docs)/[\w./-]+\.(?:json|py|sh|png))", text))
    links = {os.path.relpath(os.path.join(here, t), ROOT)
             for t in re.findall(r"\]\(([^)#:\s]+)\)", text)}     # [text](path), not URLs
    assert named, doc
    missing = sorted(f for f in named | links if not os.path.exists(os.path.join(ROOT, f)))
    assert not missing, f"{doc} names files that do not exist: {missing}"


def test_prefill_int8_flag_reaches_the_engine_config():
    parser = cli.build_parser()
    assert cli.engine_kwargs(parser.parse_args(["generate", "hi", "--prefill-int8"]))["prefill_int8"] is True
    assert cli.engine_kwargs(parser.parse_args(["generate", "hi"]))["prefill_int8"] is False
