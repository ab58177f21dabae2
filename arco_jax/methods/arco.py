"""ARCO stage 2 (config.method 'arco_ns', 'arco_sg', 'arco_sag', and 'custom' mixes with an ARCO
term): the loss is objective.arco_loss; the method owns the per-class banks of teacher
representations (the contrastive term's negatives) and the L_nn pool of pooled embeddings."""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from arco_jax import memory, objective, step
from arco_jax.methods.base import InitOutputs, Method


@flax.struct.dataclass
class ArcoState:
    """TrainState.methods['arco']."""

    bank: memory.ClassBank
    pool: memory.EmbeddingPool


def bank_capacities(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    a = config.arco
    return (a.bank_size_background,) + (a.bank_size,) * (config.data.num_classes - 1)


def nn_embedding_dim(config: ml_collections.ConfigDict) -> int:
    """L_nn's pooled embedding: rep_dim per cell of an nn_grid^r grid over the r spatial axes."""
    return config.model.rep_dim * config.arco.nn_grid ** config.data.spatial_rank


def init_arco_state(config: ml_collections.ConfigDict, key: jax.Array) -> ArcoState:
    """Empty banks; a pool of random unit vectors (as the reference), so L_nn is defined at once."""
    return ArcoState(bank=memory.init_class_bank(bank_capacities(config), config.model.rep_dim),
                     pool=memory.init_embedding_pool(key, config.arco.nn_pool_size, nn_embedding_dim(config)))


def write(own: ArcoState, update, good: jax.Array) -> ArcoState:
    """The step's bank push and pool rows, kept only for a good step."""
    bank_push, pool_rows = update
    pool = own.pool
    if pool_rows is not None:
        pushed = memory.push_embedding_pool(own.pool, pool_rows)
        pool = jax.tree.map(lambda new, old: jnp.where(good, new, old), pushed, own.pool)
    bank = own.bank
    if bank_push is not None:  # Into the donated bank: no second copy.
        bank = memory.push_class_bank(own.bank, bank_push.keys, jnp.where(good, bank_push.written, 0))
    return ArcoState(bank=bank, pool=pool)


def _init_state(config: ml_collections.ConfigDict, nets, outputs: InitOutputs, key: jax.Array) -> ArcoState:
    return init_arco_state(config, key)


METHOD = Method(name="arco", stage=2, terms=objective.TERMS, init_state=_init_state,
                make_step=lambda config, nets, tx: step.make_stage2_step(
                    config, nets, tx, objective.arco_loss, write, "arco", labeled_view=objective.labeled_view))
