#!/usr/bin/env bash
# Download, here (with network), the wheels that the GPU machine's image lacks, into DIR (default .whl at the
# repository root, which .gitignore keeps out of git): benchmarks/gpu_check.sh installs them there with
# `pip install --no-deps --no-index --find-links DIR -r DIR/requirements.txt`, leaving the image's torch alone.
# The image (see the device docs' package list) has torch 2.11, triton 3.6, torchvision, numpy, scipy,
# scikit-learn, typer, rich, onnx, onnxruntime, matplotlib, pillow and pytest; it lacks torch-pruning (pinned,
# pure Python). Its Python was 3.12 when last seen; wheels are fetched for 3.10, 3.11 and 3.12, and pip there
# takes the one that fits. The folder is a `carry` path of the device tool (64 MiB in all with the tree).
#
#   benchmarks/gpu_wheels.sh [DIR]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${1:-$ROOT/.whl}
PY=${PYTHON:-python3}
PACKAGES=("torch-pruning==1.6.1")  # each with its version: one version of each, or the offline install stops
mkdir -p "$DIR"
for version in 3.10 3.11 3.12; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$DIR" "${PACKAGES[@]}"
done
printf '%s\n' "${PACKAGES[@]}" >"$DIR/requirements.txt"
git -C "$ROOT" describe --always --dirty >"$DIR/commit.txt" 2>/dev/null || rm -f "$DIR/commit.txt"  # for the summary
ls -l "$DIR"
echo "total: $(du -sk "$DIR" | cut -f1) KiB in $DIR (the device tool carries at most 64 MiB with the tree)"
