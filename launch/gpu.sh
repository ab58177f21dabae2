#!/usr/bin/env bash
# Train on NVIDIA GPUs. One machine: one process sees every visible GPU and puts them all in the
# data mesh; no distributed setup is needed. Several machines: run this on each of them with
# COORDINATOR_ADDRESS, NUM_PROCESSES and PROCESS_ID set (passed on as arco_jax.main's flags of
# the same names, which call jax.distributed.initialize) and the same WORKDIR on a shared disk.
#
#   launch/gpu.sh [--dry-run] CONFIG WORKDIR [--config.field=value ...]
#   launch/gpu.sh configs/acdc.py runs/acdc_sg_7 --config.data.data_dir=/data/ACDC
#
# Environment:
#   CUDA_VISIBLE_DEVICES  which GPUs to use; global batch sizes must divide by their count
#   PYTHON                interpreter that creates .venv (default python3; needs 3.11 or newer)
#   SKIP_INSTALL=1        use .venv as it is (no pip)
#   COORDINATOR_ADDRESS   host:port of process 0, reachable from every machine (several machines)
#   NUM_PROCESSES         number of machines (one process each)
#   PROCESS_ID            this machine's index, 0 ... NUM_PROCESSES-1
#   DRY_RUN=1             same as --dry-run: print the commands instead of running them
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
}

DRY_RUN="${DRY_RUN:-0}"
if [ "${1:-}" = "--dry-run" ]; then
  DRY_RUN=1
  shift
fi
[ $# -ge 2 ] || usage
CONFIG="$1"
WORKDIR="$2"
shift 2
cd "$(dirname "$0")/.."
[ -f "$CONFIG" ] || { echo "gpu.sh: config file '$CONFIG' not found (relative to the repository root)" >&2; exit 2; }

do_run() {
  if [ "$DRY_RUN" = 1 ]; then
    echo "$*"
  else
    "$@"
  fi
}

distributed=()
cluster_vars=0
for name in COORDINATOR_ADDRESS NUM_PROCESSES PROCESS_ID; do
  if [ -n "${!name:-}" ]; then cluster_vars=$((cluster_vars + 1)); fi
done
if [ "$cluster_vars" = 3 ]; then
  distributed=("--coordinator_address=$COORDINATOR_ADDRESS" "--num_processes=$NUM_PROCESSES"
               "--process_id=$PROCESS_ID")
elif [ "$cluster_vars" != 0 ]; then
  echo "gpu.sh: several machines need all of COORDINATOR_ADDRESS, NUM_PROCESSES and PROCESS_ID" >&2
  exit 2
fi

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  PYTHON="${PYTHON:-python3}"
  if [ ! -d .venv ]; then
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "gpu.sh: $PYTHON is $("$PYTHON" --version 2>&1); the pinned requirements need Python 3.11+ (set PYTHON)" >&2
      exit 2
    fi
    do_run "$PYTHON" -m venv .venv
  fi
  jax_version="$(sed -n 's/^jax==//p' requirements.txt)"
  do_run .venv/bin/python -m pip install --quiet -r requirements.txt "jax[cuda12]==$jax_version"
fi
do_run .venv/bin/python -m arco_jax.main --config="$CONFIG" --workdir="$WORKDIR" "${distributed[@]}" "$@"
