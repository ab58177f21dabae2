"""Command line entry: python -m arco_jax.main --config=configs/demo.py --workdir=runs/demo

Override any config field from the command line, e.g. --config.train.steps=100. Running the
same command again resumes from the workdir's newest intact checkpoint; a workdir whose run
used another config is refused unless --allow_config_change is given.

Several hosts: --multihost calls jax.distributed.initialize(), which finds the coordinator by
itself on TPU pods and SLURM/Kubernetes clusters; elsewhere give --coordinator_address,
--num_processes and --process_id (each implies --multihost). Every host runs the same
command with the same --workdir (a shared filesystem or bucket).

--profile_steps=START:END writes a jax.profiler trace of the updates from global step START
to END into <workdir>/tensorboard, for TensorBoard's profile plugin (skip the first steps:
they compile).

Exit codes: 0 done; 75 (EX_TEMPFAIL) preempted: SIGTERM arrived, the current step was saved
and the same command resumes it; 2 a bad --config.<field> override (no such field, or a value
of the wrong type), a bad --profile_steps or a --workdir on a Google Drive that is not
mounted, told in one line; 1 any other error (the message names its cause).
"""
import difflib
import re
import sys
import textwrap

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

PREEMPTED_EXIT_CODE = 75
USAGE_EXIT_CODE = 2
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)(?:=(.*))?$", re.DOTALL)

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_bool("allow_config_change", False,
                  "Resume a workdir whose run used another config (the old config.json is kept).")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() before anything else.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (implies --multihost).")
flags.DEFINE_integer("num_processes", None, "Number of processes of the job (implies --multihost).")
flags.DEFINE_integer("process_id", None, "This process's index, 0 ... num_processes-1 (implies --multihost).")
flags.DEFINE_string("profile_steps", None,
                    "START:END: trace the updates from global step START to END with jax.profiler into "
                    "<workdir>/tensorboard (TensorBoard's profile tab).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _config_argument(argv: list[str]) -> str | None:
    """The value of --config in argv (either --config=X or --config X), as config_flags finds it."""
    for i, arg in enumerate(argv):
        if re.match(r"^--?config=", arg):
            return arg.split("=", 1)[1]
        if re.match(r"^--?config$", arg) and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _overrides(argv: list[str]) -> list[tuple[str, str | None]]:
    """(field path, value or None) of each --config.<path>[=value] in argv, in order."""
    found = [_OVERRIDE.match(arg) for arg in argv]
    return [(m.group(1), m.group(2)) for m in found if m]


def _lookup(config, path: str):
    """The value at a dotted path ('[i]' indexing allowed), or raise LookupError."""
    node = config
    for part in path.split("."):
        key, *indices = re.split(r"\[|\]\[", part.removesuffix("]"))
        if not isinstance(node, ml_collections.ConfigDict) or key not in node:
            raise LookupError(path)
        node = node[key]
        for index in indices:
            try:
                node = node[int(index)]
            except (ValueError, TypeError, IndexError, KeyError) as err:
                raise LookupError(path) from err
    return node


def _leaf_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            paths += _leaf_paths(value, f"{prefix}{key}.")
        else:
            paths.append(f"{prefix}{key}")
    return paths


def _override_problem(argv: list[str], error: Exception) -> str | None:
    """One line for a config_flags failure that an override explains: the first one naming no
    field of the loaded config (with the closest existing field), or a value of the wrong type.
    None when no override explains it (a bug in the config file keeps its traceback)."""
    argument = _config_argument(argv)
    if argument is None:
        return None
    try:
        config = FLAGS["config"].parser.parse(argument)
    except Exception:  # pylint: disable=broad-except  # The file itself fails: not ours to explain.
        return None
    if not isinstance(config, ml_collections.ConfigDict):  # config_flags defers a missing file's error.
        return f"--config={argument}: cannot load the config file (no such file, or not readable)"
    for path, value in _overrides(argv):
        try:
            current = _lookup(config, path)
        except LookupError:
            closest = difflib.get_close_matches(path, _leaf_paths(config), n=1, cutoff=0.0)
            hint = f"; did you mean --config.{closest[0]}?" if closest else ""
            return f"--config.{path}: no such config field{hint}"
        prefix = f"flag --config.{path}={value}: "
        if isinstance(error, flags.Error) and value is not None and str(error).startswith(prefix):
            detail = " ".join(str(error)[len(prefix):].split())
            expected = "" if current is None else f", expected {type(current).__name__}"
            return f"--config.{path}: bad value {value!r}{expected} ({detail})"
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (app.parse_flags_with_usage), except that a bad --config.<field>
    override exits with code 2 and one line instead of a traceback (unknown field: config_flags
    raises AttributeError/KeyError) or absl's two-line fatal message (bad value)."""
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError, IndexError, OSError) as err:
        problem = _override_problem(FLAGS.read_flags_from_files(argv[1:], force_gnu=False), err)
        if problem is None:
            raise
    except flags.Error as err:
        problem = None
        if str(err).startswith("flag --config."):
            problem = _override_problem(FLAGS.read_flags_from_files(argv[1:], force_gnu=False), err)
        if problem is None:  # absl's own message and exit code.
            message = str(err)
            message = f"\n{textwrap.indent(message, '  ')}" if "\n" in message else f" {message}"
            sys.stderr.write(f"FATAL Flags parsing error:{message}\n"
                             "Pass --helpshort or --helpfull to see help on flags.\n")
            sys.exit(1)
    print(problem, file=sys.stderr)
    sys.exit(USAGE_EXIT_CODE)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    explicit = {"coordinator_address": FLAGS.coordinator_address, "num_processes": FLAGS.num_processes,
                "process_id": FLAGS.process_id}
    if FLAGS.multihost or any(v is not None for v in explicit.values()):
        jax.distributed.initialize(**{k: v for k, v in explicit.items() if v is not None})
    from arco_jax import files, monitoring, train
    from arco_jax.data.ssl4mis import DataError
    from arco_jax.errors import ConfigError

    try:  # Before anything is read, written or compiled.
        files.workdir_path(FLAGS.workdir)  # A workdir on a Google Drive that is not mounted stops here.
        profile_steps = monitoring.check_profile_steps(FLAGS.profile_steps,
                                                       FLAGS.config.pretrain.steps + FLAGS.config.train.steps)
    except monitoring.ConfigError as error:
        print(error, file=sys.stderr)
        sys.exit(USAGE_EXIT_CODE)
    logging.set_verbosity(logging.WARNING)  # Library chatter (Orbax, Grain); progress has its own logger.
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change,
                                 profile_steps=profile_steps)
    except train.Preempted as preempted:
        print(preempted, file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    except (ConfigError, DataError) as error:  # A bad field or file: its one line names it.
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
