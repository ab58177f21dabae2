"""Stage 1, relational pretraining (pretrain.py has the loss), run for config.pretrain.steps
before stage 2: SGD of its own on the segmenter and its heads, the EMA teacher, its queues; it
owns its heads (Networks.methods['relational']) and their parameters, optimizer state and
queues (TrainState.methods['relational']). After its last step the student is handed over to
stage 2's teacher (pretrain.hand_over)."""
from __future__ import annotations

import jax
import ml_collections
import optax

from arco_jax import memory, pretrain, step
from arco_jax.core import Batch, Networks, TrainState
from arco_jax.methods.base import InitOutputs, Method


def make_pretrain_step(config: ml_collections.ConfigDict, nets: Networks, tx=None):
    """pretrain_step(state, batch) -> (state, metrics); `tx` (stage 2's) is not used. After the
    step that reaches pretrain.steps, the caller applies the method's `finish` (a separate call:
    inside this jit XLA may compute the student's BatchNorm statistics twice, for the student and
    for its teacher copy, and the two could differ in the last bit)."""
    own_tx = pretrain.build_pretrain_optimizer(config)
    decay = config.pretrain.ema_decay

    def pretrain_step(state: TrainState, batch: Batch):
        rel = state.methods["relational"]
        key = jax.random.fold_in(state.rng, state.step)
        trainable = {"segmenter": state.params["segmenter"], "heads": rel.params}
        grad_fn = jax.value_and_grad(pretrain.relational_loss, has_aux=True)
        (loss, (terms, (batch_stats, teacher_stats), (global_rows, local_rows), metrics)), grads = grad_fn(
            trainable, state, batch, key, config, nets)
        updates, opt_state = own_tx.update(grads, rel.opt_state, trainable)
        new = optax.apply_updates(trainable, updates)
        heads = new["heads"]
        teacher = {
            "params": {**state.teacher["params"],
                       "segmenter": step.ema(new["segmenter"], state.teacher["params"]["segmenter"], decay)},
            "batch_stats": step.teacher_running_stats(config, teacher_stats, batch_stats,
                                                      state.teacher["batch_stats"], decay),
        }
        teacher_heads = step.ema({"global_head": heads["global_head"], "local_head": heads["local_head"]},
                                 rel.teacher, decay)
        own = rel.replace(params=heads, teacher=teacher_heads, opt_state=opt_state,
                          global_queue=memory.push_embedding_pool(rel.global_queue, global_rows),
                          local_queue=memory.push_embedding_pool(rel.local_queue, local_rows))
        updated = state.replace(
            step=state.step + 1, params={**state.params, "segmenter": new["segmenter"]}, batch_stats=batch_stats,
            teacher=teacher, methods={**state.methods, "relational": own})
        new_state, _, guard_metrics = step.guarded(config, state, updated, terms, grads)
        return new_state, {**metrics, **guard_metrics, "loss": loss,
                           "lr": pretrain.pretrain_learning_rate(config, state.step)}

    return pretrain_step


def _init_state(config: ml_collections.ConfigDict, nets: Networks, outputs: InitOutputs, key: jax.Array):
    return pretrain.init_relational_state(config, nets.methods["relational"], outputs.params["segmenter"],
                                          outputs.logits, outputs.features, key)


METHOD = Method(name="relational", stage=1, terms=pretrain.TERMS, make_step=make_pretrain_step,
                networks=pretrain.build_relational_networks, init_state=_init_state, finish=pretrain.hand_over)
