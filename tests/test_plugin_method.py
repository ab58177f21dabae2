"""A training method defined here, outside arco_jax, plugs in through the public registry alone:
entropy minimisation (the supervised loss plus the mean entropy of the student's predictions
on the unlabeled images), with a part of the train state of its own (a running mean of that
entropy and a count of good steps). It trains, checkpoints and resumes through train.py with
no arco_jax module knowing it exists."""
from __future__ import annotations

import json

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arco_jax import inference, losses, methods, step, train
from arco_jax.config import ConfigError, validate
from arco_jax.core import LossOutput, stage2_keys, student_forward
from arco_jax.methods import Method
from tests import tiny

ENTROPY_WEIGHT = 0.1


@flax.struct.dataclass
class EntropyState:
    mean_entropy: jax.Array
    good_steps: jax.Array


def entropy_loss(params, state, batch, key, progress, config, nets):
    num_labeled = batch.image_l.shape[0]
    (logits, _), batch_stats = student_forward(nets, params["segmenter"], state.batch_stats,
                                               jnp.concatenate([batch.image_l, batch.image_u]),
                                               stage2_keys(key)["student_l"])
    sup, parts = losses.supervised_loss(logits[:num_labeled], batch.label_l, config.data.ignore_label)
    entropy = jnp.mean(losses.entropy(jax.nn.softmax(logits[num_labeled:].astype(jnp.float32), -1)))
    total = config.loss_weights.sup * sup + ENTROPY_WEIGHT * entropy
    return total, LossOutput({"sup": sup, "entropy": entropy}, batch_stats, jax.lax.stop_gradient(entropy), parts)


def write(own: EntropyState, entropy, good) -> EntropyState:
    return EntropyState(mean_entropy=jnp.where(good, 0.5 * own.mean_entropy + 0.5 * entropy, own.mean_entropy),
                        good_steps=own.good_steps + good.astype(jnp.int32))


ENTROPY_MIN = Method(
    name="entropy_min", stage=2, terms=("sup", "entropy"),
    make_step=lambda config, nets, tx: step.make_stage2_step(config, nets, tx, entropy_loss, write, "entropy_min"),
    init_state=lambda config, nets, outputs, key: EntropyState(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)))
PRESET = {f"loss_weights.{t}": 0.0 for t in methods.UNLABELED_TERMS}


@pytest.fixture(scope="module")
def registered():
    methods.register(ENTROPY_MIN, preset=PRESET)
    yield
    methods.unregister("entropy_min")


def config_of(tmp_path, steps):
    c = tiny.tiny_config(tmp_path / "phantom", steps=steps, every=2, narrow=True)
    return methods.apply_method(c, "entropy_min")


def test_registering_makes_the_name_a_method_and_sets_its_preset(registered, tmp_path):
    c = config_of(tmp_path, 2)
    validate(c)
    assert c.method == "entropy_min" and "entropy_min" in methods.method_names()
    assert all(c.loss_weights[t] == 0.0 for t in methods.UNLABELED_TERMS)
    assert methods.stage_methods(c) == {2: ENTROPY_MIN}
    with pytest.raises(ValueError, match="already registered"):
        methods.register(ENTROPY_MIN)


def test_an_unknown_method_is_refused_with_the_known_ones(tmp_path):
    c = tiny.tiny_config(tmp_path / "phantom")
    c.method = "entropy_minimum"
    with pytest.raises(ConfigError, match="method.*'supervised'.*'custom'"):
        validate(c)


def test_interface_refuses_a_method_without_the_supervised_term():
    with pytest.raises(ValueError, match="lack 'sup'"):
        Method(name="bad", stage=2, terms=("entropy",), make_step=None)


def test_a_method_defined_in_a_test_trains_checkpoints_and_resumes(registered, tmp_path):
    workdir = tmp_path / "run"
    first = train.train_and_evaluate(config_of(tmp_path, 2), workdir)
    assert set(first["test"]) == {"best", "last"}
    train.train_and_evaluate(config_of(tmp_path, 4), workdir, allow_config_change=True)  # trained longer
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if r["split"] == "train"]
    assert [r["step"] for r in train_lines] == [2, 4]
    for record in train_lines:
        assert record["loss_entropy"] > 0 and np.isfinite(record["loss_sup"])
        assert not any(k in record for k in ("loss_contrast", "loss_consistency"))  # only its own terms
    state = inference.restore_state(workdir, inference.read_config(workdir), "last", 4)
    own = state.methods["entropy_min"]
    assert set(state.methods) == {"entropy_min"} and int(own.good_steps) == 4  # resumed at 2, counted on
    assert 0.0 < float(own.mean_entropy) <= np.log(4)
