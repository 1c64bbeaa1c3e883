"""Subcommands of the optimize package: quantize, prune."""
from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model's linear weights and save it")
    p.add_argument("model", help="Hugging Face model directory")
    p.add_argument("out", help="output directory")
    p.add_argument("--method", choices=["int8", "int4", "gptq"], default="int8",
                   help="gptq: int4 with error compensation, calibrated on --calib text")
    p.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128])
    p.add_argument("--calib", help="gptq: a UTF-8 text file to calibrate on (4096 tokens are used)")
    p.set_defaults(func=run_quantize)
    add_prune_parser(sub)


def run_quantize(args) -> None:
    from miaotui.optimize.quantize import quantize_model_dir
    info = quantize_model_dir(args.model, args.out, args.method, args.group_size,
                              progress=sys.stderr.isatty(), calib=args.calib)
    print(f"[miaotui] wrote {info['out']} ({info['method']}, {info['bytes'] / 1e6:.1f} MB of weights)",
          file=sys.stderr)


def add_prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune a model (unstructured, N:M, layers or width) and save it")
    p.add_argument("model", help="Hugging Face model directory or GGUF file (dequantized first)")
    p.add_argument("out", help="output directory (a Hugging Face checkpoint)")
    p.add_argument("--method", choices=["magnitude", "wanda", "sparsegpt", "layers", "width"],
                   default="wanda", help="layers: drop whole blocks; width: remove MLP channels "
                   "(and --kv-groups attention head groups)")
    p.add_argument("--sparsity", type=float, default=0.5,
                   help="fraction of weights (layers: of blocks; width: of MLP channels) removed")
    p.add_argument("--pattern", help="N:M semi-structured (2:4, 4:8): N weights kept in every M "
                   "(magnitude, wanda, sparsegpt; replaces --sparsity)")
    p.add_argument("--kv-groups", type=int, default=0,
                   help="width: KV groups (a K/V head and its query heads) removed per layer")
    p.add_argument("--calib", help="a UTF-8 text file to calibrate on (all methods but magnitude)")
    p.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens used")
    p.set_defaults(func=run_prune)


def run_prune(args) -> None:
    from miaotui.config import MiaotuiError
    from miaotui.optimize.prune import prune_model_dir
    if args.calib_tokens < 64:
        raise MiaotuiError(f"--calib-tokens {args.calib_tokens}: need at least 64")
    info = prune_model_dir(args.model, args.out, args.method, args.sparsity, args.pattern,
                           args.calib, args.kv_groups, args.calib_tokens, progress=True)
    print(f"[miaotui] wrote {info['out']} ({info['method']}, {info['params'] / 1e6:.1f}M parameters, "
          f"{info['zero_weights'] / 1e6:.1f}M zero linear weights)", file=sys.stderr)
