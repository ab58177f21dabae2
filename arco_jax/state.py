"""How the train state starts: the networks, the optimizers and their schedules, the initial
TrainState (core.py defines it, and Batch and Networks, with no loss code; they are re-exported
here), with each method's own part built by that method (arco_jax/methods/); and how a
checkpoint of the layout before methods owned their parts is read."""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from arco_jax import methods, models
from arco_jax.data import registry
from arco_jax.config import parse_lr_multipliers
from arco_jax.core import Batch, Networks, TrainState, eval_variables  # noqa: F401  (re-exported)


# What each DatasetInfo.intensity leaves the images in (their photometric jitter clips to it).
# 'dataset' (a per-channel plan, e.g. CT scaled to [0, 1] beside a z-scored MR channel): no one range.
IMAGE_RANGES = {"minmax": (0.0, 1.0), "zscore": None, "imagenet": None, "dataset": None}


def build_networks(config: ml_collections.ConfigDict) -> Networks:
    """Modules computing in config.model.dtype; their parameters are always float32."""
    sizes = {"num_classes": config.data.num_classes, "in_channels": config.data.in_channels}
    dtype = jnp.dtype(config.model.dtype)
    return Networks(
        segmenter=models.build_segmenter(config.model, **sizes, dtype=dtype),
        head=models.build_head(config.model, **sizes, dtype=dtype),
        projector=models.build_projector(config.model, dtype),
        methods={m.name: modules for m in methods.stage_methods(config).values()
                 if (modules := m.networks(config)) is not None},
        image_range=IMAGE_RANGES[registry.info(config).intensity],
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


def create_train_state(config: ml_collections.ConfigDict, nets: Networks,
                       tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
    """Initialise the student; the teacher starts as an exact copy (segmenter and head); each
    method of the run adds its own part. Stage 2's method draws from the key the L_nn pool always
    drew from, stage 1's from a fold of its own (so stage 2's draws are those of a run without
    stage 1)."""
    init_key, dropout_key, method_key, state_key = jax.random.split(key, 4)
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
    outputs = methods.InitOutputs(params, logits, features)
    keys = {1: jax.random.fold_in(key, 1), 2: method_key}
    parts = {m.name: m.init_state(config, nets, outputs, keys[stage])
             for stage, m in methods.stage_methods(config).items()}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        teacher=jax.tree.map(jnp.copy, teacher),
        rng=state_key,
        bad_step=jnp.full((), -1, jnp.int32),
        bad_terms=jnp.zeros((len(term_names(config)),), bool),
        methods={name: part for name, part in parts.items() if part is not None},
    )


def stage_terms(config: ml_collections.ConfigDict) -> dict[int, tuple[str, ...]]:
    """{stage: the loss terms its method reports}, what the log line of a stage shows."""
    return {stage: m.terms for stage, m in methods.stage_methods(config).items()}


def term_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Order of TrainState.bad_terms and of the `loss_<term>` metrics every step reports (a term
    the current stage does not compute is 0): stage 2's terms, then stage 1's others, then the
    gradient."""
    terms = stage_terms(config)
    return tuple(dict.fromkeys(terms[2] + terms.get(1, ()))) + ("grad",)


# The layout before methods owned their parts: ARCO's bank and pool and stage 1's state were
# TrainState fields, and bad_terms followed this fixed order.
_LEGACY_TERMS = ("sup", "unsup", "contrast", "eqv", "nn", "consistency", "rel_global", "rel_local", "grad")


@flax.struct.dataclass
class _LegacyTrainState:
    """That layout, field for field (the order matters: the saved fingerprint follows it)."""

    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    teacher: dict
    bank: Any
    pool: Any
    rng: jax.Array
    bad_step: jax.Array
    bad_terms: jax.Array
    pretrain: Any = None


def is_legacy_layout(saved_names) -> bool:
    """Whether a checkpoint's leaf names ('bank/keys', ...) are of the layout before methods."""
    return any(name.split("/", 1)[0] in ("bank", "pool") for name in saved_names)


def legacy_layout(config: ml_collections.ConfigDict, saved_names, target: TrainState):
    """(what to restore a legacy checkpoint into, how to turn it into `target`'s layout), for a
    `target` of this config (abstract arrays with shardings), or None when no legacy checkpoint
    can be of this config. A legacy checkpoint has the bank and pool whatever its method: a run
    whose method has none drops them. None too when `saved_names` are of the current layout."""
    if not is_legacy_layout(saved_names):
        return None
    if not set(term_names(config)) <= set(_LEGACY_TERMS):
        return None  # A method that did not exist then: no legacy checkpoint can be of this run.
    placement = getattr(target.step, "sharding", None)
    arco = methods.get("arco")  # A legacy checkpoint has ARCO's state whatever its method.
    own = jax.eval_shape(lambda: arco.init_state(config, None, None, jax.random.key(0)))
    own = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=placement), own)
    own = target.methods.get("arco", own)
    legacy = _LegacyTrainState(
        step=target.step, params=target.params, batch_stats=target.batch_stats, opt_state=target.opt_state,
        teacher=target.teacher, bank=own.bank, pool=own.pool, rng=target.rng, bad_step=target.bad_step,
        bad_terms=jax.ShapeDtypeStruct((len(_LEGACY_TERMS),), jnp.bool_, sharding=placement),
        pretrain=target.methods.get("relational"))
    order = np.array([_LEGACY_TERMS.index(name) for name in term_names(config)])

    def convert(restored: _LegacyTrainState) -> TrainState:
        parts = {"arco": own.replace(bank=restored.bank, pool=restored.pool), "relational": restored.pretrain}
        bad_terms = jax.jit(lambda flags: flags[order], out_shardings=placement)(restored.bad_terms)
        return TrainState(step=restored.step, params=restored.params, batch_stats=restored.batch_stats,
                          opt_state=restored.opt_state, teacher=restored.teacher, rng=restored.rng,
                          bad_step=restored.bad_step, bad_terms=bad_terms,
                          methods={name: parts[name] for name in target.methods})

    return legacy, convert
