#!/usr/bin/env bash
# The CUDA checks in one go, in under 4 minutes on one GPU, on a machine that may have nothing but
# python3 with a CUDA torch (no network, no pydantic): charlm's other dependencies come from a
# wheel folder made beforehand by scripts/gpu_wheels.sh, installed into a temporary folder that
# goes on PYTHONPATH with the repository (no `pip install -e`, which would pull a torch). Then
# the gpu-marked tests (tests/test_gpu.py) and scripts/bench.py --quick on the GPU in fp32 and
# bf16; each stage's output goes to LOG_DIR/<stage>.log, and summary.txt holds what it printed.
#   scripts/gpu_wheels.sh scripts/gpu_wheels 3.12   # here, once, for the GPU machine's Python
#   scripts/gpu_check.sh LOG_DIR [WHEEL_DIR]        # there, from anywhere; WHEEL_DIR default scripts/gpu_wheels
#   scripts/gpu_check.sh --setup-only LOG_DIR [WHEEL_DIR]   # a dry run anywhere: dependencies and test collection
# PYTHON picks the interpreter (default python3); a python that already has the dependencies
# needs no wheel folder.
set -uo pipefail
SETUP_ONLY=0
if [ "${1:-}" = "--setup-only" ]; then SETUP_ONLY=1; shift; fi
[ $# -ge 1 ] || { echo "usage: scripts/gpu_check.sh [--setup-only] LOG_DIR [WHEEL_DIR]" >&2; exit 2; }
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1" && LOG=$(cd "$1" && pwd)
WHEELS=${2:-$REPO/scripts/gpu_wheels}
PY=${PYTHON:-python3}
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_SECONDS:-225}))  # the whole check ends within this, whatever runs long
cd "$REPO"

say() { echo "$*" | tee -a "$LOG/summary.txt"; }  # summary.txt: every line this script prints
fail() { say "gpu_check: $*"; exit 1; }
left() { echo $((DEADLINE - $(date +%s))); }
# Run a stage with at most $1 seconds (less if the deadline is nearer), logging to $LOG/$2.log.
stage() {
    local most=$1 name=$2; shift 2
    local limit; limit=$(left); [ "$limit" -gt "$most" ] && limit=$most
    if [ "$limit" -le 5 ]; then say "$name: skipped (out of time)"; return 1; fi
    local began; began=$(date +%s)
    timeout "$limit" "$@" > "$LOG/$name.log" 2>&1
    local rc=$?
    local verdict=ok; [ $rc -eq 124 ] && verdict="cut at ${limit}s"; [ $rc -ne 0 ] && [ $rc -ne 124 ] && verdict="failed ($rc)"
    say "$name: $verdict in $(( $(date +%s) - began ))s (log: $name.log)"
    tail -n 5 "$LOG/$name.log"
    return $rc
}

# The wheels for this Python into $DEPS: with pip where it is, else unpacked (a wheel is a zip
# archive laid out for site-packages; the folder already holds every dependency).
install_wheels() {
    local tag="cp${PYVERSION/./}"
    ls "$WHEELS"/pydantic_core-*-"$tag"-*.whl > /dev/null 2>&1 \
        || fail "the wheels in $WHEELS are not for Python $PYVERSION: make them with scripts/gpu_wheels.sh DIR $PYVERSION"
    if "$PY" -m pip --version > /dev/null 2>&1; then
        "$PY" -m pip install --disable-pip-version-check --no-index --find-links "$WHEELS" --target "$DEPS" \
            -r "$WHEELS/requirements.txt" > "$LOG/wheels.log" 2>&1
        return
    fi
    "$PY" - "$WHEELS" "$DEPS" "$tag" > "$LOG/wheels.log" 2>&1 <<'PYEOF'
import pathlib, sys, zipfile
wheels, target, tag = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
for wheel in sorted(wheels.glob("*.whl")):
    python_tag = wheel.name.split("-")[-3]  # name-version-python-abi-platform.whl
    if not python_tag.startswith("cp") or python_tag == tag:
        zipfile.ZipFile(wheel).extractall(target)
        print("unpacked", wheel.name)
PYEOF
}

: > "$LOG/summary.txt"
"$PY" -c "import torch" 2>/dev/null || fail "$PY has no torch; run this with a python3 that has a CUDA torch (PYTHON=...)"
"$PY" - > "$LOG/env.txt" 2> /dev/null <<'PYEOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA build", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
for k in range(torch.cuda.device_count()):
    print(f"GPU {k}:", torch.cuda.get_device_name(k))
PYEOF
say "$(cat "$LOG/env.txt")"
PYVERSION=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ $SETUP_ONLY -eq 0 ]; then
    "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null \
        || fail "no CUDA device: nothing to check (this python's torch sees no GPU; --setup-only checks the rest)"
fi

# What charlm and its tests import besides torch (numpy: charlm encodes the corpus through it).
imports() { "$PY" -c "import charlm.cli, charlm.training.run, numpy, pytest" > "$LOG/imports.log" 2>&1; }
DEPS=$(mktemp -d "${TMPDIR:-/tmp}/charlm-gpu-deps.XXXXXX")
trap 'rm -rf "$DEPS"' EXIT
export CHARLM_NO_CPP=1  # the C++ step loops are CPU code (and need ninja): not what is checked here
export CHARLM_CACHE_DIR="$DEPS/cache"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if ! imports; then
    [ -f "$WHEELS/requirements.txt" ] || fail "charlm's dependencies are missing here ($(tail -n 1 "$LOG/imports.log")) and $WHEELS holds no wheels: make them where there is a network with scripts/gpu_wheels.sh DIR $PYVERSION and bring DIR"
    install_wheels || fail "the wheels in $WHEELS do not install here (wheels.log)"
    export PYTHONPATH="$DEPS:$PYTHONPATH"
    imports || fail "charlm does not import with the wheels from $WHEELS (imports.log)"
    say "dependencies: installed from $WHEELS into a temporary folder on PYTHONPATH"
fi
if [ $SETUP_ONLY -eq 1 ]; then
    stage 60 collect "$PY" -m pytest -q --collect-only -p no:cacheprovider -m gpu tests/test_gpu.py
    exit $?
fi
# xunit1: the junit file keeps the tests' recorded properties (syncs per step)
stage 130 gpu_tests "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu tests/test_gpu.py \
    --junitxml "$LOG/gpu_tests.xml" -o junit_family=xunit1
tests=$?
for precision in fp32 bf16; do
    stage 45 "bench_$precision" "$PY" scripts/bench.py --quick --device cuda --precision "$precision" --json
done
say "gpu_check: done in $(( $(date +%s) - START ))s; the tests $([ $tests -eq 0 ] && echo passed || echo FAILED)"
exit $tests
