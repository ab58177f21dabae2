"""Evaluate a trained run on its val or test cases with the run's evaluator (the one training
reported with: the SSL4MIS volume protocol for ACDC, mIoU for image datasets).

  python -m arco_jax.evaluate --workdir=runs/acdc_sg_7 [--split=test] [--checkpoint=best]
      [--empty_policy=ssl4mis] [--data_dir=/path/to/ACDC]

Writes <workdir>/eval/<split>-<checkpoint>/: summary.json (what the checkpoint and data were,
then the evaluator's record, the same summary a run's results.json holds: for volumes, means per
class and over classes, their std and excluded counts, units), table.md, and for volumes
per_case.csv (one row per volume and class); prints the table. The data is the run's
(config.json; the phantom is re-derived from its parameters) unless --data_dir points elsewhere.

Distances (HD95, ASD) are in voxels, as every published ACDC table computes them (medpy
without spacing). When a volume's h5 carries a `spacing` attribute or dataset (3 positive
numbers in millimetres, in the array's axis order (z, y, x), i.e. slice spacing first), the
distances are also computed in millimetres; they are reported when every volume of the split
has a spacing.

For cardiac cine data (ACDC's classes, cases named patient_frameNN) the table and summary.json
add the metrics at end diastole and end systole separately and the LV / RV end-diastolic and
end-systolic volumes (mL with a spacing, else voxels) and ejection fractions, predicted against
the ground truth (evaluators/cardiac.py).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import sys
from pathlib import Path

import ml_collections
import numpy as np
from etils import epath

from arco_jax import evaluation, evaluators, files, inference
from arco_jax.evaluators import cardiac
from arco_jax.data import datasets, registry, ssl4mis
from arco_jax.errors import ConfigError

SPLITS = ("val", "test")
SPACING_KEY = datasets.SPACING_KEY
SPACING_CONVENTION = (
    "h5 'spacing' attribute (or dataset): 3 positive numbers in mm in the array's axis order "
    "(z, y, x), slice spacing first; NIfTI zooms are (x, y, z) and must be reversed")


@dataclasses.dataclass(frozen=True)
class Report:
    """What evaluate_workdir wrote: the folder, summary.json's content and table.md's text."""

    directory: epath.Path
    summary: dict
    table: str


read_spacing = datasets.read_h5_spacing


def open_eval_data(config: ml_collections.ConfigDict, workdir: epath.Path,
                   data_dir: str | Path | None) -> registry.OpenDataset:
    """The run's dataset (config.json; a generated one is rebuilt if not cached), or a folder
    of the same kind at --data_dir."""
    if data_dir:
        config = ml_collections.ConfigDict(config.to_dict())
        config.data.data_dir = str(data_dir)
    if config.data.data_dir and not Path(config.data.data_dir).is_dir():
        origin = "--data_dir" if data_dir else f"data.data_dir in {workdir / inference.CONFIG_FILE}"
        raise ssl4mis.DataError(f"data root {config.data.data_dir} ({origin}) is not a directory; pass --data_dir")
    return registry.open_dataset(config)


def eval_directory(workdir: epath.PathLike, split: str, checkpoint: str | int) -> epath.Path:
    return files.workdir_path(workdir) / "eval" / f"{split}-{checkpoint}"


def _write_per_case(path: epath.Path, per_case: dict, per_case_mm: dict | None, class_names) -> None:
    columns = ["case", "class", *evaluation.METRIC_NAMES]
    if per_case_mm is not None:
        columns += [f"{m}_mm" for m in evaluation.DISTANCE_METRICS]
    distance_columns = [evaluation.METRIC_NAMES.index(m) for m in evaluation.DISTANCE_METRICS]
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(columns)
    for case, rows in per_case.items():
        for k, cls in enumerate(class_names):
            values = list(rows[k])
            if per_case_mm is not None:
                values += [per_case_mm[case][k][i] for i in distance_columns]
            writer.writerow([case, cls, *(repr(float(v)) for v in values)])
    files.write_text(path, text.getvalue())


def evaluate_workdir(workdir: epath.PathLike, split: str = "test", checkpoint: str | int = "best",
                     empty_policy: str | None = None, data_dir: str | Path | None = None) -> Report:
    """Run the run's evaluator on one checkpoint and split, and write its files."""
    workdir = files.workdir_path(workdir)
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    config = inference.read_config(workdir)
    policy = empty_policy or config.eval.empty_policy
    if policy not in evaluation.EMPTY_POLICIES:
        raise ValueError(f"empty_policy={policy!r} is not one of {', '.join(evaluation.EMPTY_POLICIES)}")
    data = open_eval_data(config, workdir, data_dir)
    data.cases(split)  # A missing list fails before the checkpoint is restored.
    model = inference.load_model(workdir, checkpoint)

    eval_config = ml_collections.ConfigDict(config.to_dict())
    eval_config.eval.empty_policy = policy
    evaluator = evaluators.build(eval_config)
    if hasattr(evaluator, "distances_in_mm"):
        evaluator.distances_in_mm = True
    result = evaluator.run(lambda images: np.asarray(model.predict_logits(images)), data, split)
    record = dict(result.record)
    per_case, per_case_mm = record.pop("per_case", None), record.pop("per_case_mm", None)
    meta = {"split": split, "checkpoint": str(checkpoint), "checkpoint_directory": model.directory,
            "checkpoint_step": model.step, "model": config.eval.model, "data_dir": data.description,
            "evaluator": evaluator.name, **evaluator.results_fields}
    if "empty_policy" in evaluator.results_fields:
        meta["empty_policy_description"] = evaluation.EMPTY_POLICIES[policy]
    if "cases_with_spacing" in record:
        meta["spacing_convention"] = SPACING_CONVENTION
    summary = {**meta, **record}
    title = (f"# {config.data.dataset}, {split} split: {config.eval.model} of checkpoint "
             f"{checkpoint} ({model.directory}, step {model.step})\n\n")
    table = title + result.table
    if per_case is not None and cardiac.applies(config.data.class_names, list(per_case)):
        summary["cardiac"] = cardiac.report(per_case, record.get("class_voxels", {}), config.data.class_names,
                                            evaluation.METRIC_NAMES)
        table += "\n" + cardiac.markdown(summary["cardiac"], evaluation.METRIC_NAMES)

    directory = eval_directory(workdir, split, checkpoint)
    directory.mkdir(parents=True, exist_ok=True)
    if per_case is not None:
        _write_per_case(directory / "per_case.csv", per_case, per_case_mm, config.data.class_names)
    files.write_text(directory / "summary.json", json.dumps(summary, indent=2) + "\n")
    files.write_text(directory / "table.md", table)
    return Report(directory=directory, summary=summary, table=table)


def _define_flags() -> None:
    """Flags are defined only when run as a program, so importing this module (and predict's,
    which has flags of the same names) never clashes."""
    from absl import flags

    flags.DEFINE_string("workdir", None, "Workdir of a trained run (config.json, checkpoints/).")
    flags.DEFINE_enum("split", "test", list(SPLITS), "Which volumes to evaluate.")
    flags.DEFINE_string("checkpoint", "best", "'best', 'last' or a saved step number.")
    flags.DEFINE_enum("empty_policy", None, list(evaluation.EMPTY_POLICIES),
                      "Empty-mask policy (default: the run's config.eval.empty_policy).")
    flags.DEFINE_string("data_dir", None, "Data folder instead of the run's (an SSL4MIS root, or the "
                        "TFDS folder for a run with data.source='tfds').")
    flags.mark_flag_as_required("workdir")


def main(argv) -> None:
    from absl import app, flags, logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    try:
        report = evaluate_workdir(f.workdir, f.split, f.checkpoint, f.empty_policy, f.data_dir)
    except (inference.WorkdirError, ssl4mis.DataError, ConfigError) as err:  # ConfigError: e.g. Drive not mounted
        sys.exit(f"error: {err}")
    print(report.table)
    written = sorted(p.name for p in report.directory.iterdir() if p.name in ("per_case.csv", "summary.json", "table.md"))
    print(f"wrote {report.directory}/{{{','.join(written)}}}")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
