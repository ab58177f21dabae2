"""The whole job end to end on a tiny built-in phantom: files written, checkpoints, resuming,
divergence, and bad input failing before anything compiles.

Compiling the full ARCO step costs about 30 s on a 2-core CPU, so training runs three times
in this file: once in a module fixture that most tests read, once to resume a copy of that
workdir to more steps (the step count is baked into the schedule, so a new compile), and once
in a second fixture with only the supervised term (a much cheaper compile) made to diverge.
"""
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from arco_jax import evaluation, files, train
from arco_jax.config import ConfigError
from arco_jax.data.ssl4mis import DataError
from arco_jax.state import term_names

import tiny

REPO = Path(__file__).resolve().parent.parent
CLASS_NAMES = ("RV", "Myo", "LV")
TRAIN_STEPS = 4
RESUMED_STEPS = 6


load_demo_config = tiny.demo_config


def tiny_config(cache_dir: Path, steps: int = TRAIN_STEPS):
    """configs/demo.py shrunk to seconds: 3/1/1 phantom patients of 32 px, batches of 2+2."""
    return tiny.tiny_config(cache_dir, steps=steps, every=2)


def read_metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def steps_of(records: list[dict], split: str) -> list[int]:
    return [r["step"] for r in records if r["split"] == split]


def checkpoint_steps(workdir: Path, name: str) -> list[int]:
    return list(ocp.CheckpointManager(workdir / "checkpoints" / name).all_steps())


def restored_state(workdir: Path, name: str, step: int) -> dict:
    """A saved TrainState as a plain dict (no target needed on the same two devices)."""
    manager = ocp.CheckpointManager(workdir / "checkpoints" / name)
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def poly_lr(config, step_index: int) -> float:
    o = config.optim
    return o.learning_rate * (1.0 - step_index / config.train.steps) ** o.poly_power


@pytest.fixture(scope="module")
def phantom_cache(tmp_path_factory):
    """The phantom is generated here, never in the home directory's cache."""
    return tmp_path_factory.mktemp("phantom_cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, phantom_cache):
    config = tiny_config(phantom_cache)
    parent = tmp_path_factory.mktemp("runs")
    # A relative workdir, as in the README's `--workdir=runs/demo` (Orbax needs absolute paths).
    cwd = os.getcwd()
    os.chdir(parent)
    try:
        results = train.train_and_evaluate(config, "demo")
    finally:
        os.chdir(cwd)
    return types.SimpleNamespace(config=config, workdir=parent / "demo", results=results)


# ----------------------------------------------------------------------------- one run

def test_config_json_is_the_config(trained):
    written = json.loads((trained.workdir / "config.json").read_text())
    assert written == json.loads(json.dumps(trained.config.to_dict()))


def test_train_lines_carry_every_loss_term_lr_and_speed(trained):
    records = read_metrics(trained.workdir)
    assert steps_of(records, "train") == [2, 4]
    for record in (r for r in records if r["split"] == "train"):
        for name in term_names(trained.config)[:-1]:
            assert math.isfinite(record[f"loss_{name}"]), (record["step"], name)
        assert math.isfinite(record["loss"]) and record["loss"] > 0
        assert math.isfinite(record["grad_norm"])
        assert record["steps_per_sec"] > 0
        # The line's lr is the one its update used: poly decay at the update's start step.
        assert record["lr"] == pytest.approx(poly_lr(trained.config, record["step"] - 1), rel=1e-5)


def test_val_lines_carry_dice(trained):
    val = [r for r in read_metrics(trained.workdir) if r["split"] == "val"]
    assert [r["step"] for r in val] == [2, 4]
    for record in val:
        assert 0.0 <= record["dice"] <= 1.0


def test_results_json_is_the_returned_dict(trained):
    written = json.loads((trained.workdir / "results.json").read_text())
    assert written == json.loads(json.dumps(trained.results))


def test_results_report_best_and_last_on_the_test_split(trained):
    results = trained.results
    assert results["steps"] == TRAIN_STEPS
    assert results["dataset"] == "phantom" and results["labeled_patients"] == 1
    assert results["labeled_slices"] > 0
    assert results["empty_policy"] == trained.config.eval.empty_policy == "ssl4mis"
    assert set(results["test"]) == {"best", "last"}
    for name, report in results["test"].items():
        assert report["num_cases"] == 2, name  # one test patient, two frames
        assert set(report["mean"]) == set(evaluation.METRIC_NAMES)
        assert list(report["per_class"]) == list(CLASS_NAMES)
        assert len(report["per_case"]) == 2
        rows = np.asarray(list(report["per_case"].values()))
        assert rows.shape == (2, len(CLASS_NAMES), len(evaluation.METRIC_NAMES))
        # The summaries are the per-case numbers averaged: over cases, then over classes.
        for k, cls in enumerate(CLASS_NAMES):
            for i, metric in enumerate(evaluation.METRIC_NAMES):
                assert report["per_class"][cls][metric] == pytest.approx(rows[:, k, i].mean())
        for metric in evaluation.METRIC_NAMES:
            per_class = [report["per_class"][cls][metric] for cls in CLASS_NAMES]
            assert report["mean"][metric] == pytest.approx(np.mean(per_class))


def test_best_val_is_the_first_step_with_the_highest_val_dice(trained):
    val = [r for r in read_metrics(trained.workdir) if r["split"] == "val"]
    top = max(r["dice"] for r in val)
    first_top = next(r for r in val if r["dice"] == top)
    assert trained.results["best_val"] == {"step": first_top["step"], "val_dice": first_top["dice"]}
    best_json = json.loads((trained.workdir / "checkpoints" / "best.json").read_text())
    assert best_json == trained.results["best_val"]


def test_checkpoints_hold_the_last_states_and_the_best_one(trained):
    workdir = trained.workdir
    assert checkpoint_steps(workdir, "last") == [2, 4]  # keep_checkpoints = 2
    best_step = trained.results["best_val"]["step"]
    assert checkpoint_steps(workdir, "best") == [best_step]
    assert int(restored_state(workdir, "best", best_step)["step"]) == best_step
    assert int(restored_state(workdir, "last", TRAIN_STEPS)["step"]) == TRAIN_STEPS


def test_results_md_has_a_table_per_selected_state(trained):
    text = (trained.workdir / "results.md").read_text()
    assert text.startswith("# ARCO results: phantom")
    best_step = trained.results["best_val"]["step"]
    assert f"### Test, val-selected (step {best_step})" in text
    assert f"### Test, last (step {TRAIN_STEPS})" in text
    tables = text.split("### Test, ")[1:]
    assert len(tables) == 2
    for table in tables:
        assert re.search(r"\| Class \| Dice \(%\) \| Jaccard \(%\) \| HD95 \(voxels\) \| ASD \(voxels\) \|", table)
        for row in (*CLASS_NAMES, "Mean"):
            assert re.search(rf"^\| {row} \|( [0-9.]+( ± [0-9.]+)? \|){{4}}$", table, re.MULTILINE), (row, table)
    last_dice = 100 * trained.results["test"]["last"]["mean"]["dice"]
    assert re.search(rf"^\| Mean \| {last_dice:.2f} \|", tables[1], re.MULTILINE)


# ----------------------------------------------------------------------------- resume

def test_resume_continues_from_the_last_checkpoint(trained, tmp_path, phantom_cache):
    workdir = tmp_path / "resumed"
    shutil.copytree(trained.workdir, workdir)
    config = tiny_config(phantom_cache, steps=RESUMED_STEPS)
    # More steps change the learning-rate schedule: a config change that must be allowed.
    results = train.train_and_evaluate(config, workdir, allow_config_change=True)
    assert json.loads((workdir / "config.before_change_1.json").read_text())["train"]["steps"] == TRAIN_STEPS

    assert results["steps"] == RESUMED_STEPS
    records = read_metrics(workdir)
    # Steps 1-4 come from the first run; the resumed run logs only what follows step 4.
    assert steps_of(records, "train") == [2, 4, 6]
    assert steps_of(records, "val") == [2, 4, 6]
    assert records[:4] == read_metrics(trained.workdir)
    assert checkpoint_steps(workdir, "last") == [4, 6]
    assert f"### Test, last (step {RESUMED_STEPS})" in (workdir / "results.md").read_text()
    val = [r for r in records if r["split"] == "val"]
    top = max(r["dice"] for r in val)
    assert results["best_val"]["step"] == next(r["step"] for r in val if r["dice"] == top)


# ----------------------------------------------------------------------------- divergence

class PoisonedStreams:
    """The real training streams, except that one labeled batch is all NaN."""

    def __init__(self, streams, poisoned_call: int):
        self.streams = streams
        self.poisoned_call = poisoned_call
        self.calls = 0

    def __next__(self):
        labeled, unlabeled = next(self.streams)
        self.calls += 1
        if self.calls == self.poisoned_call:
            labeled = {**labeled, "image": np.full_like(labeled["image"], np.nan)}
        return labeled, unlabeled

    def __getattr__(self, name):
        return getattr(self.streams, name)


@pytest.fixture(scope="module")
def diverged(tmp_path_factory, phantom_cache):
    """Only the supervised term (a cheap compile; the guard is the same), a checkpoint every
    step, and the third labeled batch all NaN: the third update fails, the check at the step-4
    log line stops the run."""
    config = tiny_config(phantom_cache)
    for term in ("unsup", "contrast", "eqv", "nn"):
        config.loss_weights[term] = 0.0
    config.train.checkpoint_every = 1
    config.train.keep_checkpoints = 10  # no rotation: what was saved stays readable
    workdir = tmp_path_factory.mktemp("diverged")
    real_make_streams = train.make_streams
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "make_streams",
                      lambda *args: PoisonedStreams(real_make_streams(*args), poisoned_call=3))
        with pytest.raises(train.TrainingDiverged) as info:
            train.train_and_evaluate(config, workdir)
    for name in ("last", "best"):
        assert wait_for_commits(workdir / "checkpoints" / name)
    return types.SimpleNamespace(config=config, workdir=workdir, message=str(info.value))


def wait_for_commits(directory: Path, timeout_s: float = 30.0) -> bool:
    """'last' saves are asynchronous: one started just before the error may still be committing."""
    deadline = time.monotonic() + timeout_s
    while any("tmp" in entry.name for entry in directory.iterdir()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_divergence_names_the_step_and_the_terms(diverged):
    message = diverged.message
    # The third update, the one from step 2, failed.
    assert re.search(r"\bat step 2\b", message), message
    failed_terms = message.split(" at step")[0]
    assert re.search(r"\bsup\b", failed_terms) and re.search(r"\bgrad\b", failed_terms), message
    for term in ("unsup", "contrast", "eqv", "nn"):  # switched off, hence finite
        assert not re.search(rf"\b{term}\b", failed_terms), message


def test_divergence_writes_nothing_after_the_failure(diverged):
    records = read_metrics(diverged.workdir)
    assert steps_of(records, "train") == [2] and steps_of(records, "val") == [2]
    assert checkpoint_steps(diverged.workdir, "best") == [2]
    assert not (diverged.workdir / "results.json").exists()
    assert not (diverged.workdir / "results.md").exists()


def test_divergence_keeps_the_good_checkpoints(diverged):
    last = checkpoint_steps(diverged.workdir, "last")
    assert 2 in last
    good = restored_state(diverged.workdir, "last", 2)
    assert int(good["step"]) == 2 and int(good["bad_step"]) == -1


def test_divergence_never_checkpoints_a_diverged_state(diverged):
    last = checkpoint_steps(diverged.workdir, "last")
    for step in last:
        state = restored_state(diverged.workdir, "last", step)
        assert int(state["bad_step"]) == -1 and int(state["step"]) == step, step
    assert last == [1, 2]


# ----------------------------------------------------------------------------- bad input

def test_missing_slice_list_fails_before_any_compile(tmp_path, monkeypatch):
    root = tmp_path / "acdc"
    (root / "data" / "slices").mkdir(parents=True)

    def must_not_build(*args, **kwargs):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(train, "build_networks", must_not_build)
    config = load_demo_config()
    config.data.dataset = "acdc"
    config.data.data_dir = str(root)
    config.data.labeled_patients = 7
    with pytest.raises(DataError, match=re.escape(str(root / "train_slices.list"))):
        train.train_and_evaluate(config, tmp_path / "run")


def test_invalid_config_fails_before_the_workdir_is_touched(tmp_path):
    config = load_demo_config()
    config.arco.num_strata = 10
    with pytest.raises(ConfigError, match=r"config\.arco\.num_strata"):
        train.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_command_line_without_data_dir_exits_with_the_field_name(tmp_path):
    workdir = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    completed = subprocess.run(
        [sys.executable, "-m", "arco_jax.main", "--config=configs/acdc.py", f"--workdir={workdir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode != 0
    assert "config.data.data_dir" in completed.stderr + completed.stdout
    assert not workdir.exists()


def test_progress_eta_of_stage_1_names_the_end_of_stage_1(tmp_path, monkeypatch):
    """Stage 1 runs several times faster than stage 2: its rate predicts only its own end."""
    clock = iter([0.0, 10.0, 20.0, 30.0, 40.0])
    monkeypatch.setattr(train.time, "perf_counter", lambda: next(clock))
    lines = []
    monkeypatch.setattr(train.log, "info", lambda message, *args: lines.append(message % args))
    terms = {1: ("sup", "rel_global"), 2: ("sup", "contrast")}
    metric_log = train.MetricLog(files.workdir_path(tmp_path), total_steps=300, boundary=100, terms=terms)
    metrics = {"loss": 1.0, "lr": 0.01, **{f"loss_{name}": 0.5 for stage in (1, 2) for name in terms[stage]}}
    metric_log.start(0)
    metric_log.progress(50, metrics, stage=1)   # 5 steps/s, 50 steps left in stage 1
    metric_log.progress(150, metrics, stage=2)  # 10 steps/s, 150 steps left in all
    assert lines[0].startswith("stage 1 | step 50/300") and lines[0].endswith("ETA 0m10s to stage 2")
    assert "(sup 0.5000 rel_global 0.5000)" in lines[0] and "(sup 0.5000 contrast 0.5000)" in lines[1]
    assert lines[1].startswith("stage 2 | step 150/300") and lines[1].endswith("ETA 0m15s")
    assert " | 5.00 steps/s" in lines[0] and " | 10.00 steps/s" in lines[1]
    # An interval of only the compiling first step has no speed; the line says so, not "nan".
    metric_log.start(150)
    metric_log.progress(150, metrics, stage=2)
    assert "nan" not in lines[2] and " | speed from the next interval (this one compiled) | ETA --" in lines[2]
