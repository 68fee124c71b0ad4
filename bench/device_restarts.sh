#!/usr/bin/env bash
# Batched vs sequential restarts on a lent GPU machine, in one short call (its python3 holds torch with CUDA
# and every package gradinv needs). With the device tool: run(command="bash bench/device_restarts.sh",
# timeout_s=300); the table and JSON come back under $OUT.
set -euo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 bench/restarts.py --device cuda --restarts 1,4,8,16,32 --iterations 20 --repeats 3
cp bench/results/restarts_cuda.md bench/results/restarts_cuda.json "${OUT:-/tmp}/"
