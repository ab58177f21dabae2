"""Load a trained segmenter from a workdir, for evaluation and prediction after training.

A workdir written by `train.train_and_evaluate` holds `config.json` and two Orbax checkpoint
directories: `checkpoints/last` (the latest states) and `checkpoints/best` (the best by
validation Dice). Both save the whole TrainState, so restoring needs its structure: it is
built abstractly (`jax.eval_shape`, nothing is computed or allocated) from the saved config,
with every leaf placed on this machine's first device, so a checkpoint written on several
GPUs or TPU hosts restores on one CPU. Only the evaluated network's segmenter variables are
kept (student or teacher, as `config.eval.model` says); optimizer state and banks are dropped.

A volume is predicted as the run's evaluator predicts a test case (`TrainedModel.predict_volume`:
slice by slice for 2-D runs, by sliding windows for 3-D ones), and what predict needs to know of
the run's dataset (intensity normalisation, h5 axis order) is what the dataset declares in this
installation's registry (`TrainedModel.dataset`), looked up by config.data.dataset.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from arco_jax import evaluation, evaluators, files
from arco_jax.config import from_record
from arco_jax.checkpointing import saved_leaf_specs
from arco_jax.data import registry
from arco_jax.errors import ConfigError
from arco_jax.state import (TrainState, build_networks, build_optimizer, create_train_state, eval_variables,
                            legacy_layout)

CHECKPOINT_KINDS = ("best", "last")
CONFIG_FILE = "config.json"


class WorkdirError(ValueError):
    """A workdir, its config or the requested checkpoint is missing or unusable."""


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A restored segmenter ready for inference.

    checkpoint: what was asked for ('best', 'last' or a step number as text);
    directory: the checkpoint directory it came from ('best' or 'last'); step: the saved step.
    predict_logits: jitted, float32 images (N, *spatial, in_channels) -> logits (N, *spatial, C),
    eval mode (no dropout, running BatchNorm statistics).
    workdir: the run's folder (named by errors).
    """

    config: ml_collections.ConfigDict
    checkpoint: str
    directory: str
    step: int
    predict_logits: Callable[[np.ndarray], jax.Array]
    workdir: epath.Path

    def _from_config(self, what: str, build: Callable):
        try:
            return build(self.config)
        except ConfigError as err:
            raise WorkdirError(f"{self.workdir / CONFIG_FILE}: {what}: {err}") from err

    @functools.cached_property
    def dataset(self) -> registry.DatasetInfo:
        """What the run's dataset declares (registry.info of config.data.dataset)."""
        return self._from_config("the run's dataset", registry.info)

    @functools.cached_property
    def evaluator(self) -> evaluators.Evaluator:
        """The evaluator the run was tested with (evaluators.build of its config)."""
        return self._from_config("the run's evaluator", evaluators.build)

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.config.data.patch_size)

    @property
    def num_classes(self) -> int:
        return int(self.config.data.num_classes)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.config.data.class_names)

    def predict_probabilities(self, image: np.ndarray, flips: bool = False) -> np.ndarray:
        """Class probabilities (D, H, W, classes) of a preprocessed volume, predicted as the run's
        evaluator predicts a test case; `flips`: averaged over every flip of the network input's
        spatial axes (test-time augmentation: 4 views of a slice, 8 of a 3-D window)."""
        evaluator = self.evaluator
        if not hasattr(evaluator, "predict_probabilities"):
            raise WorkdirError(f"{self.workdir}: the run's evaluator {evaluator.name!r} predicts no volumes")
        predict = lambda x: np.asarray(self.predict_logits(x))  # noqa: E731
        if flips:
            predict = flip_averaged(predict, int(self.config.data.spatial_rank))
        return evaluator.predict_probabilities(predict, image)

    def predict_volume(self, image: np.ndarray) -> np.ndarray:
        """Label map (D, H, W) of a preprocessed volume (D, H, W), predicted as the run's evaluator
        predicts a test case (its `predict_volume`): slice by slice (the SSL4MIS protocol) for 2-D
        runs, by sliding windows with the run's eval.window, stride, window_batch_size and
        largest_component for 3-D ones."""
        evaluator = self.evaluator
        if not hasattr(evaluator, "predict_volume"):
            raise WorkdirError(f"{self.workdir}: the run's evaluator {evaluator.name!r} has no predict_volume: "
                               "it predicts no volumes, and predict segments volumes only")
        return evaluator.predict_volume(lambda x: np.asarray(self.predict_logits(x)), image)


def flip_averaged(predict: Callable[[np.ndarray], np.ndarray], spatial_rank: int) -> Callable:
    """Test-time augmentation of a batch predictor (N, *spatial, C) -> logits: the log of the
    mean softmax over every combination of flips of the spatial axes, each flipped back (so an
    argmax or a softmax downstream reads the averaged probabilities)."""
    spatial = range(1, spatial_rank + 1)
    views = [axes for r in range(spatial_rank + 1) for axes in itertools.combinations(spatial, r)]

    def averaged(images: np.ndarray) -> np.ndarray:
        total = None
        for axes in views:
            view = np.ascontiguousarray(np.flip(images, axes)) if axes else images
            probabilities = evaluation.softmax(predict(view))
            probabilities = np.flip(probabilities, axes) if axes else probabilities
            total = probabilities if total is None else total + probabilities
        return np.log(total / len(views) + np.finfo(np.float32).tiny)

    return averaged


def _check_workdir(workdir: epath.Path) -> None:
    if not workdir.is_dir():
        raise WorkdirError(f"workdir {workdir} does not exist or is not a directory")


def read_config(workdir: epath.PathLike) -> ml_collections.ConfigDict:
    """The run's config, as train_and_evaluate wrote it to <workdir>/config.json (a record of an
    earlier layout is upgraded, and fields added since take their defaults)."""
    workdir = files.workdir_path(workdir)
    _check_workdir(workdir)
    path = workdir / CONFIG_FILE
    if not path.is_file():
        raise WorkdirError(f"{path} is missing: not a workdir written by arco_jax training")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WorkdirError(f"{path} is not valid JSON ({err})") from err
    try:
        return from_record(record)
    except ValueError as err:
        raise WorkdirError(f"{path}: {err}") from err


def checkpoint_manager(directory: epath.PathLike) -> ocp.CheckpointManager:
    """A read-only manager of a saved run's checkpoints (local or in a bucket)."""
    return ocp.CheckpointManager(files.workdir_path(directory), options=ocp.CheckpointManagerOptions(create=False))


def checkpoint_steps(workdir: epath.PathLike) -> dict[str, list[int]]:
    """Saved steps under checkpoints/best and checkpoints/last (empty lists when absent)."""
    workdir = files.workdir_path(workdir)
    steps = {}
    for kind in CHECKPOINT_KINDS:
        directory = workdir / "checkpoints" / kind
        if directory.is_dir():
            manager = checkpoint_manager(directory)
            steps[kind] = sorted(manager.all_steps())
            manager.close()
        else:
            steps[kind] = []
    return steps


def _available(steps: dict[str, list[int]]) -> str:
    return "; ".join(f"{kind}: {values if values else 'none'}" for kind, values in steps.items())


def resolve_checkpoint(workdir: epath.PathLike, checkpoint: str | int = "best") -> tuple[str, int]:
    """(directory 'best' or 'last', step) for 'best', 'last' or a step number.

    A step number is looked up in 'last' first, then in 'best' (the best state may be older
    than every kept 'last' state).
    """
    workdir = files.workdir_path(workdir)
    _check_workdir(workdir)
    steps = checkpoint_steps(workdir)
    text = str(checkpoint).strip()
    if text in CHECKPOINT_KINDS:
        if not steps[text]:
            raise WorkdirError(f"{workdir / 'checkpoints' / text} holds no checkpoint "
                               f"(available: {_available(steps)})")
        return text, steps[text][-1]
    if not text.isdigit():
        raise WorkdirError(f"checkpoint={checkpoint!r}: expected 'best', 'last' or a step number")
    step = int(text)
    for kind in ("last", "best"):
        if step in steps[kind]:
            return kind, step
    raise WorkdirError(f"{workdir / 'checkpoints'} has no checkpoint at step {step} "
                       f"(available: {_available(steps)})")


def abstract_train_state(config: ml_collections.ConfigDict) -> TrainState:
    """Shapes, dtypes and a one-device placement of every TrainState leaf; nothing allocated."""
    nets = build_networks(config)
    init = functools.partial(create_train_state, config, nets, build_optimizer(config))
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), shapes)


def restore_state(workdir: epath.Path, config: ml_collections.ConfigDict, directory: str, step: int) -> TrainState:
    """The TrainState (on one device) of checkpoints/<directory>/<step>, also of the layout
    before methods owned their state (state.legacy_layout)."""
    path = workdir / "checkpoints" / directory
    target = abstract_train_state(config)
    saved = saved_leaf_specs(path / str(step))
    manager = checkpoint_manager(path)
    upgrade = legacy_layout(config, tuple(saved), target) if saved is not None else None
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target if upgrade is None else upgrade[0])))["state"]
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise WorkdirError(f"{path / str(step)} cannot be restored as the TrainState of "
                           f"{workdir / CONFIG_FILE} ({err})") from err
    finally:
        manager.close()
    return restored if upgrade is None else upgrade[1](restored)


def segmenter_variables(state: TrainState, model: str) -> dict:
    """The Flax variables of the student's or the EMA teacher's segmenter."""
    try:
        return eval_variables(state, model)
    except ValueError as err:
        raise WorkdirError(str(err)) from err


def load_model(workdir: epath.PathLike, checkpoint: str | int = "best") -> TrainedModel:
    """Restore the segmenter of a trained run ('best', 'last' or a step number)."""
    workdir = files.workdir_path(workdir)
    config = read_config(workdir)
    directory, step = resolve_checkpoint(workdir, checkpoint)
    state = restore_state(workdir, config, directory, step)
    variables = segmenter_variables(state, config.eval.model)
    segmenter = build_networks(config).segmenter
    apply = jax.jit(lambda v, images: segmenter.apply(v, images, train=False)[0])
    return TrainedModel(config=config, checkpoint=str(checkpoint), directory=directory, step=step,
                        predict_logits=functools.partial(apply, variables), workdir=workdir)
