"""The train state (one pytree: student, teacher, optimizer, banks, rng) and how it starts."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from arco_jax import memory, models, pretrain
from arco_jax.config import LOSS_TERMS


@dataclasses.dataclass(frozen=True)
class Networks:
    """The Flax modules (static; parameters live in the TrainState)."""

    segmenter: nn.Module
    head: nn.Module
    projector: nn.Module
    relational: pretrain.RelationalNetworks  # stage-1 heads


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; saved whole by the checkpointer.

    params: {'segmenter', 'head', 'projector'} of the student.
    teacher: {'params': {'segmenter', 'head'}, 'batch_stats'}: the EMA teacher.
    step: the global step: [0, pretrain.steps) is stage 1, then train.steps of stage 2. The
      segmenter (params['segmenter'], batch_stats, teacher) is shared by both stages.
    opt_state: stage 2's optimizer (stage 1 has its own in `pretrain`, so stage 2 starts fresh).
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
    pretrain: pretrain.RelationalState | None = None


def build_networks(config: ml_collections.ConfigDict) -> Networks:
    """Modules computing in config.model.dtype; their parameters are always float32."""
    model_config = ml_collections.ConfigDict(config.model.to_dict())
    model_config.num_classes = config.data.num_classes
    dtype = jnp.dtype(config.model.dtype)
    return Networks(
        segmenter=models.build_segmenter(model_config, dtype),
        head=models.build_head(model_config, dtype),
        projector=models.build_projector(model_config, dtype),
        relational=pretrain.build_relational_networks(config),
    )


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """SGD with Nesterov momentum, L2 weight decay added to the gradient (as torch.optim.SGD),
    poly learning-rate decay lr0 (1 - t/T)^power."""
    o = config.optim
    schedule = optax.polynomial_schedule(
        init_value=o.learning_rate, end_value=0.0, power=o.poly_power, transition_steps=config.train.steps)
    return optax.chain(
        optax.add_decayed_weights(o.weight_decay),
        optax.sgd(schedule, momentum=o.momentum, nesterov=o.nesterov),
    )


def learning_rate(config: ml_collections.ConfigDict, step) -> jax.Array:
    """Stage 2's learning rate at its own step count (global step - pretrain.steps)."""
    o = config.optim
    frac = jnp.clip(step / config.train.steps, 0.0, 1.0)
    return o.learning_rate * (1.0 - frac) ** o.poly_power


def bank_capacities(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    a = config.arco
    return (a.bank_size_background,) + (a.bank_size,) * (config.data.num_classes - 1)


def nn_embedding_dim(config: ml_collections.ConfigDict) -> int:
    return config.model.rep_dim * config.arco.nn_grid ** 2


def create_train_state(config: ml_collections.ConfigDict, nets: Networks,
                       tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
    """Initialise the student; the teacher starts as an exact copy (segmenter and head)."""
    h, w = config.data.patch_size
    init_key, dropout_key, pool_key, state_key = jax.random.split(key, 4)
    dummy = jnp.zeros((1, h, w, config.model.in_channels), jnp.float32)
    variables = nets.segmenter.init({"params": init_key, "dropout": dropout_key}, dummy, train=False)
    logits, features = nets.segmenter.apply(variables, dummy, train=False)
    head_params = nets.head.init(jax.random.fold_in(init_key, 1), features)["params"]
    rep = jnp.zeros((1, config.model.rep_dim), jnp.float32)
    projector_params = nets.projector.init(jax.random.fold_in(init_key, 2), rep)["params"]
    params = {"segmenter": variables["params"], "head": head_params, "projector": projector_params}
    batch_stats = variables.get("batch_stats", {})
    teacher = {
        "params": {"segmenter": params["segmenter"], "head": params["head"]},
        "batch_stats": batch_stats,
    }
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        teacher=jax.tree.map(jnp.copy, teacher),
        bank=memory.init_class_bank(bank_capacities(config), config.model.rep_dim),
        pool=memory.init_embedding_pool(pool_key, config.arco.nn_pool_size, nn_embedding_dim(config)),
        rng=state_key,
        bad_step=jnp.full((), -1, jnp.int32),
        bad_terms=jnp.zeros((len(LOSS_TERM_NAMES),), bool),
        # Its own key stream: the stage-2 draws above are those of a run without stage 1.
        pretrain=pretrain.init_relational_state(config, nets.relational, params["segmenter"], logits, features,
                                                jax.random.fold_in(key, 1)) if config.pretrain.steps > 0 else None,
    )


# Order of the loss terms in TrainState.bad_terms (and in the step's metrics, where a term the
# current stage does not compute is 0), then the gradient.
STAGE_TERMS = {1: pretrain.TERMS, 2: LOSS_TERMS}
LOSS_TERM_NAMES = tuple(dict.fromkeys(LOSS_TERMS + pretrain.TERMS)) + ("grad",)
