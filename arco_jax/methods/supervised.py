"""The labeled-only baseline: the supervised loss on the labeled images, nothing else. It owns no
state; the unlabeled half of the batch is drawn (one data stream for every method) and unused."""
from __future__ import annotations

import jax
import ml_collections

from arco_jax import losses, objective, step
from arco_jax.core import Batch, LossOutput, Networks, TrainState, stage2_keys, student_forward
from arco_jax.methods.base import Method


def labeled_loss(params: dict, state: TrainState, batch: Batch, key: jax.Array, progress: jax.Array,
                 config: ml_collections.ConfigDict, nets: Networks):
    """loss_weights.sup (loss.supervised: CE + Dice or CE) on one train-mode student pass over the labeled images."""
    (logits, _), batch_stats = student_forward(nets, params["segmenter"], state.batch_stats, batch.image_l,
                                               stage2_keys(key)["student_l"])
    sup, parts = losses.supervised_loss(logits, batch.label_l, config.data.ignore_label, kind=config.loss.supervised)
    return config.loss_weights.sup * sup, LossOutput({"sup": sup}, batch_stats, None, dict(parts))


METHOD = Method(name="supervised", stage=2, terms=("sup",),
                make_step=lambda config, nets, tx: step.make_stage2_step(
                    config, nets, tx, labeled_loss, labeled_view=objective.labeled_view))
