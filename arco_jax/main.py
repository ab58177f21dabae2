"""Command line entry: python -m arco_jax.main --config=configs/demo.py --workdir=runs/demo

Override any config field from the command line, e.g. --config.train.steps=100.
On several hosts (TPU pods, clusters) pass --multihost: jax.distributed.initialize() then
finds the coordinator from the environment.
"""
from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() before anything else.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    if FLAGS.multihost:
        jax.distributed.initialize()
    from arco_jax import train

    logging.set_verbosity(logging.WARNING)  # Library chatter (Orbax, Grain); progress has its own logger.
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
