#!/usr/bin/env bash
# Train on NVIDIA GPUs. One machine: one process sees every visible GPU and puts them in the
# data mesh (as many as the global batch divides over); no distributed setup is needed. Several
# machines: run this on each of them with COORDINATOR_ADDRESS, NUM_PROCESSES and PROCESS_ID set
# (passed on as arco_jax.main's flags of the same names, which call jax.distributed.initialize)
# and the same WORKDIR on a shared disk.
#
#   launch/gpu.sh [--dry-run] CONFIG WORKDIR [--config.field=value ...]
#   launch/gpu.sh configs/acdc.py runs/acdc_sg_7 --config.data.data_dir=/data/ACDC
#
# The first run builds .venv in the repository root with requirements.txt and jax[cuda12] or
# jax[cuda13]; when several machines share the checkout (a cluster's shared filesystem), one
# of them builds it while the others wait for it (a lock directory, .venv.install.lock), and
# later runs find it ready (.venv/arco_jax_installed names what was installed).
#
# Environment:
#   CUDA_VISIBLE_DEVICES  which GPUs to use
#   CUDA                  12 or 13: which jax[cudaNN] to install; default: the newest the driver
#                         supports (nvidia-smi's "CUDA Version"), 13 when it cannot be read
#   PYTHON                interpreter that creates .venv (default python3; needs 3.11 or newer)
#   SKIP_INSTALL=1        use .venv as it is (no pip)
#   LOCK_TIMEOUT          seconds to wait for another machine's install (default 1800)
#   COORDINATOR_ADDRESS   host:port of process 0, reachable from every machine (several machines)
#   NUM_PROCESSES         number of machines (one process each)
#   PROCESS_ID            this machine's index, 0 ... NUM_PROCESSES-1
#   DRY_RUN=1             same as --dry-run: print the commands instead of running them
set -euo pipefail
# Written for bash 3.2 as well (macOS): arrays are expanded as ${a[@]+"${a[@]}"}.

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
}

fail() {
  echo "gpu.sh: $*" >&2
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
[ -f "${CONFIG%%:*}" ] || fail "config file '${CONFIG%%:*}' not found (relative to the repository root)"
LOCK=.venv.install.lock
STAMP=.venv/arco_jax_installed

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
  fail "several machines need all of COORDINATOR_ADDRESS, NUM_PROCESSES and PROCESS_ID"
fi

# 12 or 13: CUDA if set, else the newest CUDA major the driver supports.
cuda_major() {
  local major="${CUDA:-}" reported
  if [ -z "$major" ]; then
    reported="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' | head -n 1)" || reported=""
    if [ -z "$reported" ]; then
      echo "gpu.sh: nvidia-smi reports no CUDA version: installing jax[cuda13] (set CUDA=12 for an older driver)" >&2
      major=13
    elif [ "$reported" -ge 13 ]; then
      major=13
    elif [ "$reported" -ge 12 ]; then
      major=12
    else
      fail "the NVIDIA driver supports CUDA $reported; JAX's wheels need CUDA 12 or 13 (update the driver)"
    fi
  fi
  case "$major" in
    12 | 13) echo "$major" ;;
    *) fail "CUDA must be 12 or 13, got '$major'" ;;
  esac
}

# What the environment holds: the pinned requirements, Python and the CUDA build of JAX.
install_spec() {
  local jax_version="$1" major="$2" requirements
  requirements="$(cksum < requirements.txt | cut -d' ' -f1)"
  echo "requirements.txt $requirements jax[cuda$major]==$jax_version"
}

install() {
  local python="${PYTHON:-python3}" jax_version major spec
  jax_version="$(sed -n 's/^jax==//p' requirements.txt)"
  [ -n "$jax_version" ] || fail "requirements.txt pins no jax==VERSION"
  major="$(cuda_major)"
  spec="$(install_spec "$jax_version" "$major")"
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$spec" ]; then
    return 0  # Built before (here or by another machine on this filesystem).
  fi
  if [ "$DRY_RUN" = 1 ]; then
    echo "mkdir $LOCK  # waits while another machine installs"
    [ -d .venv ] || echo "$python -m venv .venv"
    echo ".venv/bin/python -m pip install --quiet -r requirements.txt jax[cuda$major]==$jax_version"
    echo "rmdir $LOCK"
    return 0
  fi
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    fail "$python is $("$python" --version 2>&1); the pinned requirements need Python 3.11+ (set PYTHON)"
  fi
  # mkdir is atomic on local and network filesystems: one machine installs, the others wait.
  local waited=0 timeout="${LOCK_TIMEOUT:-1800}"
  until mkdir "$LOCK" 2>/dev/null; do
    if [ "$waited" -ge "$timeout" ]; then
      fail "waited ${timeout} s for the install by $(cat "$LOCK/owner" 2>/dev/null || echo '?') ($LOCK); if no" \
        "install is running, remove $LOCK and run again"
    fi
    [ "$waited" != 0 ] || echo "gpu.sh: $(cat "$LOCK/owner" 2>/dev/null || echo 'another machine') is installing" \
      ".venv; waiting" >&2
    sleep 5
    waited=$((waited + 5))
  done
  echo "$(hostname) pid $$" > "$LOCK/owner"
  trap 'rm -rf "$LOCK"' EXIT
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$spec" ]; then  # Finished while we waited.
    rm -rf "$LOCK"
    trap - EXIT
    return 0
  fi
  rm -f "$STAMP"
  [ -d .venv ] || "$python" -m venv .venv
  .venv/bin/python -m pip install --quiet -r requirements.txt "jax[cuda$major]==$jax_version"
  echo "$spec" > "$STAMP.tmp" && mv "$STAMP.tmp" "$STAMP"
  rm -rf "$LOCK"
  trap - EXIT
}

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  install
fi
do_run .venv/bin/python -m arco_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
  ${distributed[@]+"${distributed[@]}"} "$@"
