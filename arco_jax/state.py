"""How the train state starts: the networks, the optimizers and their schedules, the initial
TrainState (core.py defines it, and Batch and Networks, with no loss code; they are re-exported
here)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from arco_jax import memory, models, pretrain
from arco_jax.config import LOSS_TERMS, parse_lr_multipliers
from arco_jax.core import Batch, Networks, TrainState, eval_variables  # noqa: F401  (re-exported)


def build_networks(config: ml_collections.ConfigDict) -> Networks:
    """Modules computing in config.model.dtype; their parameters are always float32."""
    sizes = {"num_classes": config.data.num_classes, "in_channels": config.data.in_channels}
    dtype = jnp.dtype(config.model.dtype)
    return Networks(
        segmenter=models.build_segmenter(config.model, **sizes, dtype=dtype),
        head=models.build_head(config.model, **sizes, dtype=dtype),
        projector=models.build_projector(config.model, dtype),
        relational=pretrain.build_relational_networks(config),
    )


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """SGD with Nesterov momentum, L2 weight decay added to the gradient (as torch.optim.SGD),
    poly learning-rate decay lr0 (1 - t/T)^power. config.optim.lr_multipliers scales the update (so
    the rate) of the parameter groups it names: optax.multi_transform, one such chain per group."""
    o = config.optim
    schedule = stage2_schedule(config)

    def sgd(multiplier: float = 1.0) -> optax.GradientTransformation:
        chain = [optax.add_decayed_weights(o.weight_decay), optax.sgd(schedule, momentum=o.momentum,
                                                                      nesterov=o.nesterov)]
        return optax.chain(*chain, optax.scale(multiplier)) if multiplier != 1.0 else optax.chain(*chain)

    groups = parse_lr_multipliers(o.get("lr_multipliers", ()))
    if not groups:  # Exactly the plain chain: the opt_state of existing checkpoints keeps its structure.
        return sgd()
    transforms = {"default": sgd(), **{f"group{i}": sgd(m) for i, (_, m) in enumerate(groups)}}
    return optax.multi_transform(transforms, functools.partial(_lr_group_labels, groups))


def param_path(path) -> str:
    """'segmenter/encoder0/conv1/kernel': the '/'-joined keys of a leaf of TrainState.params."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _lr_group_labels(groups, params) -> dict:
    """Each leaf's group: the first pattern that fully matches its path, else 'default'. A pattern
    matching no leaf at all is a typo that would silently train at the base rate: refused."""
    used = set()

    def label(path, _):
        name = param_path(path)
        for i, (pattern, _m) in enumerate(groups):
            if pattern.fullmatch(name):
                used.add(i)
                return f"group{i}"
        return "default"

    labels = jax.tree_util.tree_map_with_path(label, params)
    unused = [groups[i][0].pattern for i in range(len(groups)) if i not in used]
    if unused:
        example = param_path(jax.tree_util.tree_flatten_with_path(params)[0][0][0])
        raise ValueError(f"config.optim.lr_multipliers: {unused} match no parameter (paths look like {example!r}, "
                         "matched whole; an earlier pattern may take all its leaves)")
    return labels


def state_with_pretrained(state: TrainState, path: str) -> tuple[TrainState, int]:
    """A fresh state whose student segmenter (params and batch_stats) comes from the .npz at `path`
    (config.model.init_from), and whose teacher is an exact copy of it, as at init. Returns the
    number of leaves loaded; the optimizer state stays fresh (its momentum is zero). Loaded leaves are
    host arrays: place the state on the mesh afterwards (parallel.replicate)."""
    student, count = models.load_pretrained(
        {"params": state.params["segmenter"], "batch_stats": state.batch_stats}, path)
    # The teacher gets its own copies: equal values, no shared buffers (the step donates them).
    teacher = jax.tree.map(lambda x: np.array(x) if isinstance(x, np.ndarray) else jnp.copy(x), student)
    return state.replace(
        params={**state.params, "segmenter": student["params"]},
        batch_stats=student.get("batch_stats", {}),
        teacher={"params": {**state.teacher["params"], "segmenter": teacher["params"]},
                 "batch_stats": teacher.get("batch_stats", {})},
    ), count


def stage2_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Stage 2's poly learning rate lr0 (1 - t/T)^power over its own step count t."""
    o = config.optim
    return optax.polynomial_schedule(init_value=o.learning_rate, end_value=0.0, power=o.poly_power,
                                     transition_steps=config.train.steps)


def learning_rate(config: ml_collections.ConfigDict, step) -> jax.Array:
    """The rate the optimizer applies at stage-2 step `step` (global step - pretrain.steps): the
    schedule's own value, not a recomputation."""
    return stage2_schedule(config)(step)


def stage2_progress(config: ml_collections.ConfigDict, global_step) -> jax.Array:
    """t/T of stage 2 at a global step (stage 1's steps come first): what the reliability
    threshold alpha_t and the Mean Teacher ramp read."""
    return (global_step - config.pretrain.steps).astype(jnp.float32) / config.train.steps


def bank_capacities(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    a = config.arco
    return (a.bank_size_background,) + (a.bank_size,) * (config.data.num_classes - 1)


def nn_embedding_dim(config: ml_collections.ConfigDict) -> int:
    """L_nn's pooled embedding: rep_dim per cell of an nn_grid^r grid over the r spatial axes."""
    return config.model.rep_dim * config.arco.nn_grid ** config.data.spatial_rank


def create_train_state(config: ml_collections.ConfigDict, nets: Networks,
                       tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
    """Initialise the student; the teacher starts as an exact copy (segmenter and head)."""
    init_key, dropout_key, pool_key, state_key = jax.random.split(key, 4)
    dummy = jnp.zeros((1, *config.data.patch_size, config.data.in_channels), jnp.float32)
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
