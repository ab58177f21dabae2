"""Check a config against an accelerator before it exists: the launchers run this before they
create a TPU VM, so a batch that cannot be laid out on its chips stops here in seconds instead
of on the VM after it was paid for.

  python -m arco_jax.preflight --config=configs/acdc.py --devices=8 --hosts=1 --platform=tpu \
      [--config.field=value ...]

Every check of config.validate runs except the dataset's own (the data is not on this machine);
the fields left to the hardware (data.mesh_devices, arco.remat_student) are resolved as the
trainer will resolve them there, and printed on one line. Exit code 2 and one line naming the
field when the config cannot run on that hardware.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

USAGE_EXIT_CODE = 2

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_integer("devices", None, "JAX devices of the accelerator, all hosts together (TPU chips; v2/v3 cores).")
flags.DEFINE_integer("hosts", 1, "Hosts (processes) the devices are spread over.")
flags.DEFINE_enum("platform", "tpu", ["cpu", "gpu", "tpu"], "The accelerator's JAX platform.")
flags.mark_flags_as_required(["config", "devices"])
FLAGS = flags.FLAGS


def describe(config, devices: int, hosts: int, platform: str) -> str:
    """The resolved layout in one line."""
    d = config.data
    idle = devices - d.mesh_devices
    return (f"batches {d.batch_labeled}+{d.batch_unlabeled} on {d.mesh_devices} of {devices} {platform} devices "
            f"({hosts} host{'s' if hosts > 1 else ''}{f', {idle} idle' if idle else ''}); "
            f"arco.remat_student {config.arco.remat_student}; model.dtype {config.model.dtype}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from arco_jax.config import ConfigError, validate  # pylint: disable=import-outside-toplevel

    config = FLAGS.config
    try:
        validate(config, device_count=FLAGS.devices, process_count=FLAGS.hosts, platform=FLAGS.platform,
                 check_data=False)
    except ConfigError as error:
        where = f"{FLAGS.devices} {FLAGS.platform} devices on {FLAGS.hosts} host{'s' if FLAGS.hosts > 1 else ''}"
        print(f"{config_flags.get_config_filename(FLAGS['config'])} on {where}: {error}", file=sys.stderr)
        sys.exit(USAGE_EXIT_CODE)
    print(describe(config, FLAGS.devices, FLAGS.hosts, FLAGS.platform))


if __name__ == "__main__":
    app.run(main)
