"""The jitted updates of both stages, and the guard that freezes the state at the last good
step when anything becomes non-finite.

Stage 1 (relational pretraining, pretrain.py): SGD on the segmenter and the stage-1 heads, EMA
teacher, queue updates. Stage 2 (ARCO): the
ARCO loss and gradients, SGD, EMA teacher, bank and pool updates. Both are pure functions
(state, batch) -> (state, metrics); jit them with donation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from arco_jax import memory, pretrain
from arco_jax.core import Batch
from arco_jax.objective import arco_loss
from arco_jax.state import LOSS_TERM_NAMES, Networks, TrainState, learning_rate, stage2_progress


def _ema(new, old, decay: float):
    return optax.incremental_update(new, old, 1.0 - decay)


def _guarded(state: TrainState, updated: TrainState, terms: dict, grads) -> tuple[TrainState, jax.Array, dict]:
    """`updated` if every term and the gradient are finite (and nothing failed before), else
    `state` with the first failure recorded. Returns (state, whether the step was good, the
    terms completed with 0 for terms of the other stage, plus the gradient norm)."""
    zero = jnp.zeros((), jnp.float32)
    terms = {name: terms.get(name, zero) for name in LOSS_TERM_NAMES[:-1]}
    grad_norm = optax.tree.norm(grads)
    finite = jnp.stack([jnp.isfinite(terms[name]) for name in LOSS_TERM_NAMES[:-1]] + [jnp.isfinite(grad_norm)])
    good = jnp.all(finite) & (state.bad_step < 0)
    new_state = jax.tree.map(lambda new, old: jnp.where(good, new, old), updated, state)
    first_bad = (state.bad_step < 0) & ~jnp.all(finite)
    new_state = new_state.replace(
        bad_step=jnp.where(first_bad, state.step, state.bad_step),
        bad_terms=jnp.where(first_bad, ~finite, state.bad_terms),
    )
    return new_state, good, {**{f"loss_{name}": value for name, value in terms.items()}, "grad_norm": grad_norm}


def make_train_step(config: ml_collections.ConfigDict, nets: Networks, tx: optax.GradientTransformation):
    """Stage 2: train_step(state, batch) -> (state, metrics)."""
    decay = config.arco.ema_decay
    start = config.pretrain.steps

    def train_step(state: TrainState, batch: Batch):
        key = jax.random.fold_in(state.rng, state.step)
        stage_step = state.step - start
        progress = stage2_progress(config, state.step)
        grad_fn = jax.value_and_grad(arco_loss, has_aux=True)
        (loss, (terms, batch_stats, bank_push, pool_rows, metrics)), grads = grad_fn(
            state.params, state, batch, key, progress, config, nets)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        student = {"segmenter": params["segmenter"], "head": params["head"]}
        teacher = {
            "params": _ema(student, state.teacher["params"], decay),
            "batch_stats": _ema(batch_stats, state.teacher["batch_stats"], decay),
        }
        pool = state.pool if pool_rows is None else memory.push_embedding_pool(state.pool, pool_rows)
        updated = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                opt_state=opt_state, teacher=teacher, pool=pool)
        new_state, good, guard_metrics = _guarded(state, updated, terms, grads)
        if bank_push is not None:  # Written after the guard, into the donated bank: no second copy.
            new_state = new_state.replace(bank=memory.push_class_bank(
                state.bank, bank_push.keys, jnp.where(good, bank_push.written, 0)))
        return new_state, {**metrics, **guard_metrics, "loss": loss, "lr": learning_rate(config, stage_step)}

    return train_step


def make_pretrain_step(config: ml_collections.ConfigDict, nets: Networks):
    """Stage 1: pretrain_step(state, batch) -> (state, metrics). After the step that reaches
    pretrain.steps, the caller applies pretrain.hand_over (a separate call: inside this jit XLA
    may compute the student's BatchNorm statistics twice, for the student and for its teacher
    copy, and the two could differ in the last bit)."""
    if config.pretrain.steps <= 0:
        raise ValueError(f"config.pretrain.steps is {config.pretrain.steps}: there is no stage 1 to step")
    tx = pretrain.build_pretrain_optimizer(config)
    decay = config.pretrain.ema_decay

    def pretrain_step(state: TrainState, batch: Batch):
        rel = state.pretrain
        key = jax.random.fold_in(state.rng, state.step)
        trainable = {"segmenter": state.params["segmenter"], "heads": rel.params}
        grad_fn = jax.value_and_grad(pretrain.relational_loss, has_aux=True)
        (loss, (terms, batch_stats, (global_rows, local_rows), metrics)), grads = grad_fn(
            trainable, state, batch, key, config, nets)
        updates, opt_state = tx.update(grads, rel.opt_state, trainable)
        new = optax.apply_updates(trainable, updates)
        heads = new["heads"]
        teacher = {
            "params": {**state.teacher["params"],
                       "segmenter": _ema(new["segmenter"], state.teacher["params"]["segmenter"], decay)},
            "batch_stats": _ema(batch_stats, state.teacher["batch_stats"], decay),
        }
        teacher_heads = _ema({"global_head": heads["global_head"], "local_head": heads["local_head"]},
                             rel.teacher, decay)
        updated = state.replace(
            step=state.step + 1, params={**state.params, "segmenter": new["segmenter"]}, batch_stats=batch_stats,
            teacher=teacher,
            pretrain=rel.replace(params=heads, teacher=teacher_heads, opt_state=opt_state,
                                 global_queue=memory.push_embedding_pool(rel.global_queue, global_rows),
                                 local_queue=memory.push_embedding_pool(rel.local_queue, local_rows)))
        new_state, _, guard_metrics = _guarded(state, updated, terms, grads)
        return new_state, {**metrics, **guard_metrics, "loss": loss,
                           "lr": pretrain.pretrain_learning_rate(config, state.step)}

    return pretrain_step
