"""Stage 1 (relational pretraining) and its hand-over to stage 2.

The loss and the window pooling are checked against hand-made cases and plain loops; the
jitted stage-1 step on a tiny config (compiled once in a module fixture); the boundary; the
skip flag (pretrain.steps = 0 leaves today's stage-2 run untouched); and the whole job,
run uninterrupted and interrupted in stage 1 and at the boundary, ending bit for bit equal.
"""
import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from arco_jax import pretrain, train
from arco_jax import state as state_lib
from arco_jax.config import ConfigError, validate
from arco_jax.models.relational import pooled_windows, window_starts
from arco_jax.step import make_pretrain_step, make_train_step
from arco_jax.data import registry
from tests.test_step import BATCH, assert_trees_equal, make_batch, tiny_config, to_numpy

PRETRAIN_STEPS = 12  # long enough for the poly schedule to leave room to fit a batch
QUEUE = 6


def tiny_two_stage_config(pretrain_steps: int = PRETRAIN_STEPS, labeled_only: bool = True):
    """test_step's tiny config with a small stage 1 (16 px windows -> 9 per 32 px image)."""
    c = tiny_config(zero_optional_weights=labeled_only)
    p = c.pretrain
    p.steps = pretrain_steps
    p.window = 16
    p.window_grid = 4
    p.queue_size = QUEUE
    p.global_dim = 32
    validate(c)
    return c


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- the loss

def test_similarity_kl_on_a_hand_made_queue():
    queue = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    student = np.array([[2.0, 0.0]])  # cosines with the queue: 1, 0, -1
    teacher = np.array([[0.0, 3.0]])  # cosines: 0, 1, 0
    t_s, t_t = 0.5, 0.25
    p_t = softmax(np.array([0.0, 1.0, 0.0]) / t_t)
    p_s = softmax(np.array([1.0, 0.0, -1.0]) / t_s)
    expected = np.sum(p_t * np.log(p_t / p_s))
    got = pretrain.similarity_kl(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(queue), t_s, t_t)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_local_similarity_compares_each_window_with_the_same_window_of_the_queue():
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(2, 3, 4, 5))  # (B, windows, D)
    queue = rng.normal(size=(7, 4, 5))  # (K, windows, D)
    got = pretrain.similarity_kl(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(queue), 0.1, 0.2)
    per_window = [pretrain.similarity_kl(jnp.asarray(student[:, w]), jnp.asarray(teacher[:, w]),
                                         jnp.asarray(queue[:, w]), 0.1, 0.2) for w in range(4)]
    np.testing.assert_allclose(float(got), np.mean(per_window), rtol=1e-5)


def test_similarity_kl_is_zero_on_agreement_and_gives_the_teacher_no_gradient():
    rng = np.random.default_rng(1)
    x, queue = jnp.asarray(rng.normal(size=(3, 4))), jnp.asarray(rng.normal(size=(5, 4)))
    np.testing.assert_allclose(float(pretrain.similarity_kl(x, x, queue, 0.1, 0.1)), 0.0, atol=1e-6)
    y = jnp.asarray(rng.normal(size=(3, 4)))
    d_student, d_teacher, d_queue = jax.grad(pretrain.similarity_kl, argnums=(0, 1, 2))(x, y, queue, 0.1, 0.1)
    assert float(jnp.abs(d_student).max()) > 0
    np.testing.assert_array_equal(d_teacher, 0.0)


def test_pooled_windows_match_a_loop_over_windows():
    rng = np.random.default_rng(2)
    maps = rng.normal(size=(2, 32, 24, 3)).astype(np.float32)
    window, grid = 16, 4
    got = np.asarray(pooled_windows(jnp.asarray(maps), window, grid))
    cell = window // grid
    expected = [maps[:, y:y + window, x:x + window].reshape(2, grid, cell, grid, cell, 3).mean(axis=(2, 4))
                for y in window_starts(32, window) for x in window_starts(24, window)]
    assert got.shape == (2, 3 * 2, grid, grid, 3)
    np.testing.assert_allclose(got, np.stack(expected, axis=1), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- the stage-1 step

@pytest.fixture(scope="module")
def stage1():
    """Initial state, compiled stage-1 step (no donation: tests reuse states), the trajectory
    over PRETRAIN_STEPS steps on fixed batches."""
    config = tiny_two_stage_config()
    nets = state_lib.build_networks(config)
    tx = state_lib.build_optimizer(config)
    state0 = jax.jit(lambda key: state_lib.create_train_state(config, nets, tx, key))(jax.random.key(0, impl="rbg"))
    step = jax.jit(make_pretrain_step(config, nets))
    states, metrics = [state0], []
    for i in range(PRETRAIN_STEPS):
        new, m = step(states[-1], make_batch(i))
        states.append(new)
        metrics.append({k: float(v) for k, v in m.items()})
    handed = jax.jit(pretrain.hand_over)(states[-1])
    return types.SimpleNamespace(config=config, nets=nets, tx=tx, step=step, states=states, metrics=metrics,
                                 handed=handed)


def test_stage1_steps_are_finite_and_fit_a_repeated_batch(stage1):
    for m in stage1.metrics:
        assert all(np.isfinite(v) for v in m.values()), m
        assert m["loss_rel_global"] > 0 and m["loss_rel_local"] > 0 and m["loss_sup"] > 0
        for term in ("unsup", "contrast", "eqv", "nn"):
            assert m[f"loss_{term}"] == 0.0
        p = stage1.config.pretrain
        np.testing.assert_allclose(m["loss"], m["loss_sup"] + p.global_weight * m["loss_rel_global"]
                                   + p.local_weight * m["loss_rel_local"], rtol=1e-5)
    # Labels the image's intensity decides: learnable in a few steps.
    batch = make_batch(9)
    labels = jnp.digitize(batch.image_l[..., 0], jnp.asarray([1 / 3, 2 / 3])).astype(jnp.int32)
    batch = type(batch)(image_l=batch.image_l, label_l=labels, image_u=batch.image_u)
    state, sup = stage1.states[0], []
    for _ in range(8):
        state, m = stage1.step(state, batch)
        sup.append(float(m["loss_sup"]))
    assert sup[-1] < sup[0] - 0.05, sup


def test_queues_are_fifo_of_this_batchs_teacher_embeddings(stage1):
    before, after = stage1.states[0].methods["relational"], stage1.states[1].methods["relational"]
    rows = 2 * BATCH  # labeled + unlabeled images
    for name in ("global_queue", "local_queue"):
        old, new = to_numpy(getattr(before, name)), to_numpy(getattr(after, name))
        assert int(new.pointer) == rows % QUEUE
        np.testing.assert_array_equal(new.rows[rows:], old.rows[rows:])
        assert not np.any(np.all(np.isclose(new.rows[:rows], old.rows[:rows]), axis=1))
    np.testing.assert_allclose(np.linalg.norm(to_numpy(after.global_queue.rows[:rows]), axis=1), 1.0, rtol=1e-5)
    windows, size = pretrain.local_embedding_size(stage1.config)
    local = to_numpy(after.local_queue.rows[:rows]).reshape(rows, windows, size)
    np.testing.assert_allclose(np.linalg.norm(local, axis=-1), 1.0, rtol=1e-5)  # each window a unit vector
    # The second push (rows 4, 5, 0, 1 of K = 6) wraps around and keeps rows 2, 3 of the first.
    wrapped = to_numpy(stage1.states[2].methods["relational"].global_queue)
    assert int(wrapped.pointer) == 2 * rows % QUEUE == 2
    np.testing.assert_array_equal(wrapped.rows[2:4], to_numpy(after.global_queue.rows[2:4]))
    assert not np.any(np.all(np.isclose(wrapped.rows[[4, 5, 0, 1]], to_numpy(after.global_queue.rows)[[4, 5, 0, 1]]),
                             axis=1))


def test_stage1_moves_the_segmenter_and_its_heads_and_leaves_stage2_alone(stage1):
    s0, s1 = stage1.states[0], stage1.states[1]
    for tree0, tree1 in ((s0.params["segmenter"], s1.params["segmenter"]), (s0.methods["relational"].params, s1.methods["relational"].params)):
        assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(to_numpy(tree0)),
                                                            jax.tree.leaves(to_numpy(tree1))))
    for field in ("opt_state", "rng"):
        assert_trees_equal(getattr(s1, field), getattr(s0, field))
    assert_trees_equal(s1.methods["arco"], s0.methods["arco"])
    assert_trees_equal(s1.params["head"], s0.params["head"])
    assert_trees_equal(s1.params["projector"], s0.params["projector"])
    # Teacher (segmenter and stage-1 heads): the EMA of the updated student.
    decay = stage1.config.pretrain.ema_decay
    expected = optax.incremental_update(s1.params["segmenter"], s0.teacher["params"]["segmenter"], 1 - decay)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 to_numpy(s1.teacher["params"]["segmenter"]), to_numpy(expected))
    expected_head = optax.incremental_update(s1.methods["relational"].params["global_head"], s0.methods["relational"].teacher["global_head"],
                                             1 - decay)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 to_numpy(s1.methods["relational"].teacher["global_head"]), to_numpy(expected_head))


def test_lr_metric_follows_the_stage1_poly_schedule(stage1):
    p = stage1.config.pretrain
    for i, m in enumerate(stage1.metrics):
        np.testing.assert_allclose(m["lr"], p.learning_rate * (1 - i / p.steps) ** p.poly_power, rtol=1e-6)


def test_boundary_hands_the_stage1_student_to_stage2_student_and_teacher(stage1):
    before, boundary = stage1.states[-1], stage1.handed
    assert int(boundary.step) == stage1.config.pretrain.steps
    assert not np.array_equal(to_numpy(jax.tree.leaves(before.teacher["params"]["segmenter"])[0]),
                              to_numpy(jax.tree.leaves(before.params["segmenter"])[0]))
    for field in ("step", "params", "batch_stats", "opt_state", "methods", "rng"):
        assert_trees_equal(getattr(boundary, field), getattr(before, field))  # only the teacher changes
    assert_trees_equal(boundary.teacher["params"]["segmenter"], boundary.params["segmenter"])
    assert_trees_equal(boundary.teacher["params"]["head"], boundary.params["head"])
    assert_trees_equal(boundary.teacher["batch_stats"], boundary.batch_stats)
    # Stage 2's optimizer has not moved: momentum zero, schedule at its start.
    assert_trees_equal(boundary.opt_state, stage1.tx.init(boundary.params))


def test_non_finite_stage1_input_freezes_the_state_and_names_the_terms(stage1):
    good = stage1.states[1]
    bad_batch = make_batch(3)
    bad_batch = type(bad_batch)(image_l=bad_batch.image_l.at[0, 0, 0, 0].set(jnp.nan),
                                label_l=bad_batch.label_l, image_u=bad_batch.image_u)
    frozen, _ = stage1.step(good, bad_batch)
    assert int(frozen.bad_step) == int(good.step)
    assert_trees_equal(frozen.params, good.params)
    assert_trees_equal(frozen.methods, good.methods)
    names = state_lib.term_names(stage1.config)
    flags = np.asarray(frozen.bad_terms)
    assert flags[names.index("sup")] and flags[names.index("rel_global")] and flags[names.index("grad")]


# ----------------------------------------------------------------------------- skipping stage 1

def test_skip_flag_builds_todays_state_and_no_stage1_step(stage1):
    config = tiny_two_stage_config(pretrain_steps=0)
    nets = state_lib.build_networks(config)
    skipped = jax.jit(lambda key: state_lib.create_train_state(config, nets, stage1.tx, key))(
        jax.random.key(0, impl="rbg"))
    assert set(skipped.methods) == {"arco"} and set(stage1.states[0].methods) == {"arco", "relational"}
    with_stage1 = stage1.states[0]
    for field in ("step", "params", "batch_stats", "opt_state", "teacher", "rng", "bad_step"):
        assert_trees_equal(getattr(skipped, field), getattr(with_stage1, field))
    assert_trees_equal(skipped.methods["arco"], with_stage1.methods["arco"])
    # The skipped run's flags cover its own terms only; none is set at the start.
    assert state_lib.term_names(config) == ("sup", "unsup", "contrast", "eqv", "nn", "consistency", "grad")
    assert not np.any(skipped.bad_terms) and not np.any(with_stage1.bad_terms)
    with pytest.raises(ValueError, match="pretrain.steps"):
        make_pretrain_step(config, nets)


def test_stage1_settings_are_validated_only_when_stage1_runs():
    config = tiny_two_stage_config(pretrain_steps=0)
    config.pretrain.window = 64  # larger than the 32 px patch: irrelevant while skipped
    validate(config)
    config.pretrain.steps = 2
    with pytest.raises(ConfigError, match="pretrain.window"):
        validate(config)
    config.pretrain.window, config.pretrain.window_grid = 16, 3
    with pytest.raises(ConfigError, match="pretrain.window_grid"):
        validate(config)
    config.pretrain.window_grid, config.pretrain.queue_size = 4, 3
    with pytest.raises(ConfigError, match="pretrain.queue_size"):
        validate(config)


# ----------------------------------------------------------------------------- the whole job

TRAINER_STAGE1, TRAINER_STAGE2 = 3, 3


def trainer_config(cache_dir):
    """Phantom of 32 px, 3 + 3 steps, labeled-only stage 2 (the stage-2 terms' resume is
    test_resume's subject), a checkpoint every 2 steps and at the boundary (step 3), on the
    two CPU devices of tests/conftest.py."""
    c = tiny_two_stage_config(pretrain_steps=TRAINER_STAGE1)
    c.data.num_classes = c.data.class_names = None  # the phantom's, not the step tests' dataset's
    registry.select(c, "phantom")
    c.data.cache_dir = str(cache_dir)
    c.data.phantom.splits = (3, 1, 1)
    c.data.phantom.image_size = 32
    c.data.phantom.slices = (3, 4)
    c.data.labeled_patients = 1
    c.data.num_workers = 0
    c.train.steps = TRAINER_STAGE2
    c.train.log_every = 1
    c.train.eval_every = 2
    c.train.checkpoint_every = 2
    c.train.keep_checkpoints = 10  # keep them all: the boundary's is compared too
    c.eval.slice_batch_size = 8
    return c


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, monkeypatch_module):
    """The job uninterrupted, and interrupted twice (preemption at step 2, in stage 1, and at
    step 3, the boundary) then finished. Compiling is most of the cost, so the step functions
    are built once and shared (each compiles once for all four runs), and the initial state is
    computed once and handed to every run (what each run's own init would compute)."""
    made = {}

    def once(make):
        def build(config, nets, *rest):
            return made.setdefault(make.__name__, make(config, nets, *rest))
        return build

    base = tmp_path_factory.mktemp("two_stage")
    config = trainer_config(base / "phantom")
    init = functools.partial(state_lib.create_train_state, config, state_lib.build_networks(config),
                             state_lib.build_optimizer(config))
    initial = jax.jit(init)(jax.random.PRNGKey(config.seed))
    monkeypatch_module.setattr(train, "create_train_state", lambda config, nets, tx, key: initial)
    monkeypatch_module.setattr(train, "make_pretrain_step", once(make_pretrain_step))
    monkeypatch_module.setattr(train, "make_train_step", once(make_train_step))
    whole = base / "whole"
    results = train.train_and_evaluate(config, whole)

    parts = base / "parts"
    for stop_at in (2, TRAINER_STAGE1):
        monkeypatch_module.setattr(train.PreemptionWatch, "reached", lambda self, step, at=stop_at: step == at)
        with pytest.raises(train.Preempted):
            train.train_and_evaluate(config, parts)
    monkeypatch_module.setattr(train.PreemptionWatch, "reached", lambda self, step: False)
    resumed = train.train_and_evaluate(config, parts)
    return types.SimpleNamespace(config=config, whole=whole, parts=parts, results=results, resumed=resumed)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_job_runs_stage1_then_stage2_on_one_step_counter(jobs):
    train_lines = [r for r in records(jobs.whole) if r["split"] == "train"]
    assert [(r["step"], r["stage"]) for r in train_lines] == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)]
    assert train_lines[0]["loss_rel_global"] > 0 and train_lines[-1]["loss_rel_global"] == 0
    o, p = jobs.config.optim, jobs.config.pretrain
    assert train_lines[0]["lr"] == pytest.approx(p.learning_rate) and train_lines[3]["lr"] == pytest.approx(o.learning_rate)
    assert jobs.results["steps"] == 6 and jobs.results["pretrain_steps"] == TRAINER_STAGE1


def test_best_checkpoint_is_chosen_among_stage2_states_only(jobs):
    val = [r for r in records(jobs.whole) if r["split"] == "val"]
    assert [(r["step"], r["stage"]) for r in val] == [(2, 1), (4, 2), (6, 2)]
    assert jobs.results["best_val"]["step"] in (4, 6)


def test_resume_in_stage1_and_at_the_boundary_matches_the_uninterrupted_run(jobs):
    final = lambda workdir: train_module_state(workdir, 6)  # noqa: E731
    assert_trees_equal(final(jobs.parts), final(jobs.whole))
    assert_trees_equal(train_module_state(jobs.parts, TRAINER_STAGE1), train_module_state(jobs.whole, TRAINER_STAGE1))
    strip = lambda rs: [{k: v for k, v in r.items() if k != "steps_per_sec"} for r in rs]  # noqa: E731
    assert strip(records(jobs.parts)) == strip(records(jobs.whole))
    assert jobs.resumed["test"] == jobs.results["test"]


def test_boundary_checkpoint_holds_the_handed_over_state(jobs):
    saved = train_module_state(jobs.whole, TRAINER_STAGE1)
    assert_trees_equal(saved["teacher"]["params"]["segmenter"], saved["params"]["segmenter"])
    assert_trees_equal(saved["teacher"]["batch_stats"], saved["batch_stats"])


def test_stage2_trains_from_the_boundary_and_carries_stage1_state_untouched(jobs):
    boundary, last = train_module_state(jobs.whole, TRAINER_STAGE1), train_module_state(jobs.whole, 6)
    assert_trees_equal(last["methods"]["relational"], boundary["methods"]["relational"])
    assert not np.array_equal(jax.tree.leaves(last["params"]["segmenter"])[0],
                              jax.tree.leaves(boundary["params"]["segmenter"])[0])


def train_module_state(workdir, step):
    """A saved TrainState as a plain dict."""
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(workdir / "checkpoints" / "last")
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
