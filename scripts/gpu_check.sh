#!/usr/bin/env bash
# The CUDA checks, in one go (about 3 minutes on one GPU): the gpu-marked tests (every backend
# against the reference on CUDA, NaN parity, fp16 loss scaling, bf16 learning, accumulation with
# weight dropout, a CUDA checkpoint sampled and evaluated on the CPU), then the benchmark on the
# GPU (charlm native and fused against torch.nn, i.e. cuDNN) in fp32 and bf16.
#   scripts/gpu_check.sh            # from the repository root, after scripts/test.sh has made .venv
#   PYTHON=python3 scripts/gpu_check.sh   # with another interpreter that has charlm's dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')"
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
"$PY" -m pytest -q -rs -p no:cacheprovider -m gpu tests
for precision in fp32 bf16; do
    "$PY" scripts/bench.py --quick --device cuda --precision "$precision" --json
done
