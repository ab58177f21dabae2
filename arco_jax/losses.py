"""The ARCO loss terms as pure functions of arrays (channels-last logits of images (B, H, W, C) or
volumes (B, D, H, W, C), integer label maps).

Sampling, augmentation and the bookkeeping of banks live elsewhere (`sampling.py`,
`augment.py`, `memory.py`); `objective.py` wires them together for one batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

DICE_SMOOTH = 1e-5
# Similarities that decide or scale a term are computed at full float32 precision (README:
# "Precision"); DEFAULT would multiply in bfloat16 on TPU and in TF32 on recent GPUs.
HIGHEST = jax.lax.Precision.HIGHEST


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-pixel softmax cross-entropy, shape of `labels`."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def dice_loss(logits: jax.Array, labels: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """SSL4MIS Dice loss: 1 - Dice per class over the whole batch, squared denominators,
    background included, averaged over classes; pixels where `valid` is False count nowhere."""
    num_classes = logits.shape[-1]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=probs.dtype)
    if valid is not None:
        probs = probs * valid[..., None]
        onehot = onehot * valid[..., None]
    axes = tuple(range(probs.ndim - 1))
    intersect = jnp.sum(probs * onehot, axis=axes)
    denominator = jnp.sum(probs * probs, axis=axes) + jnp.sum(onehot * onehot, axis=axes)
    dice = (2.0 * intersect + DICE_SMOOTH) / (denominator + DICE_SMOOTH)
    return jnp.mean(1.0 - dice)


SUPERVISED_LOSSES = ("ce_dice", "ce")  # config.loss.supervised


def supervised_loss(logits: jax.Array, labels: jax.Array, ignore_label: int | None = None,
                    kind: str = "ce_dice") -> tuple[jax.Array, dict]:
    """The loss on labeled images: 'ce_dice', CE + Dice with equal weights (the ARCO/SSL4MIS
    reference), or 'ce', CE alone (ReCo's natural-image recipe; no Dice is computed or reported).
    Pixels labeled `ignore_label` are left out (CE is the mean over the other pixels)."""
    if kind not in SUPERVISED_LOSSES:
        raise ValueError(f"losses.supervised_loss: kind must be one of {SUPERVISED_LOSSES}, got {kind!r}")
    if ignore_label is None:
        valid = safe = None
        ce = jnp.mean(cross_entropy(logits, labels))
    else:
        valid = labels != ignore_label
        safe = jnp.where(valid, labels, 0)
        ce = jnp.sum(jnp.where(valid, cross_entropy(logits, safe), 0.0)) / jnp.maximum(jnp.sum(valid), 1)
    if kind == "ce":
        return ce, {"sup_ce": ce}
    if ignore_label is None:
        dice = dice_loss(logits, labels)
    else:
        dice = dice_loss(logits, safe, valid.astype(jnp.float32))
    return ce + dice, {"sup_ce": ce, "sup_dice": dice}


def confident_fraction(confidence: jax.Array, threshold: float, valid: jax.Array | None = None,
                       axis: int | None = None) -> jax.Array:
    """Fraction of the pixels whose confidence reaches `threshold`, over `axis`; with `valid`, of
    the valid pixels only (a rescale's padding has confidence 0 but is no pixel of the image)."""
    confident = confidence >= threshold
    if valid is None:
        return jnp.mean(confident.astype(jnp.float32), axis=axis)
    return jnp.sum(confident & valid, axis=axis) / jnp.maximum(jnp.sum(valid, axis=axis), 1)


def pseudo_label_loss(logits: jax.Array, pseudo_labels: jax.Array, confidence: jax.Array,
                      threshold: float, valid: jax.Array | None = None) -> jax.Array:
    """Confidence-weighted pseudo-label CE (reference `compute_unsupervised_loss`).

    Each image is weighted by the fraction of its pixels whose teacher confidence reaches
    `threshold`; the weighted CE is averaged over the pixels whose CE is positive. With `valid`
    (pseudo-labels shape, bool), as ReCo's ignore index -1: the other pixels have no CE and the
    fraction is of the valid pixels (their pseudo-labels may be any value).
    """
    batch = logits.shape[0]
    weight = confident_fraction(confidence.reshape(batch, -1), threshold,
                                None if valid is None else valid.reshape(batch, -1), axis=1)
    if valid is None:
        ce = cross_entropy(logits, pseudo_labels)
    else:
        ce = jnp.where(valid, cross_entropy(logits, jnp.where(valid, pseudo_labels, 0)), 0.0)
    counted = ~(ce <= 0)  # Also counts NaN, so a broken prediction cannot hide as a 0 loss.
    weighted = weight.reshape((batch,) + (1,) * (ce.ndim - 1)) * ce  # (B, 1, 1) or (B, 1, 1, 1)
    return jnp.sum(jnp.where(counted, weighted, 0.0)) / jnp.maximum(jnp.sum(counted), 1)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-8) -> jax.Array:
    """x / max(||x||, eps), the cosine-similarity normalisation of torch.cosine_similarity."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def info_nce(anchors: jax.Array, positive: jax.Array, negatives: jax.Array,
             temperature: float) -> jax.Array:
    """Mean over anchors of CE over cosine logits [positive, negatives] / tau, target positive.

    anchors (n, D) carry the gradient; positive (D,) and negatives (n, m, D) are teacher
    representations and are treated as constants.
    """
    return jnp.mean(info_nce_per_anchor(anchors, positive, negatives, temperature))


def info_nce_per_anchor(anchors: jax.Array, positive: jax.Array, negatives: jax.Array,
                        temperature: float) -> jax.Array:
    """info_nce of each anchor, (n,): a term computed over chunks of anchors is their mean."""
    a = l2_normalize(anchors)
    p = jax.lax.stop_gradient(l2_normalize(positive))
    neg = jax.lax.stop_gradient(l2_normalize(negatives))
    # Cosines at HIGHEST precision (DEFAULT rounds to bfloat16 on TPU: ~0.4 % per cosine, then
    # divided by the temperature). Each negative is read once, so this is bound by memory, not
    # multiplies: full float32 costs next to nothing.
    pos_logit = jnp.dot(a, p, precision=HIGHEST)
    neg_logits = jnp.einsum("nd,nmd->nm", a, neg, precision=HIGHEST)
    logits = jnp.concatenate([pos_logit[:, None], neg_logits], axis=1) / temperature
    return jax.nn.logsumexp(logits, axis=1) - logits[:, 0]


def class_average(per_class_loss: jax.Array, has_anchors: jax.Array, present: jax.Array) -> jax.Array:
    """Average over the classes present in the batch, as the reference does.

    A present class without anchors or negatives contributes 0 but still counts in the
    denominator; with at most one class present the term is 0 (no contrast to learn).
    """
    num_present = jnp.sum(present)
    total = jnp.sum(jnp.where(has_anchors & present, per_class_loss, 0.0))
    return jnp.where(num_present > 1, total / jnp.maximum(num_present, 1), 0.0)


def equivariance_loss(student_logits: jax.Array, target_logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked KL(softmax(target) || softmax(student)) per pixel, mean over pixels per image,
    then over images. `target_logits` is a constant (the warped, detached prediction)."""
    target = jax.lax.stop_gradient(target_logits.astype(jnp.float32))
    log_p_target = jax.nn.log_softmax(target, axis=-1)
    log_p_student = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(log_p_target) * (log_p_target - log_p_student), axis=-1)
    mask = jax.lax.stop_gradient(mask.astype(jnp.float32))
    spatial = tuple(range(1, kl.ndim))  # (H, W) or (D, H, W)
    per_image = jnp.sum(kl * mask, axis=spatial) / (jnp.sum(mask, axis=spatial) + 1e-7)
    return jnp.mean(per_image)


def nearest_neighbour_loss(student: jax.Array, teacher: jax.Array, pool: jax.Array, topk: int) -> jax.Array:
    """L_nn with a gradient: neighbours are chosen by the teacher embedding, the loss is the
    mean squared distance of the student embedding to them (inputs are L2-normalised rows).

    The reference chooses neighbours with the student and measures the teacher, which gives
    the student no gradient at all; the paper's ablation treats the term as active.
    """
    # 2 - 2 cos cancels for near neighbours, exactly the ones chosen: bfloat16-rounded cosines
    # (DEFAULT precision on TPU) would leave their distances mostly rounding error. The pool is
    # a few dozen rows, so HIGHEST is free.
    teacher_dist = 2.0 - 2.0 * jnp.dot(jax.lax.stop_gradient(teacher), pool.T, precision=HIGHEST)
    _, neighbours = jax.lax.top_k(-teacher_dist, topk)
    student_dist = 2.0 - 2.0 * jnp.dot(student, jax.lax.stop_gradient(pool).T, precision=HIGHEST)
    return jnp.mean(jnp.take_along_axis(student_dist, neighbours, axis=1))


def softmax_mse(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """Mean Teacher consistency (SSL4MIS): mean over pixels and classes of the squared
    difference of the two softmax maps; the teacher's is a constant."""
    student = jax.nn.softmax(student_logits.astype(jnp.float32), axis=-1)
    teacher = jax.lax.stop_gradient(jax.nn.softmax(teacher_logits.astype(jnp.float32), axis=-1))
    return jnp.mean(jnp.square(student - teacher))


def sigmoid_rampup(progress: jax.Array, length: float) -> jax.Array:
    """exp(-5 (1 - min(progress / length, 1))^2), the ramp-up of Laine & Aila used by SSL4MIS
    (progress and length in the same unit); 1 when length is 0."""
    if length == 0:
        return jnp.ones_like(jnp.asarray(progress, jnp.float32))
    phase = 1.0 - jnp.clip(jnp.asarray(progress, jnp.float32) / length, 0.0, 1.0)
    return jnp.exp(-5.0 * phase * phase)


def entropy(probs: jax.Array) -> jax.Array:
    """Per-pixel Shannon entropy of a probability map (last axis)."""
    return -jnp.sum(probs * jnp.log(probs + 1e-10), axis=-1)
