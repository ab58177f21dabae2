"""Workdirs in a Cloud Storage bucket (gs://...): training, resuming and evaluating write
through epath only, never to a local folder, and give what a local workdir gives. The bucket
is faked on the local disk (tests/fake_bucket.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from arco_jax import evaluate, files, inference, train
from arco_jax.config import ConfigError, validate
from etils import epath

import tiny
from fake_bucket import fake_gcs

WORKDIR = "gs://bucket/runs/tiny"


def tiny_config(cache_dir: Path, steps: int):
    c = tiny.tiny_config(cache_dir, steps=steps, every=1, narrow=True)
    for term in ("unsup", "contrast", "eqv", "nn"):
        c.loss_weights[term] = 0.0
    return c


def records(text: str) -> list[dict]:
    """metrics.jsonl without the wall-clock rate."""
    rows = [json.loads(line) for line in text.splitlines()]
    return [{k: v for k, v in row.items() if k != "steps_per_sec"} for row in rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run of 2 steps in the bucket, resumed to 3 with a changed config, then the
    evaluation command on it."""
    monkeypatch = pytest.MonkeyPatch()
    cwd = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(cwd)
    root = tmp_path_factory.mktemp("bucket_root")
    cache = tmp_path_factory.mktemp("phantom")
    short, longer = tiny_config(cache, 2), tiny_config(cache, 3)
    out = {"root": root, "cwd": cwd}
    with fake_gcs(root, monkeypatch):
        train.train_and_evaluate(short, WORKDIR)
        out["results"] = train.train_and_evaluate(longer, WORKDIR, allow_config_change=True)
        out["report"] = evaluate.evaluate_workdir(WORKDIR, "test", "best")
        out["steps"] = inference.checkpoint_steps(WORKDIR)
    yield out
    monkeypatch.undo()


def test_nothing_is_written_to_a_local_folder_named_after_the_bucket(runs):
    assert sorted(p.name for p in runs["cwd"].iterdir()) == []


def test_the_bucket_holds_the_whole_run(runs):
    run = runs["root"] / "bucket" / "runs" / "tiny"
    for name in ("config.json", "config.before_change_1.json", "metrics.jsonl", "results.json", "results.md",
                 "checkpoints/best.json", "eval/test-best/per_case.csv", "eval/test-best/summary.json",
                 "eval/test-best/table.md"):
        assert (run / name).is_file(), name
    assert runs["steps"]["last"] == [2, 3] and len(runs["steps"]["best"]) == 1
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 3


def test_resuming_in_the_bucket_logs_each_step_once(runs):
    run = runs["root"] / "bucket" / "runs" / "tiny"
    logged = records((run / "metrics.jsonl").read_text())
    assert [r["step"] for r in logged if r["split"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in logged if r["split"] == "val"] == [1, 2, 3]
    assert runs["results"]["steps"] == 3
    assert json.loads((run / "results.json").read_text())["test"] == runs["results"]["test"]
    summary = json.loads((run / "eval" / "test-best" / "summary.json").read_text())
    assert summary["mean"] == pytest.approx(runs["results"]["test"]["best"]["mean"], rel=1e-6)


def test_metric_log_in_a_bucket_rewrites_the_file_instead_of_appending(tmp_path, monkeypatch):
    with fake_gcs(tmp_path, monkeypatch):
        workdir = files.workdir_path("gs://bucket/log")
        workdir.mkdir(parents=True)
        log = train.MetricLog(workdir, total_steps=10)
        log.REMOTE_WRITE_SECONDS = 3600.0
        log.keep_until(0)
        log.write({"split": "train", "step": 1})
        assert not (workdir / "metrics.jsonl").exists()  # held until a checkpoint or a minute
        log.flush()
        log.write({"split": "train", "step": 2})
        log.flush()
        assert [r["step"] for r in records((workdir / "metrics.jsonl").read_text())] == [1, 2]
        # A resumed run from step 1 drops step 2 and goes on from the file's content.
        resumed = train.MetricLog(workdir, total_steps=10)
        resumed.keep_until(1)
        resumed.write({"split": "train", "step": 2, "again": True})
        resumed.flush()
        assert records((workdir / "metrics.jsonl").read_text()) == [
            {"split": "train", "step": 1}, {"split": "train", "step": 2, "again": True}]


def test_local_paths_are_made_absolute_and_bucket_uris_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert files.workdir_path("runs/x") == epath.Path(tmp_path / "runs" / "x")
    assert str(files.workdir_path("gs://b/runs/x")) == "gs://b/runs/x"
    assert files.is_remote("gs://b/x") and files.is_remote("s3://b/x") and not files.is_remote("/gs/b")


def test_data_in_a_bucket_is_refused_with_what_to_do(tmp_path):
    c = tiny_config(tmp_path, 2)
    c.data.dataset = "acdc"
    c.data.data_dir = "gs://bucket/ACDC"
    with pytest.raises(ConfigError, match=r"data.data_dir.*in a bucket.*copy the data"):
        validate(c)
