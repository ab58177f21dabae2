"""Evaluate a trained run on the val or test volumes with the SSL4MIS protocol.

  python -m arco_jax.evaluate --workdir=runs/acdc_sg_7 [--split=test] [--checkpoint=best]
      [--empty_policy=ssl4mis] [--data_dir=/path/to/ACDC]

Writes <workdir>/eval/<split>-<checkpoint>/: per_case.csv (one row per volume and class),
summary.json (means per class and over classes, the empty-mask policy, units, the checkpoint's
step) and table.md, and prints the table. The data is the run's (config.json; the phantom
is re-derived from its parameters) unless --data_dir points elsewhere.

Distances (HD95, ASD) are in voxels, as every published ACDC table computes them (medpy
without spacing). When a volume's h5 carries a `spacing` attribute or dataset (3 positive
numbers in millimetres, in the array's axis order (z, y, x), i.e. slice spacing first), the
distances are also computed in millimetres; they are reported when every volume of the split
has a spacing.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import sys
from pathlib import Path

import ml_collections
from etils import epath

from arco_jax import evaluation, files, inference
from arco_jax.data import datasets, registry, ssl4mis

SPLITS = ("val", "test")
SPACING_KEY = datasets.SPACING_KEY
SPACING_CONVENTION = (
    "h5 'spacing' attribute (or dataset): 3 positive numbers in mm in the array's axis order "
    "(z, y, x), slice spacing first; NIfTI zooms are (x, y, z) and must be reversed")
UNITS = {"dice": "fraction", "jaccard": "fraction", "hd95": "voxels", "asd": "voxels",
         "hd95_mm": "mm", "asd_mm": "mm"}
DISTANCE_METRICS = ("hd95", "asd")


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


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: an undefined mean (the 'nan' policy, every case excluded) is null."""
    return float(value) if math.isfinite(value) else None


def _by_class(summary: dict, key: str, names: tuple[str, ...], cast=_finite_or_none) -> dict:
    return {cls: {name: cast(summary[key][k, i]) for i, name in enumerate(names)}
            for k, cls in enumerate(summary["class_names"])}


def _summary_json(voxel: dict, mm: dict | None, meta: dict) -> dict:
    names = list(evaluation.METRIC_NAMES)
    per_class = _by_class(voxel, "mean", names)
    std = _by_class(voxel, "std", names)
    excluded = _by_class(voxel, "excluded", names, cast=int)
    mean = {name: _finite_or_none(voxel["class_mean"][i]) for i, name in enumerate(names)}
    if mm is not None:
        for metric in DISTANCE_METRICS:
            i = evaluation.METRIC_NAMES.index(metric)
            mean[f"{metric}_mm"] = _finite_or_none(mm["class_mean"][i])
            for k, cls in enumerate(mm["class_names"]):
                per_class[cls][f"{metric}_mm"] = _finite_or_none(mm["mean"][k, i])
                std[cls][f"{metric}_mm"] = _finite_or_none(mm["std"][k, i])
                excluded[cls][f"{metric}_mm"] = int(mm["excluded"][k, i])
    units = {m: u for m, u in UNITS.items() if mm is not None or not m.endswith("_mm")}
    return {**meta, "units": units, "spacing_convention": SPACING_CONVENTION, "mean": mean,
            "per_class": per_class, "std_per_class": std, "excluded_per_class": excluded}


def _write_per_case(path: epath.Path, per_case: dict, per_case_mm: dict | None, class_names) -> None:
    columns = ["case", "class", *evaluation.METRIC_NAMES]
    if per_case_mm is not None:
        columns += [f"{m}_mm" for m in DISTANCE_METRICS]
    distance_columns = [evaluation.METRIC_NAMES.index(m) for m in DISTANCE_METRICS]
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(columns)
    for case, rows in per_case.items():
        for k, cls in enumerate(class_names):
            values = list(rows[k])
            if per_case_mm is not None:
                values += [per_case_mm[case][k, i] for i in distance_columns]
            writer.writerow([case, cls, *(repr(float(v)) for v in values)])
    files.write_text(path, text.getvalue())


def evaluate_workdir(workdir: epath.PathLike, split: str = "test", checkpoint: str | int = "best",
                     empty_policy: str | None = None, data_dir: str | Path | None = None) -> Report:
    """Run the volume protocol for one checkpoint of a run and write the three files."""
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

    num_classes, class_names = model.num_classes, model.class_names
    per_case, per_case_mm = {}, {}
    for volume in registry.iterate_cases(data, split):
        pred = model.predict_volume(volume.image)
        per_case[volume.case] = evaluation.evaluate_volume(pred, volume.label, num_classes, empty_policy=policy,
                                                           ignore_label=config.data.ignore_label)
        if volume.spacing is not None:
            per_case_mm[volume.case] = evaluation.evaluate_volume(pred, volume.label, num_classes, volume.spacing,
                                                                  empty_policy=policy,
                                                                  ignore_label=config.data.ignore_label)
    with_mm = len(per_case_mm) == len(per_case)
    if per_case_mm and not with_mm:
        print(f"warning: {len(per_case_mm)} of {len(per_case)} {split} volumes have a '{SPACING_KEY}'; "
              "millimetre distances need all of them and are left out", file=sys.stderr)

    voxel = evaluation.summarize(per_case, class_names)
    mm = evaluation.summarize(per_case_mm, class_names) if with_mm else None
    meta = {"split": split, "checkpoint": str(checkpoint), "checkpoint_directory": model.directory,
            "checkpoint_step": model.step, "model": config.eval.model, "data_dir": data.description,
            "num_cases": len(per_case), "cases_with_spacing": len(per_case_mm),
            "empty_policy": policy, "empty_policy_description": evaluation.EMPTY_POLICIES[policy]}
    summary = _summary_json(voxel, mm, meta)

    title = (f"# {config.data.dataset}, {split} split: {config.eval.model} of checkpoint "
             f"{checkpoint} ({model.directory}, step {model.step})\n\n")
    table = title + "## Distances in voxels\n\n" + evaluation.markdown_table(voxel, policy, "voxels")
    if mm is not None:
        table += "\n## Distances in mm\n\n" + evaluation.markdown_table(mm, policy, "mm")

    directory = eval_directory(workdir, split, checkpoint)
    directory.mkdir(parents=True, exist_ok=True)
    _write_per_case(directory / "per_case.csv", per_case, per_case_mm if with_mm else None, class_names)
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
    except (inference.WorkdirError, ssl4mis.DataError) as err:
        sys.exit(f"error: {err}")
    print(report.table)
    print(f"wrote {report.directory}/per_case.csv, summary.json, table.md")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
