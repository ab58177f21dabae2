"""An ignore label (a pixel of no class, e.g. Pascal VOC's 255) is left out of every loss term,
every sampler's candidates, the banks and every metric."""
import jax
import jax.numpy as jnp
import numpy as np

from arco_jax import evaluation, losses, objective
from arco_jax.evaluators.miou import confusion_matrix, iou_from_confusion

IGNORE = 255
NUM_CLASSES = 3


def labels_with_ignored_band(seed: int = 0) -> np.ndarray:
    labels = np.random.default_rng(seed).integers(0, NUM_CLASSES, (2, 8, 8)).astype(np.int32)
    labels[:, :, :3] = IGNORE
    return labels


def test_supervised_loss_does_not_see_ignored_pixels():
    labels = labels_with_ignored_band()
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, NUM_CLASSES))
    changed = logits.at[:, :, :3].set(100.0 * jax.random.normal(jax.random.PRNGKey(1), (2, 8, 3, NUM_CLASSES)))
    loss, parts = losses.supervised_loss(logits, jnp.asarray(labels), IGNORE)
    loss_changed, _ = losses.supervised_loss(changed, jnp.asarray(labels), IGNORE)
    np.testing.assert_allclose(loss, loss_changed, rtol=1e-6)
    # The same as the loss of the labeled part alone.
    kept, _ = losses.supervised_loss(logits[:, :, 3:], jnp.asarray(labels[:, :, 3:]))
    np.testing.assert_allclose(loss, kept, rtol=1e-5)
    assert np.isfinite(parts["sup_ce"]) and np.isfinite(parts["sup_dice"])


def test_supervised_loss_gradient_is_zero_at_ignored_pixels():
    labels = jnp.asarray(labels_with_ignored_band(1))
    logits = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, NUM_CLASSES))
    grad = jax.grad(lambda x: losses.supervised_loss(x, labels, IGNORE)[0])(logits)
    assert np.all(np.asarray(grad)[:, :, :3] == 0) and np.any(np.asarray(grad)[:, :, 3:] != 0)


def test_no_sampler_candidate_or_bank_entry_is_an_ignored_pixel():
    labels = jnp.asarray(labels_with_ignored_band(2))
    probs = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, NUM_CLASSES)), -1)
    everywhere = jnp.ones(labels.shape, bool)
    reliable, anchors = objective.anchor_masks(labels, everywhere, probs, 0.0)
    ignored = np.asarray(labels == IGNORE)
    for mask in (reliable, anchors, objective.bank_candidates(labels, probs, everywhere, 1, "other_classes"),
                 objective.bank_candidates(labels, probs, everywhere, 1, "reference")):
        mask = np.asarray(mask)
        assert mask.shape == (NUM_CLASSES,) + labels.shape
        assert not np.any(mask[:, ignored])
    assert np.asarray(reliable).any(axis=0)[~ignored].all()  # every labeled pixel is some class's candidate


def test_volume_metrics_leave_ignored_voxels_out():
    gt = np.zeros((2, 8, 8), np.int32)
    gt[:, 2:6, 2:6] = 1
    gt[:, :, 6:] = IGNORE
    pred = np.where(gt == IGNORE, 2, gt)  # anything where the truth is ignored
    pred[:, :, 6:] = 1
    rows = evaluation.evaluate_volume(pred, gt, NUM_CLASSES, empty_policy="ssl4mis", ignore_label=IGNORE)
    assert rows[0, 0] == 1.0  # class 1: perfect Dice once the ignored band is left out
    unmasked = evaluation.evaluate_volume(pred, np.where(gt == IGNORE, 0, gt), NUM_CLASSES, empty_policy="ssl4mis")
    assert unmasked[0, 0] < 1.0


def test_confusion_matrix_counts_no_ignored_pixel():
    label = labels_with_ignored_band(3)
    pred = np.random.default_rng(4).integers(0, NUM_CLASSES, label.shape)
    confusion = confusion_matrix(pred, label, NUM_CLASSES, IGNORE)
    assert confusion.sum() == np.sum(label != IGNORE)
    kept = label != IGNORE
    expected = np.zeros((NUM_CLASSES, NUM_CLASSES), int)
    np.add.at(expected, (label[kept], pred[kept]), 1)
    np.testing.assert_array_equal(confusion, expected)
    iou = iou_from_confusion(confusion)
    assert iou.shape == (NUM_CLASSES,) and np.all((iou >= 0) & (iou <= 1))


def test_equivariance_mask_leaves_ignored_pixels_out():
    labels = jnp.asarray(labels_with_ignored_band(5))
    mask = np.asarray(objective.equivariance_mask(labels, jnp.ones(labels.shape), NUM_CLASSES, 0.5))
    np.testing.assert_array_equal(mask, (np.asarray(labels) > 0) & (np.asarray(labels) != IGNORE))
