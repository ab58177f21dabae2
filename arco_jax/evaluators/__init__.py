"""Evaluators as plug-ins, chosen by `config.eval.type`.

An evaluator turns a prediction function and a split of an opened dataset into metrics. It
reads the split's cases one at a time (each process its own share: cases p, p + n, ... of n
processes) and gathers what every process measured, so every process returns the same result.

    evaluator = evaluators.build(config)       # config.eval.type, or the dataset's default
    result = evaluator.run(predict, data, "val")
    result.metrics["dice"]                     # scalars; config.eval.select_metric names one

Built in: 'volume_slices' (the SSL4MIS per-volume protocol, volumes predicted slice by slice:
ACDC, the phantom), 'sliding_window' (the same metrics, 3-D volumes predicted by overlapping
windows: the reference's test_3D.py) and 'miou' (a confusion matrix over whole images:
natural-image sets). 'auto' picks by the dataset's `eval_unit` (and, for volumes, its spatial
rank: 'volume_slices' for 2-D samples, 'sliding_window' for 3-D ones). A new evaluator is a
module with a class that has `name`, `selectable` and `run`, and one `register(...)` call. An
evaluator of volumes also has `predict_volume(predict, image) -> labels`, how it predicts one
case: `python -m arco_jax.predict` segments new scans of a run with it.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Protocol

import ml_collections
import numpy as np

from arco_jax.data.registry import OpenDataset
from arco_jax.errors import ConfigError

# images (N, *spatial, C) float32 -> logits (N, *spatial, num_classes) float32, on this process.
Predict = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """metrics: the scalars selection and logs read; record: everything, JSON-able (results.json);
    table: the Markdown report."""

    metrics: dict
    record: dict
    table: str


class Evaluator(Protocol):
    name: str
    # Metrics a checkpoint may be selected by, and whether larger ('max') or smaller ('min') is better.
    selectable: dict
    default_metric: str

    def run(self, predict: Predict, data: OpenDataset, split: str) -> EvalResult:
        """Evaluate every case of `split` (all processes call it together)."""


_BUILTIN = {
    "volume_slices": "arco_jax.evaluators.volumes:VolumeSlices",
    "miou": "arco_jax.evaluators.miou:MeanIoU",
    "sliding_window": "arco_jax.evaluators.sliding_window:SlidingWindow",
}
_DEFAULT_FOR_UNIT = {"volume": "volume_slices", "image": "miou"}
_DEFAULT_FOR_3D_VOLUMES = "sliding_window"
_REGISTERED: dict[str, type] = {}


def register(name: str, evaluator_class: type, *, replace: bool = False) -> None:
    """Make `evaluator_class(config)` selectable as config.eval.type = name."""
    if not replace and (name in _REGISTERED or name in _BUILTIN):
        raise ValueError(f"an evaluator named {name!r} is already registered")
    _REGISTERED[name] = evaluator_class


def names() -> tuple[str, ...]:
    return tuple(sorted(set(_BUILTIN) | set(_REGISTERED)))


def evaluator_class(name: str) -> type:
    if name not in _REGISTERED:
        if name not in _BUILTIN:
            raise ConfigError(f"config.eval.type: {name!r} is not an evaluator; known: auto, {', '.join(names())}")
        module, attribute = _BUILTIN[name].split(":")
        _REGISTERED[name] = getattr(importlib.import_module(module), attribute)
    return _REGISTERED[name]


def type_of(config: ml_collections.ConfigDict) -> str:
    """config.eval.type, with 'auto' resolved from the dataset's eval_unit (and spatial rank:
    volumes of 3-D samples are evaluated by sliding windows, of 2-D ones slice by slice)."""
    name = config.eval.type
    if name == "auto":
        from arco_jax.data import registry  # pylint: disable=import-outside-toplevel

        info = registry.info(config)
        if info.eval_unit == "volume" and info.spatial_rank == 3:
            return _DEFAULT_FOR_3D_VOLUMES
        return _DEFAULT_FOR_UNIT[info.eval_unit]
    return name


def select_metric(config: ml_collections.ConfigDict) -> tuple[str, str]:
    """(metric, 'max' | 'min') that checkpoints are selected by on the validation split."""
    cls = evaluator_class(type_of(config))
    metric = config.eval.select_metric
    if metric == "auto":
        metric = cls.default_metric
    if metric not in cls.selectable:
        raise ConfigError(f"config.eval.select_metric: {metric!r} is not reported by the {type_of(config)!r} "
                          f"evaluator; choose one of {', '.join(cls.selectable)}")
    return metric, cls.selectable[metric]


def validate(config: ml_collections.ConfigDict) -> None:
    select_metric(config)
    check = getattr(evaluator_class(type_of(config)), "validate", None)
    if check is not None:
        check(config)


def build(config: ml_collections.ConfigDict) -> Evaluator:
    return evaluator_class(type_of(config))(config)


def better(value: float, than: float | None, mode: str) -> bool:
    """Whether `value` improves on `than` (None: nothing yet) for a 'max' or 'min' metric."""
    if than is None:
        return bool(np.isfinite(value))
    return bool(value > than) if mode == "max" else bool(value < than)


def my_indices(count: int) -> range:
    """This process's share of `count` cases: p, p + n, ... (n processes)."""
    import jax  # pylint: disable=import-outside-toplevel

    return range(jax.process_index(), count, jax.process_count())
