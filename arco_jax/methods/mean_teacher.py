"""Mean Teacher as SSL4MIS trains it: one student pass over the labeled and unlabeled images
together (one batch-norm batch), the supervised loss on the labeled part, and the ramped
consistency term (consistency.py) on the unlabeled part. It owns no state beyond the EMA teacher
every method has."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from arco_jax import losses, objective, step
from arco_jax.consistency import consistency_term, consistency_weight
from arco_jax.core import Batch, LossOutput, Networks, TrainState, stage2_keys, student_forward
from arco_jax.methods.base import Method


def mean_teacher_loss(params: dict, state: TrainState, batch: Batch, key: jax.Array, progress: jax.Array,
                      config: ml_collections.ConfigDict, nets: Networks):
    """w_sup sup + w_c(t) consistency, with w_c(t) the SSL4MIS ramp of loss_weights.consistency."""
    keys = stage2_keys(key)
    num_labeled = batch.image_l.shape[0]
    (logits, _), batch_stats = student_forward(nets, params["segmenter"], state.batch_stats,
                                               jnp.concatenate([batch.image_l, batch.image_u]), keys["student_l"])
    sup, parts = losses.supervised_loss(logits[:num_labeled], batch.label_l, config.data.ignore_label,
                                        kind=config.loss.supervised)
    consistency, teacher_stats = consistency_term(keys["consistency"], config, nets, state.teacher,
                                                  logits[num_labeled:], batch.image_u)
    weight = consistency_weight(config, progress)
    terms = {"sup": sup, "consistency": consistency}
    total = config.loss_weights.sup * sup + weight * consistency
    return total, LossOutput(terms, batch_stats, None, {**parts, "consistency_weight": weight}, teacher_stats)


METHOD = Method(name="mean_teacher", stage=2, terms=("sup", "consistency"),
                make_step=lambda config, nets, tx: step.make_stage2_step(
                    config, nets, tx, mean_teacher_loss, labeled_view=objective.labeled_view))
