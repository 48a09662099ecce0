#!/usr/bin/env bash
# The main job from nothing: a virtual environment, one minute of training on the built-in
# corpus (Python's standard library source, no download), then a sample.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
# --overwrite: runs/demo belongs to this script; each demo replaces the previous demo run.
.venv/bin/charlm train --config configs/demo.yaml --out runs/demo --overwrite
.venv/bin/charlm sample --checkpoint runs/demo --prompt "def " --length 400 --seed 0
