"""The `miaotui` command: generate, chat, and the subcommands other packages register
(serve, bench, estimate, perplexity, quantize). User errors print one line, no traceback."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

from miaotui.config import MiaotuiError

# modules that add subcommands: each has add_parser(subparsers)
PLUGINS = ["miaotui.serve.cli", "miaotui.bench.cli", "miaotui.optimize.cli"]


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except None/False ones and where the help says it."""

    @staticmethod
    def _no_default(action) -> bool:
        d = action.default
        return d is None or d is False or d is argparse.SUPPRESS

    def add_argument(self, action):
        if not action.help and action.option_strings and not self._no_default(action):
            action.help = "(default: %(default)s)"
        super().add_argument(action)

    def _get_help_string(self, action):
        text = action.help or ""
        if self._no_default(action) or "default" in text:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every (sub)command shows its defaults, accepts --debug, and reports a usage error in
    one line (exit 2) instead of the usage block."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", Formatter)
        super().__init__(*a, **kw)
        if "--debug" not in self._option_string_actions:
            self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                              help="show tracebacks")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def at_least(lo: float, kind=int):
    """An argparse type: a number of `kind` no smaller than `lo` (a one-line usage error)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not value >= lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo} (got {text})")
        return value
    parse.__name__ = kind.__name__
    return parse


def positive(text: str) -> float:
    value = at_least(0.0, float)(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be positive (got 0)")
    return value


DTYPE_CHOICES = ["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"]
KV_DTYPE_CHOICES = ["auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16", "int8"]


def _size(text: str) -> int:
    from miaotui.bench.memory import parse_bytes
    try:
        return parse_bytes(text)
    except MiaotuiError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], not {text!r}")
    return v


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", default=None, help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="weight dtype")
    g.add_argument("--quantization", "-q", default=None, choices=["none", "int8", "int4", "gguf"],
                   help="none: dequantize GGUF; int8/int4: quantize at load (default: keep as stored)")
    g.add_argument("--group-size", type=at_least(1), default=32, help="int4 group size")
    g.add_argument("--kv-cache-dtype", default="auto", choices=KV_DTYPE_CHOICES,
                   help="auto: the weights' compute dtype")
    g.add_argument("--kv-cache-memory", type=positive, default=None,
                   help="KV cache size: bytes, or a fraction (< 1) of available memory (default: "
                        "room for min(max-num-seqs, 4) x max-model-len tokens, at most 1/4 of available)")
    g.add_argument("--memory-budget", type=_size, default=None, metavar="BYTES",
                   help="fit the process in this much memory (e.g. 1GiB, 800M): the KV cache gets "
                        "what the runtime, weights and workspace leave (replaces --kv-cache-memory)")
    g.add_argument("--max-model-len", type=at_least(1), default=None,
                   help="context window in tokens (default: the model's, at most 4096)")
    g.add_argument("--max-num-seqs", type=at_least(1), default=None,
                   help="sequences decoded together (default: 1 for generate and chat, else 64)")
    g.add_argument("--max-num-batched-tokens", type=at_least(1), default=2048, help="tokens per engine step")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--max-decode-delay", type=at_least(0.0, float), default=None, metavar="X",
                   help="while streams decode, cut long prompts into chunks so that a step takes at "
                        "most ~X decode steps (0: off; default: off, serve: 2.5)")
    g.add_argument("--threads", type=at_least(1), default=None, help="(default: all cores)")
    g.add_argument("--device", default="auto", metavar="auto|cpu|cuda[:N]",
                   help="auto: cuda when a CUDA device is available, else cpu")
    g.add_argument("--gpu-memory-utilization", type=_fraction, default=0.9, metavar="F",
                   help="CUDA: share of the device's memory to use; the KV cache gets what the "
                        "weights and a profiled step leave (default 0.9)")
    g.add_argument("--enforce-eager", action="store_true", help="CUDA: no CUDA graphs for decode steps")
    g.add_argument("--prefill-int8", action="store_true",
                   help="prompt tokens through quantized weights with int8 activations (faster "
                        "prefill, a small perplexity cost; default: float32 activations)")
    g.add_argument("--chat-template", default=None, nargs="?", const=None, metavar="FILE|NAME",
                   help="Jinja file, built-in name or template text (default: the model's own)")
    g = p.add_argument_group("speculative decoding (greedy output unchanged; sampled: the same distribution)")
    g.add_argument("--speculative", default=None, choices=["ngram", "draft", "self-int4"],
                   help="ngram: guess from the prompt and text so far; draft: a smaller model "
                        "(--draft-model); self-int4: the model's own weights in int4")
    g.add_argument("--num-spec-tokens", type=at_least(1), default=4, metavar="K",
                   help="guesses verified per step at most (1-16)")
    g.add_argument("--draft-model", default=None, metavar="PATH", help="the draft model (same vocabulary)")
    g.add_argument("--prompt-lookup-max", type=at_least(1), default=4, metavar="N",
                   help="ngram: longest suffix matched")
    g.add_argument("--prompt-lookup-min", type=at_least(1), default=2, metavar="N",
                   help="ngram: shortest suffix matched")
    g = p.add_argument_group("distributed (see README, Distributed)")
    g.add_argument("--tensor-parallel-size", "--tp", type=at_least(1), default=1, metavar="N",
                   help="split the model over N processes (spawned here; under torchrun: its world size)")
    g.add_argument("--dist-addr", default=None, metavar="HOST",
                   help="rendezvous address of the spawned workers (default: 127.0.0.1; torchrun: MASTER_ADDR)")
    g.add_argument("--dist-port", type=at_least(1), default=None, metavar="PORT",
                   help="rendezvous port (default: a free one; torchrun: MASTER_PORT)")
    g.add_argument("--dist-timeout", type=positive, default=60.0, metavar="S",
                   help="seconds to wait for every process at start-up")


def check_model_args(args) -> None:
    """What the argument types cannot check, before anything is loaded."""
    model = args.model or ""
    if ("/" in model or model.endswith(".gguf")) and not os.path.exists(model):
        raise MiaotuiError(f"model path not found: {model}")   # (bench shape names have no /)
    spec = speculative_config(args)
    if spec is not None and spec["model"] and not os.path.exists(spec["model"]):
        raise MiaotuiError(f"draft model path not found: {spec['model']}")


def speculative_config(args) -> dict | None:
    """--speculative and its options as LLM(speculative=...)'s dict (None: off), checked
    here without importing torch (engine/speculative.py checks the same at load)."""
    if getattr(args, "bench_spec", False):   # `bench spec` attaches its methods in turn
        return None
    if getattr(args, "speculative", None) is None:
        if getattr(args, "draft_model", None):
            raise MiaotuiError("--draft-model needs --speculative draft")
        return None
    if args.draft_model and args.speculative != "draft":
        raise MiaotuiError("--draft-model goes with --speculative draft")
    if args.speculative == "draft" and not args.draft_model:
        raise MiaotuiError("--speculative draft needs --draft-model PATH (a smaller model with the same vocabulary)")
    if args.num_spec_tokens > 16:
        raise MiaotuiError(f"--num-spec-tokens: must be at most 16, not {args.num_spec_tokens}")
    if args.prompt_lookup_min > args.prompt_lookup_max:
        raise MiaotuiError("--prompt-lookup-min must not exceed --prompt-lookup-max")
    return {"method": args.speculative, "num_tokens": args.num_spec_tokens, "model": args.draft_model,
            "prompt_lookup_max": args.prompt_lookup_max, "prompt_lookup_min": args.prompt_lookup_min}


def engine_kwargs(args) -> dict:
    kw = dict(dtype=args.dtype, quantization=args.quantization, group_size=args.group_size,
              kv_cache_dtype=args.kv_cache_dtype, max_model_len=args.max_model_len,
              max_num_batched_tokens=args.max_num_batched_tokens,
              enable_prefix_caching=not args.no_prefix_caching, num_threads=args.threads,
              prefill_int8=getattr(args, "prefill_int8", False),
              tensor_parallel_size=args.tensor_parallel_size, dist_addr=args.dist_addr,
              dist_port=args.dist_port, dist_timeout=args.dist_timeout, device=args.device,
              gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager)
    # unset: EngineConfig's defaults (sized from the model)
    for name in ("kv_cache_memory", "memory_budget", "max_num_seqs", "chat_template", "max_decode_delay"):
        if getattr(args, name, None) is not None:
            kw[name] = getattr(args, name)
    spec = speculative_config(args)
    if spec is not None:
        kw["speculative"] = spec
    if "memory_budget" in kw:   # the budget sizes the KV pool (over a command's default pool)
        kw.pop("kv_cache_memory", None)
    return kw


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most")
    g.add_argument("--temperature", "-t", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0: off")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def sampling_params(args):
    """The SamplingParams of the options; an out-of-range one is named as its flag."""
    from miaotui.sampling_params import InvalidParams, SamplingParams
    try:
        return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                              top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty,
                              presence_penalty=args.presence_penalty,
                              frequency_penalty=args.frequency_penalty, seed=args.seed,
                              stop=args.stop, ignore_eos=args.ignore_eos)
    except InvalidParams as e:
        flag = "--" + e.param.replace("_", "-")
        raise MiaotuiError(f"{flag}{str(e)[len(e.param):]}") from None


def load_llm(args):
    from miaotui.llm import LLM
    t0 = time.perf_counter()
    llm = LLM(args.model, progress=sys.stderr.isatty(), **engine_kwargs(args))
    print(f"[miaotui] loaded {llm.engine.model_path} in {time.perf_counter() - t0:.2f}s",
          file=sys.stderr)
    return llm


def stream_to_stdout(llm, prompt, params) -> None:
    """Stream one completion to stdout; report prefill and decode speed on stderr."""
    t0 = time.perf_counter()
    t_first = None
    n_prompt, n_out = 0, 0
    out = None
    for out in llm.stream(prompt, params):
        if t_first is None and out.outputs[0].token_ids:
            t_first = time.perf_counter()
        n_prompt, n_out = len(out.prompt_token_ids), len(out.outputs[0].token_ids)
        sys.stdout.write(out.outputs[0].delta_text)
        sys.stdout.flush()
    t1 = time.perf_counter()
    sys.stdout.write("\n")
    t_first = t_first or t1
    decode = (n_out - 1) / (t1 - t_first) if n_out > 1 and t1 > t_first else 0.0
    print(f"[miaotui] prompt {n_prompt} tok, prefill {n_prompt / (t_first - t0):.1f} tok/s, "
          f"time to first token {(t_first - t0) * 1000:.0f} ms; "
          f"generated {n_out} tok, decode {decode:.1f} tok/s", file=sys.stderr)
    m = out.metrics if out is not None else {}
    if m.get("spec_steps"):
        print(f"[miaotui] speculative: {m['spec_accepted']}/{m['spec_proposed']} guesses accepted "
              f"({100 * (m['acceptance_rate'] or 0):.0f}%), {m['mean_accepted_length']:.2f} per step",
              file=sys.stderr)


def read_prompt(args) -> str:
    """The prompt argument, `-` for standard input, or -f FILE (for prompts past the OS's
    argument limit)."""
    if args.file is not None and args.prompt is not None:
        raise MiaotuiError("give the prompt as an argument or with -f FILE, not both")
    try:
        if args.file is not None:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
        elif args.prompt == "-":
            text = sys.stdin.read()
        elif args.prompt is None:
            raise MiaotuiError("no prompt: give one as an argument, - to read standard input, "
                               "or -f FILE")
        else:
            text = args.prompt
    except OSError as e:
        raise MiaotuiError(f"cannot read {args.file}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise MiaotuiError(f"the prompt is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise MiaotuiError("the prompt is empty")
    return text


def chat_prompt(llm, args, text: str):
    """The prompt to run: the model's chat template around `text` (with --system), or the
    text itself with --raw or when the model has no template."""
    if args.raw:
        return text
    if not llm.tokenizer.chat_template:
        if args.system:
            raise MiaotuiError("--system needs a chat template, and this model has none "
                               "(give one with --chat-template)")
        print("[miaotui] the model has no chat template: plain completion", file=sys.stderr)
        return text
    messages = [{"role": "system", "content": args.system}] if args.system else []
    return llm.apply_chat_template(messages + [{"role": "user", "content": text}])


def generation_params(args):
    """sampling_params() for commands that exist to generate: --max-tokens 0 is refused."""
    params = sampling_params(args)
    if params.max_tokens == 0:
        raise MiaotuiError("--max-tokens 0 would generate nothing; give at least 1")
    return params


def cmd_generate(args) -> None:
    params = generation_params(args)
    if args.raw and args.system:
        raise MiaotuiError("--system needs the chat template; it cannot go with --raw")
    text = read_prompt(args)
    llm = load_llm(args)
    stream_to_stdout(llm, chat_prompt(llm, args, text), params)


def cmd_chat(args) -> None:
    params = generation_params(args)
    llm = load_llm(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("[miaotui] chat: empty line or Ctrl-D to quit, /reset to clear history", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        ids = llm.apply_chat_template(history)
        reply = []
        for out in llm.stream(ids, params):
            reply.append(out.outputs[0].delta_text)
            sys.stdout.write(out.outputs[0].delta_text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def version() -> str:
    from miaotui import __version__
    return f"miaotui {__version__} (Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="miaotui", description="秒推: fast LLM inference")
    parser.add_argument("--version", action="version", version=version())
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="answer a prompt (streamed), in the model's chat template",
                       description="Answer one prompt, streamed to stdout. The prompt goes through "
                                   "the model's chat template, as one user turn, unless --raw.")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt; - reads standard input")
    p.add_argument("-f", "--file", default=None, help="read the prompt from this UTF-8 file")
    p.add_argument("--raw", action="store_true",
                   help="plain completion of the prompt text, no chat template")
    p.add_argument("--system", default=None, help="system prompt (chat template only)")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate, max_num_seqs=1)   # one conversation: KV for one sequence
    p = sub.add_parser("chat", help="interactive chat with history")
    p.add_argument("--system", default=None, help="system prompt")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat, max_num_seqs=1)
    for name in PLUGINS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        debug = getattr(args, "debug", False)
        if hasattr(args, "kv_cache_memory"):      # every command with model options
            check_model_args(args)
        if hasattr(args, "top_p"):                # every command with sampling options
            sampling_params(args)
        if hasattr(args, "dist_timeout") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # under torchrun, ranks > 0 only run the model
            from miaotui.distributed.worker import torchrun_worker_main
            if torchrun_worker_main(args.dist_timeout):
                return 0
        args.func(args)
        return 0
    except MiaotuiError as e:
        if debug:
            raise
        print(f"miaotui: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
