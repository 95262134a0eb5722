#!/usr/bin/env bash
# The GPU check, prepared for an NVIDIA host (H100/H200) whose Python has torch with CUDA
# but no cnnserve install and no internet: lays the repository out as the cnnserve package
# (symlinks, no pip), then runs `python -m cnnserve.bench.gpu_check`, which prints one JSON
# line per figure and writes OUT/gpu_check.jsonl and OUT/gpu_check.md (a few minutes).
#
#   bench/gpu.sh [OUT]            OUT defaults to ./gpu-check
#   PYTHON=python3.11 ARTIFACTS=/path/to/artifacts bench/gpu.sh OUT
#   bench/gpu.sh OUT --dry-run    the same on a CPU, tiny sizes (what CI runs)
#
# Needs the exported TorchScript models (convnet.pt, fcn.pt): `make export` on a development
# machine and carry artifacts/ along. The gateway phase also needs cnnserve's dependencies;
# without them it is reported as skipped and the model-alone figures still come.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-gpu-check}
shift || true
python=${PYTHON:-python3}

if ! "$python" -c 'import cnnserve.bench.gpu_check' 2>/dev/null; then
    # cnnserve is the repository's top-level folders installed as one package
    # (pyproject's package-dir); without pip, a tree of symlinks does the same.
    tree=$(mktemp -d)
    trap 'rm -rf "$tree"' EXIT
    mkdir -p "$tree/cnnserve"
    top=$(sed -n '/^\[tool\.setuptools\.package-dir\]/,/^\[/s/^cnnserve = "\(.*\)"$/\1/p' \
        "$repo/pyproject.toml")
    # failglob: a folder with no modules is an error here, not a dangling link named '*.py'.
    (shopt -s failglob; ln -s "$repo/$top"/*.py "$tree/cnnserve/")
    sed -n 's/^"cnnserve\.\([a-z_]*\)" = "\([a-z_]*\)"$/\1 \2/p' "$repo/pyproject.toml" |
        while read -r package folder; do ln -s "$repo/$folder" "$tree/cnnserve/$package"; done
    export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}"
fi

exec "$python" -m cnnserve.bench.gpu_check --out "$out" --artifacts "${ARTIFACTS:-$repo/artifacts}" "$@"
