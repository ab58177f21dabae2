"""What every method's jitted update shares: the EMA teacher update, the guard that freezes the
state at the last good step when anything becomes non-finite, and the stage-2 update skeleton
(loss and gradients, SGD, EMA teacher, the method's own state written after the guard).

A method's step is a pure function (state, batch) -> (state, metrics) built from these
(arco_jax/methods/); the trainer jits it with donation.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from arco_jax import methods
from arco_jax.core import Batch, LossOutput, Networks, TrainState
from arco_jax.state import learning_rate, stage2_progress, term_names


def ema(new, old, decay: float | jax.Array):
    """old + (1 - decay) (new - old), leaf by leaf: the teacher's update."""
    return optax.incremental_update(new, old, 1.0 - decay)


def teacher_decay(config: ml_collections.ConfigDict, stage_step: jax.Array) -> float | jax.Array:
    """The teacher's EMA decay at stage-2 step `stage_step` (0 at the stage's first step):
    arco.ema_decay, or with arco.ema_warmup SSL4MIS's min(1 - 1/(t + 1), ema_decay), which
    makes the first update a copy of the student and the teacher the students' running mean
    until the decay is reached. Without the warm-up, the Python float (the update's arithmetic
    as before the option existed, bit for bit)."""
    decay = config.arco.ema_decay
    if not config.arco.ema_warmup:
        return decay
    t = stage_step.astype(jnp.float32)
    return jnp.minimum(1.0 - 1.0 / (t + 1.0), jnp.float32(decay))


def teacher_running_stats(config: ml_collections.ConfigDict, passes_stats: dict | None, student_stats: dict,
                          teacher_stats: dict, decay: float | jax.Array) -> dict:
    """The teacher's BatchNorm running statistics after a step: those its train-mode passes left
    (core.teacher_pass); where it ran none, or in eval mode (its passes move none), the EMA of the
    student's, as its parameters."""
    if config.arco.teacher_train_mode and passes_stats is not None:
        return passes_stats
    return ema(student_stats, teacher_stats, decay)


def guarded(config: ml_collections.ConfigDict, state: TrainState, updated: TrainState, terms: dict,
            grads) -> tuple[TrainState, jax.Array, dict]:
    """`updated` if every term and the gradient are finite (and nothing failed before), else
    `state` with the first failure recorded. Returns (state, whether the step was good, the
    terms of the run (state.term_names; 0 for terms this step does not compute) as
    `loss_<term>`, plus the gradient norm)."""
    names = term_names(config)[:-1]
    unknown = set(terms) - set(names)
    if unknown:
        raise ValueError(f"the step computed terms {sorted(unknown)} that no method of this run declares")
    zero = jnp.zeros((), jnp.float32)
    terms = {name: terms.get(name, zero) for name in names}
    grad_norm = optax.tree.norm(grads)
    finite = jnp.stack([jnp.isfinite(terms[name]) for name in names] + [jnp.isfinite(grad_norm)])
    good = jnp.all(finite) & (state.bad_step < 0)
    new_state = jax.tree.map(lambda new, old: jnp.where(good, new, old), updated, state)
    first_bad = (state.bad_step < 0) & ~jnp.all(finite)
    new_state = new_state.replace(
        bad_step=jnp.where(first_bad, state.step, state.bad_step),
        bad_terms=jnp.where(first_bad, ~finite, state.bad_terms),
    )
    return new_state, good, {**{f"loss_{name}": value for name, value in terms.items()}, "grad_norm": grad_norm}


Stage2Loss = Callable[[dict, TrainState, Batch, jax.Array, jax.Array, ml_collections.ConfigDict, Networks],
                      tuple[jax.Array, LossOutput]]
"""loss(params, state, batch, key, progress, config, nets): progress is t/T of stage 2."""


LabeledView = Callable[[ml_collections.ConfigDict, Networks, Batch, jax.Array], Batch]


def make_stage2_step(config: ml_collections.ConfigDict, nets: Networks, tx: optax.GradientTransformation,
                     loss: Stage2Loss, write: Callable[[Any, Any, jax.Array], Any] | None = None,
                     name: str | None = None,
                     labeled_view: LabeledView | None = None):
    """train_step(state, batch) -> (state, metrics) of a stage-2 method: the labeled images of
    the batch take `labeled_view(config, nets, batch, key)` if given (the methods pass
    objective.labeled_view: ReCo's labeled jitter and blur, config.augment; loss code, so it is
    handed in, not imported here), then gradients of `loss` for every
    student parameter, `tx`, the EMA teacher (segmenter and head), the guard; then
    `write(own_state, update, good)` replaces state.methods[name] (the method's own part: it is
    written after the guard, so a bad step must leave it as it was when `good` is false)."""
    start = config.pretrain.steps

    def train_step(state: TrainState, batch: Batch):
        key = jax.random.fold_in(state.rng, state.step)
        if labeled_view is not None:
            batch = labeled_view(config, nets, batch, key)
        progress = stage2_progress(config, state.step)
        decay = teacher_decay(config, state.step - start)
        (total, out), grads = jax.value_and_grad(loss, has_aux=True)(state.params, state, batch, key, progress,
                                                                       config, nets)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        student = {"segmenter": params["segmenter"], "head": params["head"]}
        teacher = {
            "params": ema(student, state.teacher["params"], decay),
            "batch_stats": teacher_running_stats(config, out.teacher_batch_stats, out.batch_stats,
                                                 state.teacher["batch_stats"], decay),
        }
        updated = state.replace(step=state.step + 1, params=params, batch_stats=out.batch_stats,
                                opt_state=opt_state, teacher=teacher)
        new_state, good, guard_metrics = guarded(config, state, updated, out.terms, grads)
        if write is not None:  # Written after the guard, into the donated state: no second copy.
            new_state = new_state.replace(methods={**new_state.methods,
                                                   name: write(state.methods[name], out.update, good)})
        return new_state, {**out.metrics, **guard_metrics, "loss": total,
                           "lr": learning_rate(config, state.step - start)}

    return train_step


def make_train_step(config: ml_collections.ConfigDict, nets: Networks, tx: optax.GradientTransformation):
    """The stage-2 step of the method config.method runs."""
    return methods.stage_methods(config)[2].make_step(config, nets, tx)


def make_pretrain_step(config: ml_collections.ConfigDict, nets: Networks, tx: optax.GradientTransformation = None):
    """The stage-1 step (config.pretrain.steps > 0)."""
    if config.pretrain.steps <= 0:
        raise ValueError(f"config.pretrain.steps is {config.pretrain.steps}: there is no stage 1 to step")
    return methods.stage_methods(config)[1].make_step(config, nets, tx)
