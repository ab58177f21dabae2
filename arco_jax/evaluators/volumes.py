"""The SSL4MIS per-volume protocol for 2-D models: every slice of a volume resized to the
patch size, predicted, argmaxed and resized back; Dice, Jaccard, HD95 and ASD per foreground
class on the 3-D volume (evaluation.py), averaged over volumes, then over classes.

Distances are in voxels, as published ACDC tables compute them; with `distances_in_mm` on (the
evaluate command turns it on) also in millimetres, when every case of the split has a spacing.
"""
from __future__ import annotations

import json
import logging

import ml_collections
import numpy as np

from arco_jax import evaluation, parallel
from arco_jax.data.registry import OpenDataset, iterate_cases
from arco_jax.errors import ConfigError
from arco_jax.evaluators import EvalResult, Predict, my_indices

DISTANCE_UNITS = "voxels"
log = logging.getLogger("arco_jax")


def class_voxels(pred: np.ndarray, label: np.ndarray, num_classes: int, spacing=None) -> dict:
    """Voxels of each class in the prediction and the ground truth (ignored voxels left out of
    both), with the voxel volume in mm^3 when the spacing is known: what clinical volumes (e.g.
    the cardiac ejection fraction, evaluators/cardiac.py) are computed from."""
    pred, label = np.asarray(pred).ravel(), np.asarray(label).ravel()
    valid = (label >= 0) & (label < num_classes)
    count = lambda x: np.bincount(x[valid].astype(np.int64), minlength=num_classes)[:num_classes].tolist()  # noqa: E731
    voxel_mm3 = float(np.prod(spacing)) if spacing is not None else None
    return {"pred": count(pred), "true": count(label), "voxel_mm3": voxel_mm3}


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
        self.distances_in_mm = False

    @staticmethod
    def validate(config: ml_collections.ConfigDict) -> None:
        if config.data.spatial_rank != 2:
            raise ConfigError(f"config.eval.type: 'volume_slices' predicts 2-D slices; this dataset's samples are "
                              f"{config.data.spatial_rank}-D (use a 3-D evaluator)")

    def predict_volume(self, predict: Predict, image: np.ndarray) -> np.ndarray:
        """The label map (D, H, W) of one volume (D, H, W), slice by slice as SSL4MIS: how a case
        is predicted here, and how `predict` segments a new scan for a run this evaluator tests."""
        return evaluation.predict_volume(predict, image, self.patch_size, slice_batch_size=self.slice_batch_size)

    def predict_probabilities(self, predict: Predict, image: np.ndarray) -> np.ndarray:
        """Class probabilities (D, H, W, classes) of one volume, slice by slice as predict_volume
        (whose labels are their argmax); for `predict --probabilities` and test-time flips."""
        return evaluation.predict_volume_probabilities(predict, image, self.patch_size,
                                                       slice_batch_size=self.slice_batch_size)

    def predict_case(self, predict: Predict, case) -> np.ndarray:
        """The label map of one case."""
        return self.predict_volume(predict, case.image)

    def per_case(self, predict: Predict, data: OpenDataset, split: str) -> tuple[dict, dict]:
        """(classes, 4) metric rows of every case of the split, gathered from all processes:
        (in voxels, in mm for the cases that have a spacing when distances_in_mm is on)."""
        cases = data.cases(split)
        mine, mine_mm, mine_voxels = {}, {}, {}
        for case in iterate_cases(data, split, my_indices(len(cases))):
            pred = self.predict_case(predict, case)
            mine_voxels[case.case] = class_voxels(pred, case.label, self.num_classes, case.spacing)
            mine[case.case] = evaluation.evaluate_volume(pred, case.label, self.num_classes,
                                                         empty_policy=self.empty_policy,
                                                         ignore_label=self.ignore_label)
            if self.distances_in_mm and case.spacing is not None:
                mine_mm[case.case] = evaluation.evaluate_volume(pred, case.label, self.num_classes, case.spacing,
                                                                empty_policy=self.empty_policy,
                                                                ignore_label=self.ignore_label)
        gathered, gathered_mm = {}, {}
        payload = json.dumps([*({k: np.asarray(v).tolist() for k, v in rows.items()} for rows in (mine, mine_mm)),
                              mine_voxels])
        self.case_voxels = {}
        for text in parallel.gather_text(payload):  # JSON keeps float64 exactly (and NaN/inf)
            voxel, mm, voxels = json.loads(text)
            gathered.update(voxel)
            gathered_mm.update(mm)
            self.case_voxels.update(voxels)
        self.case_voxels = {c: self.case_voxels[c] for c in cases if c in self.case_voxels}
        rows = lambda found: {c: np.asarray(found[c], np.float64) for c in cases if c in found}  # noqa: E731
        return rows(gathered), rows(gathered_mm)

    def run(self, predict: Predict, data: OpenDataset, split: str) -> EvalResult:
        per_case, per_case_mm = self.per_case(predict, data, split)
        class_names = list(self.class_names)
        voxel = evaluation.summarize(per_case, class_names)
        with_mm = bool(per_case_mm) and len(per_case_mm) == len(per_case)
        if per_case_mm and not with_mm:
            log.warning("%d of %d %s volumes have a spacing; millimetre distances need all of them and are left "
                        "out", len(per_case_mm), len(per_case), split)
        mm = evaluation.summarize(per_case_mm, class_names) if with_mm else None
        metrics = {m: float(voxel["class_mean"][i]) for i, m in enumerate(evaluation.METRIC_NAMES)}
        record = {**evaluation.summary_record(voxel, mm),
                  "per_case": {case: np.asarray(rows).tolist() for case, rows in per_case.items()},
                  "class_voxels": self.case_voxels}
        if self.distances_in_mm:
            record["cases_with_spacing"] = len(per_case_mm)
        if with_mm:
            record["per_case_mm"] = {case: np.asarray(rows).tolist() for case, rows in per_case_mm.items()}
        table = evaluation.markdown_table(voxel, self.empty_policy, DISTANCE_UNITS)
        if with_mm:
            table = ("## Distances in voxels\n\n" + table + "\n## Distances in mm\n\n"
                     + evaluation.markdown_table(mm, self.empty_policy, "mm"))
        return EvalResult(metrics=metrics, record=record, table=table)
