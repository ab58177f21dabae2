#!/usr/bin/env bash
# Train arco_jax on a Cloud TPU VM: one host (v4-8, v5litepod-8, v6e-8) or a multi-host slice
# (v4-32, v5litepod-16). Every command after `create` runs on all workers at once.
#
#   launch/tpu_vm.sh [--dry-run] COMMAND [--config.field=value ...]
#
# The --config overrides go to arco_jax.main (start, run) and into the config check (check,
# create, start, run), so create is refused when the config you will run cannot use ACCELERATOR.
#
# Commands:
#   check    check CONFIG (and the overrides given) against ACCELERATOR's chips here, before
#            anything is created: how the global batch is laid out on them, or why it cannot be
#   create   check, then ask for the TPU: a queued resource (the Cloud TPU default; SPOT=1 for
#            Spot capacity), waiting until it is ACTIVE; PROVISION=vm creates the VM directly
#   copy     copy this checkout (the files git tracks or would track) to ~/arco_jax on all workers
#   install  a Python 3.11 virtual environment with requirements-gcs.txt (the core requirements and
#            the Cloud Storage clients for a gs:// WORKDIR) and jax[tpu] of the pinned version
#   start    stage DATA from GCS to each worker's disk, then start training in the background on
#            all workers (refused while a training job still runs there); arguments go to arco_jax.main
#   run      the whole job, supervised from here until training finishes: create the TPU if it
#            does not exist, copy, install, start, wait; after a preemption (exit code 75, or the
#            Spot TPU taken back) it recreates what is gone and starts again, and training resumes
#            exactly from the last checkpoint in WORKDIR. Exit code 0 when training finished
#   status   the TPU's state and worker 0's training state (running, exit N, none)
#   logs     follow the training log of worker 0 (WORKER=N for another)
#   delete   delete the TPU (and its queued resource); checkpoints and results stay in WORKDIR
#
# Settings (environment variables):
#   ZONE             required, e.g. us-central2-b (v4), us-west4-a (v5e)
#   BUCKET           required for `start` and `run`: gs://your-bucket
#   PROJECT          GCP project; default: gcloud's configured project
#   TPU_NAME         default arco-jax (also the queued resource's name)
#   ACCELERATOR      default v4-8; e.g. v4-32, v5litepod-8, v5litepod-16, v6e-8
#   RUNTIME_VERSION  default: the base image for ACCELERATOR's generation
#   PROVISION        queued (default): a queued resource; vm: gcloud compute tpus tpu-vm create
#   SPOT             1: Spot capacity (cheaper, can be taken back at any time)
#   CONFIG           default configs/acdc.py
#   DATA             default $BUCKET/ACDC (the SSL4MIS layout); set it empty for the phantom demo
#   WORKDIR          default $BUCKET/runs/acdc; shared by all workers, where the trainer resumes
#   PYTHON           the local Python that checks the config (default .venv/bin/python, else python3)
#   SKIP_CHECK       1: create and start without checking the config here
#   POLL_SECONDS     how often `run` and `create` look at the TPU (default 60)
#   MAX_STARTS       how many times `run` starts training before it gives up (default 50)
#   DRY_RUN          1: same as --dry-run, print every command instead of running it (the
#                    config check, which only reads local files, still runs)
#
# Example:
#   export ZONE=us-central2-b BUCKET=gs://my-bucket ACCELERATOR=v4-8 SPOT=1
#   launch/tpu_vm.sh run --config.data.labeled_patients=7     # create ... train ... until done
#   launch/tpu_vm.sh logs                                      # from another terminal
#   launch/tpu_vm.sh delete
set -euo pipefail
# Written for the bash 3.2 that macOS ships: no associative arrays, no ${x,,}, and arrays
# are expanded as ${a[@]+"${a[@]}"} (bash before 4.4 calls "${a[@]}" of an empty array unbound).

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
}

fail() {
  echo "tpu_vm.sh: $*" >&2
  exit 2
}

say() {
  echo "tpu_vm.sh: $*" >&2
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
PROVISION="${PROVISION:-queued}"
CONFIG="${CONFIG:-configs/acdc.py}"
WORKER="${WORKER:-0}"
POLL_SECONDS="${POLL_SECONDS:-60}"
MAX_STARTS="${MAX_STARTS:-50}"
REMOTE_DIR="arco_jax"                     # relative to the worker's home directory
REMOTE_DATA='$HOME/arco_jax_data'         # expanded on the worker
REMOTE_LOG='$HOME/arco_jax_train.log'
REMOTE_PID='$HOME/arco_jax_train.pid'     # the training job's process id, while it runs
REMOTE_EXIT='$HOME/arco_jax_train.exit'   # its exit code, once it has ended
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

# "DEVICES HOSTS": the JAX devices of ACCELERATOR (all hosts) and its host count.
# v4, v5p: the size counts TensorCores, two per chip, one JAX device per chip, 4 chips a host.
# v5e, v6e: the size counts chips; up to 8 on one host, 4-chip hosts beyond.
# v2, v3: the size counts TensorCores, each a JAX device, 8 a host.
topology() {
  local generation="${ACCELERATOR%-*}" size="${ACCELERATOR##*-}" devices hosts
  case "$size" in
    '' | *[!0-9]*) fail "ACCELERATOR '$ACCELERATOR' is not TYPE-SIZE (e.g. v4-8, v5litepod-16, v6e-8)" ;;
  esac
  case "$generation" in
    v4 | v5p) devices=$((size / 2)); hosts=$(((devices + 3) / 4)) ;;
    v5litepod | v5e | v6e)
      devices=$size
      if [ "$size" -le 8 ]; then hosts=1; else hosts=$((size / 4)); fi
      ;;
    v2 | v3) devices=$size; hosts=$(((size + 7) / 8)) ;;
    *) fail "ACCELERATOR '$ACCELERATOR': unknown TPU generation '$generation' (v2, v3, v4, v5litepod, v5p, v6e)" ;;
  esac
  [ "$devices" -ge 1 ] || fail "ACCELERATOR '$ACCELERATOR' has no chips"
  echo "$devices $hosts"
}

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

# gcloud compute tpus GROUP VERB ARGS... in this zone (and project); GROUP tpu-vm or queued-resources.
gcloud_tpus() {
  local args=(gcloud compute tpus "$@" "--zone=$ZONE")
  if [ -n "${PROJECT:-}" ]; then args+=("--project=$PROJECT"); fi
  do_run ${args[@]+"${args[@]}"}
}

# The same, always run (a query whose answer decides what comes next), its output captured.
query_tpus() {
  local args=(gcloud compute tpus "$@" "--zone=$ZONE")
  if [ -n "${PROJECT:-}" ]; then args+=("--project=$PROJECT"); fi
  ${args[@]+"${args[@]}"} 2>/dev/null
}

# A command on every worker of the slice, at the same time.
on_all_workers() {
  gcloud_tpus tpu-vm ssh "$TPU_NAME" --worker=all "--command=$1"
}

no_extra_arguments() {
  [ $# -eq 0 ] || fail "'$COMMAND' takes no arguments, got: $*"
}

# The config (with the overrides given) against ACCELERATOR, here, before anything is paid for.
check_config() {
  if [ "${SKIP_CHECK:-0}" = 1 ]; then
    say "SKIP_CHECK=1: $CONFIG is not checked against $ACCELERATOR"
    return 0
  fi
  local python="${PYTHON:-}" layout devices hosts
  if [ -z "$python" ]; then
    if [ -x "$REPO_ROOT/.venv/bin/python" ]; then python="$REPO_ROOT/.venv/bin/python"; else python=python3; fi
  fi
  layout="$(topology)"
  devices="${layout% *}"
  hosts="${layout#* }"
  local summary
  if ! summary="$(cd "$REPO_ROOT" && "$python" -m arco_jax.preflight "--config=$CONFIG" "--devices=$devices" \
    "--hosts=$hosts" --platform=tpu "$@" 2>&1)"; then
    case "$summary" in
      *ModuleNotFoundError* | *ImportError* | '')
        fail "checking $CONFIG against $ACCELERATOR needs arco_jax's requirements in a local Python ($python:" \
          "$(echo "$summary" | tail -n 1)): python3 -m venv .venv && .venv/bin/pip install -r requirements.txt," \
          "or set PYTHON; SKIP_CHECK=1 skips the check" ;;
    esac
    fail "$ACCELERATOR ($devices chips, $hosts host(s)) cannot run this: $(echo "$summary" | grep -v '^Pass --help' \
      | grep . | tail -n 1)"
  fi
  say "$CONFIG on $ACCELERATOR: $summary"
}

# The TPU VM's state (READY, CREATING, PREEMPTED, ...), or NONE when it does not exist.
node_state() {
  local state
  state="$(query_tpus tpu-vm describe "$TPU_NAME" "--format=value(state)")" || state=""
  echo "${state:-NONE}"
}

# The queued resource's state (WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, SUSPENDED, FAILED ...), or NONE.
queued_state() {
  local state
  state="$(query_tpus queued-resources describe "$TPU_NAME" "--format=value(state.state)")" || state=""
  echo "${state:-NONE}"
}

create_tpu() {
  local spot=()
  if [ "${SPOT:-0}" = 1 ]; then spot=(--spot); fi
  case "$PROVISION" in
    queued)
      gcloud_tpus queued-resources create "$TPU_NAME" "--node-id=$TPU_NAME" "--accelerator-type=$ACCELERATOR" \
        "--runtime-version=$RUNTIME_VERSION" --scopes=https://www.googleapis.com/auth/cloud-platform \
        ${spot[@]+"${spot[@]}"}
      if [ "$DRY_RUN" = 1 ]; then
        do_run gcloud compute tpus queued-resources describe "$TPU_NAME" "--zone=$ZONE" "--format=value(state.state)"
        echo "# (repeated every $POLL_SECONDS s until ACTIVE)"
        return 0
      fi
      local state
      while true; do
        state="$(queued_state)"
        case "$state" in
          ACTIVE) break ;;
          FAILED | SUSPENDED | NONE)
            fail "queued resource $TPU_NAME is $state; 'launch/tpu_vm.sh delete' and try again (or another ZONE)" ;;
          *) say "queued resource $TPU_NAME: $state; looking again in $POLL_SECONDS s"; sleep "$POLL_SECONDS" ;;
        esac
      done
      ;;
    vm)
      gcloud_tpus tpu-vm create "$TPU_NAME" "--accelerator-type=$ACCELERATOR" "--version=$RUNTIME_VERSION" \
        --scopes=https://www.googleapis.com/auth/cloud-platform ${spot[@]+"${spot[@]}"}
      ;;
    *) fail "PROVISION must be 'queued' or 'vm', got '$PROVISION'" ;;
  esac
}

delete_tpu() {
  if [ "$PROVISION" = queued ]; then
    gcloud_tpus queued-resources delete "$TPU_NAME" --force --quiet
  else
    gcloud_tpus tpu-vm delete "$TPU_NAME" --quiet
  fi
}

copy_code() {
  # Tracked and untracked-but-not-ignored files: no virtual environments, runs or caches.
  do_run bash -c "cd $(quote "$REPO_ROOT") && git ls-files -z --cached --others --exclude-standard \
| xargs -0 tar -czf $(quote "$ARCHIVE")"
  gcloud_tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME:arco_jax_code.tar.gz" --worker=all
  on_all_workers "mkdir -p ~/$REMOTE_DIR && tar -xzf ~/arco_jax_code.tar.gz -C ~/$REMOTE_DIR"
}

install_environment() {
  local jax_version
  jax_version="$(sed -n 's/^jax==//p' "$REPO_ROOT/requirements.txt")"
  [ -n "$jax_version" ] || fail "requirements.txt pins no jax==VERSION"
  # The TPU images ship Python 3.10; uv fetches a Python 3.11 for the project's pins.
  on_all_workers "set -e; cd ~/$REMOTE_DIR && python3 -m pip install --user --quiet uv \
&& ~/.local/bin/uv venv --allow-existing --python 3.11 .venv \
&& ~/.local/bin/uv pip install --python .venv/bin/python -r requirements-gcs.txt 'jax[tpu]==$jax_version'"
}

# Start training detached on every worker (training outlives the ssh session; `logs` follows it).
# A worker whose previous job still runs refuses, so two runs never share a TPU.
start_training() {
  require BUCKET gs://my-bucket
  [[ "$BUCKET" == gs://* ]] || fail "BUCKET must be a gs:// URL, got '$BUCKET'"
  DATA="${DATA-$BUCKET/ACDC}"
  WORKDIR="${WORKDIR:-$BUCKET/runs/acdc}"
  local train=(.venv/bin/python -m arco_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" --multihost) stage="" job
  if [ -n "$DATA" ]; then
    stage="mkdir -p $REMOTE_DATA && gcloud storage rsync --recursive $(quote "$DATA") $REMOTE_DATA/ACDC && "
    train+=("--config.data.data_dir=$REMOTE_DATA/ACDC")
  fi
  if [ $# -gt 0 ]; then train+=("$@"); fi
  job="$(printf '%q ' ${train[@]+"${train[@]}"})"
  job="${job//\\\$HOME/\$HOME}"   # keep $HOME for the worker's shell to expand
  local busy="if [ -f $REMOTE_PID ] && kill -0 \"\$(cat $REMOTE_PID)\" 2>/dev/null; then echo \
\"tpu_vm.sh: busy: training job \$(cat $REMOTE_PID) still runs on \$(hostname) (log: $REMOTE_LOG)\" >&2; exit 3; fi"
  # The job (data staging included) records its exit code when it ends, and its process id meanwhile.
  local record="${stage}$job; code=\$?; echo \"arco_jax.main exit code \$code\"; \
echo \$code > $REMOTE_EXIT.tmp && mv $REMOTE_EXIT.tmp $REMOTE_EXIT; rm -f $REMOTE_PID"
  on_all_workers "set -e; cd ~/$REMOTE_DIR; $busy; rm -f $REMOTE_EXIT; setsid nohup bash -c \
$(quote "$record") > $REMOTE_LOG 2>&1 < /dev/null & echo \$! > $REMOTE_PID"
}

# Worker 0's training state: 'running', 'exit N', 'none' (no job, or one killed before it could
# record an exit code), or 'unreachable' (ssh failed: the TPU is gone, preempted or rebooting).
training_state() {
  local output
  if output="$(query_tpus tpu-vm ssh "$TPU_NAME" --worker=0 "--command=if [ -f $REMOTE_EXIT ]; then \
echo \"exit \$(cat $REMOTE_EXIT)\"; elif [ -f $REMOTE_PID ] && kill -0 \"\$(cat $REMOTE_PID)\" 2>/dev/null; then \
echo running; else echo none; fi")"; then
    echo "$output" | tail -n 1
  else
    echo unreachable
  fi
}

# `run`: start, wait, and after a preemption recreate and start again, until training exits 0.
supervise() {
  require BUCKET gs://my-bucket
  local starts=0 state job
  if [ "$DRY_RUN" = 1 ]; then
    create_tpu
    copy_code
    install_environment
    start_training "$@"
    echo "# then every $POLL_SECONDS s: worker 0's training state; after exit code 75 or a preemption the TPU is"
    echo "# recreated (delete, create, copy, install) and training started again, until exit code 0"
    return 0
  fi
  while true; do
    state="$(node_state)"
    if [ "$state" != READY ]; then
      if [ "$state" != NONE ] || [ "$(queued_state)" != NONE ]; then
        say "TPU $TPU_NAME is $state: deleting it to create it again"
        delete_tpu
      fi
      create_tpu
      copy_code
      install_environment
    elif [ "$starts" = 0 ]; then
      job="$(training_state)"
      [ "$job" != running ] || fail "busy: a training job already runs on $TPU_NAME ('launch/tpu_vm.sh logs'" \
        "follows it); wait for it to end or delete the TPU"
      copy_code   # The TPU was there already: bring it this checkout (installing again is quick).
      install_environment
    fi
    [ "$starts" -lt "$MAX_STARTS" ] || fail "training was started $starts times (MAX_STARTS) without finishing"
    starts=$((starts + 1))
    say "starting training (start $starts)"
    start_training "$@"
    while true; do
      sleep "$POLL_SECONDS"
      job="$(training_state)"
      case "$job" in
        running) ;;
        "exit 0")
          say "training finished (exit code 0); results in ${WORKDIR}; 'launch/tpu_vm.sh delete' frees the TPU"
          return 0
          ;;
        "exit 75") say "training was preempted (exit code 75): starting again, it resumes from its checkpoint"; break ;;
        unreachable | none) say "training is $job on $TPU_NAME ($(node_state)): starting again"; break ;;
        exit\ *)
          echo "tpu_vm.sh: training failed ($job, not a preemption); the log: launch/tpu_vm.sh logs" >&2
          exit 1
          ;;
        *) say "unexpected answer from worker 0: '$job'; asking again" ;;
      esac
    done
  done
}

case "$COMMAND" in
  check | create | copy | install | start | run | status | logs | delete) ;;
  *)
    echo "tpu_vm.sh: unknown command '$COMMAND'" >&2
    usage
    ;;
esac
if [ "$COMMAND" != check ]; then require ZONE us-central2-b; fi
case "$COMMAND" in
  check) check_config "$@" ;;
  create)
    check_config "$@"
    create_tpu
    ;;
  copy)
    no_extra_arguments "$@"
    copy_code
    ;;
  install)
    no_extra_arguments "$@"
    install_environment
    ;;
  start)
    check_config "$@"
    start_training "$@"
    ;;
  run)
    check_config "$@"
    supervise "$@"
    ;;
  status)
    no_extra_arguments "$@"
    echo "TPU $TPU_NAME: $(node_state) (queued resource: $(queued_state)); training: $(training_state)"
    ;;
  logs)
    no_extra_arguments "$@"
    gcloud_tpus tpu-vm ssh "$TPU_NAME" "--worker=$WORKER" "--command=tail -n 100 -F $REMOTE_LOG"
    ;;
  delete)
    no_extra_arguments "$@"
    delete_tpu
    ;;
esac
