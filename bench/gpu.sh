#!/usr/bin/env bash
# bf16 pretraining MFU on one GPU (written for an H200): a ~125M dense model (GPT-2 small's shape) and the one-GPU
# MoE (moe-small), against the card's bf16 matmul peak measured in the same run. Goal: >= 35% MFU for dense.
# A few minutes: 30 steps of 16 x 1024 tokens per model. On a machine without a GPU it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no GPU: bench/gpu.sh measures GPU pretraining MFU only; nothing to do here (bench/pretrain.py is the CPU bench)"
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
exec "$PYTHON" -m bench.pretrain --gpu --steps "${STEPS:-30}"
