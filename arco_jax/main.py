"""Command line entry: python -m arco_jax.main --config=configs/demo.py --workdir=runs/demo

Override any config field from the command line, e.g. --config.train.steps=100. Running the
same command again resumes from the workdir's newest intact checkpoint; a workdir whose run
used another config is refused unless --allow_config_change is given.

Several hosts: --multihost calls jax.distributed.initialize(), which finds the coordinator by
itself on TPU pods and SLURM/Kubernetes clusters; elsewhere give --coordinator_address,
--num_processes and --process_id (each implies --multihost). Every host runs the same
command with the same --workdir (a shared filesystem or bucket).

Exit codes: 0 done; 75 (EX_TEMPFAIL) preempted: SIGTERM arrived, the current step was saved
and the same command resumes it; 1 any error (the message names its cause).
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

PREEMPTED_EXIT_CODE = 75

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_bool("allow_config_change", False,
                  "Resume a workdir whose run used another config (the old config.json is kept).")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() before anything else.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (implies --multihost).")
flags.DEFINE_integer("num_processes", None, "Number of processes of the job (implies --multihost).")
flags.DEFINE_integer("process_id", None, "This process's index, 0 ... num_processes-1 (implies --multihost).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    explicit = {"coordinator_address": FLAGS.coordinator_address, "num_processes": FLAGS.num_processes,
                "process_id": FLAGS.process_id}
    if FLAGS.multihost or any(v is not None for v in explicit.values()):
        jax.distributed.initialize(**{k: v for k, v in explicit.items() if v is not None})
    from arco_jax import train

    logging.set_verbosity(logging.WARNING)  # Library chatter (Orbax, Grain); progress has its own logger.
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change)
    except train.Preempted as preempted:
        print(preempted, file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    app.run(main)
