"""Mean intersection over union over whole images, the natural-image protocol (ReCo, ARCO's
Pascal VOC / Cityscapes / SUN RGB-D tables): one confusion matrix accumulated over every
labeled pixel of the split (the ignore label left out), summed over processes; IoU per class
(background included) and its mean over classes that occur in the prediction or the ground truth.

Each image is predicted whole: padded at the bottom and right to a multiple of
`eval.pad_multiple` (the network's total stride; zero padding), predicted, cropped back.
Images of one padded size share one compiled program.
"""
from __future__ import annotations

import json

import ml_collections
import numpy as np

from arco_jax import parallel
from arco_jax.data.registry import OpenDataset, iterate_cases
from arco_jax.errors import ConfigError
from arco_jax.evaluators import EvalResult, Predict, my_indices


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
        self.results_fields = {"ignore_label": self.ignore_label}

    @staticmethod
    def validate(config: ml_collections.ConfigDict) -> None:
        if not (isinstance(config.eval.pad_multiple, int) and config.eval.pad_multiple >= 1):
            raise ConfigError(f"config.eval.pad_multiple: must be an integer >= 1, got {config.eval.pad_multiple!r}")

    def predict_image(self, predict: Predict, image: np.ndarray) -> np.ndarray:
        """Label map of one image (*spatial[, C]) predicted whole."""
        image = np.asarray(image, np.float32)
        if image.ndim == self.spatial_rank:  # Single-channel images may come without a channel axis.
            image = image[..., None]
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
        confusion = sum(np.asarray(json.loads(text), np.int64)
                        for text in parallel.gather_text(json.dumps(confusion.tolist())))
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
        return EvalResult(metrics=metrics, record=record, table="\n".join(lines) + "\n")
