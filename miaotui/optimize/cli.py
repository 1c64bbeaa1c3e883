"""Subcommands of the optimize package: quantize."""
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


def run_quantize(args) -> None:
    from miaotui.optimize.quantize import quantize_model_dir
    info = quantize_model_dir(args.model, args.out, args.method, args.group_size,
                              progress=sys.stderr.isatty(), calib=args.calib)
    print(f"[miaotui] wrote {info['out']} ({info['method']}, {info['bytes'] / 1e6:.1f} MB of weights)",
          file=sys.stderr)
