"""The 3-D sliding-window protocol for volume models (ARCO's test_3D.py, after UA-MT's
test_util.py): a volume is covered by overlapping windows, the softmax of every window is summed
into the volume and divided by how many windows covered each voxel, and the average is argmaxed.
Dice, Jaccard, HD95 and ASD per foreground class on the label map (evaluation.py), averaged over
volumes, then over classes, exactly as the 2-D `volume_slices` protocol reports them.

Axes are depth first, (D, H, W[, C]); the reference's LA window 112 x 112 x 80 (x, y, z) with
strides 18 / 18 / 4 is window (80, 112, 112), stride (4, 18, 18) here.

* A volume smaller than the window in some axis is zero-padded in that axis, half before and half
  after (the odd voxel after), and the prediction cropped back.
* Along each axis there are ceil((size - window) / stride) + 1 windows starting at
  min(i * stride, size - window): every stride, the last one flush with the end.
* Windows are predicted `eval.window_batch_size` at a time; the last batch is filled with zero
  windows so that a jitted predict function compiles once for the whole split.
* `eval.largest_component` (off, as the reference's default `nms=0`) keeps only the largest
  connected component of each foreground class (full 26-connectivity, as skimage.measure.label,
  which the reference uses); for the reference's one-class LA task that is its getLargestCC.

Settings (config.eval): window (() = data.patch_size), stride (() = the reference's LA strides
scaled to the window, `default_stride`), window_batch_size, largest_component, empty_policy.
Distances are in voxels; with `distances_in_mm` on (the evaluate command turns it on) also in
millimetres, when every case of the split has a spacing.
"""
from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence

import ml_collections
import numpy as np
from scipy import ndimage

from arco_jax import evaluation, parallel
from arco_jax.data.registry import OpenDataset
from arco_jax.errors import ConfigError
from arco_jax.evaluators import EvalResult, Predict
from arco_jax.evaluators.volumes import DISTANCE_UNITS, VolumeSlices

log = logging.getLogger("arco_jax")

# The reference's LA setting (test_3D.py), depth first: the default stride keeps its ratios.
REFERENCE_WINDOW = (80, 112, 112)
REFERENCE_STRIDE = (4, 18, 18)


def default_stride(window: Sequence[int]) -> tuple[int, ...]:
    """The reference's strides as fractions of its window (1/20 in depth, 18/112 in-plane),
    applied to `window` and rounded half up (at least 1): (4, 18, 18) for (80, 112, 112)."""
    if len(window) != len(REFERENCE_WINDOW):
        raise ValueError(f"window {tuple(window)} must have {len(REFERENCE_WINDOW)} axes (D, H, W)")
    return tuple(max(1, (2 * int(w) * s + r) // (2 * r)) for w, s, r in zip(window, REFERENCE_STRIDE,
                                                                               REFERENCE_WINDOW))


def symmetric_padding(shape: Sequence[int], window: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """(before, after) zero padding per axis that makes `shape` at least `window`: half of what is
    missing before, the rest after (the reference's split); (0, 0) where the axis is large enough."""
    padding = []
    for size, extent in zip(shape, window):
        missing = max(int(extent) - int(size), 0)
        padding.append((missing // 2, missing - missing // 2))
    return tuple(padding)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start of every window along one axis of length `size` >= `window`: ceil((size - window) /
    stride) + 1 of them at min(i * stride, size - window), so the last one ends at `size`."""
    if not (window >= 1 and stride >= 1):
        raise ValueError(f"window {window} and stride {stride} must be positive")
    if size < window:
        raise ValueError(f"an axis of {size} voxels is smaller than the window {window}: pad it first")
    steps = -(-(size - window) // stride) + 1
    return [min(i * stride, size - window) for i in range(steps)]


def window_positions(shape: Sequence[int], window: Sequence[int],
                     stride: Sequence[int]) -> list[tuple[int, ...]]:
    """Start corners of every window over a (padded) volume of `shape`, first axis outermost."""
    if not len(shape) == len(window) == len(stride):
        raise ValueError(f"shape {tuple(shape)}, window {tuple(window)} and stride {tuple(stride)} need the "
                         "same number of axes")
    return list(itertools.product(*(window_starts(s, w, t) for s, w, t in zip(shape, window, stride))))


def sliding_window_probabilities(predict: Predict, volume: np.ndarray, window: Sequence[int],
                                 stride: Sequence[int], batch_size: int = 4) -> np.ndarray:
    """Class probabilities (*spatial, K) float32 of a volume (*spatial) or (*spatial, C), averaged
    over the overlapping windows that cover each voxel.

    `predict` maps float32 (batch_size, *window, C) windows to logits (batch_size, *window, K); it
    always sees `batch_size` windows (the last batch is completed with zero windows). A volume
    smaller than `window` in some axis is zero-padded symmetrically (`symmetric_padding`) and the
    result cropped back to the volume. `stride` must not exceed `window` (no voxel left uncovered).
    """
    window = tuple(int(w) for w in window)
    stride = tuple(int(s) for s in stride)
    rank = len(window)
    if len(stride) != rank or min(window) < 1 or min(stride) < 1:
        raise ValueError(f"window {window} and stride {stride} must be {rank} positive ints each")
    if any(s > w for s, w in zip(stride, window)):
        raise ValueError(f"stride {stride} exceeds window {window}: voxels between windows would be left out")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive")
    volume = np.asarray(volume, np.float32)
    if volume.ndim == rank:
        volume = volume[..., None]
    if volume.ndim != rank + 1:
        raise ValueError(f"volume must be {rank}-D, with or without a channel axis, for a {rank}-D window; "
                         f"got shape {volume.shape}")
    spatial = volume.shape[:rank]
    padding = symmetric_padding(spatial, window)
    if any(before or after for before, after in padding):
        volume = np.pad(volume, padding + ((0, 0),))
    padded = volume.shape[:rank]
    positions = window_positions(padded, window, stride)

    scores = None
    count = np.zeros(padded, np.float32)
    batch = np.zeros((batch_size, *window, volume.shape[-1]), np.float32)
    for first in range(0, len(positions), batch_size):
        starts = positions[first:first + batch_size]
        regions = [tuple(slice(s, s + w) for s, w in zip(start, window)) for start in starts]
        batch[:] = 0.0
        for k, region in enumerate(regions):
            batch[k] = volume[region]
        logits = np.asarray(predict(batch))
        if logits.ndim != rank + 2 or logits.shape[:-1] != batch.shape[:-1]:
            raise ValueError(f"predict returned shape {logits.shape} for windows {batch.shape}; expected "
                             f"{batch.shape[:-1] + ('K',)}")
        probabilities = evaluation.softmax(logits)
        if scores is None:
            scores = np.zeros((*padded, logits.shape[-1]), np.float32)
        for k, region in enumerate(regions):
            scores[region] += probabilities[k]
            count[region] += 1.0
    scores /= count[..., None]
    crop = tuple(slice(before, before + size) for (before, _), size in zip(padding, spatial))
    return scores[crop]


def largest_component(labels: np.ndarray) -> np.ndarray:
    """`labels` with each foreground class reduced to its largest connected component (the other
    voxels of that class set to background 0). Full connectivity (26 neighbours in 3-D), as
    skimage.measure.label in the reference's getLargestCC; ties keep the component found first
    (scan order). With one foreground class this is the reference's post-processing; per class,
    so that a second, separate structure is not erased as a 'smaller component' of the
    foreground. A class absent from `labels` stays absent."""
    labels = np.asarray(labels)
    structure = np.ones((3,) * labels.ndim, bool)
    kept = labels.copy()
    for cls in np.unique(labels):
        if cls <= 0:
            continue
        components, found = ndimage.label(labels == cls, structure=structure)
        if found > 1:
            largest = int(np.argmax(np.bincount(components.ravel())[1:])) + 1
            kept[(components > 0) & (components != largest)] = 0
    return kept


def predict_labels(predict: Predict, volume: np.ndarray, window: Sequence[int], stride: Sequence[int],
                   batch_size: int = 4, keep_largest_component: bool = False) -> np.ndarray:
    """Label map (*spatial) int32: the argmax of `sliding_window_probabilities`, optionally with
    each foreground class reduced to its largest connected component."""
    probabilities = sliding_window_probabilities(predict, volume, window, stride, batch_size)
    labels = np.argmax(probabilities, axis=-1).astype(np.int32)
    return largest_component(labels) if keep_largest_component else labels


def _window_settings(config: ml_collections.ConfigDict) -> tuple[tuple, tuple]:
    """(window, stride) as configured, () replaced by their defaults (not yet checked)."""
    window = tuple(config.eval.window) or tuple(config.data.patch_size)
    stride = tuple(config.eval.stride)
    if not stride and len(window) == len(REFERENCE_WINDOW) and all(isinstance(w, int) for w in window):
        stride = default_stride(window)
    return window, stride


def _positive_ints(value, count: int) -> bool:
    return (len(value) == count
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in value))


def check_window_settings(config: ml_collections.ConfigDict, window: tuple, stride: tuple, *,
                          window_rule: str, stride_rule: str, window_origin: str = "") -> None:
    """The checks of eval.window / eval.stride / eval.window_batch_size that every sliding-window
    evaluator shares (mIoU and the 3-D protocol): their messages differ only in what () stands for
    (``window_rule``, ``stride_rule``, each after "or () "), and ``window_origin`` says where a
    defaulted window came from. Windows have config.data.spatial_rank sides."""
    rank, e = config.data.spatial_rank, config.eval
    axes = "D, H, W" if rank == 3 else "H, W"
    if not _positive_ints(window, rank):
        raise ConfigError(f"config.eval.window: must be {rank} positive integers ({axes}) {window_rule}; "
                          f"got {tuple(e.window)!r}")
    if not _positive_ints(stride, rank):
        raise ConfigError(f"config.eval.stride: must be {rank} positive integers ({axes}), or () {stride_rule}; "
                          f"got {tuple(e.stride)!r}")
    if any(s > w for s, w in zip(stride, window)):
        points = "voxels" if rank == 3 else "pixels"
        raise ConfigError(f"config.eval.stride: {tuple(stride)} exceeds the window {tuple(window)} in some axis; "
                          f"{points} between windows would never be predicted")
    from arco_jax import models  # pylint: disable=import-outside-toplevel  (flax: only when validating)

    if not models.check(config.model):
        multiple = models.input_multiple(config)
        if any(w % multiple for w in window):
            raise ConfigError(f"config.eval.window: {tuple(window)}{window_origin} must be multiples of {multiple}, "
                              f"what the {config.model.name!r} model takes")
    size = e.window_batch_size
    if not (isinstance(size, int) and not isinstance(size, bool) and size >= 1):
        raise ConfigError(f"config.eval.window_batch_size: must be a positive integer, got {size!r}")


class SlidingWindow(VolumeSlices):
    """3-D volumes predicted by overlapping windows (the ARCO/UA-MT test_3D.py protocol)."""

    name = "sliding_window"
    selectable = {"dice": "max", "jaccard": "max", "hd95": "min", "asd": "min"}
    default_metric = "dice"

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.window, self.stride = _window_settings(config)
        self.window_batch_size = int(config.eval.window_batch_size)
        self.keep_largest_component = bool(config.eval.largest_component)
        self.results_fields = {**self.results_fields, "window": list(self.window), "stride": list(self.stride),
                               "largest_component": self.keep_largest_component}
        self.padded_cases: dict[str, dict] = {}  # split -> {case: shape} of the last run
        self._warned: set[str] = set()
        self._padded_here: dict[str, list] = {}  # this process's padded cases of the current run

    @staticmethod
    def validate(config: ml_collections.ConfigDict) -> None:
        rank = config.data.spatial_rank
        if rank != 3:
            raise ConfigError(f"config.eval.type: 'sliding_window' predicts 3-D windows; this dataset's samples are "
                              f"{rank}-D (use 'volume_slices' or 'miou')")
        e = config.eval
        window, stride = _window_settings(config)
        origin = "" if tuple(e.window) else " (from data.patch_size, eval.window is ())"
        check_window_settings(config, window, stride, window_rule="or () for data.patch_size",
                              stride_rule="for the reference's strides scaled to the window", window_origin=origin)
        if not isinstance(e.largest_component, bool):
            raise ConfigError(f"config.eval.largest_component: must be True or False, got {e.largest_component!r}")

    def predict_volume(self, predict: Predict, image: np.ndarray) -> np.ndarray:
        """The label map (D, H, W) of one volume (D, H, W[, C]) by sliding windows (this run's window,
        stride, window batch size and largest-component setting): how a case is predicted here, and
        how `predict` segments a new scan for a run this evaluator tests."""
        return predict_labels(predict, image, self.window, self.stride, self.window_batch_size,
                              self.keep_largest_component)

    def predict_probabilities(self, predict: Predict, image: np.ndarray) -> np.ndarray:
        """Class probabilities (D, H, W, classes) of one volume by sliding windows (predict_volume's
        labels are their argmax, then the largest-component setting)."""
        return sliding_window_probabilities(predict, image, self.window, self.stride, self.window_batch_size)

    def predict_case(self, predict: Predict, case) -> np.ndarray:
        """The label map of one case by sliding windows; a case smaller than the window is noted."""
        spatial = tuple(np.shape(case.label))
        if np.shape(case.image)[:len(spatial)] != spatial or len(spatial) != len(self.window):
            raise ValueError(f"case {case.case}: image {np.shape(case.image)} and label {spatial} are "
                             f"not one (D, H, W[, C]) volume and its (D, H, W) labels")
        if any(s < w for s, w in zip(spatial, self.window)):
            self._padded_here[case.case] = list(spatial)
        return self.predict_volume(predict, case.image)

    def per_case(self, predict: Predict, data: OpenDataset, split: str) -> tuple[dict, dict]:
        """VolumeSlices.per_case with these predictions, and the padded cases gathered and said once."""
        self._padded_here = {}
        rows, rows_mm = super().per_case(predict, data, split)
        gathered_padded = {}
        for text in parallel.gather_text(json.dumps(self._padded_here)):
            gathered_padded.update(json.loads(text))
        cases = data.cases(split)
        self.padded_cases[split] = {c: gathered_padded[c] for c in cases if c in gathered_padded}
        if self.padded_cases[split] and split not in self._warned and parallel.is_main_process():
            self._warned.add(split)
            listed = ", ".join(f"{c} {tuple(s)}" for c, s in self.padded_cases[split].items())
            log.warning("%d of %d %s volumes are smaller than the window %s in some axis and were zero-padded "
                        "symmetrically (predictions cropped back): %s", len(self.padded_cases[split]), len(cases),
                        split, self.window, listed)
        return rows, rows_mm

    def run(self, predict: Predict, data: OpenDataset, split: str) -> EvalResult:
        result = super().run(predict, data, split)
        record = {**result.record, "padded_cases": dict(self.padded_cases.get(split, {}))}
        table = result.table
        padded = len(record["padded_cases"])
        if padded:
            table += (f"{padded} volume{'s' if padded > 1 else ''} smaller than the window {self.window} "
                      f"{'were' if padded > 1 else 'was'} zero-padded symmetrically and cropped back.\n")
        table += (f"Sliding window {self.window} (D, H, W) at stride {self.stride}, softmax averaged over "
                  f"overlaps{'; largest component of each class kept' if self.keep_largest_component else ''}.\n")
        return EvalResult(metrics=result.metrics, record=record, table=table)


__all__ = ["DISTANCE_UNITS", "SlidingWindow", "default_stride", "largest_component", "predict_labels",
           "sliding_window_probabilities", "symmetric_padding", "window_positions", "window_starts"]
