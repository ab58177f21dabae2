"""Per-volume segmentation metrics and the SSL4MIS slice-wise evaluation protocol.

Published ACDC numbers (SSL4MIS, the ARCO reference) are medpy's ``dc``, ``jc``, ``hd95`` and
``asd`` on 3-D binary masks per foreground class. This module reproduces those values with
numpy + scipy.ndimage only, so the core install does not need medpy:

* the surface of a mask is the mask minus its erosion by the face-connected (connectivity 1)
  structuring element, with voxels outside the image counted as background, as in medpy;
* HD95 is the 95th percentile (linear interpolation) of the *pooled* distances of both
  directions, pred->gt and gt->pred, not the larger of two directed percentiles;
* ASD is *directed*: the mean distance from the prediction's surface to the ground truth's
  surface (medpy ``asd(pred, gt)``), not the symmetric ASSD.

Both distance sets are computed once and shared by HD95 and ASD (medpy runs three distance
transforms for the pair, this runs two); the numbers are identical.

medpy raises on an empty mask, and repositories disagree on what to report then, so the
empty-mask policy is an explicit, named argument (see ``EMPTY_POLICIES``).
"""
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from scipy import ndimage

METRIC_NAMES = ("dice", "jaccard", "hd95", "asd")

EMPTY_POLICIES = {
    "ssl4mis": (
        "as the ARCO/SSL4MIS test_2D.py: metrics only when pred and gt are both non-empty; "
        "pred non-empty but gt empty -> (1, 1, 0, 0); pred empty -> (0, 0, 0, 0)"
    ),
    "nan": (
        "undefined metrics are NaN and left out of the means (counted as excluded): "
        "one mask empty -> Dice 0, Jaccard 0, HD95/ASD NaN; both empty -> all NaN"
    ),
    "worst": (
        "one mask empty -> Dice 0, Jaccard 0, HD95/ASD = the image diagonal; "
        "both empty -> (1, 1, 0, 0)"
    ),
}

# Metric rows for the cases where at least one mask is empty, keyed by policy and by
# (pred is empty, gt is empty). None marks the image diagonal (depends on shape and spacing).
_EMPTY_CASE_METRICS = {
    "ssl4mis": {
        (False, True): (1.0, 1.0, 0.0, 0.0),
        (True, False): (0.0, 0.0, 0.0, 0.0),
        (True, True): (0.0, 0.0, 0.0, 0.0),
    },
    "nan": {
        (False, True): (0.0, 0.0, np.nan, np.nan),
        (True, False): (0.0, 0.0, np.nan, np.nan),
        (True, True): (np.nan, np.nan, np.nan, np.nan),
    },
    "worst": {
        (False, True): (0.0, 0.0, None, None),
        (True, False): (0.0, 0.0, None, None),
        (True, True): (1.0, 1.0, 0.0, 0.0),
    },
}


def _check_policy(empty_policy: str) -> None:
    if empty_policy not in EMPTY_POLICIES:
        raise ValueError(
            f"empty_policy={empty_policy!r} is not one of {sorted(EMPTY_POLICIES)}"
        )


def _spacing_array(spacing: float | Sequence[float] | None, ndim: int) -> np.ndarray:
    """Spacing as one positive float per axis (1.0 everywhere when None: voxel units)."""
    if spacing is None:
        return np.ones(ndim)
    values = np.asarray(spacing, dtype=np.float64)
    if values.ndim == 0:
        values = np.full(ndim, float(values))
    if values.shape != (ndim,):
        raise ValueError(f"spacing={spacing!r} needs one value per axis of a {ndim}-D mask")
    if not np.all(np.isfinite(values) & (values > 0)):
        raise ValueError(f"spacing={spacing!r} must be finite and positive")
    return values


def image_diagonal(shape: Sequence[int], spacing: float | Sequence[float] | None = None) -> float:
    """Physical diagonal of the image's field of view.

    Strictly larger than any distance between two voxels of the image, so under the 'worst'
    policy a missed structure always scores worse than any prediction that found it.
    """
    extent = np.asarray(shape, dtype=np.float64) * _spacing_array(spacing, len(shape))
    return float(np.sqrt(np.sum(extent**2)))


def _surface(mask: np.ndarray) -> np.ndarray:
    """One-voxel-thick border: the voxels that a face-connected erosion removes."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, iterations=1)


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Distances pred-surface -> gt-surface and gt-surface -> pred-surface (both non-empty)."""
    pred_surface, gt_surface = _surface(pred), _surface(gt)
    # The EDT measures distance to the nearest zero, so the target surface is the zero set.
    to_gt = ndimage.distance_transform_edt(~gt_surface, sampling=spacing)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[gt_surface]
    return to_gt, to_pred


def binary_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: float | Sequence[float] | None = None,
    *,
    empty_policy: str,
) -> dict[str, float]:
    """Dice, Jaccard, HD95 and ASD of two binary masks of the same shape (nonzero = foreground).

    Distances are in voxels when ``spacing`` is None, else in the spacing's units (one value
    per axis, anisotropic allowed). ``empty_policy`` names an entry of ``EMPTY_POLICIES``.
    """
    _check_policy(empty_policy)
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {pred.shape} differs from gt shape {gt.shape}")
    if pred.ndim == 0:
        raise ValueError("pred and gt must be arrays with at least one axis, got scalars")
    spacing_values = _spacing_array(spacing, pred.ndim)

    pred_empty, gt_empty = not pred.any(), not gt.any()
    if pred_empty or gt_empty:
        diagonal = image_diagonal(pred.shape, spacing_values)
        row = _EMPTY_CASE_METRICS[empty_policy][(pred_empty, gt_empty)]
        values = [diagonal if value is None else value for value in row]
        return dict(zip(METRIC_NAMES, (float(v) for v in values)))

    intersection = np.count_nonzero(pred & gt)
    pred_size, gt_size = np.count_nonzero(pred), np.count_nonzero(gt)
    to_gt, to_pred = surface_distances(pred, gt, spacing_values)
    return {
        "dice": 2.0 * intersection / (pred_size + gt_size),
        "jaccard": intersection / (pred_size + gt_size - intersection),
        "hd95": float(np.percentile(np.concatenate([to_gt, to_pred]), 95)),
        "asd": float(to_gt.mean()),
    }


def evaluate_volume(
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    num_classes: int,
    spacing: float | Sequence[float] | None = None,
    *,
    empty_policy: str,
    ignore_label: int | None = None,
) -> np.ndarray:
    """Metrics per foreground class 1..num_classes-1, rows of ``METRIC_NAMES``: (C-1, 4).

    Voxels whose ground truth is ``ignore_label`` count as neither prediction nor ground
    truth of any class (both are set to background there before anything is measured)."""
    pred_labels, gt_labels = np.asarray(pred_labels), np.asarray(gt_labels)
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} needs at least one foreground class")
    if ignore_label is not None:
        ignored = gt_labels == ignore_label
        pred_labels, gt_labels = np.where(ignored, 0, pred_labels), np.where(ignored, 0, gt_labels)
    for name, labels in (("pred_labels", pred_labels), ("gt_labels", gt_labels)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"{name} holds values in [{labels.min()}, {labels.max()}], outside "
                f"[0, {num_classes - 1}] for num_classes={num_classes}"
            )
    rows = []
    for label in range(1, num_classes):
        metrics = binary_metrics(
            pred_labels == label, gt_labels == label, spacing, empty_policy=empty_policy
        )
        rows.append([metrics[name] for name in METRIC_NAMES])
    return np.asarray(rows, dtype=np.float64)


def _zoom_to(array: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """scipy.ndimage.zoom of the leading axes to an exact 2-D shape (the factors the reference
    passes); a trailing channel axis is kept."""
    factors = tuple(target / size for target, size in zip(shape, array.shape)) + (1,) * (array.ndim - len(shape))
    resized = ndimage.zoom(array, factors, order=order)
    if resized.shape[:len(shape)] != tuple(shape):
        raise ValueError(f"zoom gave {resized.shape} for {array.shape} -> {tuple(shape)}")
    return resized


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, float32, numerically safe."""
    logits = np.asarray(logits, np.float32)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _slice_logits(predict_fn, image, patch_size, slice_batch_size, image_order):
    """(image's (D, H, W) shape, [logits (n, h, w, classes) of consecutive slices]) for
    predict_volume and predict_volume_probabilities: the volume's slices resized to the patch,
    predicted in batches of slice_batch_size (the last zero-padded, so a jitted predict_fn
    compiles once)."""
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[..., None]
    if image.ndim != 4:
        raise ValueError(f"image must be (D, H, W) or (D, H, W, C), got shape {image.shape}")
    patch_size = tuple(int(s) for s in patch_size)
    if len(patch_size) != 2 or min(patch_size) < 1:
        raise ValueError(f"patch_size={patch_size} must be two positive ints (h, w)")
    if slice_batch_size < 1:
        raise ValueError(f"slice_batch_size={slice_batch_size} must be positive")
    depth = image.shape[0]
    slices = np.stack([_zoom_to(s, patch_size, image_order) for s in image]).astype(np.float32)
    num_batches = -(-depth // slice_batch_size)
    slices = np.pad(slices, ((0, num_batches * slice_batch_size - depth), (0, 0), (0, 0), (0, 0)))
    out = []
    for first, batch in zip(range(0, depth, slice_batch_size), np.split(slices, num_batches)):
        logits = np.asarray(predict_fn(batch))
        if logits.ndim != 4 or logits.shape[:3] != batch.shape[:3]:
            raise ValueError(
                f"predict_fn returned shape {logits.shape} for input {batch.shape}; "
                f"expected (N, h, w, C) = {batch.shape[:3] + ('C',)}"
            )
        out.append(logits[: min(slice_batch_size, depth - first)])
    return image.shape[:3], out


def predict_volume(
    predict_fn: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    patch_size: Sequence[int],
    *,
    slice_batch_size: int = 16,
    image_order: int = 0,
) -> np.ndarray:
    """Label map (D, H, W) of a volume (D, H, W) or (D, H, W, C), predicted slice by slice as in
    SSL4MIS.

    Each (H, W) slice is resized to ``patch_size`` with ``scipy.ndimage.zoom`` of order
    ``image_order`` (0, nearest, as the reference's ACDC test_2D.py and its training
    resize; its Synapse-style test.py uses 3), fed to ``predict_fn`` in batches of
    ``slice_batch_size`` slices (the last batch zero-padded so a jitted ``predict_fn``
    compiles once), argmaxed over classes and resized back with order 0 (nearest, so labels
    stay labels). ``predict_fn`` maps float32 (N, h, w, C) to logits (N, h, w, classes).
    """
    (_, height, width), logits = _slice_logits(predict_fn, image, patch_size, slice_batch_size, image_order)
    labels = np.concatenate([np.argmax(batch, axis=-1).astype(np.int32) for batch in logits])
    return np.stack([_zoom_to(s, (height, width), 0) for s in labels])


def predict_volume_probabilities(
    predict_fn: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    patch_size: Sequence[int],
    *,
    slice_batch_size: int = 16,
    image_order: int = 0,
) -> np.ndarray:
    """Class probabilities (D, H, W, classes) of a volume, slice by slice as `predict_volume`:
    the softmax of each resized slice, resized back by nearest neighbour, so that its argmax is
    `predict_volume`'s label map."""
    (_, height, width), logits = _slice_logits(predict_fn, image, patch_size, slice_batch_size, image_order)
    return np.stack([_zoom_to(p, (height, width), 0) for batch in logits for p in softmax(batch)])


def _nan_mean_std(values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std ignoring NaN; NaN where nothing is left (no warnings)."""
    valid = ~np.isnan(values)
    count = valid.sum(axis=axis)
    filled = np.where(valid, values, 0.0)
    mean = np.divide(filled.sum(axis=axis), count, out=np.full(count.shape, np.nan),
                     where=count > 0)
    deviation = np.where(valid, values - np.expand_dims(mean, axis), 0.0)
    variance = np.divide((deviation**2).sum(axis=axis), count,
                         out=np.full(count.shape, np.nan), where=count > 0)
    return mean, np.sqrt(variance)


def summarize(per_case: Mapping[str, np.ndarray], class_names: Sequence[str]) -> dict:
    """Means over cases per class and over classes, as the tables report them.

    Returns ``metric_names``, ``class_names``, ``num_cases``, ``mean`` and ``std`` (C-1, 4)
    over cases (population std), ``excluded`` (C-1, 4) counts of NaN cases left out, and
    ``class_mean`` (4,): the mean over classes of the per-class means.
    """
    if not per_case:
        raise ValueError("per_case is empty: nothing to summarize")
    expected = (len(class_names), len(METRIC_NAMES))
    for case, metrics in per_case.items():
        if np.shape(metrics) != expected:
            raise ValueError(
                f"case {case!r}: metrics shape {np.shape(metrics)}, expected {expected} "
                f"for classes {list(class_names)}"
            )
    stacked = np.stack([np.asarray(m, dtype=np.float64) for m in per_case.values()])
    mean, std = _nan_mean_std(stacked, axis=0)
    class_mean, _ = _nan_mean_std(mean, axis=0)
    return {
        "metric_names": METRIC_NAMES,
        "class_names": tuple(class_names),
        "num_cases": len(per_case),
        "mean": mean,
        "std": std,
        "excluded": np.isnan(stacked).sum(axis=0),
        "class_mean": class_mean,
    }


UNITS = {"dice": "fraction", "jaccard": "fraction", "hd95": "voxels", "asd": "voxels",
         "hd95_mm": "mm", "asd_mm": "mm"}
DISTANCE_METRICS = ("hd95", "asd")


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: an undefined mean (the 'nan' policy, every case excluded) is null."""
    return float(value) if np.isfinite(value) else None


def _by_class(summary: dict, key: str, cast=finite_or_none) -> dict:
    return {cls: {name: cast(summary[key][k, i]) for i, name in enumerate(METRIC_NAMES)}
            for k, cls in enumerate(summary["class_names"])}


def summary_record(voxel: dict, mm: dict | None = None) -> dict:
    """The one JSON summary of a volume evaluation (a run's results.json test records, the
    evaluate command's summary.json): units, the mean over classes, and per class the mean, std
    and number of excluded cases, from `summarize` outputs (distances in voxels; `mm`, when given,
    adds hd95_mm and asd_mm)."""
    per_class, std = _by_class(voxel, "mean"), _by_class(voxel, "std")
    excluded = _by_class(voxel, "excluded", cast=int)
    mean = {name: finite_or_none(voxel["class_mean"][i]) for i, name in enumerate(METRIC_NAMES)}
    if mm is not None:
        for metric in DISTANCE_METRICS:
            i = METRIC_NAMES.index(metric)
            mean[f"{metric}_mm"] = finite_or_none(mm["class_mean"][i])
            for k, cls in enumerate(mm["class_names"]):
                per_class[cls][f"{metric}_mm"] = finite_or_none(mm["mean"][k, i])
                std[cls][f"{metric}_mm"] = finite_or_none(mm["std"][k, i])
                excluded[cls][f"{metric}_mm"] = int(mm["excluded"][k, i])
    units = {m: u for m, u in UNITS.items() if mm is not None or not m.endswith("_mm")}
    return {"num_cases": voxel["num_cases"], "units": units, "mean": mean, "per_class": per_class,
            "std_per_class": std, "excluded_per_class": excluded}


def markdown_table(summary: dict, policy_name: str, units: str) -> str:
    """Markdown table: Dice and Jaccard in percent, HD95 and ASD in ``units``, mean ± std."""
    _check_policy(policy_name)
    scales = (100.0, 100.0, 1.0, 1.0)
    header = ("Class", "Dice (%)", "Jaccard (%)", f"HD95 ({units})", f"ASD ({units})")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, mean, std in zip(summary["class_names"], summary["mean"], summary["std"]):
        cells = [f"{m * s:.2f} ± {d * s:.2f}" for m, d, s in zip(mean, std, scales)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cells = [f"{m * s:.2f}" for m, s in zip(summary["class_mean"], scales)]
    lines.append("| Mean | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"{summary['num_cases']} volumes, mean ± population std over volumes; Mean row: "
        f"mean over classes. Distances in {units}. ASD is directed (prediction to ground "
        f"truth), HD95 pools both directions (as medpy)."
    )
    lines.append(f"Empty-mask policy `{policy_name}`: {EMPTY_POLICIES[policy_name]}.")
    excluded = summary["excluded"]
    if excluded.any():
        parts = [
            f"{cls} " + ", ".join(
                f"{metric} {n}" for metric, n in zip(METRIC_NAMES, row) if n
            )
            for cls, row in zip(summary["class_names"], excluded) if row.any()
        ]
        lines.append("Excluded (undefined, NaN) volumes: " + "; ".join(parts) + ".")
    return "\n".join(lines) + "\n"
