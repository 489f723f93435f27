#!/usr/bin/env bash
# The CUDA checks, in a few minutes, for a machine with a GPU:
#   1. the tests that run on a CUDA device (their ids contain "cuda"; they skip without one),
#   2. python -m minituner.kernels.bench --device cuda      NF4 quantize/dequantize vs bitsandbytes
#   3. benchmarks/optimizer_speed.py --device cuda           PagedAdamW vs torch AdamW, page-ins
#   4. benchmarks/qlora_speed.py --device cuda               (when that script exists)
# and a short table at the end: each piece, its exit status and seconds; the full outputs above it.
#
#   bash benchmarks/cuda_check.sh                   # PYTHON=... picks the interpreter
#   SIZE=8192 REPEATS=10 bash benchmarks/cuda_check.sh
#
# Without a CUDA device it says so and exits 2 before running anything.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python}
SIZE=${SIZE:-4096}
REPEATS=${REPEATS:-5}
LIMIT=${LIMIT:-240}  # seconds per piece

if ! "$PY" -c "import torch, minituner" 2>/dev/null; then
    echo "cuda_check: $PY cannot import torch and minituner; activate the environment (. .venv/bin/activate) or set PYTHON=" >&2
    exit 2
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "cuda_check: no CUDA device here (torch.cuda.is_available() is False in $PY); run it on a machine with a GPU" >&2
    exit 2
fi
"$PY" -c "import torch; print('cuda_check:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"

names=() codes=() secs=()
piece() {  # piece NAME COMMAND...: run with a time limit, outside the checkout (the top-level
    # kernels/ folder would shadow the installed minituner.kernels and Hugging Face's `kernels`)
    local name=$1 start rc
    shift
    echo
    echo "=== $name: $*"
    start=$(date +%s)
    (cd /tmp && timeout "$LIMIT" "$@")
    rc=$?
    names+=("$name") codes+=("$rc") secs+=("$(($(date +%s) - start))")
}

piece "CUDA tests" "$PY" -m pytest -q -rs -p no:cacheprovider -k cuda --rootdir "$ROOT" "$ROOT/tests" \
    --deselect "$ROOT/tests/test_notebooks.py"
piece "kernels.bench" "$PY" -m minituner.kernels.bench --device cuda --size "$SIZE" --repeats "$REPEATS"
piece "optimizer_speed" "$PY" "$ROOT/benchmarks/optimizer_speed.py" --device cuda --size "$SIZE" --repeats "$REPEATS"
if [ -f "$ROOT/benchmarks/qlora_speed.py" ]; then
    piece "qlora_speed" "$PY" "$ROOT/benchmarks/qlora_speed.py" --device cuda --repeats "$REPEATS"
else
    names+=("qlora_speed") codes+=("-") secs+=("-")
fi

echo
printf '%-16s %-6s %s\n' piece status seconds
printf '%-16s %-6s %s\n' ---------------- ------ -------
failed=0
for i in "${!names[@]}"; do
    status=${codes[$i]}
    case $status in 0) word=ok ;; -) word="absent (benchmarks/qlora_speed.py not written yet)" ;; 124) word="timed out (LIMIT=$LIMIT s)"; failed=1 ;; *) word="failed (exit $status)"; failed=1 ;; esac
    printf '%-16s %-6s %-7s %s\n' "${names[$i]}" "$status" "${secs[$i]}" "$word"
done
exit $failed
