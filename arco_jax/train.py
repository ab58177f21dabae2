"""Train ARCO and evaluate it, in sections: data, model and state, checkpoints, the step
loop (progress, validation, best checkpoint), and the final test report.

`train_and_evaluate(config, workdir)` is the whole job; `main.py` only parses flags, so a
notebook can call this directly.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from arco_jax import evaluation, parallel
from arco_jax.config import validate
from arco_jax.data import phantom, pipeline, ssl4mis
from arco_jax.objective import Batch
from arco_jax.state import (LOSS_TERM_NAMES, Networks, TrainState, build_networks, build_optimizer,
                            create_train_state)
from arco_jax.step import make_train_step

DISTANCE_UNITS = "voxels"
log = logging.getLogger("arco_jax")


def _console() -> None:
    """Progress lines to stdout on the main process (also in notebooks), once."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)


class TrainingDiverged(RuntimeError):
    """A loss term or the gradient became NaN/Inf; the state was frozen at the last good step."""


# ----------------------------------------------------------------------------- data

def prepare_data(config: ml_collections.ConfigDict) -> Path:
    """Root of the SSL4MIS layout: the user's ACDC folder, or the phantom (built on first use)."""
    d = config.data
    if d.dataset == "phantom":
        p = d.phantom
        return phantom.ensure_phantom(d.cache_dir or None, splits=tuple(p.splits), image_size=p.image_size,
                                      slices=tuple(p.slices), seed=p.seed)
    return Path(d.data_dir)


def labeled_slices(config: ml_collections.ConfigDict, root: Path) -> int:
    d = config.data
    return ssl4mis.labeled_slice_count(d.dataset, d.labeled_patients, d.one_patient_split, root=root)


def make_streams(config: ml_collections.ConfigDict, root: Path, num_labeled: int) -> pipeline.TrainStreams:
    d = config.data
    return pipeline.make_train_streams(
        root, num_labeled_slices=num_labeled, labeled_batch_size=d.batch_labeled,
        unlabeled_batch_size=d.batch_unlabeled, patch_size=tuple(d.patch_size), seed=config.seed,
        num_classes=d.num_classes, worker_count=d.num_workers)


# ----------------------------------------------------------------------------- evaluation

class Evaluator:
    """The SSL4MIS volume protocol on a list of (case, image, label) volumes, one jitted
    eval-mode forward reused for every slice batch."""

    def __init__(self, config: ml_collections.ConfigDict, nets: Networks):
        self.config = config
        self._logits = jax.jit(lambda variables, x: nets.segmenter.apply(variables, x, train=False)[0])

    def variables(self, state: TrainState) -> dict:
        if self.config.eval.model == "teacher":
            return {"params": state.teacher["params"]["segmenter"], "batch_stats": state.teacher["batch_stats"]}
        return {"params": state.params["segmenter"], "batch_stats": state.batch_stats}

    def __call__(self, state: TrainState, volumes) -> tuple[dict, dict]:
        c = self.config
        variables = self.variables(state)
        predict = lambda x: np.asarray(self._logits(variables, jnp.asarray(x)))  # noqa: E731
        per_case = {}
        for case, image, label in volumes:
            pred = evaluation.predict_volume(predict, image, tuple(c.data.patch_size),
                                             slice_batch_size=c.eval.slice_batch_size)
            per_case[case] = evaluation.evaluate_volume(pred, label, c.data.num_classes,
                                                        empty_policy=c.eval.empty_policy)
        return evaluation.summarize(per_case, list(c.data.class_names)), per_case


def mean_dice(summary: dict) -> float:
    return float(summary["class_mean"][evaluation.METRIC_NAMES.index("dice")])


def summary_json(summary: dict, per_case: dict) -> dict:
    names = evaluation.METRIC_NAMES
    return {
        "num_cases": summary["num_cases"],
        "mean": {m: float(summary["class_mean"][i]) for i, m in enumerate(names)},
        "per_class": {cls: {m: float(summary["mean"][k, i]) for i, m in enumerate(names)}
                      for k, cls in enumerate(summary["class_names"])},
        "per_case": {case: np.asarray(rows).tolist() for case, rows in per_case.items()},
    }


# ----------------------------------------------------------------------------- checkpoints

class Checkpoints:
    """Orbax managers for the latest states (with the data stream position) and the best one
    by validation Dice. Every process calls save/restore; Orbax coordinates the writes."""

    def __init__(self, workdir: Path, keep: int):
        self.last = ocp.CheckpointManager(
            workdir / "checkpoints" / "last",
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
        self.best = ocp.CheckpointManager(
            workdir / "checkpoints" / "best", options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
        self.best_file = workdir / "checkpoints" / "best.json"

    def save_last(self, step: int, state: TrainState, streams: pipeline.TrainStreams) -> None:
        self.last.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(streams.get_state())))

    def save_best(self, step: int, state: TrainState, val_dice: float) -> None:
        self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
        self.best.wait_until_finished()
        if jax.process_index() == 0:
            _write_json(self.best_file, {"step": step, "val_dice": val_dice})

    def best_record(self) -> dict | None:
        return json.loads(self.best_file.read_text()) if self.best_file.exists() else None

    def restore_last(self, target: TrainState, streams: pipeline.TrainStreams) -> TrainState | None:
        step = self.last.latest_step()
        if step is None:
            return None
        restored = self.last.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        streams.set_state(restored["data"])
        return restored["state"]

    def restore_best(self, target: TrainState) -> TrainState | None:
        step = self.best.latest_step()
        if step is None:
            return None
        return self.best.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]

    def close(self) -> None:
        self.last.wait_until_finished()
        self.last.close()
        self.best.close()


# ----------------------------------------------------------------------------- logging

def _write_json(path: Path, payload: dict) -> None:
    """Write-then-rename so a crash never leaves a truncated file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    tmp.replace(path)


class MetricLog:
    """metrics.jsonl (appended, survives restarts) and the console progress line."""

    def __init__(self, workdir: Path, total_steps: int):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self.total_steps = total_steps
        self._mark = (None, None)

    def start(self, step: int) -> None:
        self._mark = (step, time.perf_counter())

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")

    def progress(self, step: int, metrics: dict) -> None:
        now = time.perf_counter()
        last_step, last_time = self._mark
        self._mark = (step, now)
        rate = (step - last_step) / (now - last_time) if last_step is not None and now > last_time else float("nan")
        eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
        self.write({"split": "train", "step": step, "steps_per_sec": rate, **metrics})
        terms = " ".join(f"{name} {metrics['loss_' + name]:.4f}" for name in LOSS_TERM_NAMES[:-1])
        log.info("step %d/%d | loss %.4f (%s) | lr %.5f | %.2f steps/s | ETA %s",
                     step, self.total_steps, metrics["loss"], terms, metrics["lr"], rate, _duration(eta))


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _check_finite(state: TrainState, checkpoint_dir: Path) -> None:
    bad_step = int(jax.device_get(state.bad_step))
    if bad_step >= 0:
        bad = [name for name, flag in zip(LOSS_TERM_NAMES, jax.device_get(state.bad_terms)) if flag]
        raise TrainingDiverged(
            f"non-finite {', '.join(bad)} at step {bad_step} (in the update from step {bad_step} to "
            f"{bad_step + 1}): training stopped. The state stayed at step {bad_step}, the last good one; "
            f"checkpoints already written in {checkpoint_dir} are untouched.")


# ----------------------------------------------------------------------------- the job

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Train (resuming from the workdir's latest checkpoint if any), select on val, report test."""
    workdir = Path(workdir).absolute()  # Orbax needs absolute paths; users type relative ones.
    _console()
    mesh = parallel.make_mesh()
    validate(config, device_count=mesh.size)
    is_main = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    if is_main:
        _write_json(workdir / "config.json", config.to_dict())

    # Data.
    root = prepare_data(config)
    num_labeled = labeled_slices(config, root)
    streams = make_streams(config, root, num_labeled)
    val_volumes = list(ssl4mis.iterate_volumes(root, "val", config.data.num_classes))
    log.info("data: %s | %d labeled slices (%d patients), batches %d+%d | %d val volumes | mesh %s",
                 root, num_labeled, config.data.labeled_patients, config.data.batch_labeled,
                 config.data.batch_unlabeled, len(val_volumes), dict(mesh.shape))

    # Model, optimizer, state (replicated over the mesh).
    nets = build_networks(config)
    tx = build_optimizer(config)
    replicated = parallel.replicated(mesh)
    init = jax.jit(functools.partial(create_train_state, config, nets, tx), out_shardings=replicated)
    state = init(jax.random.PRNGKey(config.seed))
    checkpoints = Checkpoints(workdir, config.train.keep_checkpoints)
    restored = checkpoints.restore_last(state, streams)
    if restored is not None:
        state = restored
        log.info("resumed from step %d", int(state.step))
    best = checkpoints.best_record() or {"step": None, "val_dice": -1.0}

    train_step = jax.jit(make_train_step(config, nets, tx),
                         in_shardings=(replicated, parallel.batch_sharding(mesh)),
                         out_shardings=(replicated, replicated), donate_argnums=0)
    evaluate = Evaluator(config, nets)
    metric_log = MetricLog(workdir, config.train.steps)

    # The loop. Every step that logs, validates or saves first checks that training is still
    # finite, so a frozen (diverged) state is never saved.
    step = start = int(state.step)
    started = time.perf_counter()
    t = config.train
    try:
        while step < t.steps:
            labeled, unlabeled = next(streams)
            arrays = parallel.global_batch(mesh, {"image_l": labeled["image"], "label_l": labeled["label"],
                                                  "image_u": unlabeled["image"]})
            state, metrics = train_step(state, Batch(**arrays))
            step += 1
            if step == start + 1:  # The first call compiles; keep that out of the steps/s figure.
                jax.block_until_ready(metrics)
                log.info("train step compiled and run once in %.1f s", time.perf_counter() - started)
                metric_log.start(step)
            last = step == t.steps
            if not (last or step % t.log_every == 0 or step % t.eval_every == 0 or step % t.checkpoint_every == 0):
                continue
            _check_finite(state, workdir / "checkpoints")
            if last or step % t.log_every == 0:
                metric_log.progress(step, {k: float(v) for k, v in jax.device_get(metrics).items()})
            if last or step % t.eval_every == 0:
                summary, _ = evaluate(state, val_volumes)
                dice = mean_dice(summary)
                metric_log.write({"split": "val", "step": step, "dice": dice})
                improved = dice > best["val_dice"]
                if improved:
                    best = {"step": step, "val_dice": dice}
                    checkpoints.save_best(step, state, dice)
                log.info("val step %d | mean Dice %.4f | best %.4f at step %d%s", step, dice,
                         best["val_dice"], best["step"], " (new best)" if improved else "")
            if last or step % t.checkpoint_every == 0:
                checkpoints.save_last(step, state, streams)
    except BaseException:
        checkpoints.close()  # Let a save in flight finish: the newest good checkpoint survives.
        streams.close()
        raise
    checkpoints.last.wait_until_finished()
    streams.close()

    # Test: the val-selected state and the last one.
    test_volumes = list(ssl4mis.iterate_volumes(root, "test", config.data.num_classes))
    results = {"dataset": config.data.dataset, "labeled_patients": config.data.labeled_patients,
               "labeled_slices": num_labeled, "steps": step, "sampler": config.arco.sampler,
               "strata": config.arco.strata, "empty_policy": config.eval.empty_policy,
               "distance_units": DISTANCE_UNITS, "best_val": best, "test": {}}
    tables = []
    candidates = [("best", checkpoints.restore_best(state)), ("last", state)]
    for name, candidate in candidates:
        if candidate is None:
            continue
        summary, per_case = evaluate(candidate, test_volumes)
        results["test"][name] = summary_json(summary, per_case)
        title = f"val-selected (step {best['step']})" if name == "best" else f"last (step {step})"
        tables.append(f"### Test, {title}\n\n"
                      + evaluation.markdown_table(summary, config.eval.empty_policy, DISTANCE_UNITS))
        log.info("test (%s): mean Dice %.4f", name, mean_dice(summary))
    checkpoints.close()
    if is_main:
        _write_json(workdir / "results.json", results)
        header = (f"# ARCO results: {config.data.dataset}, {config.data.labeled_patients} labeled patients "
                  f"({num_labeled} slices), sampler {config.arco.sampler}/{config.arco.strata}, {step} steps\n\n")
        (workdir / "results.md").write_text(header + "\n\n".join(tables) + "\n")
        print(header + "\n\n".join(tables))
    return results
