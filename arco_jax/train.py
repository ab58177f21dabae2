"""Train ARCO and evaluate it, in sections: guards, data, model and state, evaluation, the step
loop (progress, validation, checkpoints, preemption), and the final test report.

`train_and_evaluate(config, workdir)` is the whole job; `main.py` only parses flags, so a
notebook can call this directly. With config.pretrain.steps > 0 the job is two stages on one
global step counter, relational pretraining (pretrain.py) then ARCO, in the same state. Running it again on the same workdir resumes exactly: the
state, the data streams' positions and metrics.jsonl continue from the newest intact
checkpoint, and the final parameters and logged metrics are bit for bit those of a run that
was never interrupted (same device count and backend).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import signal
import sys
import threading
import time

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from arco_jax import evaluators, files, host_memory, methods, monitoring, parallel
from arco_jax.checkpointing import Checkpoints, committed_steps
from arco_jax.config import ConfigError, fill_unrecorded, from_record, validate
from arco_jax.data import pipeline, registry
from arco_jax.core import Batch
from arco_jax.state import (Networks, TrainState, build_networks, build_optimizer, create_train_state,
                            eval_variables, legacy_layout, stage_terms, state_with_pretrained, term_names)
from arco_jax.step import make_pretrain_step, make_train_step

# Fields a resumed run may change without --allow_config_change: they decide when things are
# logged, evaluated or kept, never what the training computes.
RESUME_SAFE_FIELDS = frozenset({"train.log_every", "train.eval_every", "train.checkpoint_every",
                                "train.keep_checkpoints", "eval.slice_batch_size", "eval.window_batch_size"})
log = logging.getLogger("arco_jax")


def _console() -> None:
    """Progress lines to stdout on the main process (also in notebooks), once."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO if parallel.is_main_process() else logging.WARNING)


class TrainingDiverged(RuntimeError):
    """A loss term or the gradient became NaN/Inf; the state was frozen at the last good step."""


class Preempted(Exception):
    """SIGTERM arrived: the current step was saved and training stopped; rerun to resume."""

    def __init__(self, step: int, checkpoint_dir: epath.Path):
        super().__init__(f"preempted (SIGTERM) at step {step}: checkpoint step {step} saved in "
                         f"{checkpoint_dir}; run the same command again to resume")
        self.step = step


# ----------------------------------------------------------------------------- guards

def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(_flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return flat


def config_record(config: ml_collections.ConfigDict) -> dict:
    """The config as config.json stores it (tuples become lists)."""
    return json.loads(json.dumps(config.to_dict()))


def config_differences(old: dict, new: dict, ignore=frozenset()) -> list[str]:
    """'field: old -> new' for every leaf field that differs (dotted names), sorted."""
    old, new = _flatten(old), _flatten(new)
    missing = object()
    lines = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name, missing), new.get(name, missing)
        if a != b and name not in ignore:
            show = lambda v: "(absent)" if v is missing else repr(v)  # noqa: E731
            lines.append(f"{name}: {show(a)} -> {show(b)}")
    return lines


def config_hash(config: ml_collections.ConfigDict) -> str:
    """Hash of everything in the config that decides what training computes."""
    record = {k: v for k, v in _flatten(config_record(config)).items() if k not in RESUME_SAFE_FIELDS}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def check_same_config_on_all_processes(config: ml_collections.ConfigDict) -> None:
    """Every process must run the same config; a launcher that passed different flags to
    different hosts would otherwise train a silently inconsistent model (or hang)."""
    texts = parallel.gather_text(json.dumps(config_record(config), sort_keys=True))
    reference = json.loads(texts[0])
    problems = [f"process {i}: " + "; ".join(config_differences(reference, json.loads(text)))
                for i, text in enumerate(texts) if text != texts[0]]
    if problems:
        raise ConfigError("the processes of this run were given different configs (differences from "
                          "process 0's): " + " | ".join(problems))


def stored_config_differences(workdir: epath.Path, config: ml_collections.ConfigDict) -> list[str]:
    """'field: stored -> given' for each field that decides what training computes and differs
    between the workdir's config.json and `config` (resolved, as validate leaves it). A field
    added since the run was made counts as its default."""
    stored_path = workdir / "config.json"
    try:
        stored = fill_unrecorded(config_record(from_record(json.loads(stored_path.read_text()))),
                                 config_record(config))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{stored_path} is not valid JSON ({error}); it records the config of the run "
                          "in this workdir: restore it, or use another --workdir") from error
    return config_differences(stored, config_record(config), ignore=RESUME_SAFE_FIELDS)


def check_workdir_config(workdir: epath.Path, config: ml_collections.ConfigDict, allow_change: bool) -> bool:
    """Refuse to resume a run that was started with another config, unless allowed.

    A workdir "holds a run" once a checkpoint is committed; before that config.json is just
    replaced (a run that died at startup, e.g. on a wrong data_dir, can be rerun fixed).
    Returns whether the config differs from the stored one. Process 0 only.
    """
    stored_path = workdir / "config.json"
    has_run = bool(committed_steps(workdir / "checkpoints" / "last"))
    if not (has_run and stored_path.exists()):
        return False
    differences = stored_config_differences(workdir, config)
    if not differences:
        return False
    listed = "\n  ".join(differences)
    if not allow_change:
        raise ConfigError(
            f"{workdir} holds a run with another config ({stored_path}); resuming it would mix two "
            f"experiments. Differing fields (stored -> given):\n  {listed}\n"
            "Use a new --workdir, or pass --allow_config_change "
            "(train_and_evaluate(..., allow_config_change=True)) to resume it anyway.")
    archived = next(workdir / f"config.before_change_{i}.json" for i in range(1, 10_000)
                    if not (workdir / f"config.before_change_{i}.json").exists())
    stored_path.replace(archived)
    log.warning("resuming with a changed config (the old one is kept as %s):\n  %s", archived.name, listed)
    return True


# ----------------------------------------------------------------------------- data

def make_streams(config: ml_collections.ConfigDict, data: registry.OpenDataset) -> pipeline.TrainStreams:
    """The labeled and unlabeled training streams of an opened dataset."""
    d = config.data
    return pipeline.make_source_streams(
        *data.train_sources(), labeled_batch_size=d.batch_labeled, unlabeled_batch_size=d.batch_unlabeled,
        patch_size=tuple(d.patch_size), seed=config.seed, worker_count=d.num_workers,
        fill_label=0 if d.ignore_label is None else d.ignore_label,
        augmentation=registry.info(config).weak_augment, unlabeled_augmentation=d.unlabeled_view or None)


# ----------------------------------------------------------------------------- evaluation

class Predictors:
    """Prediction functions of a state for the evaluators. Each process predicts its own cases
    on its own devices (batches split over them, the model copied locally: no traffic between
    hosts); the evaluators gather the metrics."""

    def __init__(self, config: ml_collections.ConfigDict, nets: Networks):
        self.model = config.eval.model
        self.mesh = parallel.local_mesh()
        self._logits = jax.jit(lambda variables, x: nets.segmenter.apply(variables, x, train=False)[0])

    def __call__(self, state: TrainState) -> evaluators.Predict:
        variables = parallel.local_replica(eval_variables(state, self.model), self.mesh)
        sharding = parallel.batch_sharding(self.mesh)
        devices = self.mesh.size

        def predict(x: np.ndarray) -> np.ndarray:
            rows = x.shape[0]
            padded = np.pad(x, ((0, -rows % devices),) + ((0, 0),) * (x.ndim - 1))
            return np.asarray(self._logits(variables, jax.device_put(padded, sharding)))[:rows]

        return predict


# ----------------------------------------------------------------------------- logging

class MetricLog:
    """metrics.jsonl (survives restarts) and the console progress line.

    A train record holds the means over its log interval (monitoring.IntervalMeans: the steps
    since the previous record; a run resumed off the log grid starts with a shorter one), `lr`
    the last update's, and steps_per_sec the interval's training rate (validation excluded).

    On a local disk each record is appended as it comes. An object in a bucket cannot be
    appended to, so there the file is held in memory and rewritten whole at most once a
    minute and at every checkpoint: a resumed run finds every line up to its checkpoint.
    """

    REMOTE_WRITE_SECONDS = 60.0

    def __init__(self, workdir: epath.Path, total_steps: int, boundary: int = 0,
                 terms: dict[int, tuple[str, ...]] | None = None, images_per_step: int = 0,
                 eval_every: int | None = None):
        """`boundary`: the first stage-2 step (0 without stage 1); `terms`: {stage: the loss
        terms the progress line shows} (None: every `loss_<term>` metric); `images_per_step`:
        the global batch (labeled + unlabeled), for images/s; `eval_every`: the validation
        period, whose time the ETA adds."""
        self.terms = terms
        self.images_per_step = images_per_step
        self.eval_every = eval_every
        self._paused = 0.0  # Seconds of the current interval spent validating.
        self._eval_seconds: list[float] = []
        self.enabled = parallel.is_main_process()
        self.path = workdir / "metrics.jsonl"
        self.total_steps = total_steps
        self.boundary = boundary
        self._mark = (None, None)
        self._remote = files.is_remote(workdir)
        self._lines: list[str] = []  # In a bucket: the whole file.
        self._unwritten = False
        self._written_at = time.monotonic()

    def keep_until(self, step: int) -> None:
        """Drop what a previous run logged after `step` (the step being resumed: those steps
        run again), and a last line cut short by a kill, so each step is logged once."""
        if not (self.enabled and self.path.exists()):
            return
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
            else:
                dropped += 1
        self._lines = kept if self._remote else []
        if dropped:
            files.write_text(self.path, "".join(line + "\n" for line in kept))
            log.info("metrics.jsonl: dropped %d lines written after step %d by the interrupted run", dropped, step)

    def start(self, step: int) -> None:
        self._mark = (step, time.perf_counter())
        self._paused = 0.0

    def evaluated(self, seconds: float) -> None:
        """A validation took `seconds`: left out of steps/s, counted in the ETA."""
        self._paused += seconds
        self._eval_seconds.append(seconds)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(record, sort_keys=True)
        if not self._remote:
            with self.path.open("a") as f:
                f.write(line + "\n")
            return
        self._lines.append(line)
        self._unwritten = True
        if time.monotonic() - self._written_at >= self.REMOTE_WRITE_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Bring the file up to date (in a bucket; local lines are already on disk)."""
        if self.enabled and self._unwritten:
            files.write_text(self.path, "".join(line + "\n" for line in self._lines))
            self._unwritten = False
        self._written_at = time.monotonic()

    def progress(self, step: int, metrics: dict, stage: int, averaged_over: int | None = None) -> dict:
        """`metrics`: the interval's means (host floats); `stage`: the stage of the updates that
        produced them (its terms are printed); `averaged_over`: how many steps they cover.
        Returns the record written."""
        now = time.perf_counter()
        last_step, last_time = self._mark
        self._mark = (step, now)
        elapsed = now - last_time - self._paused if last_step is not None else 0.0
        self._paused = 0.0
        # NaN when no step was timed (an interval of only a compiling first step).
        timed = last_step is not None and step > last_step and elapsed > 0
        rate = (step - last_step) / elapsed if timed else float("nan")
        # Stage 1 runs several times faster than stage 2, so its rate only predicts its own end.
        stage_end = self.boundary if stage == 1 else self.total_steps
        left = (stage_end - step) / rate if rate > 0 else float("nan")
        if self.eval_every and self._eval_seconds:
            left += (stage_end // self.eval_every - step // self.eval_every) * float(np.mean(self._eval_seconds))
        eta = _duration(left)
        record = {"split": "train", "step": step, "stage": stage, "steps_per_sec": rate, **metrics}
        self.write(record)
        names = self.terms[stage] if self.terms else [k[5:] for k in metrics if k.startswith("loss_")]
        terms = " ".join(f"{name} {metrics['loss_' + name]:.4f}" for name in names)
        mean_of = f"mean of {averaged_over} steps: " if averaged_over else ""
        grad = f" grad {metrics['grad_norm']:.3g}" if "grad_norm" in metrics else ""
        images = f", {rate * self.images_per_step:.1f} images/s" if self.images_per_step else ""
        speed = f"{rate:.2f} steps/s{images}" if timed else "speed from the next interval (this one compiled)"
        log.info("stage %d | step %d/%d | %sloss %.4f (%s)%s | lr %.5f | %s | ETA %s", stage,
                 step, self.total_steps, mean_of, metrics["loss"], terms, grad, metrics["lr"], speed,
                 f"{eta} to stage 2" if stage == 1 else eta)
        return record


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _check_finite(config: ml_collections.ConfigDict, state: TrainState, checkpoint_dir: epath.Path) -> None:
    bad_step = int(parallel.fetch(state.bad_step))
    if bad_step >= 0:
        bad = [name for name, flag in zip(term_names(config), parallel.fetch(state.bad_terms)) if flag]
        raise TrainingDiverged(
            f"non-finite {', '.join(bad)} at step {bad_step} (in the update from step {bad_step} to "
            f"{bad_step + 1}): training stopped. The state stayed at step {bad_step}, the last good one; "
            f"checkpoints already written in {checkpoint_dir} are untouched.")


# ----------------------------------------------------------------------------- preemption

class PreemptionWatch:
    """Has SIGTERM (the usual preemption notice) arrived? One process: a signal handler sets a
    flag. Several processes: JAX's preemption sync manager (it catches SIGTERM itself) names a
    step at which every process answers yes, so all save the same step together."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._multi = jax.process_count() > 1

    def __enter__(self) -> "PreemptionWatch":
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _on_sigterm(self, signum, frame) -> None:
        self.requested = True

    def reached(self, step: int) -> bool:
        """Call once per step, on every process."""
        if self._multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested


# ----------------------------------------------------------------------------- the job

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.PathLike, *,
                       allow_config_change: bool = False, profile_steps=None) -> dict:
    """Train (resuming from the workdir's newest intact checkpoint if any), select on val,
    report test. Raises Preempted after saving when SIGTERM arrives during training (a notice
    that comes while starting up is acted on after the first step; one that comes during the
    final test evaluation lets it finish: the last state is saved by then). `profile_steps`:
    'START:END' or (START, END), global steps whose updates jax.profiler traces into
    <workdir>/tensorboard."""
    with PreemptionWatch() as preemption:
        return _train_and_evaluate(config, files.workdir_path(workdir), allow_config_change, preemption,
                                   profile_steps)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.Path, allow_config_change: bool,
                        preemption: PreemptionWatch, profile_steps=None) -> dict:
    _console()
    check_same_config_on_all_processes(config)
    # The fields left to the hardware (data.mesh_devices, arco.remat_student) are resolved here
    # and recorded in config.json with the rest.
    validate(config, device_count=jax.device_count(), process_count=jax.process_count(),
             platform=jax.default_backend())
    mesh = parallel.make_mesh(config.data.mesh_devices)
    is_main = parallel.is_main_process()
    monitoring.check_profile_steps(profile_steps, config.pretrain.steps + config.train.steps)  # before any read

    def claim_workdir() -> None:
        if is_main:
            workdir.mkdir(parents=True, exist_ok=True)
            check_workdir_config(workdir, config, allow_config_change)
            files.write_json(workdir / "config.json", config.to_dict())

    parallel.on_all_processes(claim_workdir, "checking the workdir's config")

    # Data: every process checks its own files; a file missing on any host stops all of them.
    # Evaluation cases are read from disk when evaluated, one at a time.
    def load_data():
        data = registry.open_dataset(config)
        split_sizes = {split: len(data.cases(split)) for split in ("val", "test")}
        return data, make_streams(config, data), split_sizes

    data, streams, split_sizes = parallel.on_all_processes(load_data, "reading the data")
    log.info("data: %s | %s, batches %d+%d | %d val, %d test cases | mesh %s, %d process(es)", data.description,
             data.labeled_description, config.data.batch_labeled, config.data.batch_unlabeled, split_sizes["val"],
             split_sizes["test"], dict(mesh.shape), jax.process_count())
    if is_main:  # Which cases were labeled, and the dataset's preprocessing plan (predict applies it).
        files.write_json(workdir / registry.DATA_RECORD, data.labeled_record)
    if mesh.size < jax.device_count():
        log.info("data mesh: %d of the %d devices (data.mesh_devices, for the global batches %d+%d); %d idle",
                 mesh.size, jax.device_count(), config.data.batch_labeled, config.data.batch_unlabeled,
                 jax.device_count() - mesh.size)

    # Model, optimizer, the steps of each stage (global steps [0, boundary) are stage 1,
    # relational pretraining; the rest stage 2, the method).
    nets = build_networks(config)
    tx = build_optimizer(config)
    replicated = parallel.replicated(mesh)
    init = jax.jit(functools.partial(create_train_state, config, nets, tx), out_shardings=replicated)
    this_config = config_hash(config)
    checkpoints = Checkpoints(workdir / "checkpoints", config.train.keep_checkpoints, this_config,
                              legacy=functools.partial(legacy_layout, config))
    boundary = config.pretrain.steps
    total_steps = boundary + config.train.steps
    shardings = dict(in_shardings=(replicated, parallel.batch_sharding(mesh)),
                     out_shardings=(replicated, replicated), donate_argnums=0)
    stages = methods.stage_methods(config)
    makers = {1: make_pretrain_step, 2: make_train_step}  # each runs the method of its stage
    steppers = {stage: jax.jit(makers[stage](config, nets, tx), **shardings) for stage in stages}

    def next_batch() -> Batch:
        labeled, unlabeled = next(streams)
        return Batch(**parallel.global_batch(mesh, {"image_l": labeled["image"], "label_l": labeled["label"],
                                                    "image_u": unlabeled["image"]}))

    # The steps still to run compile before the state exists, from its shapes and a first batch:
    # the compiler's peak (on a CPU over twice the state) then never sits on top of the state.
    # The run resumes from the newest checkpoint; should that one prove unreadable and an older
    # one lie in another stage, the loop compiles that stage when it gets there.
    first_batch = next_batch()
    state_shapes = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
    resume_from = checkpoints.latest_saved_step or 0
    for stage in stages:
        if (resume_from < boundary) if stage == 1 else (total_steps > max(resume_from, boundary)):
            started = time.perf_counter()
            steppers[stage] = steppers[stage].lower(state_shapes, first_batch).compile()
            log.info("stage %d train step compiled in %.1f s", stage, time.perf_counter() - started)
    host_memory.release_freed_memory()  # what the compiler freed, before the state is allocated

    # The newest intact checkpoint (read into the state's shapes), else a fresh state; either
    # way one state is allocated (replicated over the mesh).
    restored = checkpoints.restore_last(state_shapes, streams)
    if restored is not None:
        state = restored
        first_batch = None  # drawn before the streams were set to the checkpoint's position
    else:
        state = init(jax.random.PRNGKey(config.seed))
    if restored is None and config.model.init_from:  # A fresh run starts its segmenter from the file.
        state, loaded = state_with_pretrained(state, config.model.init_from)
        state = parallel.replicate(mesh, state)
        log.info("init_from %s: %d segmenter arrays loaded", config.model.init_from, loaded)
    start = int(parallel.fetch(state.step))
    host_memory.release_freed_memory()  # what initialising (and restoring) freed
    if restored is not None:
        log.info("resumed from step %d", start)
    best = checkpoints.best_record()
    if best is not None and best["step"] > start and best["config_hash"] != this_config:
        log.warning("the best checkpoint (step %d) was selected after step %d under the replaced config; "
                    "dropped, selection starts again", best["step"], start)
        checkpoints.forget_best()
        best = None
    metric, mode = evaluators.select_metric(config)
    key = f"val_{metric}"
    if best is not None and key not in best:
        log.warning("the best checkpoint (step %d) was selected by another metric than %s; selection starts again",
                    best["step"], metric)
        best = None
    best = {"step": best["step"], key: best[key]} if best else {"step": None, key: None}
    # A dataset without a val split (the LA benchmark's protocol: train, then test the last
    # state) has no checkpoint selection: the test report is of the last state only.
    validates = split_sizes["val"] > 0
    if not validates:
        log.info("no val cases: no checkpoint selection, the last state is tested")

    finish = {stage: jax.jit(m.finish, in_shardings=replicated, out_shardings=replicated, donate_argnums=0)
              for stage, m in stages.items() if m.finish is not None}
    evaluator = evaluators.build(config)
    predictors = Predictors(config, nets)
    terms = stage_terms(config)
    images_per_step = config.data.batch_labeled + config.data.batch_unlabeled
    metric_log = MetricLog(workdir, total_steps, boundary, terms, images_per_step, config.train.eval_every)
    metric_log.keep_until(start)
    events = monitoring.EventLog(workdir, start)
    profiler = monitoring.Profiler(profile_steps, total_steps, start, events.trace_dir)
    interval = monitoring.IntervalMeans()
    table, count = monitoring.parameter_table(state.params)
    log.info("model: %s parameters (table in parameters.txt)", f"{count:,}")
    if is_main:
        files.write_text(workdir / "parameters.txt", table + "\n")
        events.text(start, "overlay_legend", monitoring.legend(config.data.class_names, config.data.num_classes))

    drawing = {"on": is_main}

    def overlays(predict, split: str) -> dict:
        """A few cases of `split` drawn for TensorBoard (process 0). A failure to draw is
        said once and drawing stops; training goes on."""
        if not drawing["on"]:
            return {}
        try:
            return monitoring.overlays(evaluator, predict, data, split, config.data.spatial_rank,
                                       config.data.num_classes, config.data.ignore_label)
        except Exception as error:  # noqa: BLE001
            drawing["on"] = False
            log.warning("tensorboard: no more overlay images (drawing %s cases failed: %r)", split, error)
            return {}

    # The loop. Every step that logs, validates or saves first checks that training is still
    # finite, so a frozen (diverged) state is never saved. Validation runs in both stages (the
    # supervised term trains the segmenter in stage 1 too), but only stage-2 states compete
    # for the best checkpoint: stage 1 is a starting point, not a result. The boundary step is
    # always saved: the stage-1 result, the state stage 2 starts from.
    step = start
    t = config.train
    try:
        while step < total_steps:
            stage = 1 if step < boundary else 2
            first_of_stage = step == max(start, boundary if stage == 2 else 0)
            if first_of_stage:
                started = time.perf_counter()
            profiler.before_update(step)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                if first_batch is not None:  # drawn for the ahead compile
                    batch, first_batch = first_batch, None
                else:
                    batch = next_batch()
                if not isinstance(steppers[stage], jax.stages.Compiled):
                    # Not compiled ahead (see above): compiled before its first call, so that what
                    # the compiler freed is handed back before the step's buffers are allocated.
                    steppers[stage] = steppers[stage].lower(state, batch).compile()
                    host_memory.release_freed_memory()
                state, metrics = steppers[stage](state, batch)
            interval.add(metrics)
            step += 1
            if step == (boundary if stage == 1 else total_steps) and stage in finish:
                state = finish[stage](state)  # Stage 2 starts from the stage-1 student, as student and teacher.
            if first_of_stage:
                # A stage's first call compiles; keep that out of the steps/s figure.
                jax.block_until_ready(metrics)
                log.info("stage %d train step run once in %.1f s", stage, time.perf_counter() - started)
                metric_log.start(step)
            profiler.after_update(step, metrics)
            last = step == total_steps
            at_boundary = step == boundary
            preempted = preemption.reached(step)
            if not (last or preempted or at_boundary or step % t.log_every == 0 or step % t.eval_every == 0
                    or step % t.checkpoint_every == 0):
                continue
            _check_finite(config, state, workdir / "checkpoints")
            # The stage-1 interval ends at the boundary: a mean never mixes the two stages' terms.
            if last or at_boundary or step % t.log_every == 0:
                averaged_over = interval.count
                record = metric_log.progress(step, interval.read(), stage, averaged_over)
                events.scalars(step, monitoring.train_scalars(record, terms[stage] if terms else None,
                                                              images_per_step))
            if validates and (last or step % t.eval_every == 0):
                started_eval = time.perf_counter()
                predict = predictors(state)
                result = evaluator.run(predict, data, "val")
                measured = result.metrics
                value = measured[metric]
                metric_log.write({"split": "val", "step": step, "stage": stage, **measured})
                improved = stage == 2 and evaluators.better(value, best[key], mode)
                if improved:
                    best = {"step": step, key: value}
                    checkpoints.save_best(step, state, value, metric)
                events.scalars(step, {**monitoring.eval_scalars("val", measured, result.record),
                                      f"val/best_{metric}": best[key]})
                events.images(step, overlays(predict, "val"))
                host_memory.release_freed_memory()  # the cases read, the predictors compiled
                metric_log.evaluated(time.perf_counter() - started_eval)
                if stage == 1:
                    log.info("val step %d (stage 1: not a candidate for best) | %s %.4f", step, metric, value)
                else:
                    log.info("val step %d | %s %.4f | best %s at step %s%s", step, metric, value,
                             "--" if best[key] is None else f"{best[key]:.4f}", best["step"],
                             " (new best)" if improved else "")
            if last or preempted or at_boundary or step % t.checkpoint_every == 0:
                checkpoints.save_last(step, state, streams)
                metric_log.flush()
                events.flush()
            if preempted and not last:
                checkpoints.wait()
                raise Preempted(step, checkpoints.last.directory)
    except BaseException:
        profiler.stop()
        _close_quietly(checkpoints, metric_log, events)  # Let a save in flight finish: the newest good one survives.
        streams.close()
        raise
    checkpoints.wait()
    streams.close()

    # Test: the val-selected state and the last one.
    results = {"dataset": config.data.dataset, **data.labeled_record, "steps": step, "pretrain_steps": boundary,
               "sampler": config.arco.sampler, "strata": config.arco.strata, "evaluator": evaluator.name,
               **evaluator.results_fields, "best_val": best, "test": {}}
    tables = []
    # Each predictor holds only its segmenter's variables. The last state's banks and optimizer
    # moments are let go before the best state is read, and the best state's once its predictor
    # exists: two full states never sit in memory together.
    predict_last = predictors(state)
    state = restored = None
    host_memory.release_freed_memory()
    best_state = checkpoints.restore_best(state_shapes) if validates else None
    predict_best = None if best_state is None else predictors(best_state)
    best_state = None
    for name, predict in (("best", predict_best), ("last", predict_last)):
        if predict is None:
            continue
        result = evaluator.run(predict, data, "test")
        results["test"][name] = result.record
        events.scalars(step, monitoring.eval_scalars(f"test_{name}", result.metrics, result.record))
        if name == "last":
            events.images(step, overlays(predict, "test"))
        title = f"val-selected (step {best['step']})" if name == "best" else f"last (step {step})"
        tables.append(f"### Test, {title}\n\n" + result.table)
        log.info("test (%s): %s %.4f", name, metric, result.metrics[metric])
    checkpoints.close()
    events.close()
    if is_main:
        files.write_json(workdir / "results.json", results)
        header = (f"# ARCO results: {config.data.dataset}, {data.labeled_description}, sampler "
                  f"{config.arco.sampler}/{config.arco.strata}, {step} steps\n\n")
        files.write_text(workdir / "results.md", header + "\n\n".join(tables) + "\n")
        print(header + "\n\n".join(tables))
    return results


def _close_quietly(checkpoints: Checkpoints, metric_log: MetricLog, events: monitoring.EventLog) -> None:
    """On the way out of an error: finish what can be finished, never mask the first error."""
    try:
        metric_log.flush()
    except Exception as error:  # noqa: BLE001
        log.warning("while stopping, writing metrics.jsonl also failed: %s", error)
    try:
        events.close()
    except Exception as error:  # noqa: BLE001
        log.warning("while stopping, writing the TensorBoard events also failed: %s", error)
    try:
        checkpoints.close()
    except Exception as error:  # noqa: BLE001
        log.warning("while stopping, a checkpoint write also failed: %s", error)
