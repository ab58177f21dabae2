"""Checkpoints of the layout before methods owned their part of the train state (ARCO's bank and
pool and stage 1's state were TrainState fields; bad_terms had a fixed order of 9 names) are
read by today's code: resumed by the trainer's Checkpoints and restored for inference, into
today's layout, whatever the run's method."""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from arco_jax import inference, memory, methods
from arco_jax import state as state_lib
from arco_jax.checkpointing import Checkpoints
from tests import tiny

LEGACY_TERMS = ("sup", "unsup", "contrast", "eqv", "nn", "consistency", "rel_global", "rel_local", "grad")


@flax.struct.dataclass
class LegacyTrainState:
    """TrainState as it was."""

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
    pretrain: Any = None


class Streams:
    def get_state(self) -> dict:
        return {"labeled": {"next_index": 3}}

    def set_state(self, state: dict) -> None:
        self.state = state


def initial_state(config):
    nets, tx = state_lib.build_networks(config), state_lib.build_optimizer(config)
    return jax.jit(lambda key: state_lib.create_train_state(config, nets, tx, key))(jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def arco(tmp_path_factory):
    config = tiny.tiny_config(tmp_path_factory.mktemp("phantom"), narrow=True)
    state = initial_state(config)
    own = state.methods["arco"]
    # Something in every part: a pushed bank and pool, and a recorded failure of two terms.
    pushed = memory.push_class_bank(own.bank, jnp.ones((4, 3, own.bank.keys.shape[-1])), jnp.array([3, 0, 1, 2]))
    pool = memory.push_embedding_pool(own.pool, -own.pool.rows[:2])
    flags = np.isin(np.array(LEGACY_TERMS), ("contrast", "grad"))
    legacy = LegacyTrainState(step=state.step + 7, params=state.params, batch_stats=state.batch_stats,
                              opt_state=state.opt_state, teacher=state.teacher, bank=pushed, pool=pool,
                              rng=state.rng, bad_step=jnp.int32(5), bad_terms=jnp.asarray(flags))
    return config, state, legacy


def save_legacy(directory, legacy):
    checkpoints = Checkpoints(directory, keep=2, config_hash="h")
    checkpoints.save_last(7, legacy, Streams())
    checkpoints.close()


def test_the_trainer_resumes_a_legacy_checkpoint_into_todays_layout(arco, tmp_path):
    config, state, legacy = arco
    save_legacy(tmp_path, legacy)
    checkpoints = Checkpoints(tmp_path, keep=2, config_hash="h", legacy=functools.partial(state_lib.legacy_layout, config))
    streams = Streams()
    restored = checkpoints.restore_last(state, streams)
    checkpoints.close()
    assert isinstance(restored, state_lib.TrainState) and int(restored.step) == 7
    assert streams.state == {"labeled": {"next_index": 3}}
    for field in ("params", "batch_stats", "opt_state", "teacher", "rng", "bad_step"):
        jax.tree.map(np.testing.assert_array_equal, getattr(restored, field), getattr(legacy, field))
    jax.tree.map(np.testing.assert_array_equal, restored.methods["arco"].bank, legacy.bank)
    jax.tree.map(np.testing.assert_array_equal, restored.methods["arco"].pool, legacy.pool)
    # The failure flags follow their names into today's order.
    names = state_lib.term_names(config)
    assert [n for n, flag in zip(names, np.asarray(restored.bad_terms)) if flag] == ["contrast", "grad"]
    # A checkpoint of today's layout is not touched by the hook.
    assert state_lib.legacy_layout(config, ("methods/arco/bank/keys", "step"), state) is None


def test_a_legacy_baseline_checkpoint_drops_the_bank_and_pool_it_never_used(arco, tmp_path):
    config, _, legacy = arco
    supervised = methods.apply_method(tiny.tiny_config(tmp_path / "phantom", narrow=True), "supervised")
    target = inference.abstract_train_state(supervised)  # shapes only: no init compile
    assert target.methods == {}
    save_legacy(tmp_path / "ckpt", legacy)
    checkpoints = Checkpoints(tmp_path / "ckpt", keep=2, config_hash="h",
                              legacy=functools.partial(state_lib.legacy_layout, supervised))
    restored = checkpoints.restore_last(target, Streams())
    checkpoints.close()
    assert restored.methods == {} and restored.bad_terms.shape == (2,)  # sup, grad
    assert np.asarray(restored.bad_terms).tolist() == [False, True]
    jax.tree.map(np.testing.assert_array_equal, restored.params, legacy.params)


def test_inference_restores_a_legacy_checkpoint(arco, tmp_path):
    config, _, legacy = arco
    save_legacy(tmp_path / "checkpoints", legacy)
    restored = inference.restore_state(tmp_path, config, "last", 7)
    jax.tree.map(np.testing.assert_array_equal, restored.teacher, legacy.teacher)
    jax.tree.map(np.testing.assert_array_equal, restored.methods["arco"].bank, legacy.bank)
