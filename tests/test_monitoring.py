"""Monitoring: TensorBoard event files (read back here record by record), interval means on
the console and in metrics.jsonl, validation overlays, the parameter table and the profiler.

One module fixture trains the tiny narrow config (the unlabeled terms weighted 0, so the step
compiles in a third of the time; they are still reported) for 4 steps, preempted at step 3 (off the
log grid) and resumed with the same call, so the event files of a resumed run are checked
too; every step's own metrics are recorded on the way to check the means against. The other
tests need no training.
"""
import io
import json
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.record_writer import masked_crc32c

from arco_jax import files, monitoring, parallel, train
from arco_jax.data.natural import voc_palette
from arco_jax.config import ConfigError
from arco_jax.state import stage_terms

import tiny
from fake_bucket import fake_gcs

REPO = Path(__file__).resolve().parent.parent
STEPS = 4
PREEMPT_AT = 3
CLASS_NAMES = ("RV", "Myo", "LV")


def read_events(path: Path) -> list[Event]:
    """The Event records of a TFRecord file, both checksums verified."""
    data, events, at = path.read_bytes(), [], 0
    while at < len(data):
        header = data[at:at + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[at + 8:at + 12])
        body = data[at + 12:at + 12 + length]
        (body_crc,) = struct.unpack("<I", data[at + 12 + length:at + 16 + length])
        assert header_crc == masked_crc32c(header) and body_crc == masked_crc32c(body), f"{path}: bad record"
        events.append(Event.FromString(body))
        at += 16 + length
    return events


def scalars(events: list[Event]) -> dict[str, dict[int, float]]:
    found = {}
    for event in events:
        for value in event.summary.value:
            if value.HasField("simple_value"):
                found.setdefault(value.tag, {})[event.step] = value.simple_value
    return found


def images(events: list[Event]) -> dict[str, dict[int, np.ndarray]]:
    found = {}
    for event in events:
        for value in event.summary.value:
            if value.HasField("image"):
                with Image.open(io.BytesIO(value.image.encoded_image_string)) as png:
                    found.setdefault(value.tag, {})[event.step] = np.asarray(png.convert("RGB"))
    return found


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    seen = []  # every step's own metrics, in order
    add = monitoring.IntervalMeans.add

    def recording_add(self, metrics):
        seen.append({k: float(v) for k, v in parallel.fetch(metrics).items()})
        add(self, metrics)

    monkeypatch.setattr(monitoring.IntervalMeans, "add", recording_add)
    console = Lines()
    train.log.addHandler(console)
    config = tiny.tiny_config(tmp_path_factory.mktemp("phantom"), steps=STEPS, every=2, narrow=True)
    for term in ("unsup", "contrast", "eqv", "nn"):  # reported as 0; the step compiles in a third of the time
        config.loss_weights[term] = 0.0
    workdir = tmp_path_factory.mktemp("runs") / "run"
    try:
        monkeypatch.setattr(train.PreemptionWatch, "reached", lambda self, step: step == PREEMPT_AT)
        with pytest.raises(train.Preempted):
            train.train_and_evaluate(config, workdir, profile_steps="1:2")
        monkeypatch.setattr(train.PreemptionWatch, "reached", lambda self, step: False)
        results = train.train_and_evaluate(config, workdir, profile_steps="1:2")  # resumed at 3
    finally:
        train.log.removeHandler(console)
        monkeypatch.undo()
    event_files = sorted((workdir / "tensorboard").glob("events.out.tfevents.*"),
                         key=lambda p: int(p.name.rsplit(".", 1)[1]))  # by the start step in the name
    events = [read_events(p) for p in event_files]
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return dict(config=config, workdir=workdir, seen=seen, lines=console.lines, results=results,
                event_files=event_files, events=events, all_events=[e for es in events for e in es],
                metrics=metrics)


def mean_of(seen: list[dict], steps: range, name: str) -> float:
    return float(np.mean([seen[s - 1][name] for s in steps]))


# ----------------------------------------------------------------------------- the tiny run

def test_one_event_file_per_run_and_the_resumed_one_purges_after_its_checkpoint(run):
    assert [p.name.rsplit(".", 1)[1] for p in run["event_files"]] == ["0", str(PREEMPT_AT)]
    first, resumed = run["events"]
    assert first[0].file_version.startswith("brain.Event")
    purge = [e for e in resumed if e.HasField("session_log")]
    assert len(purge) == 1 and purge[0].session_log.status == SessionLog.START
    assert purge[0].step == PREEMPT_AT + 1  # what the interrupted run logged after step 3 is hidden
    assert [s for s in scalars(first)["loss/total"]] == [2] and [s for s in scalars(resumed)["loss/total"]] == [4]


def test_train_scalars_are_interval_means_of_every_term(run):
    tags = scalars(run["all_events"])
    seen = run["seen"]
    assert len(seen) == STEPS  # steps 1, 2, 3 before the preemption, 4 after it
    terms = stage_terms(run["config"])[2]
    assert len(terms) >= 3
    # Step 2: the mean of steps 1 and 2; step 4: the resumed run's first interval, step 4 alone.
    intervals = {2: range(1, 3), 4: range(4, 5)}
    for step, steps in intervals.items():
        assert tags["loss/total"][step] == pytest.approx(mean_of(seen, steps, "loss"), rel=1e-5)
        for term in terms:
            assert tags[f"loss/{term}"][step] == pytest.approx(mean_of(seen, steps, f"loss_{term}"), rel=1e-5), term
        assert tags["train/grad_norm"][step] == pytest.approx(mean_of(seen, steps, "grad_norm"), rel=1e-5)
        assert tags["train/sup_dice"][step] == pytest.approx(mean_of(seen, steps, "sup_dice"), rel=1e-5)
        assert tags["train/lr"][step] == pytest.approx(seen[step - 1]["lr"], rel=1e-6)  # the last update's
    # The mean differs from the last step's value: the test can tell the two apart.
    for name in ("loss", "grad_norm"):
        assert abs(mean_of(seen, range(1, 3), name) - seen[1][name]) > 1e-6 * abs(seen[1][name]), name
    # Speed: timed from the end of the compiling first step; the resumed run's only step is
    # that one, so its interval has no speed (NaN: not written).
    rate, images = tags["speed/steps_per_sec"], tags["speed/images_per_sec"]
    batch = run["config"].data.batch_labeled + run["config"].data.batch_unlabeled
    assert list(rate) == [2] and rate[2] > 0 and images[2] == pytest.approx(batch * rate[2], rel=1e-5)


def test_metrics_jsonl_and_the_console_show_the_same_means(run):
    train_records = {r["step"]: r for r in run["metrics"] if r["split"] == "train"}
    assert sorted(train_records) == [2, 4]
    loss = mean_of(run["seen"], range(1, 3), "loss")
    assert train_records[2]["loss"] == pytest.approx(loss, rel=1e-5)
    progress = [line for line in run["lines"] if line.startswith("stage 2 | step")]
    assert len(progress) == 2
    assert progress[0].startswith(f"stage 2 | step 2/{STEPS} | mean of 2 steps: loss {loss:.4f} (")
    assert progress[1].startswith(f"stage 2 | step 4/{STEPS} | mean of 1 steps: loss {run['seen'][3]['loss']:.4f}")
    assert " grad " in progress[0] and " images/s | ETA " in progress[0]


def test_validation_metrics_per_class_and_the_selection_metric(run):
    tags = scalars(run["all_events"])
    val = {r["step"]: r for r in run["metrics"] if r["split"] == "val"}
    assert sorted(val) == [2, 4]
    for step in (2, 4):
        for metric in ("dice", "jaccard"):
            assert tags[f"val/{metric}"][step] == pytest.approx(val[step][metric], rel=1e-6)
            per_class = [tags[f"val_{metric}/{name}"][step] for name in CLASS_NAMES]
            assert np.mean(per_class) == pytest.approx(val[step][metric], rel=1e-5)
    best = run["results"]["best_val"]
    assert tags["val/best_dice"][4] == pytest.approx(best["val_dice"], rel=1e-6)
    # The final test of both the val-selected and the last state.
    last = run["results"]["test"]["last"]
    assert tags["test_last/dice"][STEPS] == pytest.approx(last["mean"]["dice"], rel=1e-6)
    assert tags["test_last_dice/LV"][STEPS] == pytest.approx(last["per_class"]["LV"]["dice"], rel=1e-6)
    assert "test_best/dice" in tags


def test_overlays_are_written_at_each_evaluation(run):
    found = images(run["all_events"])
    val = {tag: steps for tag, steps in found.items() if tag.startswith("val_overlay/")}
    assert len(val) == 2  # the tiny split's two val volumes, the busiest slice of each
    assert all(sorted(steps) == [2, 4] for steps in val.values())
    test = [tag for tag in found if tag.startswith("test_overlay/")]
    assert len(test) == 2 and all(sorted(found[tag]) == [STEPS] for tag in test)
    picture = next(iter(val.values()))[4]
    side = run["config"].data.patch_size[0] * (160 // run["config"].data.patch_size[0])
    assert picture.shape == (side, 3 * side + 8, 3)
    truth = picture[:, 2 * side + 8:]
    assert (np.ptp(truth.astype(int), axis=-1) > 0).any()  # class colours in the ground-truth panel
    assert any("legend" in v.tag for e in run["all_events"] for v in e.summary.value)


def test_the_profiler_trace_appears_where_tensorboard_looks(run):
    traces = list((run["workdir"] / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0  # traced once; the resumed run was past 1:2
    assert any("profile of steps 1 to 2 written" in line for line in run["lines"])
    assert any("past that window; nothing is traced" in line for line in run["lines"])


def test_parameter_table_is_written_and_its_total_logged(run):
    table = (run["workdir"] / "parameters.txt").read_text()
    assert "segmenter/out_conv/kernel" in table and "head/" in table
    total = table.strip().splitlines()[-1]
    assert total.startswith("Total: ")
    count = total.split()[1]
    assert any(line.startswith(f"model: {count} parameters") for line in run["lines"])


# ----------------------------------------------------------------------------- without training

def test_interval_means_average_and_keep_the_last_lr():
    import jax.numpy as jnp

    means = monitoring.IntervalMeans()
    for value in (1.0, 2.0, 6.0):
        means.add({"loss": jnp.float32(value), "lr": jnp.float32(value / 10)})
    assert means.count == 3
    assert means.read() == pytest.approx({"loss": 3.0, "lr": 0.6})
    means.add({"loss": jnp.float32(5.0), "lr": jnp.float32(0.5)})
    assert means.read() == pytest.approx({"loss": 5.0, "lr": 0.5})  # a new interval
    means.add({"loss": jnp.float32(1.0), "lr": jnp.float32(0.1)})
    means.add({"other": jnp.float32(4.0), "lr": jnp.float32(0.2)})  # another stage's metrics: starts again
    assert means.read() == pytest.approx({"other": 4.0, "lr": 0.2})
    with pytest.raises(ValueError, match="no step"):
        means.read()


def test_overlay_panels_colour_prediction_truth_outline_and_ignored_pixels():
    label = np.zeros((8, 8), np.int64)
    label[2:6, 2:6] = 1
    label[0, :] = 255  # ignored
    prediction = np.zeros((8, 8), np.int64)
    prediction[3:7, 3:7] = 2
    image = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    picture = monitoring.overlay(image, label, prediction, num_classes=4, ignore_label=255, min_size=16)
    assert picture.shape == (16, 3 * 16 + 8, 3) and picture.dtype == np.uint8
    image_panel, predicted, truth = picture[:, :16], picture[:, 20:36], picture[:, 40:56]
    colours = voc_palette(4)
    assert (np.ptp(image_panel.astype(int), axis=-1) == 0).all()  # grey
    grey = image_panel.astype(float) / 255
    # Ground truth: class 1 at (2..5) (pixels doubled), half grey, half its colour.
    expected = np.round((0.5 * grey[8, 8] + 0.5 * colours[1] / 255) * 255)
    np.testing.assert_allclose(truth[8, 8], expected, atol=1)
    np.testing.assert_allclose(truth[:2], 0.3 * image_panel[:2].astype(float), atol=1)  # ignored: darkened only
    # Prediction: class 2 inside, and the truth's outline in white.
    np.testing.assert_allclose(predicted[12, 12], np.round((0.5 * grey[12, 12] + 0.5 * colours[2] / 255) * 255),
                               atol=1)
    assert (predicted[4, 4:12] == 255).all()  # the top edge of the true square
    assert (predicted[8, 8] != 255).any()  # its inside is not outlined


def test_palette_colours_are_distinct_and_background_is_black():
    colours = voc_palette(21)
    assert (colours[0] == 0).all() and len({tuple(c) for c in colours}) == 21
    assert tuple(colours[1]) == (128, 0, 0) and tuple(colours[2]) == (0, 128, 0)


@pytest.mark.parametrize("text", ["5:3", "3:3", "a:b", "3", "-1:4", "1:2:3"])
def test_a_malformed_profile_range_is_refused(text):
    with pytest.raises(ConfigError, match=rf"^--profile_steps={text}: expected START:END"):
        monitoring.parse_profile_steps(text)


def test_a_profile_range_past_the_run_says_where_the_run_ends():
    assert monitoring.check_profile_steps("2:10", 10) == (2, 10)
    assert monitoring.check_profile_steps((2, 4), 10) == (2, 4) and monitoring.check_profile_steps(None, 10) is None
    with pytest.raises(ConfigError, match=r"--profile_steps=5:11: the run ends at step 10 .*END <= 10"):
        monitoring.check_profile_steps("5:11", 10)


def test_the_command_line_refuses_a_profile_range_past_the_run_in_one_line(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "arco_jax.main", "--config=configs/demo.py",
                             "--config.pretrain.steps=5", "--config.train.steps=10", "--profile_steps=5:20",
                             f"--workdir={tmp_path / 'run'}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "--profile_steps=5:20: the run ends at step 15 (pretrain.steps + train.steps); choose START < END <= 15"]
    assert not (tmp_path / "run").exists()


def test_events_of_a_bucket_workdir_are_written_locally_and_copied_at_each_flush(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "bucket_root"
    with fake_gcs(root, monkeypatch):
        workdir = files.workdir_path("gs://bucket/runs/x")
        events = monitoring.EventLog(workdir, start_step=0)
        local = events.local
        assert events.remote and not str(local).startswith("gs:")
        events.scalars(1, {"loss/total": 2.5, "skipped": float("nan")})
        in_bucket = root / "bucket" / "runs" / "x" / "tensorboard"
        assert not in_bucket.exists()  # until a flush (a checkpoint)
        events.flush()
        (copied,) = in_bucket.glob("events.out.tfevents.*")
        assert scalars(read_events(copied)) == {"loss/total": {1: 2.5}}
        (local / "plugins" / "profile" / "t").mkdir(parents=True)  # as jax.profiler leaves a trace
        (local / "plugins" / "profile" / "t" / "host.xplane.pb").write_bytes(b"trace")
        events.scalars(2, {"loss/total": 1.5})
        events.close()
        assert scalars(read_events(copied)) == {"loss/total": {1: 2.5, 2: 1.5}}
        assert (in_bucket / "plugins" / "profile" / "t" / "host.xplane.pb").read_bytes() == b"trace"
        assert not local.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bucket_root"]  # no folder named gs:


def test_the_monitoring_module_imports_no_tensorflow():
    code = ("import sys, arco_jax.monitoring; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'torch')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
