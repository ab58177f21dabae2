"""The ARCO objective for one batch: teacher pseudo-labels, strong view, student forwards and
every loss term, as one differentiable function of the student parameters.

Representations are never built at full resolution. The FPN head and the projector are
linear after the head's `coarse` stage, so a pixel's representation is computed from the
coarse map at that pixel (`fine_at_pixels`), and the mean representation over a region (a
class prototype, a pooling cell for L_nn) is the head applied to the region's mean input
(`region_sums`). The reference materialises (B, 496, H, W) maps for student and teacher and
then uses a few hundred pixels of them.

This is the loss of the 'arco' method (methods/arco.py owns its state: the class banks and the
L_nn pool). With every ARCO weight 0 (an ablation) it is the labeled-only loss; a 'custom' mix
may add the Mean Teacher term (consistency.py) on a clean pass of its own. The
switches on which ARCO's paper and code differ (`arco.negatives`, `arco.nn_gradient`, ...) act
here.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from arco_jax import augment, losses, memory, parallel, sampling
from arco_jax.consistency import consistency_term, consistency_weight
from arco_jax.core import (STAGE2_KEY_NAMES, Batch, LossOutput, Networks, TrainState, stage2_keys, student_forward,
                           teacher_pass)
from arco_jax.data import registry

TERMS = ("sup", "unsup", "contrast", "eqv", "nn", "consistency")  # what arco_loss reports

ARCO_UNLABELED_TERMS = ("unsup", "contrast", "eqv", "nn")  # Terms that need the strong view.


@dataclasses.dataclass
class Forward:
    """Runs the student (train mode, threading BatchNorm statistics) and the teacher (threading
    its running statistics through its passes: teacher_batch_stats, None until one has run)."""

    config: ml_collections.ConfigDict
    nets: Networks
    params: dict
    teacher: dict
    batch_stats: dict
    teacher_batch_stats: dict | None = None

    def _student_apply(self, batch_stats: dict, images: jax.Array, key: jax.Array):
        """One train-mode student forward: ((logits, features), updated batch statistics)."""
        return student_forward(self.nets, self.params["segmenter"], batch_stats, images, key)

    def student(self, images: jax.Array, key: jax.Array):
        (logits, features), self.batch_stats = self._student_apply(self.batch_stats, images, key)
        return logits, features

    def student_passes(self, passes: dict[str, tuple[jax.Array, jax.Array]]) -> dict[str, tuple]:
        """Student forwards {name: (images, dropout key)} -> {name: (logits, features)}, in
        order (each pass is its own batch-norm batch, and updates the running statistics).

        With `arco.remat_student` the passes run as one loop whose body is rematerialised:
        the backward pass recomputes one chunk's activations at a time instead of keeping
        every pass's (at 256 px, batch 4+4: 1.8 GiB less, and one more forward per chunk).
        A loop needs equal chunks, so every pass is cut into chunks of the greatest common
        divisor of the pass sizes; a pass cut in k > 1 chunks (chunk i: images i, i + k,
        i + 2k, ...) normalises each chunk as its own batch-norm batch, with dropout keys split
        from its key. With equal labeled and unlabeled batches that is the equivariance pass
        only: two batch-norm batches, each of half its labeled and half its unlabeled views.
        A checkpoint inside a loop body is what holds on XLA:CPU, whose scheduler moves a
        straight-line recomputation next to the forward it repeats, saving nothing.
        """
        if not self.config.arco.remat_student or len(passes) < 2:
            return {name: self.student(images, key) for name, (images, key) in passes.items()}
        chunk = math.gcd(*(images.shape[0] for images, _ in passes.values()))
        chunked_images, chunk_keys = [], []
        for images, key in passes.values():
            count = images.shape[0] // chunk
            # Strided chunks (images i, i + count, ...): each device's share of a batch sharded
            # over the mesh stays on that device.
            chunked_images.append(images.reshape((chunk, count) + images.shape[1:]).swapaxes(0, 1))
            chunk_keys.append(key[None] if count == 1 else jax.random.split(key, count))

        @functools.partial(jax.checkpoint, prevent_cse=False)
        def one_chunk(batch_stats, inputs):
            outputs, batch_stats = self._student_apply(batch_stats, *inputs)
            return batch_stats, outputs

        # The body's batch-norm statistics of a sharded batch are collectives: on several CPU
        # devices the loop is unrolled (same results, no memory saved; see parallel.py).
        unroll = not parallel.collectives_in_loops_are_safe()
        self.batch_stats, stacked = jax.lax.scan(
            one_chunk, self.batch_stats, (jnp.concatenate(chunked_images), jnp.concatenate(chunk_keys)),
            unroll=unroll)
        outputs, start = {}, 0
        for name, (images, _) in passes.items():
            count = images.shape[0] // chunk
            logits, features = jax.tree.map(
                lambda x: x[start:start + count].swapaxes(0, 1).reshape((count * chunk,) + x.shape[2:]), stacked)
            outputs[name] = (logits, features)
            start += count
        return outputs

    def teacher_net(self, images: jax.Array, key: jax.Array):
        """Teacher predictions, constant for the gradient (core.teacher_pass)."""
        outputs, self.teacher_batch_stats = teacher_pass(self.nets, self.teacher, images, key,
                                                         self.config.arco.teacher_train_mode, self.teacher_batch_stats)
        return outputs

    def head(self, which: str, method: str, *args):
        params = self.params["head"] if which == "student" else self.teacher["params"]["head"]
        out = self.nets.head.apply({"params": params}, *args, method=method)
        return out if which == "student" else jax.lax.stop_gradient(out)

    def project(self, reps: jax.Array) -> jax.Array:
        return self.nets.projector.apply({"params": self.params["projector"]}, reps)


def _pixels(flat_index: jax.Array, shape: tuple[int, ...]):
    """Flat indices into a (B, *spatial) grid -> (b, y, x), or (b, z, y, x) for volumes."""
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


# The reference code's bank filter (taken over from U2PL): a pixel of class c enters bank c when
# the teacher's prob of c is below this and c's rank among the teacher's classes is in
# [low, high) on unlabeled images, or below `low` on labeled images whose label is not c.
REFERENCE_BANK_MAX_PROB = 0.97
REFERENCE_BANK_RANKS = (3, 20)


def contrast_keys(key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(anchor, enqueue, negative) keys of one contrastive term."""
    anchor_key, enqueue_key, negative_key = jax.random.split(key, 3)
    return anchor_key, enqueue_key, negative_key


def _per_class(classes: jax.Array, labels: jax.Array) -> jax.Array:
    """(C,) class ids shaped to broadcast against labels[None] ((1, B, *spatial))."""
    return classes.reshape((-1,) + (1,) * labels.ndim)


def anchor_masks(labels: jax.Array, low: jax.Array, teacher_probs: jax.Array, threshold: float):
    """(reliable, anchors), each (C, B, *spatial): per class, the reliable (low-entropy) pixels and
    those of them the teacher also believes in (prob of the class > threshold)."""
    classes = jnp.arange(teacher_probs.shape[-1])
    reliable = (labels[None] == _per_class(classes, labels)) & low[None]
    return reliable, reliable & (jnp.moveaxis(teacher_probs, -1, 0) > threshold)


def class_ranks(probs: jax.Array) -> jax.Array:
    """(C, ...) rank of each class in a descending, stable sort of probs (..., C): 0 = argmax."""
    p = jnp.moveaxis(probs, -1, 0)
    classes = jnp.arange(p.shape[0])
    above = p[None] > p[:, None]  # [c, k]: class k ranks above c
    tied_before = (p[None] == p[:, None]) & (classes[None, :] < classes[:, None]).reshape(
        (p.shape[0], p.shape[0]) + (1,) * (p.ndim - 1))
    return jnp.sum(above | tied_before, axis=1)


def bank_candidates(labels: jax.Array, teacher_probs: jax.Array, high: jax.Array, num_labeled: int,
                    negatives: str) -> jax.Array:
    """(C, B, H, W): the pixels offered to each class's bank.

    'other_classes': the uncertain (high-entropy) pixels of class c, later drawn as negatives
    for the other classes. 'reference': the reference code's masks, the uncertain pixels of
    class c whose teacher prob of c is below REFERENCE_BANK_MAX_PROB and whose teacher ranks c
    in [3, 20) (unlabeled) or in the top 3 while the label is not c (labeled). The labeled
    part contradicts its own class condition, so it is always empty, and with 3 classes or
    fewer no rank reaches 3: the bank stays empty apart from rare unlabeled pixels.
    """
    classes = jnp.arange(teacher_probs.shape[-1])
    uncertain = (labels[None] == _per_class(classes, labels)) & high[None]
    if negatives == "other_classes":
        return uncertain
    low_rank, high_rank = REFERENCE_BANK_RANKS
    ranks = class_ranks(teacher_probs)
    labeled = jnp.arange(labels.shape[0]) < num_labeled
    class_mask = jnp.where(labeled.reshape((1, -1) + (1,) * (labels.ndim - 1)),
                           (ranks < low_rank) & (labels[None] != _per_class(classes, labels)),
                           (ranks >= low_rank) & (ranks < high_rank))
    return uncertain & (jnp.moveaxis(teacher_probs, -1, 0) < REFERENCE_BANK_MAX_PROB) & class_mask


def _distinct_draw(key: jax.Array, mask: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Up to n distinct candidates of a flat mask, uniformly: (n indices, how many are real)."""
    n = min(n, mask.shape[0])
    scores = jnp.where(mask, jax.random.uniform(key, mask.shape), -1.0)
    _, index = jax.lax.top_k(scores, n)
    return index, jnp.minimum(jnp.sum(mask), n)


def update_bank(key: jax.Array, fwd: Forward, teacher: HeadInputs, labels: jax.Array, teacher_probs: jax.Array,
                high: jax.Array, num_labeled: int) -> memory.BankPush:
    """The push of L2-normalised teacher representations of each class's bank candidates.

    'other_classes' draws bank_enqueue of them uniformly with replacement; 'reference' pushes
    only distinct pixels (up to bank_enqueue), as the reference pushes each matching pixel
    once, so a nearly empty mask leaves a nearly empty bank.
    """
    a = fwd.config.arco
    num_classes = teacher_probs.shape[-1]
    grid = labels.shape
    _, enqueue_key, _ = contrast_keys(key)
    masks = bank_candidates(labels, teacher_probs, high, num_labeled, a.negatives).reshape(num_classes, -1)
    keys = jax.random.split(enqueue_key, num_classes)
    if a.negatives == "other_classes":
        index, valid = jax.vmap(lambda k, m: sampling.sample(k, m, a.bank_enqueue, method="uniform"))(keys, masks)
    else:
        index, valid = jax.vmap(lambda k, m: _distinct_draw(k, m, a.bank_enqueue))(keys, masks)
    reps = fwd.head("teacher", "fine_at_pixels", *teacher, *_pixels(index, grid))
    return memory.bank_push(losses.l2_normalize(reps), valid)


def class_prototypes(fwd: Forward, teacher: HeadInputs, reliable: jax.Array) -> jax.Array:
    """(C, D) positives: the teacher's mean representation over each class's reliable pixels
    (reliable (C, B, *spatial)), not normalised."""
    region_sums, region_weights = fwd.head("teacher", "region_sums", *teacher,
                                           jnp.moveaxis(reliable, 0, 1).astype(jnp.float32))
    return fwd.head("teacher", "output", jnp.sum(region_sums, 0)
                    / jnp.maximum(jnp.sum(region_weights, 0), 1.0)[:, None])


def class_anchors(key: jax.Array, fwd: Forward, student: HeadInputs, anchor_mask: jax.Array,
                  grid: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(anchors (C, n, D), has_anchors (C,)): student representations at n pixels of each
    class's anchor mask (C, B, *spatial), drawn with the configured sampler and strata, through
    the projector unless arco.project_anchors is off."""
    a = fwd.config.arco
    num_classes = anchor_mask.shape[0]
    sample = jax.vmap(lambda k, m: sampling.sample(
        k, m, a.num_anchors, method=a.sampler, num_strata=a.num_strata, layout=a.strata,
        spatial_shape=grid if a.strata == "spatial" else None, spatial_rank=len(grid) - 1))
    anchor_index, has_anchors = sample(jax.random.split(key, num_classes), anchor_mask.reshape(num_classes, -1))
    anchors = fwd.head("student", "fine_at_pixels", *student, *_pixels(anchor_index, grid))
    return (fwd.project(anchors) if a.project_anchors else anchors), has_anchors


def class_negative_index(key: jax.Array, config: ml_collections.ConfigDict,
                         bank: memory.ClassBank | memory.PushedBank, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(row index (n, m) into `bank.rows`, any drawn) of class c's negatives, from a static-shape
    mask over the rows of all banks: 'other_classes', filled rows of the other classes' banks;
    'reference', the rows of bank c plus its zero row while the bank is not full."""
    a = config.arco
    classes = jnp.arange(bank.count.shape[0])
    if a.negatives == "other_classes":
        rows = bank.filled & (classes != c)[:, None]
    else:
        rows = bank.filled_and_zero_row & (classes == c)[:, None]
    draw_key, shuffle_key = jax.random.split(key)
    index, ok = sampling.sample(draw_key, rows.reshape(-1), a.num_anchors * a.num_negatives, method=a.sampler,
                                num_strata=a.num_strata, layout="index")
    # Samplers return slots stratum by stratum: shuffle so each anchor sees all strata.
    index = jax.random.permutation(shuffle_key, index)
    return index.reshape(a.num_anchors, a.num_negatives), ok


def class_negatives(key: jax.Array, config: ml_collections.ConfigDict, bank: memory.ClassBank | memory.PushedBank,
                    c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(negatives (n, m, D), any drawn) of class c: the rows `class_negative_index` draws."""
    index, ok = class_negative_index(key, config, bank, c)
    return bank.rows(index.reshape(-1)).reshape(*index.shape, -1), ok


# Anchors whose negatives are gathered at once: at the ACDC settings a class's 256 x 512 negatives
# of 496 dims are 260 MB (and as much again normalised); 64 anchors at a time hold a quarter.
ANCHORS_PER_CHUNK = 64


def chunked_info_nce(anchors: jax.Array, prototype: jax.Array, index: jax.Array,
                     bank: memory.ClassBank | memory.PushedBank, temperature: float,
                     chunk: int | None = None) -> jax.Array:
    """losses.info_nce of `anchors` (n, D) against the bank rows `index` (n, m), gathering the
    negatives of `chunk` anchors at a time (default ANCHORS_PER_CHUNK; the largest divisor of n
    not above it), rematerialised: the backward pass gathers them again rather than keeping
    them. The same value as gathering all at once."""
    n = anchors.shape[0]
    chunk = ANCHORS_PER_CHUNK if chunk is None else chunk
    chunk = max(d for d in range(1, min(chunk, n) + 1) if n % d == 0)

    @jax.checkpoint
    def one_chunk(args):
        chunk_index, chunk_anchors = args
        negatives = bank.rows(chunk_index.reshape(-1)).reshape(*chunk_index.shape, -1)
        return losses.info_nce_per_anchor(chunk_anchors, prototype, negatives, temperature)

    per_anchor = jax.lax.map(one_chunk, (index.reshape(n // chunk, chunk, -1),
                                         anchors.reshape(n // chunk, chunk, -1)))
    return jnp.mean(per_anchor)


class ContrastDraws(NamedTuple):
    """What one contrastive term draws before its negatives: per class (C, ...)."""

    prototypes: jax.Array  # (C, D) teacher class means, the positives
    anchors: jax.Array  # (C, n, D) student anchors
    has_anchors: jax.Array  # (C,)
    present: jax.Array  # (C,) the class has reliable pixels
    negative_keys: jax.Array  # (C,) keys of `class_negatives`


def contrast_draws(key: jax.Array, fwd: Forward, student: HeadInputs, teacher: HeadInputs, labels: jax.Array,
                   teacher_probs: jax.Array, low: jax.Array) -> ContrastDraws:
    """Positives, anchors and the negatives' keys of the term for `key`, as the train step draws them."""
    a = fwd.config.arco
    num_classes = teacher_probs.shape[-1]
    anchor_key, _, negative_key = contrast_keys(key)
    reliable, anchor_mask = anchor_masks(labels, low, teacher_probs, a.anchor_prob_threshold)
    anchors, has_anchors = class_anchors(anchor_key, fwd, student, anchor_mask, labels.shape)
    return ContrastDraws(class_prototypes(fwd, teacher, reliable), anchors, has_anchors,
                         jnp.any(reliable.reshape(num_classes, -1), axis=1), jax.random.split(negative_key, num_classes))


def per_class_contrast(key: jax.Array, fwd: Forward, student: HeadInputs, teacher: HeadInputs,
                       labels: jax.Array, teacher_probs: jax.Array, low: jax.Array,
                       bank: memory.ClassBank | memory.PushedBank):
    """Each class's InfoNCE term with class prototypes as positives and bank entries as
    negatives; the bank is read, never written. Returns (per_class_loss (C,), counted (C,),
    present (C,)); `losses.class_average` of them is the contrastive loss.

    counted: the class is present and has anchors and negatives (`class_negatives`; with
    'reference' negatives, while a bank is empty every negative logit is 0, as the reference's
    initial zero vector makes it).
    """
    a = fwd.config.arco
    draws = contrast_draws(key, fwd, student, teacher, labels, teacher_probs, low)

    # Rematerialised: a class's negatives (num_anchors x num_negatives x rep_dim, 260 MB at the
    # ACDC settings) are gathered again in the backward pass instead of being kept for every
    # class, which would hold about 2 GB of residuals through the step; within a class they are
    # gathered a chunk of anchors at a time (chunked_info_nce).
    @jax.checkpoint
    def one_class(args):
        k, c, class_anchors_, prototype = args
        index, ok = class_negative_index(k, fwd.config, bank, c)
        return chunked_info_nce(class_anchors_, prototype, index, bank, a.temperature), ok

    per_class_loss, has_negatives = jax.lax.map(one_class, (
        draws.negative_keys, jnp.arange(draws.present.shape[0]), draws.anchors, draws.prototypes))
    return per_class_loss, draws.has_anchors & has_negatives & draws.present, draws.present


def contrastive_term(key: jax.Array, fwd: Forward, student: HeadInputs, teacher: HeadInputs,
                     labels: jax.Array, teacher_probs: jax.Array, low: jax.Array, high: jax.Array,
                     bank: memory.ClassBank, num_labeled: int):
    """Pixel contrast: the bank is updated first (as the reference), then the class terms of
    `per_class_contrast` read it. Returns (loss, the bank's push, metrics); the step writes
    the push after its guard, the terms read the bank as it will be."""
    push = update_bank(key, fwd, teacher, labels, teacher_probs, high, num_labeled)
    bank = memory.PushedBank(bank, push)
    per_class_loss, counted, present = per_class_contrast(key, fwd, student, teacher, labels, teacher_probs,
                                                          low, bank)
    metrics = {"contrast_classes": jnp.sum(counted).astype(jnp.float32),
               "bank_fill": jnp.mean(bank.count / bank.capacity)}
    return losses.class_average(per_class_loss, counted, present), push, metrics


def pooled_embedding(fwd: Forward, which: str, inputs: HeadInputs, grid_size: int) -> jax.Array:
    """Representation maps average-pooled to grid_size^r cells over the r spatial axes (a
    grid_size x grid_size grid for images), flattened, L2-normalised: (B, E)."""
    coarse, finest = inputs
    batch, spatial = finest.shape[0], finest.shape[1:-1]
    cell = jnp.zeros(spatial, jnp.int32)
    for axis, size in enumerate(spatial):  # Row-major cell index, one axis at a time.
        index = jnp.arange(size) * grid_size // size
        cell = cell * grid_size + index.reshape((size,) + (1,) * (len(spatial) - axis - 1))
    cells = jnp.arange(grid_size ** len(spatial)).reshape((-1,) + (1,) * len(spatial))
    weights = (cell[None] == cells).astype(jnp.float32)
    sums, counts = fwd.head(which, "region_sums", coarse, finest, jnp.broadcast_to(weights, (batch,) + weights.shape))
    reps = fwd.head(which, "output", sums / counts[..., None])
    if which == "student":
        reps = fwd.project(reps)
    return losses.l2_normalize(reps.reshape(batch, -1))


def _colour_settings(config: ml_collections.ConfigDict):
    """augment.ColourJitter of config.augment for jitter 'colour' (None for 'intensity'). It undoes
    the ImageNet normalisation of 'imagenet' datasets first (it acts on RGB in [0, 1]); 'minmax'
    images already are."""
    g = config.augment
    if g.jitter != "colour":
        return None
    mean = std = None
    if registry.info(config).intensity == "imagenet":
        from arco_jax.data.natural import IMAGENET_MEAN, IMAGENET_STD  # pylint: disable=import-outside-toplevel

        mean, std = tuple(map(float, IMAGENET_MEAN)), tuple(map(float, IMAGENET_STD))
    return augment.ColourJitter(saturation=g.saturation, hue=g.hue, mean=mean, std=std)


def rescales_unlabeled(config: ml_collections.ConfigDict) -> bool:
    """Whether the strong view starts with ReCo's random rescale (augment.unlabeled_scale not (1, 1))."""
    return tuple(config.augment.unlabeled_scale) != (1.0, 1.0)


def no_class_label(config: ml_collections.ConfigDict) -> int:
    """The label of pixels that are no class: the dataset's ignore label, else num_classes."""
    d = config.data
    return d.num_classes if d.ignore_label is None else d.ignore_label


def strong_view_settings(config: ml_collections.ConfigDict, nets: Networks) -> dict:
    """augment.strong_augment's keyword settings from config.augment (rescale, mix, jitter, blur,
    warp, flip) and arco.warp_pseudo_labels; the rescale pads labels with `no_class_label`."""
    g = config.augment
    rescale = tuple(map(float, g.unlabeled_scale)) if rescales_unlabeled(config) else None
    return dict(warp_labels=config.arco.warp_pseudo_labels, warp_prob=g.warp_prob, value_range=nets.image_range,
                mix=g.mix, num_classes=config.data.num_classes, jitter_prob=g.jitter_prob,
                colour=_colour_settings(config), blur_prob=g.blur_prob, flip_prob=g.flip_prob, rescale=rescale,
                fill_label=no_class_label(config) if rescale else None)


def strong_view(fwd: Forward, image_u: jax.Array, teacher_key: jax.Array, strong_key: jax.Array):
    """Pseudo-labels (argmax) and confidences (max prob) of the teacher on the weak view, then
    the strong view of the same images with them (augment.strong_augment, as config.augment
    says); the labels follow the warp unless arco.warp_pseudo_labels is off. Returns (image_s,
    pseudo, confidence); with augment.unlabeled_scale, pseudo holds `no_class_label` (confidence
    0) where the rescale padded."""
    weak_logits, _ = fwd.teacher_net(image_u, teacher_key)
    weak_probs = jax.nn.softmax(weak_logits.astype(jnp.float32), -1)
    return augment.strong_augment(strong_key, image_u, jnp.argmax(weak_probs, -1).astype(jnp.int32),
                                  jnp.max(weak_probs, -1), **strong_view_settings(fwd.config, fwd.nets))


LABELED_VIEW_FOLD = len(STAGE2_KEY_NAMES) + 1  # stage2_keys folds in len(STAGE2_KEY_NAMES) for its last two


def labeled_view(config: ml_collections.ConfigDict, nets: Networks, batch: Batch, key: jax.Array) -> Batch:
    """The labeled images with ReCo's jitter and blur of the labeled view (augment.labeled_jitter_prob,
    augment.labeled_blur_prob; the kind and ranges of augment.jitter), labels unchanged; the
    batch itself when both are 0. `key` is the step's: the draws use fold_in(key,
    LABELED_VIEW_FOLD), so every other draw of the step is that of a run without it."""
    g = config.augment
    if g.labeled_jitter_prob == 0 and g.labeled_blur_prob == 0:
        return batch
    image_l = augment.labeled_photometric(jax.random.fold_in(key, LABELED_VIEW_FOLD), batch.image_l,
                                          jitter_prob=g.labeled_jitter_prob, blur_prob=g.labeled_blur_prob,
                                          value_range=nets.image_range, colour=_colour_settings(config))
    return dataclasses.replace(batch, image_l=image_l)


def equivariance_photometric(config: ml_collections.ConfigDict, nets: Networks, key: jax.Array,
                             images: jax.Array) -> jax.Array:
    """The equivariance term's second photometric view of the strong images: the strong view's
    jitter (augment.jitter's kind and ranges, augment.jitter_prob) and blur (augment.blur_prob),
    drawn anew; it moves no pixel, so the warp compared with the prediction is the only geometry."""
    g = config.augment
    return augment.labeled_photometric(key, images, jitter_prob=g.jitter_prob, blur_prob=g.blur_prob,
                                       value_range=nets.image_range, colour=_colour_settings(config))


def equivariance_mask(labels: jax.Array, confidences: jax.Array, num_classes: int, threshold: float) -> jax.Array:
    """Where the equivariance term compares predictions: confident foreground pixels (an
    ignore label, being no class, is never foreground)."""
    return (labels > 0) & (labels < num_classes) & (confidences >= threshold)


def arco_loss(params: dict, state: TrainState, batch: Batch, key: jax.Array, progress: jax.Array,
              config: ml_collections.ConfigDict, nets: Networks):
    """Total ARCO loss and what the step needs besides gradients: (loss, core.LossOutput) whose
    `terms` hold the unweighted value of every term (0 for terms whose weight is 0: their work
    is skipped) and whose `update` is (bank push, pool rows) for the ARCO state (None for what
    is not written).
    """
    a, w = config.arco, config.loss_weights
    keys = stage2_keys(key)
    own = state.methods["arco"]
    fwd = Forward(config, nets, params, state.teacher, state.batch_stats)
    num_labeled = batch.image_l.shape[0]
    arco_unlabeled = any(w[name] > 0 for name in ARCO_UNLABELED_TERMS)

    if arco_unlabeled:
        image_s, pseudo, confidence = strong_view(fwd, batch.image_u, keys["teacher_weak"], keys["strong"])

    # Every student input is built before the first student pass, so the passes can run as one
    # rematerialised loop (arco.remat_student). The labeled images have their own pass, and a
    # Mean Teacher term in a 'custom' mix the clean unlabeled images theirs.
    passes = {"labeled": (batch.image_l, keys["student_l"])}
    if w.consistency > 0:
        passes["clean"] = (batch.image_u, keys["clean_u"])
    if arco_unlabeled:
        passes["strong"] = (image_s, keys["student_u"])
    if w.eqv > 0:
        # Equivariance: student(T(x)) should match T(student(x)) on confident foreground.
        # A second photometric view of the strong images: same geometry as the prediction it
        # is compared with (the reference re-warps independently, misaligning the two).
        view = jnp.concatenate([batch.image_l, equivariance_photometric(config, nets, keys["eqv_view"], image_s)])
        matrices = augment.random_similarity(keys["eqv_warp"], view.shape[0], scale_range=tuple(a.eqv_scale),
                                             spatial_rank=view.ndim - 2)
        passes["eqv"] = (augment.warp_affine(view, matrices, order=1), keys["eqv_student"])
    out = fwd.student_passes(passes)

    logits_l, features_l = out["labeled"]
    zero = jnp.zeros((), jnp.float32)
    terms = dict.fromkeys(TERMS, zero)
    weights = {name: w[name] for name in TERMS}
    terms["sup"], sup_parts = losses.supervised_loss(logits_l, batch.label_l, config.data.ignore_label,
                                                      kind=config.loss.supervised)
    metrics = dict(sup_parts)
    if w.consistency > 0:
        terms["consistency"], fwd.teacher_batch_stats = consistency_term(
            keys["consistency"], config, nets, state.teacher, out["clean"][0], batch.image_u, fwd.teacher_batch_stats)
        weights["consistency"] = metrics["consistency_weight"] = consistency_weight(config, progress)
    if not arco_unlabeled:
        return _weighted_sum(weights, terms), LossOutput(terms, fwd.batch_stats, (None, None), metrics,
                                                         fwd.teacher_batch_stats)

    logits_u, features_u = out["strong"]
    # Padding of the rescale (no class, confidence 0) is no pseudo-label: out of the CE, the
    # weight and the logged fraction.
    valid = ((pseudo >= 0) & (pseudo < config.data.num_classes)) if rescales_unlabeled(config) else None
    if w.unsup > 0:
        terms["unsup"] = losses.pseudo_label_loss(logits_u, pseudo, confidence, a.confidence_threshold, valid)
    metrics["confident_fraction"] = losses.confident_fraction(confidence, a.confidence_threshold, valid)

    labels = jnp.concatenate([batch.label_l, pseudo])
    confidences = jnp.concatenate([jnp.ones_like(confidence[:num_labeled]), confidence])
    bank_push, pool_rows = None, None
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
        terms["contrast"], bank_push, contrast_metrics = contrastive_term(
            keys["contrast"], fwd, student, teacher, labels, teacher_probs, low, high, own.bank, num_labeled)
        metrics.update(contrast_metrics)
    if w.nn > 0:
        unlabeled = slice(num_labeled, None)
        student_emb = pooled_embedding(fwd, "student", student.rows(unlabeled), a.nn_grid)
        teacher_emb = pooled_embedding(fwd, "teacher", teacher.rows(unlabeled), a.nn_grid)
        terms["nn"] = losses.nearest_neighbour_loss(student_emb, teacher_emb, own.pool.rows, a.nn_topk)
        if a.nn_gradient == "reference":  # The reference's L_nn is a number that trains nothing.
            terms["nn"] = jax.lax.stop_gradient(terms["nn"])
        pool_rows = teacher_emb
    if w.eqv > 0:
        warped_logits, _ = out["eqv"]
        target = augment.warp_affine(jax.lax.stop_gradient(jnp.concatenate([logits_l, logits_u])), matrices, order=1)
        mask = equivariance_mask(labels, confidences, config.data.num_classes, a.eqv_confidence_threshold)
        warped_mask = augment.warp_affine(mask[..., None].astype(jnp.float32), matrices, order=1)[..., 0]
        terms["eqv"] = losses.equivariance_loss(warped_logits, target, warped_mask)

    return _weighted_sum(weights, terms), LossOutput(terms, fwd.batch_stats, (bank_push, pool_rows), metrics,
                                                     fwd.teacher_batch_stats)


def _weighted_sum(weights: dict, terms: dict) -> jax.Array:
    return sum(weights[name] * value for name, value in terms.items())
