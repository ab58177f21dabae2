"""The start every report command (study, variance, contrast_geometry, term_gradients) shares."""
from __future__ import annotations


def report_flags(argv):
    """absl's parsed FLAGS after refusing stray positional arguments, with absl's logging at
    WARNING: these commands print their own progress and report."""
    from absl import flags, logging  # pylint: disable=import-outside-toplevel

    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    return flags.FLAGS
