"""What a run shows while it trains, without TensorFlow: TensorBoard event files, the step
metrics averaged over each log interval, validation overlays, a parameter table and a
`jax.profiler` trace of chosen steps.

* Event files go to <workdir>/tensorboard (`tensorboard --logdir <workdir>/tensorboard`),
  written by tensorboardX's record writer and summary protos (no TensorFlow). We write each
  event synchronously instead of through tensorboardX's `SummaryWriter`, whose background
  queue has no way to wait until everything queued is on disk: after `flush()` the file holds
  every event so far, which the bucket copy below and a resumed run rely on.
* A workdir in a bucket cannot take appends, so the event file is written to a local folder
  and copied whole into <workdir>/tensorboard at every checkpoint and at the end (as
  metrics.jsonl is): a run killed between checkpoints loses the events since the last one.
* A resumed run writes a new event file that starts with a purge marker at the first step it
  logs: TensorBoard then hides what the interrupted run logged after its checkpoint, and the
  curves continue from the resumed step.
* Only process 0 writes; the others' objects do nothing (the averaging runs on all of them,
  since it is a jitted computation on global arrays).
"""
from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from clu import metrics as clu_metrics
from clu import parameter_overview
from etils import epath
from tensorboardX import summary as tb_summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary

from arco_jax import files, parallel
from arco_jax.data.natural import voc_palette
from arco_jax.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
LAST_VALUE_METRICS = ("lr",)  # Schedule values, not measurements: the interval's last update's.
log = logging.getLogger("arco_jax")


# ----------------------------------------------------------------------------- interval means

class IntervalMeans:
    """The step metrics averaged over the steps since the last `read()`, kept on the devices
    with clu.metrics (Average; LastValue for `lr`): one jitted merge per step, nothing
    fetched until the interval is read, so the steps stay asynchronous."""

    def __init__(self):
        self._keys = None
        self._accumulated = None
        self.count = 0

    def _build(self, keys: tuple[str, ...]) -> None:
        kinds = {k: (clu_metrics.LastValue if k in LAST_VALUE_METRICS else clu_metrics.Average).from_output(k)
                 for k in keys}
        collection = clu_metrics.Collection.create(**kinds)
        self._first = jax.jit(lambda m: collection.single_from_model_output(**m))
        self._merge = jax.jit(lambda acc, m: acc.merge(collection.single_from_model_output(**m)), donate_argnums=0)
        self._compute = jax.jit(lambda acc: acc.compute())
        self._keys = keys

    def add(self, metrics: dict) -> None:
        keys = tuple(sorted(metrics))
        if keys != self._keys:  # A new stage's step reports other metrics: start again.
            self._build(keys)
            self._accumulated, self.count = None, 0
        self._accumulated = (self._first(metrics) if self._accumulated is None
                             else self._merge(self._accumulated, metrics))
        self.count += 1

    def read(self) -> dict[str, float]:
        """{name: mean over the interval} (host floats), and start a new interval."""
        if self._accumulated is None:
            raise ValueError("no step was added since the last read")
        means = {k: float(v) for k, v in parallel.fetch(self._compute(self._accumulated)).items()}
        self._accumulated, self.count = None, 0
        return means


# ----------------------------------------------------------------------------- event files

def _tag(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-/]+", "_", str(text))


class EventLog:
    """The run's TensorBoard event file (process 0; a no-op on the others)."""

    def __init__(self, workdir: epath.Path, start_step: int):
        """`start_step`: the step this run starts from (0 for a fresh run, else the resumed one)."""
        self.enabled = parallel.is_main_process()
        self.target = workdir / TENSORBOARD_DIR
        self.remote = files.is_remote(workdir)
        self._copied: dict[str, tuple[int, int]] = {}
        self._writer = None
        self.local: Path | None = None
        if not self.enabled:
            return
        if self.remote:
            self.local = Path(tempfile.mkdtemp(prefix="arco_jax_tensorboard_"))
            log.info("tensorboard: events written to %s and copied to %s at every checkpoint", self.local,
                     self.target)
        else:
            self.local = Path(os.fspath(self.target))
            self.local.mkdir(parents=True, exist_ok=True)
        # pid and start step in the name: two runs of one workdir never share a file.
        self._writer = EventsWriter(str(self.local / "events"), filename_suffix=f".{os.getpid()}.{start_step}")
        if start_step > 0:  # TensorBoard drops what earlier files hold from this step on.
            self._write(Event(step=start_step + 1, session_log=SessionLog(status=SessionLog.START)))

    @property
    def trace_dir(self) -> str:
        """Where jax.profiler traces go (the profile plugin reads <logdir>/plugins/profile);
        '' on processes other than 0."""
        return "" if self.local is None else str(self.local)

    def _write(self, event: Event) -> None:
        event.wall_time = time.time()
        self._writer.write_event(event)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:
            return
        finite = {tag: float(v) for tag, v in values.items() if v is not None and math.isfinite(float(v))}
        if finite:
            self._write(Event(step=step, summary=Summary(value=[
                Summary.Value(tag=_tag(tag), simple_value=v) for tag, v in sorted(finite.items())])))

    def images(self, step: int, images: dict[str, np.ndarray]) -> None:
        """(H, W, 3) uint8 images, PNG-encoded."""
        if self._writer is None or not images:
            return
        values = [v for tag, image in images.items()
                  for v in tb_summary.image(_tag(tag), image, dataformats="HWC").value]
        self._write(Event(step=step, summary=Summary(value=values)))

    def text(self, step: int, tag: str, markdown: str) -> None:
        if self._writer is not None:
            self._write(Event(step=step, summary=tb_summary.text(_tag(tag), markdown)))

    def flush(self) -> None:
        """Everything written so far on disk (in a bucket: copied there)."""
        if self._writer is None:
            return
        self._writer.flush()
        if self.remote:
            self._copy_to_bucket()

    def _copy_to_bucket(self) -> None:
        """Copy the files that changed since the last copy (event files, profiler traces)."""
        for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
            stat = path.stat()
            relative = path.relative_to(self.local).as_posix()
            if self._copied.get(relative) == (stat.st_size, stat.st_mtime_ns):
                continue
            destination = self.target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(path.read_bytes())  # One object write: whole or not at all.
            self._copied[relative] = (stat.st_size, stat.st_mtime_ns)

    def close(self) -> None:
        if self._writer is None:
            return
        self.flush()
        self._writer.close()
        self._writer = None
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


def train_scalars(record: dict, terms: tuple[str, ...] | None, images_per_step: int) -> dict[str, float]:
    """TensorBoard tags of a train record (interval means): loss/total and loss/<term> for
    the terms of its stage, train/<metric> for the rest, speed/steps_per_sec and images_per_sec."""
    names = terms if terms is not None else tuple(k[5:] for k in record if k.startswith("loss_"))
    scalars = {"loss/total": record["loss"], **{f"loss/{n}": record[f"loss_{n}"] for n in names}}
    skip = {"split", "step", "stage", "loss", "steps_per_sec"}
    scalars.update({f"train/{k}": v for k, v in record.items() if k not in skip and not k.startswith("loss_")})
    rate = record.get("steps_per_sec", float("nan"))
    scalars.update({"speed/steps_per_sec": rate, "speed/images_per_sec": rate * images_per_step})
    return scalars


def eval_scalars(split: str, metrics: dict, record: dict) -> dict[str, float]:
    """<split>/<metric> for the class means, <split>_<metric>/<class> for every class (the
    evaluator's record 'per_class': {class: {metric: value}}, when it has one)."""
    scalars = {f"{split}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    per_class = record.get("per_class")
    if isinstance(per_class, dict):
        for name, values in per_class.items():
            if isinstance(values, dict):
                scalars.update({f"{split}_{metric}/{name}": v for metric, v in values.items()
                                if isinstance(v, (int, float))})
    return scalars


# ----------------------------------------------------------------------------- overlays

def _grey(image: np.ndarray) -> np.ndarray:
    """(H, W[, C]) -> (H, W, 3) float in [0, 1], stretched between the 1st and 99th percentile."""
    image = np.asarray(image, np.float32)
    if image.ndim == 3:
        image = image[..., :3] if image.shape[-1] >= 3 else image[..., 0]
    low, high = np.percentile(image, (1, 99))
    scaled = np.clip((image - low) / (high - low), 0, 1) if high > low else np.zeros_like(image)
    return scaled if scaled.ndim == 3 else np.repeat(scaled[..., None], 3, axis=-1)


def _edges(labels: np.ndarray) -> np.ndarray:
    """Pixels of a foreground region that touch another label (4-neighbourhood)."""
    edge = np.zeros(labels.shape, bool)
    rows, columns = labels[1:] != labels[:-1], labels[:, 1:] != labels[:, :-1]
    edge[1:] |= rows
    edge[:-1] |= rows
    edge[:, 1:] |= columns
    edge[:, :-1] |= columns
    return edge & (labels > 0)


def overlay(image: np.ndarray, label: np.ndarray, prediction: np.ndarray, num_classes: int,
            ignore_label: int | None = None, min_size: int = 160) -> np.ndarray:
    """(H', 3 W' + 8, 3) uint8: the image | the prediction in class colours with the ground
    truth's outlines in white | the ground truth in class colours (ignored pixels dark);
    small images enlarged (nearest) to about `min_size` pixels a side."""
    factor = max(1, min_size // max(label.shape))
    grow = lambda a: np.repeat(np.repeat(np.asarray(a), factor, 0), factor, 1)  # noqa: E731
    grey, label, prediction = grow(_grey(image)), grow(label).astype(np.int64), grow(prediction).astype(np.int64)
    colours = voc_palette(num_classes).astype(np.float32) / 255.0
    ignored = (label == ignore_label) if ignore_label is not None else np.zeros(label.shape, bool)
    truth = np.where(ignored, 0, np.clip(label, 0, num_classes - 1))

    def painted(labels: np.ndarray) -> np.ndarray:
        mixed = 0.5 * grey + 0.5 * colours[labels]
        return np.where((labels > 0)[..., None], mixed, grey)

    predicted = painted(np.clip(prediction, 0, num_classes - 1))
    predicted[_edges(truth)] = 1.0
    ground = painted(truth)
    ground[ignored] *= 0.3
    gap = np.ones((grey.shape[0], 4, 3), np.float32)
    return (np.concatenate([grey, gap, predicted, gap, ground], axis=1) * 255).round().astype(np.uint8)


def _busiest(label: np.ndarray, ignore_label: int | None) -> int:
    """The index along axis 0 with the most labeled foreground (the middle one if none)."""
    foreground = label > 0
    if ignore_label is not None:
        foreground &= label != ignore_label
    counts = foreground.reshape(label.shape[0], -1).sum(1)
    return int(np.argmax(counts)) if counts.any() else label.shape[0] // 2


def overlays(evaluator, predict, data, split: str, spatial_rank: int, num_classes: int,
             ignore_label: int | None, count: int = 4) -> dict[str, np.ndarray]:
    """Overlays of the first `count` cases of a split (the first 2 for 3-D volumes, each
    predicted whole), one slice each, the one with the most labeled foreground; predicted as
    the evaluator predicts (only that slice for 2-D models on volumes). Empty when the
    evaluator has no predict_volume / predict_image. Local to this process (no collectives)."""
    volume = getattr(evaluator, "predict_volume", None)
    whole = getattr(evaluator, "predict_image", None)
    count = min(count if spatial_rank == 2 else 2, len(data.cases(split)))
    images = {}
    for index in range(count):
        case = data.case(split, index)
        image, label = np.asarray(case.image), np.asarray(case.label)
        if label.ndim == 3 and volume is not None:  # a volume: a 3-D model, or slices of a 2-D one
            k = _busiest(label, ignore_label)
            predicted = volume(predict, image)[k] if spatial_rank == 3 else volume(predict, image[k:k + 1])[0]
            name, image, label = f"{case.case}_slice{k}", image[k], label[k]
        elif label.ndim == 2 and whole is not None:
            predicted, name = whole(predict, image), case.case
        else:
            return {}
        images[f"{split}_overlay/{name}"] = overlay(image, label, predicted, num_classes, ignore_label)
    return images


def legend(class_names, num_classes: int) -> str:
    """Markdown: the overlays' colour of each class."""
    names = ["background", *class_names][:num_classes]
    rows = [f"| {k} | {name} | #{''.join(f'{c:02x}' for c in colour)} |"
            for k, (name, colour) in enumerate(zip(names, voc_palette(num_classes))) if k > 0]
    return ("Overlays: image | prediction (ground-truth outlines in white) | ground truth.\n\n"
            "| label | class | colour |\n|---|---|---|\n" + "\n".join(rows))


# ----------------------------------------------------------------------------- parameters

def parameter_table(params) -> tuple[str, int]:
    """(clu's table of every parameter array: name, shape, size; the total count)."""
    return (parameter_overview.get_parameter_overview(params, include_stats=False),
            parameter_overview.count_parameters(params))


# ----------------------------------------------------------------------------- profiler

def parse_profile_steps(steps) -> tuple[int, int] | None:
    """'START:END' or (START, END) -> (START, END); None or '' -> None. A malformed value
    raises ConfigError."""
    if steps is None or steps == "":
        return None
    text = steps if isinstance(steps, str) else ":".join(str(s) for s in steps)
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not match or int(match.group(1)) >= int(match.group(2)):
        raise ConfigError(f"--profile_steps={text}: expected START:END, two step numbers with START < END "
                          "(e.g. 10:20 traces the updates from step 10 to step 20)")
    return int(match.group(1)), int(match.group(2))


def check_profile_steps(steps, total_steps: int) -> tuple[int, int] | None:
    """parse_profile_steps, and END within the run's `total_steps` (pretrain.steps + train.steps)."""
    window = parse_profile_steps(steps)
    if window is not None and window[1] > total_steps:
        raise ConfigError(f"--profile_steps={window[0]}:{window[1]}: the run ends at step {total_steps} "
                          f"(pretrain.steps + train.steps); choose START < END <= {total_steps}")
    return window


class Profiler:
    """A jax.profiler trace of the updates from global step START to END (process 0), into
    the event folder, where TensorBoard's profile plugin finds it (plugins/profile/<time>/)."""

    def __init__(self, steps, total_steps: int, start_step: int, trace_dir: str):
        """`steps`: 'START:END', (START, END) or None (no trace)."""
        self.window, self.trace_dir, self.active = None, trace_dir, False
        self.enabled = parallel.is_main_process()
        steps = check_profile_steps(steps, total_steps)
        if steps is None:
            return
        first, end = steps
        if end <= start_step:  # A relaunch after preemption passes the same flags: not an error.
            log.warning("--profile_steps=%d:%d: this run resumes at step %d, past that window; nothing is traced",
                        first, end, start_step)
            return
        if first < start_step:
            log.warning("--profile_steps=%d:%d: this run resumes at step %d; tracing steps %d to %d", first, end,
                        start_step, start_step, end)
        self.window = (max(first, start_step), end)

    def before_update(self, step: int) -> None:
        """Call with the step the next update starts from."""
        if self.window is not None and step == self.window[0] and self.enabled:
            jax.profiler.start_trace(self.trace_dir)
            self.active = True

    def after_update(self, step: int, outputs) -> None:
        """Call with the step the update reached and what it returned."""
        if self.active and step == self.window[1]:
            jax.block_until_ready(outputs)  # The trace holds the device work of the last update too.
            self.stop()
            log.info("profile of steps %d to %d written under %s/plugins/profile", *self.window, self.trace_dir)

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
