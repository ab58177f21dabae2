"""model.dtype = 'bfloat16': the networks compute in bfloat16 while parameters, optimizer state,
teacher and banks stay float32, and a train step runs with finite losses.

A bfloat16 step compiles separately from the float32 ones of test_step.py; the default run
uses the supervised term only (the cheapest full step), the slow one every term.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arco_jax import config as config_lib
from arco_jax import state as state_lib
from arco_jax.step import make_train_step
from tests.test_step import make_batch, tiny_config


def bf16_step(zero_optional_weights: bool):
    config = tiny_config(zero_optional_weights=zero_optional_weights)
    config.model.dtype = "bfloat16"
    config_lib.validate(config)
    nets = state_lib.build_networks(config)
    tx = state_lib.build_optimizer(config)
    state = jax.jit(lambda key: state_lib.create_train_state(config, nets, tx, key))(jax.random.PRNGKey(0))
    new_state, metrics = jax.jit(make_train_step(config, nets, tx))(state, make_batch(seed=0))
    return nets, state, new_state, jax.device_get(metrics)


def float_dtypes(tree) -> set[str]:
    return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def check_step(nets, state, new_state, metrics) -> None:
    for name in ("params", "opt_state", "teacher", "batch_stats", "methods"):
        assert float_dtypes(getattr(new_state, name)) <= {"float32"}, name
    for name, value in metrics.items():
        assert np.isfinite(value), name
    assert int(new_state.step) == 1 and int(new_state.bad_step) == -1
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, new_state.params)
    assert all(jax.tree.leaves(moved["segmenter"]))
    # The compute really is bfloat16: the decoder maps come out in it, the logits in float32.
    variables = {"params": new_state.params["segmenter"], "batch_stats": new_state.batch_stats}
    logits, features = nets.segmenter.apply(variables, make_batch(seed=1).image_l, train=False)
    assert logits.dtype == jnp.float32
    assert {f.dtype for f in features} == {jnp.dtype(jnp.bfloat16)}


def test_bfloat16_step_keeps_float32_state():
    check_step(*bf16_step(zero_optional_weights=True))


@pytest.mark.slow
def test_bfloat16_step_with_every_term():
    nets, state, new_state, metrics = bf16_step(zero_optional_weights=False)
    check_step(nets, state, new_state, metrics)
    for term in ("unsup", "contrast", "eqv", "nn"):
        assert metrics[f"loss_{term}"] > 0, term


def test_unknown_compute_dtype_names_the_field():
    config = tiny_config()
    config.model.dtype = "float16"
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.dtype: 'float16' is not one of"):
        config_lib.validate(config)
