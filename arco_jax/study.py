"""A study: every method at several label budgets and seeds, summarised as mean +- std over
seeds of the test Dice and HD95. By default the phantom study, on the built-in data:

  python -m arco_jax.study --out=runs/phantom_study

runs configs/phantom_study.py for each method x labeled-patient budget x seed (5 x 3 x 3 by
default), one workdir per run under <out>/runs/, and writes <out>/study.json (every run's
numbers, wall time and command) and <out>/study.md (the table), both rewritten after every run
(a study still running, or stopped, says which runs it has not finished). A run whose results.json exists
is not run again (if its config.json is the config this call would run; else the study stops
with the differing fields), and an interrupted run resumes from its checkpoint, so the same command
continues a study that was stopped. Compiled programs are cached in <out>/jax_cache: a method
compiles once for all its budgets and seeds.

--config names another study config (any config whose get_config takes "method=<preset>", such
as configs/acdc_cpu.py for real ACDC); --override sets fields of every run (the data folder).

Test numbers are those of the validation-selected checkpoint (the published protocol); the
std is over seeds (sample std, n - 1).
"""
from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from arco_jax import cli, files, methods

REPO = Path(__file__).resolve().parent.parent
STUDY_CONFIG = "configs/phantom_study.py"
METHODS = ("supervised", "mean_teacher", "arco_ns", "arco_sg", "arco_sag")
BUDGETS = (1, 3, 7)
SEEDS = (0, 1, 2)


def _config_file(config_path: str) -> Path:
    """The config named as on the command line: relative to the working directory, else to the
    repository (so `--config=configs/acdc_cpu.py` works from anywhere)."""
    for path in (Path(config_path), REPO / config_path):
        if path.is_file():
            return path
    raise ValueError(f"--config: {config_path!r} is not a file")


def load_config(method: str, labeled_patients: int, seed: int, overrides: Sequence[str] = (),
                config_path: str = STUDY_CONFIG):
    """The study config with the method preset, the budget, the seed and any `field=value`
    overrides (values parsed as Python literals when they are)."""
    path = _config_file(config_path)
    spec = importlib.util.spec_from_file_location(f"study_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(f"method={method}")
    config.data.labeled_patients = labeled_patients
    config.seed = seed
    for override in overrides:
        field, _, text = override.partition("=")
        if not _:
            raise ValueError(f"override {override!r} is not field=value")
        node = config
        *parents, leaf = field.split(".")
        for name in parents:
            if name not in node:
                raise ValueError(f"override {override!r}: the config has no field {field!r}")
            node = node[name]
        if leaf not in node:
            raise ValueError(f"override {override!r}: the config has no field {field!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        node[leaf] = tuple(value) if isinstance(value, list) else value
    return config


def run_name(method: str, labeled_patients: int, seed: int) -> str:
    return f"{method}_p{labeled_patients}_s{seed}"


def command_line(method: str, labeled_patients: int, seed: int, workdir: Path, overrides: Sequence[str],
                 config_path: str = STUDY_CONFIG) -> str:
    """The single-run command that reproduces one cell of the study."""
    extra = "".join(f" --config.{o}" for o in overrides)
    return (f"python -m arco_jax.main --config={config_path}:method={method} "
            f"--config.data.labeled_patients={labeled_patients} --config.seed={seed}{extra} --workdir={workdir}")


def check_finished_run(workdir: Path, config) -> None:
    """A finished run is reused only if it ran the config this call would run: a preset or a
    default changed since (or another --override) stops the study with the differing fields,
    instead of a table that mixes two experiments."""
    import jax  # pylint: disable=import-outside-toplevel

    from arco_jax import config as config_lib  # pylint: disable=import-outside-toplevel
    from arco_jax import train  # pylint: disable=import-outside-toplevel

    config_lib.validate(config, device_count=jax.device_count(), process_count=jax.process_count(),
                        platform=jax.default_backend(), check_data=False)
    differences = train.stored_config_differences(workdir, config)
    if differences:
        raise ValueError(f"{workdir} holds a finished run of another config ({'; '.join(differences)}; "
                         "stored -> this call): delete that folder to run it again, or use another --out")


def run_one(out: Path, method: str, labeled_patients: int, seed: int, overrides: Sequence[str],
            config_path: str = STUDY_CONFIG) -> dict:
    from arco_jax import train  # pylint: disable=import-outside-toplevel

    workdir = out / "runs" / run_name(method, labeled_patients, seed)
    record_path = workdir / "study_record.json"
    if record_path.exists():
        check_finished_run(workdir, load_config(method, labeled_patients, seed, overrides, config_path))
        record = json.loads(record_path.read_text())
        # The command names the workdir as this call's --out does (the run may have been made
        # with another spelling of the same folder).
        return {**record, "command": command_line(method, labeled_patients, seed, workdir, overrides, config_path)}
    config = load_config(method, labeled_patients, seed, overrides, config_path)
    started = time.perf_counter()
    results = train.train_and_evaluate(config, workdir)
    best = results["test"]["best"]["mean"]
    record = {"method": method, "labeled_patients": labeled_patients, "seed": seed,
              "labeled_slices": results["labeled_slices"], "steps": results["steps"],
              "best_val": results["best_val"], "test_dice": best["dice"], "test_hd95": best["hd95"],
              "test_asd": best["asd"],
              "test_dice_per_class": {c: v["dice"] for c, v in results["test"]["best"]["per_class"].items()},
              "wall_s": time.perf_counter() - started,
              "command": command_line(method, labeled_patients, seed, workdir, overrides, config_path)}
    record_path.write_text(json.dumps(record, indent=2))
    return record


def _mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else float("nan")


def summarize(records: list[dict], method_names: Sequence[str], budgets: Sequence[int]) -> dict:
    cells = {}
    for method in method_names:
        for budget in budgets:
            rows = [r for r in records if r["method"] == method and r["labeled_patients"] == budget]
            if not rows:
                continue
            dice, dice_std = _mean_std([100 * r["test_dice"] for r in rows])
            hd95, hd95_std = _mean_std([r["test_hd95"] for r in rows])
            classes = rows[0]["test_dice_per_class"]
            cells[f"{method}/{budget}"] = {
                "method": method, "labeled_patients": budget, "seeds": [r["seed"] for r in rows],
                "dice": dice, "dice_std": dice_std, "hd95": hd95, "hd95_std": hd95_std,
                "dice_per_class": {c: _mean_std([100 * r["test_dice_per_class"][c] for r in rows])[0]
                                   for c in classes},
                "labeled_slices": rows[0]["labeled_slices"],
            }
    return cells


def _pm(mean: float, std: float, digits: int) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if math.isfinite(std) else f"{mean:.{digits}f}"


def markdown(report: dict) -> str:
    cells, budgets = report["cells"], report["budgets"]
    header = "| Method | " + " | ".join(f"{b} patient{'s' if b > 1 else ''}: Dice % / HD95" for b in budgets) + " |"
    config_path = report.get("config", STUDY_CONFIG)
    title = "Phantom study" if config_path == STUDY_CONFIG else f"Study of {config_path}"
    if report.get("pending"):
        title += f" ({len(report['runs'])} of {len(report['runs']) + len(report['pending'])} runs finished)"
    lines = [
        f"# {title}: test mean Dice (%) and HD95 (voxels), mean ± std over seeds {report['seeds']}",
        "",
        f"{config_path} ({report['steps']} steps, {report['image_size']} px), validation-selected "
        f"checkpoint, empty-mask policy {report['empty_policy']}. Total wall time "
        f"{report['wall_s'] / 60:.1f} min on {report['machine']}.",
        "",
        header,
        "|---|" + "---|" * len(budgets),
    ]
    for method in report["methods"]:
        row = [method]
        for budget in budgets:
            cell = cells.get(f"{method}/{budget}")
            text = "–" if cell is None else \
                f"{_pm(cell['dice'], cell['dice_std'], 1)} / {_pm(cell['hd95'], cell['hd95_std'], 2)}"
            if cell is not None and len(cell["seeds"]) < len(report["seeds"]):
                text += f" (seed{'s' if len(cell['seeds']) > 1 else ''} {', '.join(map(str, cell['seeds']))} so far)"
            row.append(text)
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Labeled slices per budget: " + ", ".join(
        f"{b} patients -> {next(c['labeled_slices'] for c in cells.values() if c['labeled_patients'] == b)}"
        for b in budgets if any(c["labeled_patients"] == b for c in cells.values())) + ".", ""]
    if report.get("pending"):
        lines += [f"Not finished yet (the same command continues the study): {', '.join(report['pending'])}.", ""]
    return "\n".join(lines)


def run_study(out: str | Path, method_names: Sequence[str] = METHODS, budgets: Sequence[int] = BUDGETS,
              seeds: Sequence[int] = SEEDS, overrides: Sequence[str] = (), config_path: str = STUDY_CONFIG) -> dict:
    import jax  # pylint: disable=import-outside-toplevel

    from arco_jax import benchmark  # pylint: disable=import-outside-toplevel

    out = Path(out)
    for method in method_names:
        if method not in methods.METHODS:
            raise ValueError(f"--methods: {method!r} is not one of {', '.join(methods.METHODS)}")
    # Every field is checked before the first run starts: a typo must not cost a day's runs.
    config = load_config(method_names[0], budgets[0], seeds[0], overrides, config_path)
    out.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str((out / "jax_cache").absolute()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    started = time.perf_counter()
    grid = [(m, b, s) for m in method_names for b in budgets for s in seeds]
    records: dict[tuple, dict] = {}
    env = benchmark.environment()  # once: it asks git and the devices
    fixed = {
        "config": config_path, "methods": list(method_names), "budgets": list(budgets), "seeds": list(seeds),
        "overrides": list(overrides), "steps": config.train.steps, "image_size": config.data.patch_size[0],
        "empty_policy": config.eval.empty_policy,
        "machine": f"{env['cpu_count']}-core {env['cpu_model']} ({env['platform']}), JAX {jax.__version__}",
        "command": "python -m arco_jax.study " + " ".join(
            [*([f"--config={config_path}"] if config_path != STUDY_CONFIG else []), f"--out={out}",
             f"--methods={','.join(method_names)}", f"--budgets={','.join(map(str, budgets))}",
             f"--seeds={','.join(map(str, seeds))}", *[f"--override={o}" for o in overrides]]),
    }

    def report_so_far() -> dict:
        runs = [records[cell] for cell in grid if cell in records]  # in grid order
        return {**fixed, "wall_s": sum(r["wall_s"] for r in runs), "this_call_s": time.perf_counter() - started,
                "pending": [run_name(*cell) for cell in grid if cell not in records],
                "cells": summarize(runs, method_names, budgets), "runs": runs}

    # The report is rewritten after every run (atomically), so a study that takes days shows its
    # table as it grows, and a stopped one keeps what it finished. Finished runs are taken first,
    # so the report holds all of them before the next run starts, wherever they lie in the grid.
    def finished(cell) -> bool:
        return (out / "runs" / run_name(*cell) / "study_record.json").exists()

    for cell in sorted(grid, key=lambda c: not finished(c)):  # stable: each group in grid order
        records[cell] = run_one(out, *cell, overrides, config_path)
        report = report_so_far()
        files.write_report(out, "study", report, markdown(report))
    return report


def main(argv) -> None:
    f = cli.report_flags(argv)
    report = run_study(f.out, f.methods, [int(b) for b in f.budgets], [int(s) for s in f.seeds], f.override,
                       f.config)
    print(markdown(report))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("config", STUDY_CONFIG, "Study config: get_config takes 'method=<preset>'.")
    flags.DEFINE_string("out", "runs/phantom_study", "Study folder (runs/, study.json, study.md).")
    flags.DEFINE_list("methods", list(METHODS), "Method presets (arco_jax/methods/presets.py).")
    flags.DEFINE_list("budgets", [str(b) for b in BUDGETS], "Labeled patients.")
    flags.DEFINE_list("seeds", [str(s) for s in SEEDS], "Seeds.")
    flags.DEFINE_multi_string("override", [], "field=value applied to every run (e.g. train.steps=20).")
    app.run(main)
