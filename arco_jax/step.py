"""The jitted update: ARCO loss and gradients, SGD, EMA teacher, bank and pool updates, and a
guard that freezes the state at the last good step when anything becomes non-finite."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from arco_jax import memory
from arco_jax.objective import Batch, arco_loss
from arco_jax.state import LOSS_TERM_NAMES, Networks, TrainState, learning_rate


def make_train_step(config: ml_collections.ConfigDict, nets: Networks, tx: optax.GradientTransformation):
    """train_step(state, batch) -> (state, metrics); a pure function, jit it with donation."""
    decay = config.arco.ema_decay

    def train_step(state: TrainState, batch: Batch):
        key = jax.random.fold_in(state.rng, state.step)
        progress = state.step.astype(jnp.float32) / config.train.steps
        grad_fn = jax.value_and_grad(arco_loss, has_aux=True)
        (loss, (terms, batch_stats, bank, pool_rows, metrics)), grads = grad_fn(
            state.params, state, batch, key, progress, config, nets)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        student = {"segmenter": params["segmenter"], "head": params["head"]}
        teacher = {
            "params": optax.incremental_update(student, state.teacher["params"], 1.0 - decay),
            "batch_stats": optax.incremental_update(batch_stats, state.teacher["batch_stats"], 1.0 - decay),
        }
        pool = state.pool if pool_rows is None else memory.push_embedding_pool(state.pool, pool_rows)
        updated = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                opt_state=opt_state, teacher=teacher, bank=bank, pool=pool)

        grad_norm = optax.tree.norm(grads)
        finite = jnp.stack([jnp.isfinite(terms[name]) for name in LOSS_TERM_NAMES[:-1]]
                           + [jnp.isfinite(grad_norm)])
        good = jnp.all(finite) & (state.bad_step < 0)
        new_state = jax.tree.map(lambda new, old: jnp.where(good, new, old), updated, state)
        first_bad = (state.bad_step < 0) & ~jnp.all(finite)
        new_state = new_state.replace(
            bad_step=jnp.where(first_bad, state.step, state.bad_step),
            bad_terms=jnp.where(first_bad, ~finite, state.bad_terms),
        )
        metrics = {**metrics, **{f"loss_{name}": value for name, value in terms.items()},
                   "loss": loss, "grad_norm": grad_norm, "lr": learning_rate(config, state.step)}
        return new_state, metrics

    return train_step
