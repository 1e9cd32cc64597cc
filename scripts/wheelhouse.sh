#!/usr/bin/env bash
# Offline wheelhouse for a GPU machine whose image has torch, triton, numpy and transformers
# but no package index: every distribution of this repo as a wheel, plus the wheels of the
# dependencies that image lacks (computed from the wheels' metadata, pinned to the versions
# installed here). Then, there: pip install --no-index --find-links OUT "engine[cuda]"
# (or simply: bash scripts/gpu_check.sh OUT).
#
#   bash scripts/wheelhouse.sh [--python-version 3.12] [--platform manylinux_2_39_x86_64] OUT
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
PYVER=3.12
PLATFORM=manylinux_2_39_x86_64   # the GPU image's glibc takes wheels up to 2_39
OUT=
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYVER=$2; shift 2 ;;
    --platform) PLATFORM=$2; shift 2 ;;
    -h|--help) sed -n 2,8p "$0"; exit 0 ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) OUT=$1; shift ;;
  esac
done
[ -n "$OUT" ] || { echo "usage: $0 [--python-version V] [--platform TAG] OUT" >&2; exit 2; }
rm -rf "$OUT"   # one version of each package: stale wheels would stop the offline install
"$PY" scripts/wheelhouse.py house "$OUT" --python-version "$PYVER" --platform "$PLATFORM"
size_kib=$(du -sk "$OUT" | cut -f1)
if [ "$size_kib" -gt $((60 * 1024)) ]; then
  echo "wheelhouse is $((size_kib / 1024)) MiB, over the 60 MiB a GPU machine accepts" >&2
  exit 1
fi
