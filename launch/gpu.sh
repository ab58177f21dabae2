#!/usr/bin/env bash
# Train on one machine with NVIDIA GPUs: every visible GPU joins the data mesh.
#   launch/gpu.sh CONFIG WORKDIR [--config.field=value ...]
#   launch/gpu.sh configs/acdc.py runs/acdc_sg_7 --config.data.data_dir=/data/ACDC
# Restrict the GPUs with CUDA_VISIBLE_DEVICES; global batch sizes must divide by their count.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [--config.field=value ...]" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
if [ ! -d .venv ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet -r requirements.txt "jax[cuda12]==$(grep '^jax==' requirements.txt | cut -d= -f3)"
python -m arco_jax.main --config="$1" --workdir="$2" "${@:3}"
