#!/usr/bin/env bash
# The wheels scripts/gpu_check.sh installs on a GPU machine whose python3 has a CUDA torch and
# nothing else (no network): what charlm and its gpu tests import besides torch, for that
# machine's Python, at the versions this repository's .venv tests with. Run it here (network).
#   scripts/gpu_wheels.sh [DIR] [PYTHON_VERSION ...]    # defaults: scripts/gpu_wheels, 3.12 (22 MB a version)
# then give gpu_check.sh DIR (its default is the same folder, git-ignored: carry it to the machine).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-scripts/gpu_wheels}
VERSIONS=("${@:2}")
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=(3.12)
PY=${PYTHON:-.venv/bin/python}
# pyproject's dependencies less torch (the machine's own) and ninja (builds the CPU loops, not
# needed there), plus pytest; pip adds what they depend on (pydantic-core, annotated-types,
# typing-inspection, typing-extensions, click, markdown-it-py, pygments, pluggy, ...).
PACKAGES=(pydantic pyyaml typer rich numpy pytest)
mkdir -p "$DIR"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PY" -m pip freeze --exclude-editable | grep -v '^torch==' > "$constraints"
# Binary wheels for CPython on x86-64 Linux: glibc 2.28 is what torch's own CUDA wheels need.
for version in "${VERSIONS[@]}"; do
    "$PY" -m pip download --disable-pip-version-check --quiet --only-binary=:all: --dest "$DIR" \
        --implementation cp --python-version "$version" \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -c "$constraints" "${PACKAGES[@]}"
done
printf '%s\n' "${PACKAGES[@]}" > "$DIR/requirements.txt"  # what gpu_check.sh installs from here
echo "$(ls "$DIR"/*.whl | wc -l) wheels for Python ${VERSIONS[*]} in $DIR ($(du -sh "$DIR" | cut -f1)):"
ls "$DIR"
