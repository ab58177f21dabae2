"""The SSL4MIS per-volume protocol for 2-D models: every slice of a volume resized to the
patch size, predicted, argmaxed and resized back; Dice, Jaccard, HD95 and ASD per foreground
class on the 3-D volume (evaluation.py), averaged over volumes, then over classes.

Distances are in voxels, as published ACDC tables compute them (`evaluate` also reports mm).
"""
from __future__ import annotations

import json

import ml_collections
import numpy as np

from arco_jax import evaluation, parallel
from arco_jax.data.registry import OpenDataset, iterate_cases
from arco_jax.errors import ConfigError
from arco_jax.evaluators import EvalResult, Predict, my_indices

DISTANCE_UNITS = "voxels"


class VolumeSlices:
    """Volumes predicted slice by slice (the ARCO/SSL4MIS test_2D.py protocol)."""

    name = "volume_slices"
    selectable = {"dice": "max", "jaccard": "max", "hd95": "min", "asd": "min"}
    default_metric = "dice"

    def __init__(self, config: ml_collections.ConfigDict):
        d = config.data
        self.patch_size = tuple(d.patch_size)
        self.num_classes = d.num_classes
        self.class_names = tuple(d.class_names)
        self.ignore_label = d.ignore_label
        self.empty_policy = config.eval.empty_policy
        self.slice_batch_size = config.eval.slice_batch_size
        self.results_fields = {"empty_policy": self.empty_policy, "distance_units": DISTANCE_UNITS}

    @staticmethod
    def validate(config: ml_collections.ConfigDict) -> None:
        if config.data.spatial_rank != 2:
            raise ConfigError(f"config.eval.type: 'volume_slices' predicts 2-D slices; this dataset's samples are "
                              f"{config.data.spatial_rank}-D (use a 3-D evaluator)")

    def per_case(self, predict: Predict, data: OpenDataset, split: str) -> dict[str, np.ndarray]:
        """(classes, 4) metric rows of every case of the split, gathered from all processes."""
        cases = data.cases(split)
        mine = {}
        for case in iterate_cases(data, split, my_indices(len(cases))):
            pred = evaluation.predict_volume(predict, case.image, self.patch_size,
                                             slice_batch_size=self.slice_batch_size)
            mine[case.case] = evaluation.evaluate_volume(pred, case.label, self.num_classes,
                                                         empty_policy=self.empty_policy,
                                                         ignore_label=self.ignore_label)
        gathered = {}
        for text in parallel.gather_text(json.dumps({k: np.asarray(v).tolist() for k, v in mine.items()})):
            gathered.update(json.loads(text))  # JSON keeps float64 exactly (and NaN/inf)
        return {case: np.asarray(gathered[case], np.float64) for case in cases}

    def run(self, predict: Predict, data: OpenDataset, split: str) -> EvalResult:
        per_case = self.per_case(predict, data, split)
        summary = evaluation.summarize(per_case, list(self.class_names))
        names = evaluation.METRIC_NAMES
        metrics = {m: float(summary["class_mean"][i]) for i, m in enumerate(names)}
        record = {
            "num_cases": summary["num_cases"],
            "mean": metrics,
            "per_class": {cls: {m: float(summary["mean"][k, i]) for i, m in enumerate(names)}
                          for k, cls in enumerate(summary["class_names"])},
            "per_case": {case: np.asarray(rows).tolist() for case, rows in per_case.items()},
        }
        table = evaluation.markdown_table(summary, self.empty_policy, DISTANCE_UNITS)
        return EvalResult(metrics=metrics, record=record, table=table)
