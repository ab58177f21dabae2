"""The ARCO loss terms against straightforward numpy re-implementations of their definitions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arco_jax import losses

SMOOTH = 1e-5


def np_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def np_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    probs = np_softmax(logits)
    return -np.log(np.take_along_axis(probs, labels[..., None], axis=-1)[..., 0])


def np_dice_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """SSL4MIS DiceLoss(softmax=True): per class 1 - (2 I + s) / (sum p^2 + sum t^2 + s), mean."""
    probs = np_softmax(logits)
    per_class = []
    for c in range(logits.shape[-1]):
        p, t = probs[..., c], (labels == c).astype(np.float64)
        intersect = np.sum(p * t)
        per_class.append(1.0 - (2.0 * intersect + SMOOTH) / (np.sum(p * p) + np.sum(t * t) + SMOOTH))
    return float(np.mean(per_class))


def np_info_nce(anchors, positive, negatives, tau) -> float:
    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)
    a, p, n = unit(anchors.astype(np.float64)), unit(positive.astype(np.float64)), unit(negatives.astype(np.float64))
    logits = np.concatenate([(a @ p)[:, None], np.einsum("nd,nmd->nm", a, n)], axis=1) / tau
    return float(np.mean(-np.log(np_softmax(logits)[:, 0])))


def random_logits(seed: int, shape, scale: float = 2.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def random_labels(seed: int, shape, num_classes: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, shape).astype(np.int32)


# ----------------------------------------------------------------------------- supervised


def test_cross_entropy_matches_numpy():
    logits, labels = random_logits(0, (2, 5, 6, 4)), random_labels(1, (2, 5, 6), 4)
    np.testing.assert_allclose(losses.cross_entropy(logits, labels), np_cross_entropy(logits, labels),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_loss_matches_ssl4mis(seed):
    logits, labels = random_logits(seed, (3, 8, 7, 4)), random_labels(seed + 10, (3, 8, 7), 4)
    labels[labels == 2] = 1  # one class absent from the labels: its 1 - Dice still counts
    np.testing.assert_allclose(losses.dice_loss(logits, labels), np_dice_loss(logits, labels), rtol=1e-5)


def test_dice_loss_near_zero_for_a_confident_correct_prediction():
    labels = random_labels(3, (2, 6, 6), 3)
    logits = 30.0 * np.eye(3, dtype=np.float32)[labels]
    assert float(losses.dice_loss(logits, labels)) < 1e-6
    # and near one for a confident, everywhere wrong one
    wrong = 30.0 * np.eye(3, dtype=np.float32)[(labels + 1) % 3]
    assert float(losses.dice_loss(wrong, labels)) > 0.99


def test_supervised_loss_is_ce_plus_dice():
    logits, labels = random_logits(4, (2, 6, 5, 3)), random_labels(5, (2, 6, 5), 3)
    total, parts = losses.supervised_loss(logits, labels)
    np.testing.assert_allclose(parts["sup_ce"], np_cross_entropy(logits, labels).mean(), rtol=1e-5)
    np.testing.assert_allclose(parts["sup_dice"], np_dice_loss(logits, labels), rtol=1e-5)
    np.testing.assert_allclose(total, parts["sup_ce"] + parts["sup_dice"], rtol=1e-6)


def test_supervised_loss_ce_only_is_the_cross_entropy_without_the_ignored_pixels():
    logits, labels = random_logits(4, (2, 6, 5, 3)), random_labels(5, (2, 6, 5), 3)
    total, parts = losses.supervised_loss(logits, labels, kind="ce")
    np.testing.assert_allclose(total, np_cross_entropy(logits, labels).mean(), rtol=1e-5)
    assert parts == {"sup_ce": total}
    ignored = labels.copy()
    ignored[0, :3] = 255
    total, _ = losses.supervised_loss(logits, ignored, ignore_label=255, kind="ce")
    np.testing.assert_allclose(total, np_cross_entropy(logits, labels)[ignored != 255].mean(), rtol=1e-5)
    with_dice, dice_parts = losses.supervised_loss(logits, ignored, ignore_label=255)
    np.testing.assert_allclose(with_dice, total + dice_parts["sup_dice"], rtol=1e-6)
    with pytest.raises(ValueError, match="kind must be one of"):
        losses.supervised_loss(logits, labels, kind="dice")


# ----------------------------------------------------------------------------- pseudo-labels


def np_pseudo_label_loss(logits, labels, confidence, threshold, counted=None) -> float:
    """Each image weighted by its fraction of confident pixels; mean over pixels with CE > 0."""
    batch = logits.shape[0]
    weight = (confidence.reshape(batch, -1) >= threshold).mean(axis=1)
    ce = np_cross_entropy(logits, labels)
    counted = ce > 0 if counted is None else counted
    return float(np.sum((weight[:, None, None] * ce)[counted]) / counted.sum())


def test_pseudo_label_loss_matches_numpy():
    shape = (3, 6, 5)
    logits, labels = random_logits(6, shape + (4,)), random_labels(7, shape, 4)
    confidence = np.random.default_rng(8).random(shape).astype(np.float32)
    confidence[0] = 0.5  # exactly at the threshold: counts as confident
    confidence[2] = 0.1  # no confident pixel: weight 0, but its pixels stay in the denominator
    loss = losses.pseudo_label_loss(logits, labels, confidence, 0.5)
    np.testing.assert_allclose(loss, np_pseudo_label_loss(logits, labels, confidence, 0.5), rtol=1e-5)
    weight = (confidence.reshape(3, -1) >= 0.5).mean(axis=1)
    assert weight[0] == 1.0 and weight[2] == 0.0 and 0.0 < weight[1] < 1.0


def test_pseudo_label_loss_averages_only_over_pixels_with_positive_ce():
    shape = (2, 4, 4)
    labels = random_labels(9, shape, 3)
    logits = random_logits(10, shape + (3,))
    # Saturated, correct logits give a CE of exactly 0 in float32: those pixels leave the mean.
    saturated = np.zeros(shape, bool)
    saturated[:, :2] = True
    logits[saturated] = 200.0 * np.eye(3, dtype=np.float32)[labels[saturated]]
    assert np.all(np.asarray(losses.cross_entropy(logits, labels))[saturated] == 0.0)
    confidence = np.full(shape, 0.99, np.float32)
    confidence[1, 0] = 0.0  # image 1: weight 3/4
    loss = losses.pseudo_label_loss(logits, labels, confidence, 0.97)
    expected = np_pseudo_label_loss(logits, labels, confidence, 0.97, counted=~saturated)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_pseudo_label_loss_is_zero_not_nan_when_every_pixel_is_perfect():
    labels = random_labels(11, (2, 3, 3), 3)
    logits = 200.0 * np.eye(3, dtype=np.float32)[labels]
    assert float(losses.pseudo_label_loss(logits, labels, np.ones((2, 3, 3), np.float32), 0.97)) == 0.0


# ----------------------------------------------------------------------------- contrast


def contrast_inputs(seed: int, n: int = 5, m: int = 7, d: int = 6):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(d,)).astype(np.float32),
            rng.normal(size=(n, m, d)).astype(np.float32))


@pytest.mark.parametrize("tau", [0.5, 0.1])
def test_info_nce_matches_numpy(tau):
    anchors, positive, negatives = contrast_inputs(12)
    np.testing.assert_allclose(losses.info_nce(anchors, positive, negatives, tau),
                               np_info_nce(anchors, positive, negatives, tau), rtol=1e-5)


def test_info_nce_uses_cosine_similarity():
    anchors, positive, negatives = contrast_inputs(13)
    scaled = losses.info_nce(3.0 * anchors, 0.2 * positive, 7.0 * negatives, 0.5)
    np.testing.assert_allclose(scaled, losses.info_nce(anchors, positive, negatives, 0.5), rtol=1e-5)


def test_info_nce_gradient_flows_only_to_anchors():
    anchors, positive, negatives = contrast_inputs(14)
    grads = jax.grad(losses.info_nce, argnums=(0, 1, 2))(
        jnp.asarray(anchors), jnp.asarray(positive), jnp.asarray(negatives), 0.5)
    assert np.abs(np.asarray(grads[0])).max() > 1e-3
    np.testing.assert_array_equal(grads[1], 0.0)
    np.testing.assert_array_equal(grads[2], 0.0)


def test_info_nce_is_small_when_anchors_align_with_the_positive():
    _, positive, negatives = contrast_inputs(15)
    anchors = np.tile(positive, (5, 1))
    negatives = -np.broadcast_to(positive, negatives.shape)  # all opposite the positive
    # logits: +1 / tau for the positive, -1 / tau for each of the 7 negatives
    loss = float(losses.info_nce(anchors, positive, negatives, 0.5))
    np.testing.assert_allclose(loss, np.log1p(7 * np.exp(-4.0)), rtol=1e-5)


def test_class_average_over_present_classes():
    per_class = jnp.array([1.0, 2.0, 4.0, 8.0])
    has_anchors = jnp.array([True, True, False, True])
    present = jnp.array([True, True, True, False])
    # Classes 0, 1, 2 present; class 2 has no anchors (adds 0 but counts); class 3 absent
    # (its loss is ignored even though it has anchors).
    np.testing.assert_allclose(losses.class_average(per_class, has_anchors, present), (1.0 + 2.0) / 3)


@pytest.mark.parametrize("present", [[False, False, False], [False, True, False]])
def test_class_average_is_zero_with_at_most_one_present_class(present):
    value = losses.class_average(jnp.array([3.0, 5.0, 7.0]), jnp.ones(3, bool), jnp.array(present))
    assert float(value) == 0.0


def test_class_average_ignores_nan_of_classes_without_anchors():
    """A class without anchors may carry garbage; it must not leak into the average."""
    value = losses.class_average(jnp.array([2.0, jnp.nan]), jnp.array([True, False]), jnp.array([True, True]))
    assert float(value) == 1.0


# ----------------------------------------------------------------------------- equivariance


def np_equivariance_loss(student, target, mask) -> float:
    p_t, p_s = np_softmax(target), np_softmax(student)
    kl = np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=-1)
    return float(np.mean(np.sum(kl * mask, axis=(1, 2)) / (np.sum(mask, axis=(1, 2)) + 1e-7)))


def test_equivariance_loss_matches_numpy():
    student, target = random_logits(16, (2, 5, 6, 3)), random_logits(17, (2, 5, 6, 3))
    mask = np.random.default_rng(18).random((2, 5, 6)).astype(np.float32)  # soft (warped) mask
    np.testing.assert_allclose(losses.equivariance_loss(student, target, mask),
                               np_equivariance_loss(student, target, mask), rtol=1e-5)


def test_equivariance_loss_zero_when_student_equals_target():
    logits = random_logits(19, (2, 4, 4, 3))
    mask = np.ones((2, 4, 4), np.float32)
    np.testing.assert_allclose(losses.equivariance_loss(logits, logits, mask), 0.0, atol=1e-6)
    assert float(losses.equivariance_loss(logits + random_logits(20, logits.shape), logits, mask)) > 0.01


def test_equivariance_loss_ignores_masked_pixels_and_target_gradient():
    student, target = random_logits(21, (2, 4, 4, 3)), random_logits(22, (2, 4, 4, 3))
    mask = np.zeros((2, 4, 4), np.float32)
    mask[:, 1:3, 1:3] = 1.0
    changed = student.copy()
    changed[mask == 0] += random_logits(23, changed[mask == 0].shape, scale=10.0)
    np.testing.assert_allclose(losses.equivariance_loss(changed, target, mask),
                               losses.equivariance_loss(student, target, mask), rtol=1e-6)
    grad_student, grad_target = jax.grad(losses.equivariance_loss, argnums=(0, 1))(
        jnp.asarray(student), jnp.asarray(target), jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(grad_student)[mask == 0], 0.0)
    assert np.abs(np.asarray(grad_student)[mask == 1]).max() > 1e-4
    np.testing.assert_array_equal(grad_target, 0.0)


def test_equivariance_loss_with_empty_mask_is_zero():
    student, target = random_logits(24, (2, 4, 4, 3)), random_logits(25, (2, 4, 4, 3))
    assert float(losses.equivariance_loss(student, target, np.zeros((2, 4, 4), np.float32))) == 0.0


# ----------------------------------------------------------------------------- nearest neighbours


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_nearest_neighbour_loss_uses_the_teachers_neighbours():
    rng = np.random.default_rng(26)
    pool = unit_rows(rng.normal(size=(8, 5)))
    teacher = unit_rows(pool[[1, 2]] + 0.05 * rng.normal(size=(2, 5)))  # nearest: rows 1, 2
    student = unit_rows(pool[[6, 5]] + 0.05 * rng.normal(size=(2, 5)))  # nearest: rows 6, 5
    topk = 3
    teacher_neighbours = np.argsort(-(teacher @ pool.T), axis=1)[:, :topk]
    student_neighbours = np.argsort(-(student @ pool.T), axis=1)[:, :topk]
    assert not np.array_equal(np.sort(teacher_neighbours), np.sort(student_neighbours))
    student_dist = 2.0 - 2.0 * student.astype(np.float64) @ pool.T
    expected = np.take_along_axis(student_dist, teacher_neighbours, axis=1).mean()
    loss = losses.nearest_neighbour_loss(student, teacher, pool, topk)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    wrong = np.take_along_axis(student_dist, student_neighbours, axis=1).mean()
    assert abs(float(loss) - wrong) > 0.1


def test_nearest_neighbour_loss_gradient_only_to_the_student():
    rng = np.random.default_rng(27)
    pool = jnp.asarray(unit_rows(rng.normal(size=(6, 4))))
    student = jnp.asarray(unit_rows(rng.normal(size=(3, 4))))
    teacher = jnp.asarray(unit_rows(rng.normal(size=(3, 4))))
    d_student, d_teacher, d_pool = jax.grad(losses.nearest_neighbour_loss, argnums=(0, 1, 2))(
        student, teacher, pool, 2)
    assert np.abs(np.asarray(d_student)).max() > 1e-3
    np.testing.assert_array_equal(d_teacher, 0.0)
    np.testing.assert_array_equal(d_pool, 0.0)


def test_nearest_neighbour_loss_zero_when_student_sits_on_its_single_neighbour():
    rng = np.random.default_rng(28)
    pool = unit_rows(rng.normal(size=(5, 4)))
    np.testing.assert_allclose(losses.nearest_neighbour_loss(pool[[3]], pool[[3]], pool, 1), 0.0, atol=1e-6)


# ----------------------------------------------------------------------------- entropy, normalisation


def test_entropy_of_uniform_is_log_c_and_of_one_hot_is_zero():
    for c in (2, 4, 7):
        np.testing.assert_allclose(losses.entropy(jnp.full((3, c), 1.0 / c)), np.log(c), rtol=1e-5)
    np.testing.assert_allclose(losses.entropy(jnp.eye(4)), 0.0, atol=1e-6)


def test_l2_normalize_unit_rows_and_zero_stays_zero():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(losses.l2_normalize(x), [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)


def test_confident_fraction_counts_only_valid_pixels():
    """The logged fraction, like the pseudo-label weight, leaves a rescale's padding (confidence
    0, no pixel of the image) out of the denominator."""
    confidence = jnp.array([[0.99, 0.5, 0.0, 0.0], [0.98, 0.99, 0.97, 0.1]])
    valid = jnp.array([[True, True, False, False], [True, True, True, True]])
    np.testing.assert_allclose(losses.confident_fraction(confidence, 0.97), 4 / 8)
    np.testing.assert_allclose(losses.confident_fraction(confidence, 0.97, valid), 4 / 6)
    np.testing.assert_allclose(losses.confident_fraction(confidence, 0.97, valid, axis=1), [0.5, 0.75])
    np.testing.assert_allclose(losses.confident_fraction(confidence, 0.97, jnp.zeros_like(valid)), 0.0)
