"""The phantom study driver on a tiny grid: two cheap methods, one budget, two seeds, a few
steps. The table's mean and std are those of the runs; a second call reuses finished runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from arco_jax import study

TINY = ("data.phantom.image_size=32", "data.patch_size=[32, 32]", "data.phantom.splits=[6, 2, 2]",
        "data.phantom.slices=[3, 4]", "data.batch_labeled=2", "data.batch_unlabeled=2", "train.steps=4",
        "train.eval_every=2", "train.checkpoint_every=4", "train.log_every=2",
        "model.unet.features=[4, 8, 8, 16, 16]", "model.rep_dim=16")  # tests/tiny.py's narrow UNet: cheap compiles
METHODS = ("supervised", "mean_teacher")
REPO = Path(__file__).resolve().parent.parent


# The grid's four runs are subprocesses, each compiling its own step (about 200 s of the suite on
# 2 cores): behind `slow`, with every test that reads them; the argument checks below run always.
@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return out, study.run_study(out, METHODS, budgets=(1,), seeds=(0, 1), overrides=TINY)


@pytest.mark.slow
def test_every_run_is_recorded_with_its_command(report):
    out, result = report
    assert [(r["method"], r["labeled_patients"], r["seed"]) for r in result["runs"]] == [
        (m, 1, s) for m in METHODS for s in (0, 1)]
    for run in result["runs"]:
        assert run["steps"] == 4 and 0.0 <= run["test_dice"] <= 1.0 and run["wall_s"] > 0
        assert f"--config=configs/phantom_study.py:method={run['method']}" in run["command"]
        assert f"--config.seed={run['seed']}" in run["command"] and "--config.train.steps=4" in run["command"]
        assert (out / "runs" / study.run_name(run["method"], 1, run["seed"]) / "results.json").exists()
    assert json.loads((out / "study.json").read_text())["cells"] == result["cells"]


@pytest.mark.slow
def test_cells_are_mean_and_sample_std_over_seeds(report):
    _, result = report
    for method in METHODS:
        runs = [r for r in result["runs"] if r["method"] == method]
        cell = result["cells"][f"{method}/1"]
        dice = 100 * np.array([r["test_dice"] for r in runs])
        assert cell["dice"] == pytest.approx(dice.mean()) and cell["dice_std"] == pytest.approx(dice.std(ddof=1))
        assert cell["hd95"] == pytest.approx(np.mean([r["test_hd95"] for r in runs]))
        assert cell["seeds"] == [0, 1]


@pytest.mark.slow
def test_markdown_has_a_row_per_method(report):
    out, result = report
    text = (out / "study.md").read_text()
    for method in METHODS:
        cell = result["cells"][f"{method}/1"]
        assert f"| {method} | {cell['dice']:.1f} ± {cell['dice_std']:.1f} / " in text


@pytest.mark.slow
def test_a_second_call_reuses_finished_runs(report):
    out, result = report
    again = study.run_study(out, METHODS, budgets=(1,), seeds=(0, 1), overrides=TINY)
    assert again["runs"] == result["runs"]
    assert again["this_call_s"] < 30


@pytest.mark.slow
def test_commands_name_the_workdirs_as_the_call_names_the_study(report, monkeypatch):
    """A study continued with a relative --out records relative workdirs (results files are
    committed; they should not carry the machine's absolute paths)."""
    out, _ = report
    monkeypatch.chdir(out.parent)
    again = study.run_study(Path(out.name), METHODS, budgets=(1,), seeds=(0, 1), overrides=TINY)
    for run in again["runs"]:
        workdir = f"{out.name}/runs/{study.run_name(run['method'], 1, run['seed'])}"
        assert run["command"].endswith(f"--workdir={workdir}"), run["command"]
    assert f"--out={out.name} " in again["command"]


@pytest.mark.slow
def test_the_command_line_continues_a_finished_study(report):
    out, result = report
    command = [sys.executable, "-m", "arco_jax.study", f"--out={out}", f"--methods={','.join(METHODS)}",
               "--budgets=1", "--seeds=0,1", *[f"--override={o}" for o in TINY]]
    completed = subprocess.run(command, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                               text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    cell = result["cells"]["supervised/1"]
    assert f"| supervised | {cell['dice']:.1f} ± {cell['dice_std']:.1f} / " in completed.stdout


def test_bad_method_and_override_are_named(tmp_path):
    with pytest.raises(ValueError, match="--methods: 'arco_xx'"):
        study.run_study(tmp_path, ("arco_xx",))
    with pytest.raises(ValueError, match="override 'train.steps' is not field=value"):
        study.load_config("arco_sg", 3, 0, ("train.steps",))


def test_another_study_config_names_itself_in_every_command(tmp_path):
    """configs/acdc_cpu.py (the real-ACDC study) loads through --config with its own schedule, and
    its single-run commands name it, so a cell of that study is reproduced with its own config."""
    config = study.load_config("arco_sag", 7, 1, ("data.data_dir=data/ACDC",), "configs/acdc_cpu.py")
    assert (config.train.steps, tuple(config.data.patch_size), config.pretrain.steps) == (1000, (128, 128), 0)
    assert (config.data.labeled_patients, config.seed, config.data.data_dir) == (7, 1, "data/ACDC")
    assert config.arco.sampler == "sag"
    command = study.command_line("arco_sag", 7, 1, tmp_path, ("data.data_dir=data/ACDC",), "configs/acdc_cpu.py")
    assert command.startswith("python -m arco_jax.main --config=configs/acdc_cpu.py:method=arco_sag ")
    assert "--config.data.data_dir=data/ACDC" in command
    text = study.markdown({"config": "configs/acdc_cpu.py", "cells": {}, "budgets": [3], "seeds": [0],
                           "methods": ["arco_sag"], "steps": 1000, "image_size": 128, "empty_policy": "x",
                           "wall_s": 60.0, "machine": "m"})
    assert text.startswith("# Study of configs/acdc_cpu.py: ") and "| arco_sag | – |" in text


def test_a_missing_config_or_field_stops_before_any_run(tmp_path):
    with pytest.raises(ValueError, match="--config: 'configs/nope.py' is not a file"):
        study.run_study(tmp_path / "out", ("supervised",), config_path="configs/nope.py")
    with pytest.raises(ValueError, match="the config has no field 'data.data_dri'"):
        study.run_study(tmp_path / "out", ("supervised",), overrides=("data.data_dri=x",))
    assert not (tmp_path / "out").exists()


def test_the_report_is_written_after_every_run_and_a_stopped_study_keeps_it(tmp_path, monkeypatch):
    """A run that fails (here the fourth) leaves study.json / study.md with the finished runs,
    marked incomplete, and the runs still to do."""
    done = []

    def fake_run(out, method, budget, seed, overrides, config_path):
        if len(done) == 3:
            raise RuntimeError("stopped")
        done.append((method, seed))
        return {"method": method, "labeled_patients": budget, "seed": seed, "labeled_slices": 3, "steps": 4,
                "best_val": 0.5, "test_dice": 0.5 + 0.1 * len(done), "test_hd95": 2.0, "test_asd": 1.0,
                "test_dice_per_class": {"RV": 0.5}, "wall_s": 1.0, "command": "python -m arco_jax.main"}

    monkeypatch.setattr(study, "run_one", fake_run)
    with pytest.raises(RuntimeError, match="stopped"):
        study.run_study(tmp_path, METHODS, budgets=(1,), seeds=(0, 1), overrides=TINY)
    report = json.loads((tmp_path / "study.json").read_text())
    assert len(report["runs"]) == 3
    assert report["pending"] == [study.run_name("mean_teacher", 1, 1)]
    assert report["cells"]["supervised/1"]["dice"] == pytest.approx(65.0)
    assert report["cells"]["mean_teacher/1"]["seeds"] == [0]
    table = (tmp_path / "study.md").read_text()
    assert "(3 of 4 runs finished)" in table and study.run_name("mean_teacher", 1, 1) in table
    assert "(seed 0 so far)" in table and "65.0 ± 7.1" in table
    assert not list(tmp_path.glob("*.tmp"))


def _finished_run(out: Path, method: str, overrides, drop_field: str | None = None) -> Path:
    """A run folder as a finished run leaves it (config.json, study_record.json), made without
    training; `drop_field` ('section.field') is left out of config.json, as a run from before
    that field existed."""
    import jax

    from arco_jax import config as config_lib

    config = study.load_config(method, 1, 0, overrides)
    config_lib.validate(config, device_count=jax.device_count(), platform=jax.default_backend(), check_data=False)
    record = config.to_dict()
    if drop_field:
        section, field = drop_field.split(".")
        del record[section][field]
    workdir = out / "runs" / study.run_name(method, 1, 0)
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(record, default=list))
    (workdir / "study_record.json").write_text(json.dumps({"method": method, "labeled_patients": 1, "seed": 0,
                                                           "test_dice": 0.5}))
    return workdir


def test_a_finished_run_of_another_config_is_refused_with_the_fields(tmp_path):
    workdir = _finished_run(tmp_path, "supervised", TINY)
    assert study.run_one(tmp_path, "supervised", 1, 0, TINY)["test_dice"] == 0.5  # same config: reused
    before = {p.name: p.read_text() for p in workdir.iterdir()}
    changed = (*TINY[:-1], "model.rep_dim=32")
    with pytest.raises(ValueError, match=r"supervised_p1_s0 holds a finished run of another config "
                                         r"\(model.rep_dim: 16 -> 32; stored -> this call\)"):
        study.run_one(tmp_path, "supervised", 1, 0, changed)
    assert {p.name: p.read_text() for p in workdir.iterdir()} == before


def test_a_run_from_before_a_preset_changed_is_refused_and_one_from_before_a_default_is_not(tmp_path):
    """Mean Teacher gained SSL4MIS's EMA warm-up (arco.ema_warmup, default off): its run made
    before the field existed recorded the default, which the preset now overrides; the labeled-only
    run keeps the default and is reused."""
    _finished_run(tmp_path, "mean_teacher", TINY, drop_field="arco.ema_warmup")
    _finished_run(tmp_path, "supervised", TINY, drop_field="arco.ema_warmup")
    assert study.run_one(tmp_path, "supervised", 1, 0, TINY)["test_dice"] == 0.5
    with pytest.raises(ValueError, match=r"arco.ema_warmup: False -> True"):
        study.run_one(tmp_path, "mean_teacher", 1, 0, TINY)


def test_finished_runs_are_reported_before_the_next_run_starts(tmp_path, monkeypatch):
    """A finished run late in the grid is in the report written after the first run of this call,
    not listed as pending until the loop reaches it."""
    runs = []

    def fake_run(out, method, budget, seed, overrides, config_path):
        runs.append((method, seed))
        if len(runs) == 2:
            raise RuntimeError("stopped")
        return {"method": method, "labeled_patients": budget, "seed": seed, "labeled_slices": 3, "steps": 4,
                "best_val": 0.5, "test_dice": 0.5, "test_hd95": 2.0, "test_asd": 1.0,
                "test_dice_per_class": {"RV": 0.5}, "wall_s": 1.0, "command": "python -m arco_jax.main"}

    finished = tmp_path / "runs" / study.run_name("mean_teacher", 1, 1)
    finished.mkdir(parents=True)
    (finished / "study_record.json").write_text("{}")
    monkeypatch.setattr(study, "run_one", fake_run)
    with pytest.raises(RuntimeError, match="stopped"):
        study.run_study(tmp_path, METHODS, budgets=(1,), seeds=(0, 1), overrides=TINY)
    assert runs == [("mean_teacher", 1), ("supervised", 0)]  # the finished one first, then the grid
    report = json.loads((tmp_path / "study.json").read_text())
    assert [(r["method"], r["seed"]) for r in report["runs"]] == [("mean_teacher", 1)]
    assert report["pending"] == [study.run_name(m, 1, s) for m, s in
                                 (("supervised", 0), ("supervised", 1), ("mean_teacher", 0))]
