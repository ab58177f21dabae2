"""The pytrees every training method shares (TrainState, Batch, Networks), the key layout of a
stage-2 step, and the two network applications every loss makes (the student's train-mode
forward, the teacher's forward).

This module imports no loss code, so the methods (arco_jax/methods/: ARCO's objective.py,
stage 1's pretrain.py, the baselines) and the state builders (state.py) all import it and none
of them imports another.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import optax


@dataclasses.dataclass(frozen=True)
class Batch:
    """One global batch: labeled images and labels, unlabeled images (channels last, labels int32)."""

    image_l: jax.Array
    label_l: jax.Array
    image_u: jax.Array


jax.tree_util.register_dataclass(Batch, data_fields=["image_l", "label_l", "image_u"], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class Networks:
    """The Flax modules (static; parameters live in the TrainState)."""

    segmenter: nn.Module
    head: nn.Module
    projector: nn.Module
    methods: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # a method's own modules, by its name
    # The values the input images take, which the photometric augmentations keep them in: (0, 1)
    # for min-max normalised data, None for z-scored data (the dataset's DatasetInfo.intensity).
    image_range: tuple[float, float] | None = (0.0, 1.0)


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; saved whole by the checkpointer.

    params: {'segmenter', 'head', 'projector'} of the student.
    teacher: {'params': {'segmenter', 'head'}, 'batch_stats'}: the EMA teacher.
    step: the global step: [0, pretrain.steps) is stage 1, then train.steps of stage 2. The
      segmenter (params['segmenter'], batch_stats, teacher) is shared by both stages.
    opt_state: stage 2's optimizer (a stage-1 method keeps its own in its part of `methods`, so
      stage 2 starts fresh).
    methods: each method's own part, by method name, for the methods of this run that have one:
      'arco' holds the class banks and the L_nn pool, 'relational' (stage 1) its heads, optimizer
      and queues. A stage-1 part is kept through stage 2 so the pytree, and a checkpoint of it,
      never changes shape.
    bad_step: -1 while every loss term stayed finite; otherwise the first step that was not
      (the state is then frozen at the last good step so nothing good is overwritten).
    bad_terms: which of the run's terms (state.term_names) failed at bad_step.
    """

    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    teacher: dict
    rng: jax.Array
    bad_step: jax.Array
    bad_terms: jax.Array
    methods: dict = flax.struct.field(default_factory=dict)


# Named keys of a stage-2 step, derived from its key the same way whichever method runs, so
# the methods draw alike where they do the same thing (the labeled pass's dropout, say).
STAGE2_KEY_NAMES = ("teacher_weak", "strong", "student_l", "student_u", "teacher_l", "teacher_u", "contrast",
                    "eqv_view", "eqv_warp", "eqv_student")


def stage2_keys(key: jax.Array) -> dict[str, jax.Array]:
    """The named keys of one stage-2 step; 'clean_u' and 'consistency' are the Mean Teacher term's
    (the student's pass on the clean unlabeled images, the teacher's noise and dropout)."""
    keys = dict(zip(STAGE2_KEY_NAMES, jax.random.split(key, len(STAGE2_KEY_NAMES))))
    keys["clean_u"], keys["consistency"] = jax.random.split(jax.random.fold_in(key, len(STAGE2_KEY_NAMES)))
    return keys


class LossOutput(NamedTuple):
    """What a stage-2 loss returns beside the scalar: `terms`, the unweighted value of each term
    it computes; the student's updated BatchNorm statistics; `update`, what the method writes
    into its part of the state after the guard (None: nothing); scalar metrics; the teacher's
    running statistics after its passes (teacher_pass), or None where it ran none. The step keeps
    them as the teacher's when the teacher runs in train mode (step.teacher_running_stats)."""

    terms: dict
    batch_stats: dict
    update: Any
    metrics: dict
    teacher_batch_stats: dict | None = None


def eval_variables(state: TrainState, model: str) -> dict:
    """The Flax variables of the student's or the EMA teacher's segmenter (config.eval.model)."""
    if model == "teacher":
        return {"params": state.teacher["params"]["segmenter"], "batch_stats": state.teacher["batch_stats"]}
    if model == "student":
        return {"params": state.params["segmenter"], "batch_stats": state.batch_stats}
    raise ValueError(f"config.eval.model: {model!r} is not 'student' or 'teacher'")


def student_forward(nets: Networks, segmenter_params: dict, batch_stats: dict, images: jax.Array, key: jax.Array):
    """One train-mode student forward: ((logits, features), updated batch statistics)."""
    outputs, updated = nets.segmenter.apply({"params": segmenter_params, "batch_stats": batch_stats}, images,
                                            train=True, rngs={"dropout": key}, mutable=["batch_stats"])
    return outputs, updated["batch_stats"]


def teacher_forward(nets: Networks, teacher: dict, images: jax.Array, key: jax.Array, train_mode: bool):
    """(logits, features) of the EMA teacher's segmenter, constant for the gradient
    (teacher_pass without its running statistics)."""
    return teacher_pass(nets, teacher, images, key, train_mode)[0]


def teacher_pass(nets: Networks, teacher: dict, images: jax.Array, key: jax.Array, train_mode: bool,
                 batch_stats: dict | None = None):
    """((logits, features), running statistics) of one EMA-teacher pass, constant for the
    gradient. In train mode (the reference) it uses dropout and batch statistics and moves the
    BatchNorm running statistics it starts from (`batch_stats`, default the teacher's) as
    PyTorch's BatchNorm moves the buffers of the reference's EMA teacher, which runs in train
    mode and averages only its parameters; in eval mode it reads them and returns them as they
    were. The statistics a step's passes leave are the teacher's (LossOutput.teacher_batch_stats),
    so the teacher's eval-mode prediction (eval.model='teacher') normalises with statistics of
    its own activations."""
    stats = teacher["batch_stats"] if batch_stats is None else batch_stats
    variables = {"params": teacher["params"]["segmenter"], "batch_stats": stats}
    if train_mode:
        outputs, updated = nets.segmenter.apply(variables, images, train=True, rngs={"dropout": key},
                                                mutable=["batch_stats"])
        stats = updated["batch_stats"]
    else:
        outputs = nets.segmenter.apply(variables, images, train=False)
    return jax.lax.stop_gradient((tuple(outputs), stats))
