"""The jitted ARCO train step on a tiny config: parameter, teacher, bank and pool updates,
metrics, skipped work for zero-weight terms, the non-finite guard and determinism.

Compiling the whole step takes most of this file's time, so exactly two configs are built
(every term on, every optional term off), each compiled once in a module-scoped fixture;
every other case reuses those executables with different states or batches of the same shape.
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from arco_jax import config as config_lib
from arco_jax import state as state_lib
from arco_jax import core, objective
from arco_jax.core import LossOutput
from arco_jax.objective import Batch
from arco_jax.state import stage2_progress
from arco_jax.step import make_stage2_step, make_train_step
from arco_jax.data import registry

NUM_CLASSES = 3
SIZE = 32
BATCH = 2
OPTIONAL_TERMS = ("unsup", "contrast", "eqv", "nn")


def _no_data(config):
    raise AssertionError("the step tests build their batches themselves (make_batch)")


# The step tests need a 3-class dataset and read no data: one is declared here.
STEP_DATASET = registry.DatasetSpec(
    name="step_tests_three_classes", fields=dict, validate=lambda config: None, open=_no_data,
    info=lambda config: registry.DatasetInfo(num_classes=NUM_CLASSES, class_names=("inner", "outer")))
if STEP_DATASET.name not in registry.names():
    registry.register(STEP_DATASET)


def tiny_config(zero_optional_weights: bool = False):
    c = config_lib.base_config()
    registry.select(c, STEP_DATASET.name)
    c.data.patch_size = (SIZE, SIZE)
    c.data.batch_labeled = BATCH
    c.data.batch_unlabeled = BATCH
    c.model.unet.features = (4, 8, 8, 16, 16)
    c.model.rep_dim = 16
    a = c.arco
    a.num_anchors = 8
    a.num_negatives = 4
    a.bank_size = 64
    a.bank_size_background = 128
    a.bank_enqueue = 16
    a.nn_grid = 2
    a.nn_pool_size = 4
    a.nn_topk = 2
    a.confidence_threshold = 0.0  # every pixel confident: the pseudo-label term is never 0
    c.train.steps = 20
    if zero_optional_weights:
        for term in OPTIONAL_TERMS:
            c.loss_weights[term] = 0.0
    config_lib.validate(c)
    return c


def make_batch(seed: int, label_classes=tuple(range(NUM_CLASSES))) -> Batch:
    rng = np.random.default_rng(seed)
    images = rng.random((2, BATCH, SIZE, SIZE, 1)).astype(np.float32)
    labels = rng.choice(np.asarray(label_classes), (BATCH, SIZE, SIZE)).astype(np.int32)
    return Batch(image_l=jnp.asarray(images[0]), label_l=jnp.asarray(labels), image_u=jnp.asarray(images[1]))


def to_numpy(tree):
    def leaf(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)
    return jax.tree.map(leaf, tree)


def assert_trees_equal(actual, expected, skip=()):
    """Bitwise equality of two pytrees of the same structure, naming the first differing path."""
    actual_leaves, actual_def = jax.tree_util.tree_flatten_with_path(to_numpy(actual))
    expected_leaves, expected_def = jax.tree_util.tree_flatten_with_path(to_numpy(expected))
    assert actual_def == expected_def
    for (path, a), (_, b) in zip(actual_leaves, expected_leaves):
        name = jax.tree_util.keystr(path)
        if any(s in name for s in skip):
            continue
        np.testing.assert_array_equal(a, b, err_msg=name)


def state_fields_equal(actual, expected, skip=()):
    for field in ("step", "params", "batch_stats", "opt_state", "teacher", "methods", "rng",
                  "bad_step", "bad_terms"):
        if field not in skip:
            assert_trees_equal(getattr(actual, field), getattr(expected, field))


@pytest.fixture(scope="module")
def full():
    """Every term on: config, networks, optimizer, initial state, compiled step, first result."""
    config = tiny_config()
    nets = state_lib.build_networks(config)
    tx = state_lib.build_optimizer(config)
    # rbg keys: the same semantics as the default threefry, several times faster to compile on CPU.
    state0 = jax.jit(lambda key: state_lib.create_train_state(config, nets, tx, key))(
        jax.random.key(0, impl="rbg"))
    step = jax.jit(make_train_step(config, nets, tx))  # no donation: tests reuse the old state
    batch = make_batch(1)
    state1, metrics1 = step(state0, batch)
    # What the step would give parameters that received no gradient at all (weight decay only).
    zero_grad_params = jax.jit(lambda s: optax.apply_updates(
        s.params, tx.update(jax.tree.map(jnp.zeros_like, s.params), s.opt_state, s.params)[0]))(state0)
    return types.SimpleNamespace(config=config, nets=nets, tx=tx, state0=state0, step=step,
                                 batch=batch, state1=state1, metrics1=metrics1,
                                 zero_grad_params=zero_grad_params)


@pytest.fixture(scope="module")
def zero(full):
    """Every optional loss weight 0 (same networks and shapes): compiled step, first result."""
    config = tiny_config(zero_optional_weights=True)
    step = jax.jit(make_train_step(config, full.nets, full.tx))
    state1, metrics1 = step(full.state0, full.batch)
    return types.SimpleNamespace(config=config, step=step, state1=state1, metrics1=metrics1)


def max_gradient_effect(new_params, zero_grad_params) -> float:
    """Largest distance of a parameter from where weight decay alone would have put it."""
    return max(float(np.max(np.abs(a - b))) for a, b in
               zip(jax.tree.leaves(to_numpy(new_params)), jax.tree.leaves(to_numpy(zero_grad_params))))


def assert_only_weight_decay(new_params, zero_grad_params):
    """The parameters moved exactly as a zero gradient would move them (up to float rounding)."""
    for a, b in zip(jax.tree.leaves(to_numpy(new_params)), jax.tree.leaves(to_numpy(zero_grad_params))):
        np.testing.assert_allclose(a, b, rtol=3e-7, atol=1e-12)


# ----------------------------------------------------------------------------- one good step


def test_step_moves_every_network_by_its_gradient(full):
    state0, state1 = full.state0, full.state1
    assert int(state1.step) == 1 and int(state0.step) == 0
    for part in ("segmenter", "head", "projector"):
        # Not just weight decay: the loss reached every part (projector via contrast and L_nn).
        assert max_gradient_effect(state1.params[part], full.zero_grad_params[part]) > 1e-5, part
    assert max_gradient_effect(state1.batch_stats, state0.batch_stats) > 1e-6
    assert int(state1.bad_step) == -1
    assert not np.asarray(state1.bad_terms).any()
    assert_trees_equal(state1.rng, state0.rng)  # the per-step key is folded in, not stored


def test_teacher_is_the_ema_of_the_updated_student(full):
    state0 = full.state0
    # A teacher that differs from the student everywhere, so old-teacher and old-student terms
    # cannot be confused.
    teacher = jax.tree.map(lambda x: 1.05 * x + 0.01, state0.teacher)
    shifted = state0.replace(teacher=teacher)
    new, _ = full.step(shifted, full.batch)
    decay = full.config.arco.ema_decay
    assert set(new.teacher["params"]) == {"segmenter", "head"}  # the projector is student-only
    old_t, new_t, new_s = to_numpy(teacher), to_numpy(new.teacher), to_numpy(new.params)
    for part in ("segmenter", "head"):
        expected = jax.tree.map(lambda t, s: decay * t.astype(np.float64) + (1 - decay) * s,
                                old_t["params"][part], new_s[part])
        for got, want in zip(jax.tree.leaves(new_t["params"][part]), jax.tree.leaves(expected)):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # BatchNorm running statistics: those the teacher's own train-mode passes of this step leave
    # (core.teacher_pass, as PyTorch moves the reference teacher's buffers), from its old ones;
    # not an average of the student's.
    key, progress = jax.random.fold_in(shifted.rng, shifted.step), stage2_progress(full.config, shifted.step)
    _, out = jax.jit(lambda s: objective.arco_loss(s.params, s, full.batch, key, progress, full.config,
                                                   full.nets))(shifted)
    for got, want in zip(jax.tree.leaves(new_t["batch_stats"]), jax.tree.leaves(to_numpy(out.teacher_batch_stats))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)  # another compilation: the last bits differ
    averaged = jax.tree.map(lambda t, s: decay * t + (1 - decay) * s, old_t["batch_stats"], to_numpy(new.batch_stats))
    assert max(float(np.max(np.abs(a - b))) for a, b in
               zip(jax.tree.leaves(new_t["batch_stats"]), jax.tree.leaves(averaged))) > 1e-3


def test_teacher_pass_moves_its_running_statistics_only_in_train_mode(full):
    """Train mode: flax's BatchNorm update from the statistics it is given (the teacher's by
    default); eval mode: those statistics, unchanged, and the outputs of an eval-mode apply."""
    teacher = jax.tree.map(lambda x: 1.05 * x + 0.01, full.state0.teacher)
    images, key = full.batch.image_l, jax.random.key(3)
    variables = {"params": teacher["params"]["segmenter"], "batch_stats": teacher["batch_stats"]}
    expected, updated = full.nets.segmenter.apply(variables, images, train=True, rngs={"dropout": key},
                                                  mutable=["batch_stats"])
    outputs, stats = core.teacher_pass(full.nets, teacher, images, key, True)
    assert_trees_equal(outputs, tuple(expected))
    assert_trees_equal(stats, updated["batch_stats"])
    _, chained = core.teacher_pass(full.nets, teacher, images, key, True, batch_stats=stats)
    _, twice = full.nets.segmenter.apply({**variables, "batch_stats": updated["batch_stats"]}, images, train=True,
                                         rngs={"dropout": key}, mutable=["batch_stats"])
    assert_trees_equal(chained, twice["batch_stats"])
    outputs, stats = core.teacher_pass(full.nets, teacher, images, key, False)
    assert_trees_equal(outputs, tuple(full.nets.segmenter.apply(variables, images, train=False)))
    assert_trees_equal(stats, teacher["batch_stats"])


def test_a_loss_without_teacher_statistics_has_the_teacher_follow_the_students(full):
    """LossOutput.teacher_batch_stats None (the teacher ran no train-mode pass): the teacher's
    running statistics are the EMA of the student's, as its parameters."""
    def student_stats_only(params, state, batch, key, progress, config, nets):
        stats = jax.tree.map(lambda x: x + 1.0, state.batch_stats)
        return jnp.sum(jax.tree.leaves(params["segmenter"])[0] ** 2), LossOutput({"sup": jnp.float32(0)}, stats, None, {})

    step = jax.jit(make_stage2_step(full.config, full.nets, full.tx, student_stats_only))
    new, _ = step(full.state0, full.batch)
    decay = full.config.arco.ema_decay
    expected = jax.tree.map(lambda t, s: decay * t + (1 - decay) * (s + 1.0), to_numpy(full.state0.teacher["batch_stats"]),
                            to_numpy(full.state0.batch_stats))
    for got, want in zip(jax.tree.leaves(to_numpy(new.teacher["batch_stats"])), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_bank_receives_bank_enqueue_keys_for_every_present_class(full):
    bank0, bank = full.state0.methods["arco"].bank, full.state1.methods["arco"].bank
    enqueue = full.config.arco.bank_enqueue
    np.testing.assert_array_equal(bank0.count, 0)
    # The labels hold every class, and labeled pixels are always enqueue candidates.
    np.testing.assert_array_equal(bank.count, [enqueue] * NUM_CLASSES)
    np.testing.assert_array_equal(bank.pointer, [enqueue] * NUM_CLASSES)
    keys = np.asarray(bank.keys)
    np.testing.assert_allclose(np.linalg.norm(keys[:, :enqueue], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(keys[:, enqueue:], 0.0)


def test_bank_skips_a_class_absent_from_labels_and_pseudo_labels(full):
    state0 = full.state0
    # A teacher sure of the background everywhere gives all-background pseudo-labels; the
    # labeled images hold classes 0 and 1 only, so class 2 has no candidate pixel.
    teacher = jax.tree.map(lambda x: x, state0.teacher)
    out_conv = teacher["params"]["segmenter"]["out_conv"]
    out_conv["bias"] = out_conv["bias"] + jnp.array([30.0, 0.0, 0.0])
    new, metrics = full.step(state0.replace(teacher=teacher), make_batch(2, label_classes=(0, 1)))
    enqueue = full.config.arco.bank_enqueue
    np.testing.assert_array_equal(new.methods["arco"].bank.count, [enqueue, enqueue, 0])
    np.testing.assert_array_equal(new.methods["arco"].bank.pointer, [enqueue, enqueue, 0])
    np.testing.assert_array_equal(new.methods["arco"].bank.keys[2], 0.0)
    assert np.isfinite(float(metrics["loss"]))


def test_several_steps_fill_banks_to_capacity_and_follow_the_lr_schedule(full):
    state, o, a = full.state0, full.config.optim, full.config.arco
    capacities = np.array([a.bank_size_background] + [a.bank_size] * (NUM_CLASSES - 1))
    for t in range(5):
        state, metrics = full.step(state, make_batch(10 + t))
        np.testing.assert_allclose(float(metrics["lr"]),
                                   o.learning_rate * (1 - t / full.config.train.steps) ** o.poly_power,
                                   rtol=1e-6)
        pushed = (t + 1) * a.bank_enqueue
        np.testing.assert_array_equal(state.methods["arco"].bank.count, np.minimum(pushed, capacities))
        np.testing.assert_array_equal(state.methods["arco"].bank.pointer, pushed % capacities)
    assert int(state.step) == 5 and int(state.bad_step) == -1
    assert int(state.methods["arco"].pool.pointer) == 5 * BATCH % a.nn_pool_size


def test_pool_receives_one_embedding_per_unlabeled_image(full):
    pool0, pool = to_numpy(full.state0.methods["arco"].pool), to_numpy(full.state1.methods["arco"].pool)
    size = full.config.arco.nn_pool_size
    assert int(pool.pointer) == BATCH % size
    np.testing.assert_array_equal(pool.rows[BATCH:], pool0.rows[BATCH:])
    assert not np.any(np.all(np.isclose(pool.rows[:BATCH], pool0.rows[:BATCH]), axis=1))
    np.testing.assert_allclose(np.linalg.norm(pool.rows, axis=1), 1.0, rtol=1e-5)


def test_metrics_hold_every_term_and_the_weighted_total(full):
    metrics = {k: float(v) for k, v in full.metrics1.items()}
    for name in ("loss", "grad_norm", "lr", "sup_ce", "sup_dice") + tuple(f"loss_{t}" for t in config_lib.LOSS_TERMS):
        assert name in metrics, name
        assert np.isfinite(metrics[name]), name
    for term in config_lib.LOSS_TERMS:
        assert (metrics[f"loss_{term}"] > 0.0) == (full.config.loss_weights[term] > 0.0), term
    weights = full.config.loss_weights
    total = sum(weights[t] * metrics[f"loss_{t}"] for t in config_lib.LOSS_TERMS)
    np.testing.assert_allclose(metrics["loss"], total, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss_sup"], metrics["sup_ce"] + metrics["sup_dice"], rtol=1e-6)
    assert metrics["grad_norm"] > 0.0
    np.testing.assert_allclose(metrics["lr"], full.config.optim.learning_rate, rtol=1e-6)


def test_lr_metric_follows_the_poly_schedule_of_the_step_index(full):
    o, steps = full.config.optim, full.config.train.steps
    new, metrics = full.step(full.state0.replace(step=jnp.asarray(10, jnp.int32)), full.batch)
    assert int(new.step) == 11
    np.testing.assert_allclose(float(metrics["lr"]), o.learning_rate * (1 - 10 / steps) ** o.poly_power,
                               rtol=1e-6)


def test_learning_rate_equals_the_optimizers_schedule():
    config = tiny_config()
    o, steps = config.optim, config.train.steps
    schedule = optax.polynomial_schedule(init_value=o.learning_rate, end_value=0.0,
                                         power=o.poly_power, transition_steps=steps)
    for t in (0, 1, 7, 19, 20, 25):
        np.testing.assert_allclose(float(state_lib.learning_rate(config, t)), float(schedule(t)),
                                   rtol=1e-5, atol=1e-9)


def test_step_is_deterministic(full):
    again, metrics = full.step(full.state0, full.batch)
    state_fields_equal(again, full.state1)
    assert_trees_equal(metrics, full.metrics1)


# ----------------------------------------------------------------------------- zero weights


def test_zero_weight_terms_are_exactly_zero_and_their_work_skipped(full, zero):
    metrics = {k: float(v) for k, v in zero.metrics1.items()}
    for term in OPTIONAL_TERMS:
        assert metrics[f"loss_{term}"] == 0.0, term
    assert metrics["loss"] == metrics["loss_sup"] > 0.0
    new, old = zero.state1, full.state0
    assert int(new.step) == 1 and int(new.bad_step) == -1
    assert_trees_equal(new.methods["arco"].bank, old.methods["arco"].bank)
    assert_trees_equal(new.methods["arco"].pool, old.methods["arco"].pool)
    # Only the supervised term is left: it trains the segmenter; head and projector get no
    # gradient and move by weight decay alone.
    assert max_gradient_effect(new.params["segmenter"], full.zero_grad_params["segmenter"]) > 1e-5
    assert_only_weight_decay(new.params["head"], full.zero_grad_params["head"])
    assert_only_weight_decay(new.params["projector"], full.zero_grad_params["projector"])


# ----------------------------------------------------------------------------- non-finite guard


def with_nan(batch: Batch, field: str) -> Batch:
    image = np.asarray(getattr(batch, field)).copy()
    image[0, 5, 7, 0] = np.nan
    return Batch(**{**batch.__dict__, field: jnp.asarray(image)})


def expected_bad_terms(config, metrics) -> np.ndarray:
    values = [metrics[f"loss_{t}"] for t in state_lib.term_names(config)[:-1]] + [metrics["grad_norm"]]
    return ~np.isfinite(np.asarray(values, np.float32))


def test_non_finite_labeled_batch_freezes_the_state(full):
    good = full.state1  # step 1, so bad_step must name the step index, not 0
    frozen, metrics = full.step(good, with_nan(full.batch, "image_l"))
    state_fields_equal(frozen, good, skip=("bad_step", "bad_terms"))
    assert int(frozen.bad_step) == 1
    bad_terms = np.asarray(frozen.bad_terms)
    np.testing.assert_array_equal(bad_terms, expected_bad_terms(full.config, metrics))
    names = state_lib.term_names(full.config)
    assert bad_terms[names.index("sup")] and bad_terms[names.index("grad")]

    # A good batch afterwards does not unfreeze it, nor move the recorded failure.
    still, metrics_after = full.step(frozen, full.batch)
    assert np.all(np.isfinite([float(v) for v in metrics_after.values()]))
    state_fields_equal(still, frozen)


def test_non_finite_unlabeled_batch_leaves_the_supervised_term_unmarked(full):
    good = full.state1
    frozen, metrics = full.step(good, with_nan(full.batch, "image_u"))
    state_fields_equal(frozen, good, skip=("bad_step", "bad_terms"))
    assert int(frozen.bad_step) == 1
    bad_terms = np.asarray(frozen.bad_terms)
    np.testing.assert_array_equal(bad_terms, expected_bad_terms(full.config, metrics))
    names = state_lib.term_names(full.config)
    # L_nn sees only the unlabeled images; the labeled CE + Dice stays finite.
    assert bad_terms[names.index("nn")] and bad_terms[names.index("grad")]
    assert not bad_terms[names.index("sup")]
