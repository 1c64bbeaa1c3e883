"""Compile the CUDA path's Triton kernels for a GPU without having one.

Triton's interpreter (the CPU tests) runs the kernels' Python, not the compiler: errors that
only the compiler sees (types, layouts, tl.dot shapes) and register spills would first show
on a GPU. This script compiles every variant the wrappers in miaotui/kernels/triton_ops.py
pick (block sizes from their own config functions, for realistic shapes) down to a cubin
for sm_90 (H100/H200) with the ptxas shipped in the triton wheel, and reports each
variant's registers, spilled bytes (STACK) and shared memory.

    python scripts/triton_compile_check.py [--quick] [--arch 90] [--json results/triton_compile.json]

Exit status 1 when a variant does not compile. Needs TRITON_INTERPRET unset (the script
drops it before importing triton).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import types

os.environ.pop("TRITON_INTERPRET", None)   # before triton is imported: compiled kernels

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from miaotui.kernels import triton_ops as T  # noqa: E402

PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
# runtime ints the JIT would not see as multiples of 16 (group sizes, counts, floats)
ODD = {"G", "M", "N", "KVH", "HEADS", "H", "k_per_split"}


T._device_sms = lambda index: 132   # an H100/H200's multiprocessors (no device to ask here)


def fake_cuda(dtype):
    """Enough of a tensor for the wrappers' config functions."""
    return types.SimpleNamespace(device=types.SimpleNamespace(type="cuda", index=0), dtype=dtype)


def resources(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED):(\d+)", out)}
    return {"regs": found.get("reg"), "spill_bytes": found.get("stack")}


def compile_variant(kernel, types_: dict, consts: dict, warps: int, arch: int) -> dict:
    """Compile one specialisation as the JIT would: pointers 16-byte aligned, strides and
    sizes divisible by 16 unless named in ODD, floats as fp32."""
    names = kernel.arg_names
    sig = {n: "constexpr" if n in consts else types_.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n].startswith("*") or (sig[n] == "i32" and n not in ODD)}
    k = triton.compile(ASTSource(kernel, sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    return {"shared_bytes": k.metadata.shared, **resources(k.asm["cubin"])}


def variants(quick: bool):
    """(kernel name, description, kernel, arg types, constexprs, num_warps)."""
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]
    for dt in dtypes:
        p = PTR[dt]
        dot_ty = T._TL[dt] if dt != torch.float32 else tl.float32
        prec = "ieee" if dt == torch.float32 else "tf32"
        attn = {"q_ptr": p, "k_ptr": p, "v_ptr": p, "tab_ptr": "*i32", "a_ptr": "*i32", "b_ptr": "*i32",
                "out_ptr": p, "lse_ptr": "*fp32", "scale_log2": "fp32", "softcap": "fp32"}
        shapes = [(128, 4)] if quick else [(128, 4), (64, 8), (256, 2), (128, 1), (80, 5)]
        for D, G in shapes:
            for decode, splits, cap in ((True, 1, False), (True, 4, True), (False, 1, False), (False, 1, True)):
                bm, bg, bn, warps = T._attn_blocks(fake_cuda(dt), D, G, 1 if decode else 2)
                types_ = dict(attn, out_ptr="*fp32") if splits > 1 else attn
                yield ("attention", f"{dt} D={D} G={G} {'decode' if decode else 'prefill'} splits={splits} "
                       f"softcap={cap}", T._attention_kernel, types_,
                       dict(DECODE=decode, SPLITS=splits, SOFTCAP=cap, DOT_TY=dot_ty, PREC=prec, BLOCK_M=bm,
                            BLOCK_G=bg, BLOCK_D=triton.next_power_of_2(D), BLOCK_N=bn), warps)
        yield ("merge", f"{dt}", T._merge_kernel, {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": p},
               dict(SPLITS=4, BLOCK_S=4, BLOCK_D=128), 4)
        for M in ((1, 16) if quick else (1, 3, 16, 32, 64, 512)):
            dot, bm, bn, bk, splits, warps = T._qmm_config(fake_cuda(dt), M, 4096, 4096)
            for bits, group, has_min in ((8, 4096, False), (8, 32, False), (8, 16, False), (4, 32, False),
                                         (4, 32, True), (4, 128, True)):
                scales = 1 if group == 4096 or group % bk == 0 else 2 if bk % group == 0 else 0
                yield ("quant_matmul", f"{dt} M={M} int{bits} block={group} min={has_min} splits={splits}",
                       T._quant_matmul_kernel,
                       {"x_ptr": p, "q_ptr": "*i8" if bits == 8 else "*u8", "s_ptr": "*fp16", "mn_ptr": "*fp16",
                        "y_ptr": p if splits == 1 else "*fp32", "offset": "fp32"},
                       dict(BITS=bits, HAS_MIN=has_min, SCALES=scales, GROUP=group if scales == 2 else 1,
                            DOT=dot, DOT_TY=dot_ty, PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), warps)
        norm = {"x_ptr": p, "r_ptr": p, "w_ptr": "*fp32", "y_ptr": p, "ro_ptr": p, "eps": "fp32", "offset": "fp32"}
        for n, add in ((4096, True), (128, False)):
            yield ("rms_norm", f"{dt} N={n} add={add}", T._rms_norm_kernel, norm,
                   dict(ADD=add, BLOCK=n), T._norm_warps(n))
        yield ("rotary", f"{dt}", T._rotary_kernel, {"x_ptr": p, "cos_ptr": "*fp32", "sin_ptr": "*fp32"},
               dict(BLOCK_H=32, BLOCK_D=64), 4)
        for gelu in (False, True):
            yield ("gated", f"{dt} gelu={gelu}", T._gated_kernel, {"x_ptr": p, "y_ptr": p},
                   dict(GELU=gelu, BLOCK=1024), 4)
        yield ("store_kv", f"{dt}", T._store_kv_kernel,
               {"k_ptr": p, "v_ptr": p, "kc_ptr": p, "vc_ptr": p, "slot_ptr": "*i32"},
               dict(BLOCK_H=8, BLOCK_D=128), 4)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="bf16 and one shape per kernel only")
    ap.add_argument("--arch", type=int, default=90, help="compute capability (90: H100/H200)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    rows, failed = [], 0
    for name, desc, kernel, types_, consts, warps in variants(args.quick):
        row = {"kernel": name, "variant": desc, "num_warps": warps}
        try:
            row.update(compile_variant(kernel, types_, consts, warps, args.arch))
        except Exception as e:   # report every failure, not just the first
            failed += 1
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
        rows.append(row)
        spill = row.get("spill_bytes")
        print(f"{'FAIL' if 'error' in row else 'ok  '} {name:13s} {desc:60s} "
              + (row["error"] if "error" in row else f"regs {row['regs']} spill {spill} B shared {row['shared_bytes']}"),
              flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "triton": triton.__version__, "variants": rows}, f, indent=1)
    print(f"{len(rows) - failed}/{len(rows)} variants compiled for sm_{args.arch}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
