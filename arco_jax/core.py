"""The pytrees every training stage shares (TrainState, Batch, Networks) and the two network
applications every loss makes (the student's train-mode forward, the teacher's forward).

This module imports no loss code, so the stages (objective.py: stage 2 and the baselines;
pretrain.py: stage 1) and the state builders (state.py) all import it and none of them
imports another.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import optax

from arco_jax import memory


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
    relational: Any  # stage 1's heads (pretrain.RelationalNetworks)


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; saved whole by the checkpointer.

    params: {'segmenter', 'head', 'projector'} of the student.
    teacher: {'params': {'segmenter', 'head'}, 'batch_stats'}: the EMA teacher.
    step: the global step: [0, pretrain.steps) is stage 1, then train.steps of stage 2. The
      segmenter (params['segmenter'], batch_stats, teacher) is shared by both stages.
    opt_state: stage 2's optimizer (stage 1 has its own in `pretrain`, so stage 2 starts fresh).
    bank, pool: stage 2's (ARCO's) class banks and L_nn pool.
    pretrain: stage 1's heads, optimizer and queues (pretrain.RelationalState); None when stage 1
      is skipped. Kept through stage 2 so the pytree, and a checkpoint of it, never changes shape.
    bad_step: -1 while every loss term stayed finite; otherwise the first step that was not
      (the state is then frozen at the last good step so nothing good is overwritten).
    """

    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    teacher: dict
    bank: memory.ClassBank
    pool: memory.EmbeddingPool
    rng: jax.Array
    bad_step: jax.Array
    bad_terms: jax.Array
    pretrain: Any = None


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
    """(logits, features) of the EMA teacher's segmenter, constant for the gradient. In train
    mode (the reference) it uses dropout and batch statistics; its running statistics are not
    updated either way."""
    variables = {"params": teacher["params"]["segmenter"], "batch_stats": teacher["batch_stats"]}
    if train_mode:
        (logits, features), _ = nets.segmenter.apply(variables, images, train=True, rngs={"dropout": key},
                                                     mutable=["batch_stats"])
    else:
        logits, features = nets.segmenter.apply(variables, images, train=False)
    return jax.lax.stop_gradient((logits, features))
