#!/usr/bin/env bash
# Train arco_jax on a Cloud TPU VM: one host (v4-8, v5litepod-8) or a multi-host slice
# (v4-32, v5litepod-16). Every command after `create` runs on all workers at once.
#
#   launch/tpu_vm.sh [--dry-run] COMMAND [--config.field=value ...]
#
# Commands, in the order of a run:
#   create   create the TPU VM (SPOT=1: a Spot VM, cheaper, can be preempted)
#   copy     copy this checkout (the files git tracks or would track) to ~/arco_jax on all workers
#   install  a Python 3.11 virtual environment with requirements-gcs.txt (the core requirements and
#            the Cloud Storage clients for a gs:// WORKDIR) and jax[tpu] of the pinned version
#   run      stage DATA from GCS to each worker's disk, then start training in the background on
#            all workers; the extra arguments are passed on to arco_jax.main
#   logs     follow the training log of worker 0 (WORKER=N for another)
#   delete   delete the TPU VM (checkpoints and results stay in WORKDIR on GCS)
#
# Settings (environment variables):
#   ZONE             required, e.g. us-central2-b (v4), us-west4-a (v5e)
#   BUCKET           required for `run`: gs://your-bucket
#   PROJECT          GCP project; default: gcloud's configured project
#   TPU_NAME         default arco-jax
#   ACCELERATOR      default v4-8; e.g. v4-32, v5litepod-16, v6e-8
#   RUNTIME_VERSION  default: the base image for ACCELERATOR's generation
#   SPOT             1: create a Spot VM
#   CONFIG           default configs/acdc.py
#   DATA             default $BUCKET/ACDC (the SSL4MIS layout); set it empty for the phantom demo
#   WORKDIR          default $BUCKET/runs/acdc; shared by all workers, where the trainer resumes
#   DRY_RUN          1: same as --dry-run, print every command instead of running it
#
# Example:
#   export ZONE=us-central2-b BUCKET=gs://my-bucket ACCELERATOR=v4-8
#   launch/tpu_vm.sh create && launch/tpu_vm.sh copy && launch/tpu_vm.sh install
#   launch/tpu_vm.sh run --config.data.labeled_patients=7 && launch/tpu_vm.sh logs
#   launch/tpu_vm.sh delete
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
}

fail() {
  echo "tpu_vm.sh: $*" >&2
  exit 2
}

DRY_RUN="${DRY_RUN:-0}"
if [ "${1:-}" = "--dry-run" ]; then
  DRY_RUN=1
  shift
fi
[ $# -ge 1 ] || usage
COMMAND="$1"
shift

TPU_NAME="${TPU_NAME:-arco-jax}"
ACCELERATOR="${ACCELERATOR:-v4-8}"
CONFIG="${CONFIG:-configs/acdc.py}"
WORKER="${WORKER:-0}"
REMOTE_DIR="arco_jax"                     # relative to the worker's home directory
REMOTE_DATA='$HOME/arco_jax_data'         # expanded on the worker
REMOTE_LOG='$HOME/arco_jax_train.log'
ARCHIVE="${TMPDIR:-/tmp}/arco_jax_code.tar.gz"
REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"

# The base image per TPU generation (cloud.google.com/tpu/docs/runtimes); JAX is installed on top.
default_runtime() {
  case "$ACCELERATOR" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}
RUNTIME_VERSION="${RUNTIME_VERSION:-$(default_runtime)}"

# One word as the shell reads it back: bare when it is plain, single-quoted otherwise.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Print the command (dry run) or run it.
do_run() {
  if [ "$DRY_RUN" = 1 ]; then
    local words=() word
    for word in "$@"; do words+=("$(quote "$word")"); done
    echo "${words[*]}"
  else
    "$@"
  fi
}

require() {
  local name="$1" example="$2"
  [ -n "${!name:-}" ] || fail "set $name (e.g. $name=$example) for '$COMMAND'"
}

# gcloud compute tpus tpu-vm VERB ARGS... in this zone (and project).
gcloud_tpu() {
  local args=(gcloud compute tpus tpu-vm "$@" "--zone=$ZONE")
  if [ -n "${PROJECT:-}" ]; then args+=("--project=$PROJECT"); fi
  do_run "${args[@]}"
}

# A command on every worker of the slice, at the same time.
on_all_workers() {
  gcloud_tpu ssh "$TPU_NAME" --worker=all "--command=$1"
}

no_extra_arguments() {
  [ $# -eq 0 ] || fail "'$COMMAND' takes no arguments, got: $*"
}

case "$COMMAND" in
  create | copy | install | run | logs | delete) ;;
  *)
    echo "tpu_vm.sh: unknown command '$COMMAND'" >&2
    usage
    ;;
esac
require ZONE us-central2-b
case "$COMMAND" in
  create)
    no_extra_arguments "$@"
    extra=()
    if [ "${SPOT:-0}" = 1 ]; then extra+=(--spot); fi
    gcloud_tpu create "$TPU_NAME" "--accelerator-type=$ACCELERATOR" "--version=$RUNTIME_VERSION" \
      --scopes=https://www.googleapis.com/auth/cloud-platform "${extra[@]}"
    ;;
  copy)
    no_extra_arguments "$@"
    # Tracked and untracked-but-not-ignored files: no virtual environments, runs or caches.
    do_run bash -c "cd $(quote "$REPO_ROOT") && git ls-files -z --cached --others --exclude-standard \
| xargs -0 tar -czf $(quote "$ARCHIVE")"
    gcloud_tpu scp "$ARCHIVE" "$TPU_NAME:arco_jax_code.tar.gz" --worker=all
    on_all_workers "mkdir -p ~/$REMOTE_DIR && tar -xzf ~/arco_jax_code.tar.gz -C ~/$REMOTE_DIR"
    ;;
  install)
    no_extra_arguments "$@"
    jax_version="$(sed -n 's/^jax==//p' "$REPO_ROOT/requirements.txt")"
    [ -n "$jax_version" ] || fail "requirements.txt pins no jax==VERSION"
    # The TPU images ship Python 3.10; uv fetches a Python 3.11 for the project's pins.
    on_all_workers "set -e; cd ~/$REMOTE_DIR && python3 -m pip install --user --quiet uv \
&& ~/.local/bin/uv venv --allow-existing --python 3.11 .venv \
&& ~/.local/bin/uv pip install --python .venv/bin/python -r requirements-gcs.txt 'jax[tpu]==$jax_version'"
    ;;
  run)
    require BUCKET gs://my-bucket
    [[ "$BUCKET" == gs://* ]] || fail "BUCKET must be a gs:// URL, got '$BUCKET'"
    DATA="${DATA-$BUCKET/ACDC}"
    WORKDIR="${WORKDIR:-$BUCKET/runs/acdc}"
    train=(.venv/bin/python -m arco_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" --multihost)
    stage=""
    if [ -n "$DATA" ]; then
      stage="mkdir -p $REMOTE_DATA && gcloud storage rsync --recursive $(quote "$DATA") $REMOTE_DATA/ACDC && "
      train+=("--config.data.data_dir=$REMOTE_DATA/ACDC")
    fi
    train+=("$@")
    # Detached from the ssh session (training outlives it); `logs` follows the log.
    job="$(printf '%q ' "${train[@]}")"
    job="${job//\\\$HOME/\$HOME}"   # keep $HOME for the worker's shell to expand
    on_all_workers "set -e; cd ~/$REMOTE_DIR && ${stage}setsid nohup bash -c \
$(quote "$job; echo \"arco_jax.main exit code \$?\"") > $REMOTE_LOG 2>&1 < /dev/null &"
    ;;
  logs)
    no_extra_arguments "$@"
    gcloud_tpu ssh "$TPU_NAME" "--worker=$WORKER" "--command=tail -n 100 -F $REMOTE_LOG"
    ;;
  delete)
    no_extra_arguments "$@"
    gcloud_tpu delete "$TPU_NAME" --quiet
    ;;
esac
