"""Mean intersection over union over whole images, the natural-image protocol (ReCo, ARCO's
Pascal VOC / Cityscapes / SUN RGB-D tables): one confusion matrix accumulated over every
labeled pixel of the split (the ignore label left out), summed over processes; IoU per class
(background included) and its mean over classes that occur in the prediction or the ground truth.

Each image is predicted whole (eval.window = (), the default, as ReCo): padded at the bottom and
right to a multiple of `eval.pad_multiple` (the network's total stride; zero padding), predicted,
cropped back. Images of one padded size share one compiled program.

Or by sliding windows (eval.window = (H, W), e.g. (512, 512) for Cityscapes' 1024 x 512 images with
a net trained on 512 px crops): windows every eval.stride pixels (() = two thirds of the window,
rounded down, as mmsegmentation's Cityscapes 'slide' test: 341 for 512), the last one flush with
the image's edge, eval.window_batch_size at a time (one compiled shape); softmax averaged where
windows overlap, then argmaxed; an image smaller than the window zero-padded half before, half
after (sliding_window.sliding_window_probabilities, the 3-D protocol's helper, rank-agnostic).
"""
from __future__ import annotations

import json

import ml_collections
import numpy as np

from arco_jax import parallel
from arco_jax.data.registry import OpenDataset, iterate_cases
from arco_jax.errors import ConfigError
from arco_jax.evaluators import EvalResult, Predict, my_indices
from arco_jax.evaluators.sliding_window import check_window_settings, sliding_window_probabilities


def default_stride(window) -> tuple[int, ...]:
    """Two thirds of each window side, rounded down (at least 1): mmsegmentation's 'slide' test
    setting for Cityscapes (crop 512, stride 341)."""
    return tuple(max(1, 2 * int(w) // 3) for w in window)


def window_settings(config: ml_collections.ConfigDict) -> tuple[tuple, tuple]:
    """(window, stride) of sliding-window mIoU; ((), ()) when images are predicted whole."""
    window = tuple(config.eval.window)
    if not window:
        return (), ()
    return window, tuple(config.eval.stride) or default_stride(window)


def sum_over_processes(confusion: np.ndarray) -> np.ndarray:
    """The sum of every process's confusion matrix, on every process (a collective: all call it)."""
    return sum(np.asarray(json.loads(text), np.int64) for text in parallel.gather_text(json.dumps(confusion.tolist())))


def confusion_matrix(pred: np.ndarray, label: np.ndarray, num_classes: int,
                     ignore_label: int | None = None) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows ground truth, columns prediction; pixels
    whose label is `ignore_label` (or outside 0..num_classes-1) are not counted."""
    pred, label = np.asarray(pred).ravel(), np.asarray(label).ravel().astype(np.int64)
    valid = (label >= 0) & (label < num_classes)
    if ignore_label is not None:
        valid &= label != ignore_label
    index = label[valid] * num_classes + pred[valid].astype(np.int64)
    return np.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def iou_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """IoU per class; NaN for a class absent from both prediction and ground truth."""
    confusion = np.asarray(confusion, np.float64)
    intersection = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    return np.divide(intersection, union, out=np.full(union.shape, np.nan), where=union > 0)


class MeanIoU:
    """mIoU over the images of a split."""

    name = "miou"
    selectable = {"miou": "max", "pixel_accuracy": "max"}
    default_metric = "miou"

    def __init__(self, config: ml_collections.ConfigDict):
        d = config.data
        self.num_classes = d.num_classes
        self.class_names = ("background", *d.class_names)
        self.ignore_label = d.ignore_label
        self.pad_multiple = int(config.eval.pad_multiple)
        self.spatial_rank = d.spatial_rank
        self.window, self.stride = window_settings(config)
        self.window_batch_size = int(config.eval.window_batch_size)
        self.results_fields = {"ignore_label": self.ignore_label}
        if self.window:
            self.results_fields.update(window=list(self.window), stride=list(self.stride))

    @staticmethod
    def validate(config: ml_collections.ConfigDict) -> None:
        e = config.eval
        if not (isinstance(e.pad_multiple, int) and e.pad_multiple >= 1):
            raise ConfigError(f"config.eval.pad_multiple: must be an integer >= 1, got {e.pad_multiple!r}")
        window, stride = window_settings(config)
        if not window:
            return
        check_window_settings(config, window, stride,
                              window_rule="for sliding-window mIoU, or () to predict whole images",
                              stride_rule="for two thirds of the window")

    def predict_image(self, predict: Predict, image: np.ndarray) -> np.ndarray:
        """Label map of one image (*spatial[, C]): whole, or by sliding windows when eval.window is
        set. How a val image is predicted here, and how `predict` segments a new photograph."""
        image = np.asarray(image, np.float32)
        if image.ndim == self.spatial_rank:  # Single-channel images may come without a channel axis.
            image = image[..., None]
        if self.window:
            probabilities = sliding_window_probabilities(predict, image, self.window, self.stride,
                                                         self.window_batch_size)
            return np.argmax(probabilities, axis=-1)
        spatial = image.shape[:-1]
        padded_shape = tuple(-(-s // self.pad_multiple) * self.pad_multiple for s in spatial)
        padding = [(0, p - s) for s, p in zip(spatial, padded_shape)] + [(0, 0)]
        logits = np.asarray(predict(np.pad(image, padding)[None]))[0]
        return np.argmax(logits[tuple(slice(0, s) for s in spatial)], axis=-1)

    def run(self, predict: Predict, data: OpenDataset, split: str) -> EvalResult:
        cases = data.cases(split)
        confusion = np.zeros((self.num_classes, self.num_classes), np.int64)
        for case in iterate_cases(data, split, my_indices(len(cases))):
            confusion += confusion_matrix(self.predict_image(predict, case.image), case.label, self.num_classes,
                                          self.ignore_label)
        confusion = sum_over_processes(confusion)
        iou = iou_from_confusion(confusion)
        present = ~np.isnan(iou)
        miou = float(np.mean(iou[present])) if present.any() else float("nan")
        total = confusion.sum()
        accuracy = float(np.trace(confusion) / total) if total else float("nan")
        metrics = {"miou": miou, "pixel_accuracy": accuracy}
        per_class = {name: (None if np.isnan(v) else float(v)) for name, v in zip(self.class_names, iou)}
        record = {"num_cases": len(cases), "mean": metrics, "per_class": {k: {"iou": v} for k, v in per_class.items()},
                  "confusion": confusion.tolist()}
        lines = ["| Class | IoU (%) |", "|---|---|"]
        lines += [f"| {name} | {'n/a' if v is None else f'{100 * v:.2f}'} |" for name, v in per_class.items()]
        lines += [f"| Mean | {100 * miou:.2f} |", "",
                  f"{len(cases)} images, {int(total)} labeled pixels"
                  + (f" (label {self.ignore_label} ignored)" if self.ignore_label is not None else "")
                  + f"; pixel accuracy {100 * accuracy:.2f} %. Mean over classes present in prediction or truth."]
        if self.window:
            lines.append(f"Sliding window {self.window} (H, W) at stride {self.stride}, softmax averaged over "
                         "overlaps.")
        return EvalResult(metrics=metrics, record=record, table="\n".join(lines) + "\n")
