"""The `miaotui` command: generate, chat, and the subcommands other packages register
(serve, bench, estimate, perplexity, quantize). User errors print one line, no traceback."""
from __future__ import annotations

import argparse
import importlib
import sys
import time

from miaotui.config import MiaotuiError

# modules that add subcommands: each has add_parser(subparsers)
PLUGINS = ["miaotui.serve.cli", "miaotui.bench.cli", "miaotui.optimize.cli"]


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", default=None, help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    g.add_argument("--quantization", "-q", default=None,
                   help="none (dequantize GGUF) | int8 | int4 (default: keep as stored)")
    g.add_argument("--group-size", type=int, default=32, help="int4 group size")
    g.add_argument("--kv-cache-dtype", default="auto", help="auto (the weights' compute dtype) | fp16 | int8")
    g.add_argument("--kv-cache-memory", type=float, default=1 << 30, help="bytes, or a fraction of free memory")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--threads", type=int, default=None)


def engine_kwargs(args) -> dict:
    return dict(dtype=args.dtype, quantization=args.quantization, group_size=args.group_size,
                kv_cache_dtype=args.kv_cache_dtype, kv_cache_memory=args.kv_cache_memory,
                max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                enable_prefix_caching=not args.no_prefix_caching, num_threads=args.threads)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", "-t", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def sampling_params(args):
    from miaotui.sampling_params import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, seed=args.seed,
                          stop=args.stop, ignore_eos=args.ignore_eos)


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


def cmd_generate(args) -> None:
    llm = load_llm(args)
    prompt = args.prompt
    if args.chat_template:
        prompt = llm.apply_chat_template([{"role": "user", "content": prompt}])
    stream_to_stdout(llm, prompt, sampling_params(args))


def cmd_chat(args) -> None:
    llm = load_llm(args)
    params = sampling_params(args)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="miaotui", description="秒推: fast LLM inference")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="complete a prompt (streamed)")
    p.add_argument("prompt")
    p.add_argument("--chat-template", action="store_true", help="wrap the prompt as a user chat turn")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("chat", help="interactive chat with history")
    p.add_argument("--system", default=None, help="system prompt")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)
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
