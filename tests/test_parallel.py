"""The train step on a device mesh: one device and two (fake CPU) devices, with the batch split
over the 'data' axis, follow the same trajectory for the same global batch and seed, with the
student's passes separate and as one rematerialised loop (arco.remat_student)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from arco_jax import parallel, sampling
from arco_jax import state as state_lib
from arco_jax.objective import Batch, Forward
from arco_jax.step import make_train_step
from tests.test_step import make_batch, tiny_config

STEPS = 3


def trajectory(num_devices: int, remat: bool):
    config = tiny_config()
    config.arco.remat_student = remat
    mesh = parallel.make_mesh(num_devices)
    nets = state_lib.build_networks(config)
    tx = state_lib.build_optimizer(config)
    replicated = parallel.replicated(mesh)
    state = jax.jit(lambda key: state_lib.create_train_state(config, nets, tx, key),
                    out_shardings=replicated)(jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(config, nets, tx), in_shardings=(replicated, parallel.batch_sharding(mesh)),
                   out_shardings=(replicated, replicated), donate_argnums=0)
    losses = []
    for i in range(STEPS):
        batch = make_batch(seed=i)
        arrays = parallel.global_batch(mesh, {k: np.asarray(v) for k, v in vars(batch).items()})
        state, metrics = step(state, Batch(**arrays))
        losses.append({k: float(v) for k, v in jax.device_get(metrics).items() if k.startswith("loss")})
    return losses, jax.device_get(state.params), state


# The rematerialised loop over a sharded batch is a configuration users must ask for (remat_student
# resolves 'auto' to on only for a single CPU device); its no-collective property is checked below
# in every run, its trajectory only with the slow tests (two more compiled steps).
@pytest.fixture(scope="module", params=[False, pytest.param(True, marks=pytest.mark.slow)], ids=["separate", "remat"])
def runs(request):
    if len(jax.devices()) < 2:
        pytest.skip("needs two devices (tests/conftest.py sets XLA_FLAGS for two CPU devices)")
    return trajectory(1, request.param), trajectory(2, request.param)


def test_two_devices_follow_the_one_device_trajectory(runs):
    (losses_1, params_1, _), (losses_2, params_2, _) = runs
    for step, (a, b) in enumerate(zip(losses_1, losses_2)):
        for name in a:
            np.testing.assert_allclose(b[name], a[name], rtol=2e-4, atol=1e-5, err_msg=f"{name} at step {step}")
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-3, atol=1e-5), params_1, params_2)


def test_state_stays_replicated_over_the_mesh(runs):
    _, (_, _, state) = runs
    leaf = jax.tree.leaves(state.params)[0]
    assert len(leaf.sharding.device_set) == 2
    assert leaf.sharding.is_fully_replicated


def loop_bodies_with_collectives(hlo_text: str) -> list[str]:
    """Names of while-loop bodies of compiled HLO that contain a collective."""
    bodies = set(re.findall(r" while\(.*?body=%?([\w.\-]+)", hlo_text))
    found, computation = [], None
    for line in hlo_text.splitlines():
        if line and not line.startswith(" "):
            computation = line.split()[0].lstrip("%")
        elif computation in bodies and re.search(r" (all-reduce|all-gather|collective-permute|all-to-all|"
                                                 r"reduce-scatter)(-start)?\(", line):
            found.append(computation)
    return sorted(set(found))


def test_no_collective_runs_inside_a_loop_on_a_cpu_mesh():
    """XLA:CPU can deadlock two devices on a collective inside a loop body (parallel.py): the
    samplers' searches and the rematerialised student passes over a sharded batch have none."""
    if len(jax.devices()) < 2:
        pytest.skip("needs two devices")
    mesh = parallel.make_mesh(2)
    config = tiny_config()
    config.arco.remat_student = True
    nets = state_lib.build_networks(config)
    state = jax.eval_shape(lambda: state_lib.create_train_state(config, nets, state_lib.build_optimizer(config),
                                                                 jax.random.key(0, impl="rbg")))
    images = jax.ShapeDtypeStruct((4, 32, 32, 1), np.float32, sharding=parallel.batch_sharding(mesh))
    keys = jax.eval_shape(lambda: jax.random.key(0, impl="rbg"))

    def loss(params, batch_stats, a, b, key_a, key_b):
        out = Forward(config, nets, params, {}, batch_stats).student_passes({"a": (a[:2], key_a), "b": (b, key_b)})
        return sum(jnp.sum(logits) for logits, _ in out.values())

    hlo = jax.jit(jax.grad(loss)).lower(state.params, state.batch_stats, images, images, keys, keys).compile().as_text()
    assert loop_bodies_with_collectives(hlo) == []

    mask = jax.ShapeDtypeStruct((3, 4 * 32 * 32), bool, sharding=NamedSharding(mesh, P(None, parallel.DATA_AXIS)))
    for method in ("uniform", "sg", "sag"):
        sample = jax.vmap(lambda k, m, method=method: sampling.sample(k, m, 16, method=method))
        hlo = jax.jit(sample).lower(jax.eval_shape(lambda: jax.random.split(jax.random.key(0, impl="rbg"), 3)),
                                    mask).compile().as_text()
        assert loop_bodies_with_collectives(hlo) == [], method
