#!/usr/bin/env bash
# The CUDA checks, in one go (under 5 minutes on one GPU): the gpu-marked tests (CUDA training,
# a CUDA checkpoint sampled and evaluated on the CPU, CPU/CUDA loss agreement), then the
# benchmark on the GPU, native against fused (cuDNN), in fp32 and in bf16.
#   scripts/gpu_check.sh            # from the repository root, after scripts/test.sh has made .venv
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')"
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
"$PY" -m pytest -q -m gpu tests
for precision in fp32 bf16; do
    "$PY" scripts/bench.py --quick --device cuda --precision "$precision"
done
