"""The ARCO objective for one batch: teacher pseudo-labels, strong view, student forwards and
every loss term, as one differentiable function of the student parameters.

Representations are never built at full resolution. The FPN head and the projector are
linear after the head's `coarse` stage, so a pixel's representation is computed from the
coarse map at that pixel (`fine_at_pixels`), and the mean representation over a region (a
class prototype, a pooling cell for L_nn) is the head applied to the region's mean input
(`region_sums`). The reference materialises (B, 496, H, W) maps for student and teacher and
then uses a few hundred pixels of them.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from arco_jax import augment, losses, memory, sampling
from arco_jax.state import Networks, TrainState


@dataclasses.dataclass(frozen=True)
class Batch:
    """One global batch: labeled images and labels, unlabeled images (NHWC, labels int32)."""

    image_l: jax.Array
    label_l: jax.Array
    image_u: jax.Array


jax.tree_util.register_dataclass(Batch, data_fields=["image_l", "label_l", "image_u"], meta_fields=[])


@dataclasses.dataclass
class Forward:
    """Runs the student (train mode, threading BatchNorm statistics) and the teacher."""

    config: ml_collections.ConfigDict
    nets: Networks
    params: dict
    teacher: dict
    batch_stats: dict

    def student(self, images: jax.Array, key: jax.Array):
        variables = {"params": self.params["segmenter"], "batch_stats": self.batch_stats}
        (logits, features), updated = self.nets.segmenter.apply(
            variables, images, train=True, rngs={"dropout": key}, mutable=["batch_stats"])
        self.batch_stats = updated["batch_stats"]
        return logits, features

    def teacher_net(self, images: jax.Array, key: jax.Array):
        """Teacher predictions, constant for the gradient. In train mode (the reference) it
        uses dropout and batch statistics; its running statistics are not updated."""
        variables = {"params": self.teacher["params"]["segmenter"], "batch_stats": self.teacher["batch_stats"]}
        if self.config.arco.teacher_train_mode:
            (logits, features), _ = self.nets.segmenter.apply(
                variables, images, train=True, rngs={"dropout": key}, mutable=["batch_stats"])
        else:
            logits, features = self.nets.segmenter.apply(variables, images, train=False)
        return jax.lax.stop_gradient((logits, features))

    def head(self, which: str, method: str, *args):
        params = self.params["head"] if which == "student" else self.teacher["params"]["head"]
        out = self.nets.head.apply({"params": params}, *args, method=method)
        return out if which == "student" else jax.lax.stop_gradient(out)

    def project(self, reps: jax.Array) -> jax.Array:
        return self.nets.projector.apply({"params": self.params["projector"]}, reps)


def _pixels(flat_index: jax.Array, shape: tuple[int, int, int]):
    """Flat indices into a (B, H, W) grid -> (b, y, x)."""
    return jnp.unravel_index(flat_index, shape)


def reliability_masks(student_probs_u: jax.Array, num_labeled: int, progress: jax.Array,
                      alpha0: float) -> tuple[jax.Array, jax.Array]:
    """Low- and high-entropy masks over the concatenated (labeled, unlabeled) batch.

    Labeled pixels are always reliable (and count as 'uncertain' candidates for the banks,
    as in the reference); unlabeled pixels are split at the alpha_t-th entropy percentiles of
    the student's strong-view prediction, alpha_t = alpha0 (1 - t/T).
    """
    ent = losses.entropy(student_probs_u)
    alpha = alpha0 * (1.0 - progress)
    low_threshold = jnp.percentile(ent, alpha)
    high_threshold = jnp.percentile(ent, 100.0 - alpha)
    labeled = jnp.ones((num_labeled,) + ent.shape[1:], bool)
    low = jnp.concatenate([labeled, ent <= low_threshold])
    high = jnp.concatenate([labeled, ent >= high_threshold])
    return low, high


class HeadInputs(NamedTuple):
    """What the linear part of the representation head needs: the head's coarse map and the
    finest decoder map, for a batch (labeled images first, then unlabeled)."""

    coarse: jax.Array
    finest: jax.Array

    def rows(self, index) -> "HeadInputs":
        return HeadInputs(self.coarse[index], self.finest[index])


def head_inputs(fwd: Forward, which: str, features) -> HeadInputs:
    return HeadInputs(fwd.head(which, "coarse", features), features[-1])


def contrastive_term(key: jax.Array, fwd: Forward, student: HeadInputs, teacher: HeadInputs,
                     labels: jax.Array, teacher_probs: jax.Array, low: jax.Array, high: jax.Array,
                     bank: memory.ClassBank):
    """Pixel contrast with class prototypes as positives and bank entries of the other classes
    as negatives. Returns (loss, updated bank, metrics)."""
    a = fwd.config.arco
    num_classes = teacher_probs.shape[-1]
    grid = labels.shape  # (B, H, W)
    anchor_key, enqueue_key, negative_key = jax.random.split(key, 3)
    classes = jnp.arange(num_classes)

    class_masks = labels[None] == classes[:, None, None, None]  # (C, B, H, W)
    reliable = class_masks & low[None]
    present = jnp.any(reliable, axis=(1, 2, 3))

    # Positives: mean teacher representation over each class's reliable pixels.
    region_sums, region_weights = fwd.head("teacher", "region_sums", *teacher,
                                           jnp.moveaxis(reliable, 0, 1).astype(jnp.float32))
    prototypes = fwd.head("teacher", "output", jnp.sum(region_sums, 0)
                          / jnp.maximum(jnp.sum(region_weights, 0), 1.0)[:, None])

    # Anchors: student representations at reliable pixels the teacher also believes in.
    anchor_masks = reliable & (jnp.moveaxis(teacher_probs, -1, 0) > a.anchor_prob_threshold)
    sample = jax.vmap(lambda k, m: sampling.sample(
        k, m, a.num_anchors, method=a.sampler, num_strata=a.num_strata, layout=a.strata,
        spatial_shape=grid if a.strata == "spatial" else None))
    anchor_index, has_anchors = sample(jax.random.split(anchor_key, num_classes),
                                       anchor_masks.reshape(num_classes, -1))
    anchors = fwd.project(fwd.head("student", "fine_at_pixels", *student,
                                   *_pixels(anchor_index, grid)))  # (C, n, D)

    # Bank update first (as the reference): uncertain teacher pixels of each class.
    enqueue = jax.vmap(lambda k, m: sampling.sample(k, m, a.bank_enqueue, method="uniform"))
    enqueue_index, enqueue_ok = enqueue(jax.random.split(enqueue_key, num_classes),
                                        (class_masks & high[None]).reshape(num_classes, -1))
    keys = fwd.head("teacher", "fine_at_pixels", *teacher, *_pixels(enqueue_index, grid))
    bank = memory.push_class_bank(bank, losses.l2_normalize(keys), enqueue_ok)

    # Negatives for class c: bank entries of every other class (static-shape mask over rows).
    flat_keys = bank.keys.reshape(-1, bank.keys.shape[-1])
    num_draws = a.num_anchors * a.num_negatives

    def per_class(args):
        k, c, class_anchors, prototype = args
        draw_key, shuffle_key = jax.random.split(k)
        candidates = (bank.filled & (classes != c)[:, None]).reshape(-1)
        index, ok = sampling.sample(draw_key, candidates, num_draws, method=a.sampler,
                                    num_strata=a.num_strata, layout="index")
        # Samplers return slots stratum by stratum: shuffle so each anchor sees all strata.
        index = jax.random.permutation(shuffle_key, index)
        negatives = flat_keys[index].reshape(a.num_anchors, a.num_negatives, -1)
        return losses.info_nce(class_anchors, prototype, negatives, a.temperature), ok

    per_class_loss, has_negatives = jax.lax.map(
        per_class, (jax.random.split(negative_key, num_classes), classes, anchors, prototypes))
    loss = losses.class_average(per_class_loss, has_anchors & has_negatives, present)
    metrics = {"contrast_classes": jnp.sum(present & has_anchors & has_negatives).astype(jnp.float32),
               "bank_fill": jnp.mean(bank.count / bank.capacity)}
    return loss, bank, metrics


def pooled_embedding(fwd: Forward, which: str, inputs: HeadInputs, grid_size: int) -> jax.Array:
    """Representation maps average-pooled to grid_size^2 cells, flattened, L2-normalised: (B, E)."""
    coarse, finest = inputs
    batch, height, width = finest.shape[:3]
    rows = jnp.arange(height) * grid_size // height
    cols = jnp.arange(width) * grid_size // width
    cell = rows[:, None] * grid_size + cols[None, :]
    weights = (cell[None] == jnp.arange(grid_size ** 2)[:, None, None]).astype(jnp.float32)
    sums, counts = fwd.head(which, "region_sums", coarse, finest, jnp.broadcast_to(weights, (batch,) + weights.shape))
    reps = fwd.head(which, "output", sums / counts[..., None])
    if which == "student":
        reps = fwd.project(reps)
    return losses.l2_normalize(reps.reshape(batch, -1))


def arco_loss(params: dict, state: TrainState, batch: Batch, key: jax.Array, progress: jax.Array,
              config: ml_collections.ConfigDict, nets: Networks):
    """Total ARCO loss and what the step needs besides gradients.

    Returns (loss, (terms, batch_stats, bank, pool_rows, metrics)); `terms` holds the
    unweighted value of every term (0 for terms whose weight is 0: their work is skipped).
    """
    a, w = config.arco, config.loss_weights
    keys = dict(zip(["teacher_weak", "strong", "student_l", "student_u", "teacher_l", "teacher_u",
                     "contrast", "eqv_view", "eqv_warp", "eqv_student"], jax.random.split(key, 10)))
    fwd = Forward(config, nets, params, state.teacher, state.batch_stats)
    num_labeled = batch.image_l.shape[0]

    logits_l, features_l = fwd.student(batch.image_l, keys["student_l"])
    zero = jnp.zeros((), jnp.float32)
    terms = dict.fromkeys(("sup", "unsup", "contrast", "eqv", "nn"), zero)
    terms["sup"], sup_parts = losses.supervised_loss(logits_l, batch.label_l)
    metrics = dict(sup_parts)
    if not any(w[name] > 0 for name in ("unsup", "contrast", "eqv", "nn")):
        return w.sup * terms["sup"], (terms, fwd.batch_stats, state.bank, None, metrics)  # Labeled-only.

    # Pseudo-labels from the teacher on the weak view, then the strong view of the same images.
    weak_logits, _ = fwd.teacher_net(batch.image_u, keys["teacher_weak"])
    weak_probs = jax.nn.softmax(weak_logits.astype(jnp.float32), -1)
    mixed, pseudo, confidence = augment.cutmix(
        keys["strong"], batch.image_u, jnp.argmax(weak_probs, -1).astype(jnp.int32), jnp.max(weak_probs, -1))
    image_s, pseudo, confidence = augment.photometric_and_warp(
        jax.random.fold_in(keys["strong"], 1), mixed, pseudo, confidence, warp_labels=a.warp_pseudo_labels)
    logits_u, features_u = fwd.student(image_s, keys["student_u"])
    if w.unsup > 0:
        terms["unsup"] = losses.pseudo_label_loss(logits_u, pseudo, confidence, a.confidence_threshold)
    metrics["confident_fraction"] = jnp.mean(confidence >= a.confidence_threshold)

    labels = jnp.concatenate([batch.label_l, pseudo])
    confidences = jnp.concatenate([jnp.ones_like(confidence[:num_labeled]), confidence])
    bank, pool_rows = state.bank, None
    if w.contrast > 0 or w.nn > 0:
        t_logits_l, t_features_l = fwd.teacher_net(batch.image_l, keys["teacher_l"])
        t_logits_u, t_features_u = fwd.teacher_net(image_s, keys["teacher_u"])
        cat = lambda x, y: tuple(jnp.concatenate([p, q]) for p, q in zip(x, y))  # noqa: E731
        student = head_inputs(fwd, "student", cat(features_l, features_u))
        teacher = head_inputs(fwd, "teacher", cat(t_features_l, t_features_u))
    if w.contrast > 0:
        teacher_probs = jax.nn.softmax(jnp.concatenate([t_logits_l, t_logits_u]).astype(jnp.float32), -1)
        low, high = reliability_masks(jax.nn.softmax(jax.lax.stop_gradient(logits_u).astype(jnp.float32), -1),
                                      num_labeled, progress, a.entropy_percentile)
        terms["contrast"], bank, contrast_metrics = contrastive_term(
            keys["contrast"], fwd, student, teacher, labels, teacher_probs, low, high, state.bank)
        metrics.update(contrast_metrics)
    if w.nn > 0:
        unlabeled = slice(num_labeled, None)
        student_emb = pooled_embedding(fwd, "student", student.rows(unlabeled), a.nn_grid)
        teacher_emb = pooled_embedding(fwd, "teacher", teacher.rows(unlabeled), a.nn_grid)
        terms["nn"] = losses.nearest_neighbour_loss(student_emb, teacher_emb, state.pool.rows, a.nn_topk)
        pool_rows = teacher_emb
    if w.eqv > 0:
        # Equivariance: student(T(x)) should match T(student(x)) on confident foreground.
        # A second photometric view of the strong images: same geometry as the prediction it
        # is compared with (the reference re-warps independently, misaligning the two).
        jitter_key, blur_key = jax.random.split(keys["eqv_view"])
        view_u = augment.gaussian_blur(blur_key, augment.intensity_jitter(jitter_key, image_s))
        view = jnp.concatenate([batch.image_l, view_u])
        matrices = augment.random_similarity(keys["eqv_warp"], view.shape[0], scale_range=tuple(a.eqv_scale))
        warped_logits, _ = fwd.student(augment.warp_affine(view, matrices, order=1), keys["eqv_student"])
        target = augment.warp_affine(jax.lax.stop_gradient(jnp.concatenate([logits_l, logits_u])), matrices, order=1)
        mask = (labels != 0) & (confidences >= a.eqv_confidence_threshold)
        warped_mask = augment.warp_affine(mask[..., None].astype(jnp.float32), matrices, order=1)[..., 0]
        terms["eqv"] = losses.equivariance_loss(warped_logits, target, warped_mask)

    total = sum(config.loss_weights[name] * value for name, value in terms.items())
    return total, (terms, fwd.batch_stats, bank, pool_rows, metrics)
