"""Stage 1: relational pretraining (ISD / MONA style), which the reference runs before ARCO.

The student learns the supervised loss on labeled images and, on every image of the batch,
to match the teacher's *relations*: the softmax over cosine similarities (temperature 0.1)
between an embedding of the image and a FIFO queue of 36 teacher embeddings of earlier
images. The loss is KL(teacher distribution || student distribution), for two embeddings:
  global: pooled bottleneck -> two linear layers -> 512-d (student: + a predictor);
  local: logits cut into windows, each pooled to grid x grid cells -> two 1x1 convolutions
    (student: + a predictor); window w of an image is compared with window w of the queued
    images (one distribution per window).
The teacher is an EMA of the student (segmenter and heads) and sees the student's view
blurred (the reference's RandomNoise is a Gaussian blur): student view = intensity jitter of
the weak view; teacher view = that, blurred with p = 0.5.

Where this departs from the reference (deliberately):
- Stage 1 draws the same batches as stage 2 (data.batch_labeled + data.batch_unlabeled, 4+4),
  not 3+3: one data stream whose position carries across the stage boundary.
- The reference lets the KL gradient reach the teacher heads through the softmax target (they
  are then both trained and EMA-averaged); here the teacher is constant, as in ISD.
- The reference flattens windows with raw reshapes that mix windows, images and channels
  before the local similarities; here each window is compared with the same window.
- The teacher heads start as copies of the student heads (the reference draws them apart).
- The reference shuffles the teacher batch (ShuffleBN); with batch statistics over the whole
  global batch that changes nothing here.

The hand-over to stage 2 (`hand_over`) is applied right after the last stage-1 step, before
anything is saved, so the state of the boundary step is already stage 2's starting point (and
applying it again on resume changes nothing): the stage-1 student becomes the stage-2 student
and teacher (segmenter, BatchNorm statistics, and the untouched FPN head);
stage 2's optimizer state is its own and still fresh (the reference loads the stage-1
student into both networks and builds a new optimizer).
"""
from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from arco_jax import augment, losses, memory
from arco_jax.core import Batch, Networks, TrainState, student_forward, teacher_pass
from arco_jax.models.relational import LinearPair, num_windows, pooled_windows

JITTER_STRENGTH = (0.8, 1.2)  # the reference's ColorJitter(brightness=0.2, contrast=0.2)
TERMS = ("sup", "rel_global", "rel_local")


@dataclasses.dataclass(frozen=True)
class RelationalNetworks:
    """Stage-1 heads (static modules; parameters live in RelationalState)."""

    global_head: LinearPair
    global_predictor: LinearPair
    local_head: LinearPair
    local_predictor: LinearPair


@flax.struct.dataclass
class RelationalState:
    """What only stage 1 needs: TrainState.methods['relational'], absent when stage 1 is skipped.

    params: student heads {'global_head', 'global_predictor', 'local_head', 'local_predictor'}.
    teacher: EMA heads {'global_head', 'local_head'}.
    opt_state: stage-1 SGD over {'segmenter': student segmenter, 'heads': params}.
    global_queue: (K, global_dim) teacher embeddings; local_queue: (K, windows * grid^2 * C).
    """

    params: dict
    teacher: dict
    opt_state: optax.OptState
    global_queue: memory.EmbeddingPool
    local_queue: memory.EmbeddingPool


def build_relational_networks(config: ml_collections.ConfigDict) -> RelationalNetworks:
    p, classes = config.pretrain, config.data.num_classes
    dtype = jnp.dtype(config.model.dtype)
    return RelationalNetworks(
        global_head=LinearPair(hidden=None, out=p.global_dim, dtype=dtype),
        global_predictor=LinearPair(hidden=p.global_dim, out=p.global_dim, dtype=dtype),
        local_head=LinearPair(hidden=2 * classes, out=classes, dtype=dtype),
        local_predictor=LinearPair(hidden=classes, out=classes, dtype=dtype),
    )


def build_pretrain_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Stage 1's SGD (momentum, L2 weight decay in the gradient), poly decay over its steps."""
    p = config.pretrain
    return optax.chain(optax.add_decayed_weights(p.weight_decay),
                       optax.sgd(pretrain_schedule(config), momentum=p.momentum, nesterov=p.nesterov))


def pretrain_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    p = config.pretrain
    return optax.polynomial_schedule(init_value=p.learning_rate, end_value=0.0, power=p.poly_power,
                                     transition_steps=max(p.steps, 1))


def pretrain_learning_rate(config: ml_collections.ConfigDict, step) -> jax.Array:
    """The stage-1 learning rate of the update from global step `step` (the schedule's own value)."""
    return pretrain_schedule(config)(step)


def local_embedding_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(windows per image, values per window embedding)."""
    p = config.pretrain
    patch = tuple(config.data.patch_size)
    return num_windows(patch, p.window), p.window_grid ** len(patch) * config.data.num_classes


def spatial_mean(maps: jax.Array) -> jax.Array:
    """(B, *spatial, C) -> (B, C) in float32: the global embedding's pooling."""
    return jnp.mean(maps.astype(jnp.float32), axis=tuple(range(1, maps.ndim - 1)))


def init_relational_state(config: ml_collections.ConfigDict, nets: RelationalNetworks, segmenter_params: dict,
                          logits: jax.Array, features: tuple, key: jax.Array) -> RelationalState:
    """Student heads drawn fresh, teacher heads their copies, queues of random unit vectors.
    `logits` and `features` are the segmenter's outputs on a dummy batch (for shapes)."""
    p = config.pretrain
    keys = jax.random.split(key, 6)
    pooled = spatial_mean(features[0])
    global_head = nets.global_head.init(keys[0], pooled)["params"]
    embedding = nets.global_head.apply({"params": global_head}, pooled)
    windows = pooled_windows(logits, p.window, p.window_grid)
    local_head = nets.local_head.init(keys[1], windows)["params"]
    params = {
        "global_head": global_head,
        "global_predictor": nets.global_predictor.init(keys[2], embedding)["params"],
        "local_head": local_head,
        "local_predictor": nets.local_predictor.init(keys[3], windows)["params"],
    }
    teacher = jax.tree.map(jnp.copy, {"global_head": global_head, "local_head": local_head})
    count, size = local_embedding_size(config)
    return RelationalState(
        params=params,
        teacher=teacher,
        opt_state=build_pretrain_optimizer(config).init({"segmenter": segmenter_params, "heads": params}),
        global_queue=memory.init_embedding_pool(keys[4], p.queue_size, p.global_dim),
        local_queue=memory.init_embedding_pool(keys[5], p.queue_size, count * size),
    )


def similarity_kl(student: jax.Array, teacher: jax.Array, queue: jax.Array, student_temperature: float,
                  teacher_temperature: float) -> jax.Array:
    """Mean KL(teacher || student) of the softmax over cosine similarities to the queue.

    student, teacher: (B, ..., D) embeddings; queue: (K, ..., D), the same middle axes (each
    window compared with the same window of the queued images). The teacher side is a
    constant target. Mean over B and the middle axes (torch's kl_div 'batchmean' per row).
    """
    queue = losses.l2_normalize(queue)
    # HIGHEST: the cosines are divided by temperatures of 0.1, which would magnify DEFAULT
    # precision's bfloat16 rounding (TPU) tenfold; the queue is a few dozen rows.
    similarity = lambda x: jnp.einsum("b...d,k...d->b...k", losses.l2_normalize(x), queue,  # noqa: E731
                                      precision=jax.lax.Precision.HIGHEST)
    student_log_probs = jax.nn.log_softmax(similarity(student) / student_temperature, axis=-1)
    teacher_log_probs = jax.nn.log_softmax(jax.lax.stop_gradient(similarity(teacher)) / teacher_temperature, -1)
    kl = jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
    return jnp.mean(kl)


def _apply(module: LinearPair, params: dict, x: jax.Array) -> jax.Array:
    return module.apply({"params": params}, x)


def relational_loss(trainable: dict, state: TrainState, batch: Batch, key: jax.Array,
                    config: ml_collections.ConfigDict, nets: Networks):
    """Stage-1 loss of the student `trainable` = {'segmenter', 'heads'}.

    Returns (loss, (terms, (batch_stats, teacher_stats), queue_rows, metrics)): the student's
    and the teacher's running statistics after their passes (core.teacher_pass);
    queue_rows = (global, local) L2-normalised teacher embeddings of this batch, pushed into
    the queues after the update.
    """
    p, rel, r = config.pretrain, state.methods["relational"], nets.methods["relational"]
    jitter_key, blur_key, student_key, teacher_key = jax.random.split(key, 4)
    images = jnp.concatenate([batch.image_l, batch.image_u])
    student_view = augment.intensity_jitter(jitter_key, images, strength=JITTER_STRENGTH, value_range=nets.image_range)
    teacher_view = augment.gaussian_blur(blur_key, student_view)

    (logits, features), batch_stats = student_forward(nets, trainable["segmenter"], state.batch_stats, student_view,
                                                      student_key)
    # The reference's teacher (arco.teacher_train_mode): dropout on, batch statistics.
    (t_logits, t_features), teacher_stats = teacher_pass(nets, state.teacher, teacher_view, teacher_key,
                                                         config.arco.teacher_train_mode)
    t_bottleneck = t_features[0]

    sup, sup_parts = losses.supervised_loss(logits[:batch.image_l.shape[0]], batch.label_l, config.data.ignore_label,
                                            kind=config.loss.supervised)

    heads = trainable["heads"]
    global_student = _apply(r.global_predictor, heads["global_predictor"],
                            _apply(r.global_head, heads["global_head"], spatial_mean(features[0])))
    global_teacher = _apply(r.global_head, rel.teacher["global_head"], spatial_mean(t_bottleneck))

    batch_size, queue_size = images.shape[0], p.queue_size
    count, size = local_embedding_size(config)
    windows = lambda x: pooled_windows(x, p.window, p.window_grid)  # noqa: E731
    local_student = _apply(r.local_predictor, heads["local_predictor"],
                           _apply(r.local_head, heads["local_head"], windows(logits))).reshape(batch_size, count, size)
    local_teacher = _apply(r.local_head, rel.teacher["local_head"], windows(t_logits)).reshape(batch_size, count, size)

    temperatures = (p.student_temperature, p.teacher_temperature)
    terms = {
        "sup": sup,
        "rel_global": similarity_kl(global_student, global_teacher, rel.global_queue.rows, *temperatures),
        "rel_local": similarity_kl(local_student, local_teacher,
                                   rel.local_queue.rows.reshape(queue_size, count, size), *temperatures),
    }
    total = terms["sup"] + p.global_weight * terms["rel_global"] + p.local_weight * terms["rel_local"]
    queue_rows = (losses.l2_normalize(global_teacher),
                  losses.l2_normalize(local_teacher).reshape(batch_size, count * size))
    return total, (terms, (batch_stats, teacher_stats), queue_rows, dict(sup_parts))


def hand_over(state: TrainState) -> TrainState:
    """The stage-2 start: teacher := student (segmenter, FPN head, BatchNorm statistics)."""
    student = {"segmenter": state.params["segmenter"], "head": state.params["head"]}
    return state.replace(teacher=jax.tree.map(jnp.copy, {"params": student, "batch_stats": state.batch_stats}))
