#!/usr/bin/env bash
# The GPU measurements issue 10 asks for, as one command sized for a short loan of one GPU
# (about 8 minutes; README, Performance, "Measuring on a lent GPU"). Run from the repository root.
#
#   OUT=/some/folder bash benchmarks/gpu_session.sh                       # on the GPU machine
#   OUT=/tmp/gpu-dry PROFILE=smoke DEVICE=cpu bash benchmarks/gpu_session.sh   # a dry run here
#
# Wheels in .whl/ (opacus and cryptography with their needs, for the GPU machine's Python) are
# installed first when present and this Python lacks them: the GPU machine has PyTorch but no package index.
# Each step has its own time limit, and speed.py saves its results after every part and every
# D-grid cell, so a step that runs out of time keeps what it measured and the next step still runs.
set -uo pipefail
OUT=${OUT:?set OUT to the folder the results go to}
PROFILE=${PROFILE:-gpu}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import opacus, cryptography" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fedpggan-site .whl/*.whl \
        || { echo "gpu_session: installing the wheels in .whl/ failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/fedpggan-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

{ nvidia-smi 2>&1 || echo "no nvidia-smi"; python3 -c "import torch, opacus; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'opacus', opacus.__version__)"; } \
    | tee "$OUT/device.txt"

status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, remember a failure
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout -s INT -k 30 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"  # INT: Python stops cleanly, keeping its files
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc" | tee -a "$OUT/$name.log"
    [ "$rc" -eq 0 ] || status=1
}

# The book-keeping clipper against Opacus on the GPU (the CUDA case of tests/test_bookkeeping.py, only it:
# pytest skips it without a GPU and still exits 0, so a missing GPU fails this step first).
if [ "$DEVICE" = cuda ] && ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_session: DEVICE=cuda but torch sees no CUDA GPU; the GPU figures cannot be measured here" | tee "$OUT/test_bookkeeping.log" >&2
    status=1
else
    step test_bookkeeping 120 python3 -m pytest -q -rs -p no:cacheprovider tests/test_bookkeeping.py \
        -k "opacus_on_the_default_discriminator and $DEVICE"
fi
# What an embedding-only generator step costs against an adversarial one (quick).
step speed_generator 90 python3 benchmarks/speed.py --profile "$PROFILE" --device "$DEVICE" --parts generator --results "$OUT"
# The DP-vs-plain D grid: 28x28 batch 256 (the target cell) first.
step speed_discriminator 300 python3 benchmarks/speed.py --profile "$PROFILE" --device "$DEVICE" --parts discriminator --results "$OUT"
ls -l "$OUT"
exit $status
