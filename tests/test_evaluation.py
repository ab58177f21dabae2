"""Metrics agree with medpy (the reference's library), known geometric answers, empty-mask
policies, the slice-wise prediction protocol, and the summary table."""
import math

import numpy as np
import pytest
from medpy.metric import binary as medpy_binary
from scipy import ndimage

from arco_jax import evaluation

POLICIES = tuple(evaluation.EMPTY_POLICIES)


def _blob(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Smooth random blobs: thresholded Gaussian-filtered noise (several components)."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return noise > np.quantile(noise, 0.7)


def _brute_force_distances(source, target, spacing):
    """Surface distances from first principles: a surface voxel has a face-neighbour outside
    the mask or outside the image; distances by exhaustive pairwise search."""
    def surface(mask):
        padded = np.pad(mask, 1)
        inner = tuple(slice(1, -1) for _ in range(mask.ndim))
        all_neighbours_inside = np.ones_like(mask)
        for axis in range(mask.ndim):
            for step in (-1, 1):
                all_neighbours_inside &= np.roll(padded, step, axis=axis)[inner]
        return mask & ~all_neighbours_inside

    source_points = np.argwhere(surface(source)) * np.asarray(spacing)
    target_points = np.argwhere(surface(target)) * np.asarray(spacing)
    pairwise = np.linalg.norm(source_points[:, None] - target_points[None], axis=-1)
    return pairwise.min(axis=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "shape, spacing",
    [
        ((40, 48), None),
        ((40, 48), (1.5, 0.7)),
        ((12, 32, 28), None),
        ((12, 32, 28), (10.0, 1.5, 1.5)),
    ],
)
def test_matches_medpy_on_random_blobs(seed, shape, spacing):
    rng = np.random.default_rng(seed)
    pred, gt = _blob(rng, shape, 2.5), _blob(rng, shape, 2.5)
    ours = evaluation.binary_metrics(pred, gt, spacing, empty_policy="nan")
    np.testing.assert_allclose(ours["dice"], medpy_binary.dc(pred, gt), rtol=1e-12)
    np.testing.assert_allclose(ours["jaccard"], medpy_binary.jc(pred, gt), rtol=1e-12)
    np.testing.assert_allclose(
        ours["hd95"], medpy_binary.hd95(pred, gt, voxelspacing=spacing), rtol=1e-12
    )
    np.testing.assert_allclose(
        ours["asd"], medpy_binary.asd(pred, gt, voxelspacing=spacing), rtol=1e-12
    )


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (10.0, 1.5, 1.5)])
def test_surface_distances_match_brute_force(spacing):
    rng = np.random.default_rng(7)
    pred, gt = _blob(rng, (6, 14, 12), 1.5), _blob(rng, (6, 14, 12), 1.5)
    to_gt, to_pred = evaluation.surface_distances(pred, gt, np.asarray(spacing))
    # Both sides list surface voxels in C order (boolean indexing, argwhere).
    np.testing.assert_allclose(to_gt, _brute_force_distances(pred, gt, spacing), rtol=1e-12)
    np.testing.assert_allclose(to_pred, _brute_force_distances(gt, pred, spacing), rtol=1e-12)


@pytest.mark.parametrize("policy", POLICIES)
def test_identical_masks_are_perfect(policy):
    mask = np.zeros((8, 20, 20), bool)
    mask[2:6, 4:15, 6:12] = True
    metrics = evaluation.binary_metrics(mask, mask, (10.0, 1.5, 1.5), empty_policy=policy)
    assert metrics == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}


@pytest.mark.parametrize("k", [1, 3])
def test_parallel_planes_offset_by_k(k):
    """One-voxel-thick planes: every voxel is surface, every distance is k slices."""
    spacing = (10.0, 1.5, 1.5)
    pred, gt = np.zeros((8, 9, 11), bool), np.zeros((8, 9, 11), bool)
    pred[2], gt[2 + k] = True, True
    metrics = evaluation.binary_metrics(pred, gt, spacing, empty_policy="nan")
    assert metrics["dice"] == 0.0 and metrics["jaccard"] == 0.0
    assert metrics["hd95"] == pytest.approx(10.0 * k)
    assert metrics["asd"] == pytest.approx(10.0 * k)


def test_cubes_offset_by_one_voxel():
    """Cube side s shifted by one voxel along z: the leading face and the interior of the
    trailing face sit one voxel from the other surface, the side walls on it; the leading
    faces of both make up more than 5% of the pooled set, so HD95 is the maximum, 1."""
    s = 6
    pred, gt = np.zeros((12, 10, 10), bool), np.zeros((12, 10, 10), bool)
    pred[2:2 + s, 2:2 + s, 2:2 + s] = True
    gt[3:3 + s, 2:2 + s, 2:2 + s] = True
    surface_voxels = s**3 - (s - 2) ** 3
    metrics = evaluation.binary_metrics(pred, gt, empty_policy="nan")
    assert metrics["dice"] == pytest.approx(2 * s * s * (s - 1) / (2 * s**3))
    assert metrics["jaccard"] == pytest.approx(s * s * (s - 1) / (s * s * (s + 1)))
    assert metrics["hd95"] == pytest.approx(1.0)
    assert metrics["asd"] == pytest.approx((s**2 + (s - 2) ** 2) / surface_voxels)


@pytest.mark.parametrize("k", [1, 2])
def test_cube_inside_cube_grown_by_k(k):
    """Every surface voxel of the inner cube is exactly k from the outer cube's surface, so
    the directed ASD (prediction -> ground truth) is k."""
    s = 5
    pred, gt = np.zeros((16, 16, 16), bool), np.zeros((16, 16, 16), bool)
    pred[5:5 + s, 5:5 + s, 5:5 + s] = True
    gt[5 - k:5 + s + k, 5 - k:5 + s + k, 5 - k:5 + s + k] = True
    metrics = evaluation.binary_metrics(pred, gt, empty_policy="worst")
    assert metrics["asd"] == pytest.approx(k)
    assert metrics["dice"] == pytest.approx(2 * s**3 / (s**3 + (s + 2 * k) ** 3))
    assert metrics["jaccard"] == pytest.approx(s**3 / (s + 2 * k) ** 3)
    assert k <= metrics["hd95"] <= math.sqrt(3) * k


def test_medpy_raises_on_empty_masks_where_we_apply_a_policy():
    empty, full = np.zeros((4, 6, 6), bool), np.zeros((4, 6, 6), bool)
    full[1:3, 2:4, 2:4] = True
    with pytest.raises(RuntimeError):
        medpy_binary.hd95(empty, full)
    for policy in POLICIES:
        evaluation.binary_metrics(empty, full, empty_policy=policy)


SHAPE, SPACING = (4, 5, 6), (10.0, 1.5, 1.5)
DIAGONAL = math.sqrt(40.0**2 + 7.5**2 + 9.0**2)
NAN = float("nan")
# (pred empty, gt empty) -> expected (dice, jaccard, hd95, asd), written out per policy.
EMPTY_CASES = {
    "ssl4mis": {
        (False, True): (1.0, 1.0, 0.0, 0.0),
        (True, False): (0.0, 0.0, 0.0, 0.0),
        (True, True): (0.0, 0.0, 0.0, 0.0),
    },
    "nan": {
        (False, True): (0.0, 0.0, NAN, NAN),
        (True, False): (0.0, 0.0, NAN, NAN),
        (True, True): (NAN, NAN, NAN, NAN),
    },
    "worst": {
        (False, True): (0.0, 0.0, DIAGONAL, DIAGONAL),
        (True, False): (0.0, 0.0, DIAGONAL, DIAGONAL),
        (True, True): (1.0, 1.0, 0.0, 0.0),
    },
}


def test_every_policy_is_tested_and_described():
    assert set(EMPTY_CASES) == set(evaluation.EMPTY_POLICIES)
    assert all(evaluation.EMPTY_POLICIES[name].strip() for name in EMPTY_CASES)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("pred_empty, gt_empty", [(False, True), (True, False), (True, True)])
def test_empty_mask_policies(policy, pred_empty, gt_empty):
    blob = np.zeros(SHAPE, bool)
    blob[1:3, 1:4, 2:5] = True
    pred = np.zeros(SHAPE, bool) if pred_empty else blob
    gt = np.zeros(SHAPE, bool) if gt_empty else blob
    metrics = evaluation.binary_metrics(pred, gt, SPACING, empty_policy=policy)
    got = [metrics[name] for name in evaluation.METRIC_NAMES]
    np.testing.assert_allclose(got, EMPTY_CASES[policy][(pred_empty, gt_empty)], rtol=1e-12)


def test_worst_policy_diagonal_in_voxels_without_spacing():
    pred, gt = np.zeros((3, 4, 12), bool), np.zeros((3, 4, 12), bool)
    gt[1, 1, 1] = True
    metrics = evaluation.binary_metrics(pred, gt, empty_policy="worst")
    assert metrics["hd95"] == metrics["asd"] == pytest.approx(13.0)


def test_bad_inputs_raise_clear_errors():
    mask = np.ones((3, 4), bool)
    with pytest.raises(ValueError, match="empty_policy='zero'"):
        evaluation.binary_metrics(mask, mask, empty_policy="zero")
    with pytest.raises(ValueError, match="differs"):
        evaluation.binary_metrics(mask, mask[:, :3], empty_policy="nan")
    with pytest.raises(ValueError, match="one value per axis"):
        evaluation.binary_metrics(mask, mask, (1.0, 1.0, 1.0), empty_policy="nan")
    with pytest.raises(ValueError, match="positive"):
        evaluation.binary_metrics(mask, mask, (1.0, 0.0), empty_policy="nan")
    with pytest.raises(ValueError, match=r"gt_labels holds values in \[4, 4\], outside \[0, 3\]"):
        evaluation.evaluate_volume(mask.astype(int), np.full((3, 4), 4), 4, empty_policy="nan")


def test_evaluate_volume_rows_are_per_class_binary_metrics():
    rng = np.random.default_rng(3)
    smooth = ndimage.gaussian_filter(rng.standard_normal((6, 24, 24)), 2)
    gt = np.digitize(smooth, [-0.1, 0.0, 0.1])
    pred = np.roll(gt, 2, axis=2)
    pred[pred == 2] = 0  # class 2 missed entirely
    rows = evaluation.evaluate_volume(pred, gt, 5, (10.0, 1.5, 1.5), empty_policy="worst")
    assert rows.shape == (4, 4)
    for label in range(1, 5):
        expected = evaluation.binary_metrics(
            pred == label, gt == label, (10.0, 1.5, 1.5), empty_policy="worst"
        )
        expected_row = [expected[name] for name in evaluation.METRIC_NAMES]
        np.testing.assert_array_equal(rows[label - 1], expected_row)
    diagonal = math.sqrt(60.0**2 + 36.0**2 + 36.0**2)
    np.testing.assert_allclose(rows[1], [0.0, 0.0, diagonal, diagonal])  # class 2 missed
    np.testing.assert_array_equal(rows[3], [1.0, 1.0, 0.0, 0.0])  # class 4 absent in both


def _threshold_predict_fn(calls):
    """Fake network: one-hot logits over 6 classes that only ever picks labels 0 and 5."""
    def predict_fn(batch):
        calls.append((batch.shape, batch.dtype))
        labels = np.where(batch[..., 0] > 0.5, 5, 0)
        return np.eye(6, dtype=np.float32)[labels]
    return predict_fn


def test_predict_volume_odd_sizes_nearest_resize_and_fixed_batches():
    rng = np.random.default_rng(0)
    image = ndimage.gaussian_filter(rng.random((7, 37, 45)), (0, 3, 3))
    image = (image - image.min()) / np.ptp(image)
    calls = []
    labels = evaluation.predict_volume(
        _threshold_predict_fn(calls), image, (32, 32), slice_batch_size=3
    )
    assert labels.shape == (7, 37, 45)
    assert set(np.unique(labels)) <= {0, 5}  # order-1 resizing would create 1..4
    assert len(set(np.unique(labels))) == 2
    assert calls == [((3, 32, 32, 1), np.float32)] * 3  # 7 slices -> 3 padded batches

    # Same result as the protocol written out slice by slice.
    for index, slice_ in enumerate(image):
        small = ndimage.zoom(slice_, (32 / 37, 32 / 45), order=0)
        back = ndimage.zoom(np.where(small > 0.5, 5, 0), (37 / 32, 45 / 32), order=0)
        np.testing.assert_array_equal(labels[index], back)


def test_predict_volume_at_patch_size_is_identity_resize():
    rng = np.random.default_rng(1)
    image = rng.random((5, 32, 32)).astype(np.float32)
    labels = evaluation.predict_volume(_threshold_predict_fn([]), image, (32, 32))
    np.testing.assert_array_equal(labels, np.where(image > 0.5, 5, 0))


def test_predict_volume_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(D, H, W\)"):
        evaluation.predict_volume(_threshold_predict_fn([]), np.zeros((32, 32)), (32, 32))
    with pytest.raises(ValueError, match="predict_fn returned shape"):
        evaluation.predict_volume(lambda b: b[:, :16], np.zeros((2, 32, 32)), (32, 32))


def _per_case():
    return {
        "case_a": np.array([[0.9, 0.8, 2.0, 1.0], [0.7, 0.6, 4.0, 2.0]]),
        "case_b": np.array([[0.7, 0.6, 4.0, 3.0], [0.0, 0.0, NAN, NAN]]),
    }


def test_summarize_means_std_and_excluded_counts():
    summary = evaluation.summarize(_per_case(), ["RV", "LV"])
    assert summary["num_cases"] == 2
    assert summary["class_names"] == ("RV", "LV")
    np.testing.assert_allclose(summary["mean"], [[0.8, 0.7, 3.0, 2.0], [0.35, 0.3, 4.0, 2.0]])
    np.testing.assert_allclose(summary["std"], [[0.1, 0.1, 1.0, 1.0], [0.35, 0.3, 0.0, 0.0]])
    np.testing.assert_array_equal(summary["excluded"], [[0, 0, 0, 0], [0, 0, 1, 1]])
    np.testing.assert_allclose(summary["class_mean"], [0.575, 0.5, 3.5, 2.0])


def test_summarize_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="case 'case_a'"):
        evaluation.summarize(_per_case(), ["RV", "LV", "MYO"])
    with pytest.raises(ValueError, match="empty"):
        evaluation.summarize({}, ["RV"])


def test_markdown_table_contents():
    summary = evaluation.summarize(_per_case(), ["RV", "LV"])
    table = evaluation.markdown_table(summary, "nan", "voxels")
    lines = table.splitlines()
    assert lines[0] == "| Class | Dice (%) | Jaccard (%) | HD95 (voxels) | ASD (voxels) |"
    assert lines[2] == "| RV | 80.00 ± 10.00 | 70.00 ± 10.00 | 3.00 ± 1.00 | 2.00 ± 1.00 |"
    assert lines[4] == "| Mean | 57.50 | 50.00 | 3.50 | 2.00 |"
    assert "Distances in voxels" in table
    assert f"Empty-mask policy `nan`: {evaluation.EMPTY_POLICIES['nan']}" in table
    assert "Excluded (undefined, NaN) volumes: LV hd95 1, asd 1." in table
    clean = evaluation.summarize({"a": _per_case()["case_a"]}, ["RV", "LV"])
    assert "Excluded" not in evaluation.markdown_table(clean, "worst", "mm")
    with pytest.raises(ValueError, match="empty_policy='medpy'"):
        evaluation.markdown_table(summary, "medpy", "mm")
