#!/usr/bin/env bash
# The CUDA path's check (issue 15) in one command for the device tool's `run` (one H200,
# Python 3.12, torch 2.11+cu130, triton 3.6, transformers 5.17, no network; it runs in
# the repository root and $OUT comes back). Stays under ~8 minutes: each stage has its own
# time limit (`timeout`), capped by what is left of the whole budget; a stage that fails or
# runs out of time does not stop the others. Everything is logged to $OUT/log; each suite
# writes $OUT/results/gpu_<suite>.json (without $OUT: results/gpu/ and results/gpu/log).
#
# Stages: versions and nvidia-smi; the carried wheels (.whl/) installed; MIAOTUI_NO_KERNELS=1
# (the CPU kernels are not built, see below); the tests marked gpu (`pytest -m gpu`) in the
# GPU test files (tests/test_gpu_*.py but the bench's own smoke test; their other tests run
# the kernels in Triton's interpreter, checked on the CPU machine); then `miaotui bench gpu`
# suite by suite (miaotui/bench/gpu.py): parity, decode, throughput, quant.
#
# Preparation, once, on the CPU machine, in the repository root (the device lacks gguf
# and llguidance; fastapi/uvicorn are not needed: nothing here imports the server):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux1_x86_64 --platform manylinux_2_31_x86_64 \
#     -d .whl gguf==0.19.0 llguidance==1.9.1
#   (3.2 MB together: gguf-0.19.0-py3-none-any.whl 0.1 MB, llguidance-1.9.1-cp39-abi3-
#   manylinux_2_31_x86_64.whl 3.1 MB; gguf's own needs numpy, pyyaml, requests, tqdm are there)
# Then the device tool's call:
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=560)
# GPU_CHECK_BUDGET (seconds, default 465) sets the whole budget; GPU_CHECK_SUITES (default
# "parity,decode,throughput,quant") which suites run, e.g. for a second, shorter call;
# GPU_CHECK_TESTS the test files (default tests/test_gpu_*.py but test_gpu_bench.py; "none").
# A dry run of this script on a machine without a GPU (what tests check here):
#   OUT=/tmp/gc GPU_CHECK_DEVICE=cpu GPU_CHECK_SMOKE=1 bash scripts/gpu_check.sh
# (tests/test_gpu_bench.py runs such a dry run of one suite).
set -u
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-465}
SUITES=${GPU_CHECK_SUITES:-parity,decode,throughput,quant}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SMOKE=${GPU_CHECK_SMOKE:+--smoke}
if [ -n "${OUT:-}" ]; then DEST=$OUT; RESULTS=$OUT/results; else DEST=results/gpu; RESULTS=results/gpu; fi
mkdir -p "$RESULTS"
LOG=$DEST/log
: > "$LOG"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export MAX_JOBS=${MAX_JOBS:-16}   # the kernels' JIT build: all 16 cores

say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# stage NAME SECONDS CMD...: run CMD with at most SECONDS (and never past the budget)
declare -a SUMMARY=()
stage() {
    local name=$1 want=$2; shift 2
    local left=$(( BUDGET - ($(date +%s) - START) ))
    local limit=$(( want < left ? want : left ))
    if [ "$limit" -lt 10 ]; then
        say "$name: skipped, ${left}s of the budget left"; SUMMARY+=("$name: skipped (no time)"); return
    fi
    say "$name: start (limit ${limit}s)"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    local took=$(( $(date +%s) - t0 ))
    case $rc in
        0) SUMMARY+=("$name: ok (${took}s)") ;;
        124|137) SUMMARY+=("$name: TIMED OUT after ${took}s") ;;
        *) SUMMARY+=("$name: FAILED rc=$rc (${took}s)") ;;
    esac
    say "$name: rc=$rc after ${took}s"
}

say "versions"
{
    python3 --version
    python3 -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
    python3 -c "import triton; print('triton', triton.__version__)"
    python3 -c "import transformers; print('transformers', transformers.__version__)"
    nvidia-smi
    git log --oneline -1 2>/dev/null
} >> "$LOG" 2>&1

if ls .whl/*.whl >/dev/null 2>&1; then
    say "installing carried wheels: $(ls .whl)"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >> "$LOG" 2>&1 && export PYTHONPATH=$PYTHONPATH:/tmp/site \
        || say "wheel install FAILED (GGUF suite will fail)"
else
    say "no .whl/ folder: gguf and llguidance must already be installed"
fi
python3 -c "import gguf; print('gguf', gguf.__version__ if hasattr(gguf, '__version__') else 'ok')" >> "$LOG" 2>&1
python3 -c "import fastapi" >/dev/null 2>&1 || say "(fastapi absent, as expected: the check never imports the server)"

# The CPU kernels: the GPU path never calls them (a GGUF embedding's dequantization at load
# has a PyTorch fallback with the same bits), and their JIT build would cost a minute or
# more of the budget: off, unless GPU_CHECK_CPU_KERNELS=1 builds them beside the tests.
if [ "${GPU_CHECK_CPU_KERNELS:-0}" = 1 ]; then
    ( timeout 240 python3 -c "from miaotui import kernels; print('cpu kernels:', kernels.load() is not None)" \
        > "$DEST/kernels.log" 2>&1 ) &
    KPID=$!
else
    export MIAOTUI_NO_KERNELS=1
    KPID=
fi

if [ -n "${GPU_CHECK_TESTS:-}" ]; then
    read -r -a GPU_TESTS <<< "${GPU_CHECK_TESTS/none/}"
else
    mapfile -t GPU_TESTS < <(ls tests/test_gpu_*.py 2>/dev/null | grep -v test_gpu_bench.py)
fi
if [ ${#GPU_TESTS[@]} -gt 0 ]; then
    stage tests 90 python3 -m pytest -m gpu -q -p no:cacheprovider "${GPU_TESTS[@]}"
else
    say "no GPU test files"; SUMMARY+=("tests: none found")
fi

if [ -n "$KPID" ]; then
    if ! wait $KPID || ! grep -q "cpu kernels: True" "$DEST/kernels.log"; then
        say "CPU kernels unavailable ($(tail -1 "$DEST/kernels.log")): MIAOTUI_NO_KERNELS=1 from here"
        export MIAOTUI_NO_KERNELS=1
    fi
    cat "$DEST/kernels.log" >> "$LOG"; rm -f "$DEST/kernels.log"
fi

declare -A LIMIT=([parity]=75 [decode]=110 [throughput]=110 [quant]=80)
for suite in ${SUITES//,/ }; do
    stage "$suite" "${LIMIT[$suite]:-120}" python3 -m miaotui bench gpu --device "$DEVICE" $SMOKE --suites "$suite" --out "$RESULTS"
done

say "summary"
for line in "${SUMMARY[@]}"; do echo "  $line" | tee -a "$LOG"; done
# the suites' tables, from the log, for the reply's tail
python3 - "$RESULTS" <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, sys
d = sys.argv[1]
for name in sorted(os.listdir(d)):
    if not name.endswith(".json"):
        continue
    doc = json.load(open(os.path.join(d, name)))
    print(f"{name}: complete={doc.get('complete')} gpu={doc['env'].get('gpu')}")
    for r in doc["results"]:
        keys = ("family", "dtype", "equal_prefix", "passed", "model", "cuda_graphs", "decode_tok_s",
                "fraction_of_copy_bw", "fraction_of_hbm_peak", "output_tok_s", "total_tok_s", "error")
        print("  " + ", ".join(f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}"
                               for k in keys if k in r))
EOF
say "done"
