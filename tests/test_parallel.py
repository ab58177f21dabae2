"""The train step on a device mesh: one device and two (fake CPU) devices, with the batch split
over the 'data' axis, follow the same trajectory for the same global batch and seed, with the
student's passes separate and as one rematerialised loop (arco.remat_student)."""
import jax
import numpy as np
import pytest

from arco_jax import parallel
from arco_jax import state as state_lib
from arco_jax.objective import Batch
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


@pytest.fixture(scope="module", params=[False, True], ids=["separate", "remat"])
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
