"""What the train step holds in memory. arco.remat_student: the student's passes as one
rematerialised loop, with the separate passes' results wherever the batch-norm batches are the
same, the documented chunking where they are not, and less memory on the backend the tests run
on (XLA's buffer assignment)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arco_jax import config as config_lib
from arco_jax import objective, parallel
from arco_jax import state as state_lib
from arco_jax.objective import Batch, Forward
from arco_jax.step import make_train_step
from arco_jax.data import registry

SIZE = 32
BATCH = 2


def small_config(remat: bool, eqv: float = 1.0, size: int = SIZE):
    c = config_lib.base_config()
    registry.select(c, "phantom")
    c.data.patch_size = (size, size)
    c.data.batch_labeled = c.data.batch_unlabeled = BATCH
    c.model.unet.features = (4, 8, 8, 16, 16)
    c.model.rep_dim = 16
    a = c.arco
    a.num_anchors, a.num_negatives = 8, 4
    a.bank_size, a.bank_size_background, a.bank_enqueue = 32, 64, 8
    a.nn_grid, a.nn_pool_size, a.nn_topk = 2, 4, 2
    a.confidence_threshold = 0.0
    a.remat_student = remat
    c.loss_weights.eqv = eqv
    c.train.steps = 20
    config_lib.validate(c)
    return c


@pytest.fixture(scope="module")
def model():
    config = small_config(remat=False)
    nets = state_lib.build_networks(config)
    tx = state_lib.build_optimizer(config)
    # rbg keys: the same semantics as the default threefry, several times faster to compile on CPU.
    state = jax.jit(lambda key: state_lib.create_train_state(config, nets, tx, key))(jax.random.key(0, impl="rbg"))
    return nets, state


def rkey(seed: int) -> jax.Array:
    return jax.random.key(seed, impl="rbg")


def images(seed: int, count: int, size: int = SIZE) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).random((count, size, size, 1)), jnp.float32)


def run_passes(config, nets, state, passes):
    """Outputs, updated batch statistics, and the gradient of a scalar of every output."""
    def scalar(params):
        fwd = Forward(config, nets, params, state.teacher, state.batch_stats)
        out = fwd.student_passes(passes)
        total = sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(out))
        return total, (out, fwd.batch_stats)

    compiled = jax.jit(jax.value_and_grad(scalar, has_aux=True)).lower(state.params).compile()
    (_, (out, stats)), grads = compiled(state.params)
    return out, stats, grads, compiled.memory_analysis().temp_size_in_bytes


def assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_equal_passes_give_the_separate_passes_results(model, monkeypatch):
    # The test session has two CPU devices, on which the loop is unrolled; this one-device
    # computation gets the loop, as on a single CPU.
    monkeypatch.setattr(parallel, "collectives_in_loops_are_safe", lambda: True)
    nets, state = model
    passes = {"labeled": (images(0, BATCH), rkey(1)),
              "strong": (images(1, BATCH), rkey(2))}
    separate = run_passes(small_config(remat=False), nets, state, passes)
    looped = run_passes(small_config(remat=True), nets, state, passes)
    assert_trees_close(separate[0], looped[0])  # logits and features of each pass
    assert_trees_close(separate[1], looped[1])  # running statistics after both passes, in order
    assert_trees_close(separate[2], looped[2], rtol=1e-4)  # gradients
    # The point of the switch, checked on the backend that runs the tests: a checkpoint the
    # compiler schedules away (as it does outside a loop on XLA:CPU) would fail this.
    assert looped[3] < 0.7 * separate[3], (looped[3], separate[3])


def test_a_larger_pass_runs_as_chunks_with_their_own_batch_norm_batch_and_keys(model):
    nets, state = model
    key = rkey(3)
    double = images(2, 2 * BATCH)
    looped = run_passes(small_config(remat=True), nets, state,
                        {"labeled": (images(0, BATCH), rkey(1)), "eqv": (double, key)})
    first, second = jax.random.split(key)
    by_hand = run_passes(small_config(remat=False), nets, state,
                         {"labeled": (images(0, BATCH), rkey(1)),
                          "eqv_a": (double[0::2], first), "eqv_b": (double[1::2], second)})
    assert_trees_close(looped[0]["labeled"], by_hand[0]["labeled"])
    # Strided chunks (images 0, 2 and 1, 3), back in their places.
    joined = jax.tree.map(lambda a, b: jnp.stack([a, b], axis=1).reshape((-1,) + a.shape[1:]),
                          by_hand[0]["eqv_a"], by_hand[0]["eqv_b"])
    assert_trees_close(looped[0]["eqv"], joined)
    assert_trees_close(looped[1], by_hand[1])
    assert_trees_close(looped[2], by_hand[2], rtol=1e-4)


def batch(seed: int, size: int) -> Batch:
    rng = np.random.default_rng(seed)
    labels = jnp.asarray(rng.integers(0, 4, (BATCH, size, size)), jnp.int32)
    return Batch(image_l=images(seed, BATCH, size), label_l=labels, image_u=images(seed + 100, BATCH, size))


def loss_terms(config, nets, state, data):
    fn = jax.jit(lambda p: objective.arco_loss(p, state, data, rkey(7), jnp.float32(0.3), config, nets))
    return fn(state.params)[1][0]


@pytest.mark.slow  # two more compiled ARCO losses; the passes' equivalence is checked above
def test_arco_loss_changes_only_the_equivariance_term(model):
    """Labeled and strong passes are not cut, so every other term is unchanged; the
    equivariance pass of 2 BATCH images runs as two chunks."""
    nets, state = model
    separate = loss_terms(small_config(remat=False), nets, state, batch(5, SIZE))
    looped = loss_terms(small_config(remat=True), nets, state, batch(5, SIZE))
    for name in ("sup", "unsup", "contrast", "nn"):
        np.testing.assert_allclose(looped[name], separate[name], rtol=1e-5, err_msg=name)
    assert np.isfinite(looped["eqv"]) and looped["eqv"] > 0
    assert not np.isclose(looped["eqv"], separate["eqv"], rtol=1e-6)  # other batch-norm batches, other dropout


@pytest.mark.slow  # compiles a full ARCO step at large banks (about 60 s); memory_analysis needs no run
def test_the_step_writes_the_bank_in_place():
    """The bank, the state's largest array, is written into the donated buffer after the
    non-finite guard (memory.BankPush): a guard that selects between the old and the new bank
    would hold a second copy of it."""
    config = small_config(remat=False, size=16)
    config.arco.bank_size, config.arco.bank_size_background = 20000, 40000
    nets, tx = state_lib.build_networks(config), state_lib.build_optimizer(config)
    state = jax.eval_shape(lambda: state_lib.create_train_state(config, nets, tx, rkey(0)))
    data = jax.eval_shape(lambda: batch(0, 16))
    compiled = jax.jit(make_train_step(config, nets, tx), donate_argnums=0).lower(state, data).compile()
    bank = state.methods["arco"].bank
    bank_bytes = bank.keys.size * bank.keys.dtype.itemsize
    assert compiled.memory_analysis().temp_size_in_bytes < 0.5 * bank_bytes
