"""Models as plug-ins: per-model sub-configs, declared feature strides, pretrained weights from an
.npz (config.model.init_from) and per-group learning-rate multipliers (config.optim.lr_multipliers).
Tiny shapes, no training loops."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags
from ml_collections import config_flags

from arco_jax import models
from arco_jax.config import ConfigError, base_config, from_record, validate
from arco_jax.data import registry
from arco_jax.state import build_networks, build_optimizer, create_train_state, state_with_pretrained
from tests.tiny import REPO, tiny_config

NARROW = (4, 8, 8, 16, 16)


def narrow_model_config():
    c = base_config()
    c.model.unet.features = NARROW
    c.model.rep_dim = 16
    return c.model


def unet_variables(seed: int, shape=(1, 32, 48, 1)):
    model = models.build_segmenter(narrow_model_config(), num_classes=3, in_channels=1)
    return model, model.init({"params": jax.random.key(seed), "dropout": jax.random.key(seed)},
                             jnp.zeros(shape), train=False)


def test_unet_is_built_from_its_own_sub_config():
    config = narrow_model_config()
    config.unet.dropout_rates = (0.0, 0.1, 0.1, 0.2, 0.2)
    model = models.build_segmenter(config, num_classes=3, in_channels=2)
    assert tuple(model.features) == NARROW and tuple(model.dropout_rates) == (0.0, 0.1, 0.1, 0.2, 0.2)
    assert model.num_classes == 3 and model.in_channels == 2
    head = models.build_head(config, num_classes=3, in_channels=2)
    assert tuple(head.feature_dims) == tuple(reversed(NARROW)) and head.output_dim == 16


def test_feature_strides_match_the_features_the_unet_returns():
    config = base_config()
    config.model.unet.features = NARROW
    strides = models.feature_strides(config)
    assert strides == (16, 8, 4, 2, 1) and models.feature_strides(config.model) == strides
    assert models.input_multiple(config) == 16
    model, variables = unet_variables(0)
    _, features = model.apply(variables, jnp.zeros((1, 32, 48, 1)), train=False)
    assert [f.shape[1:3] for f in features] == [(32 // s, 48 // s) for s in strides]


def test_old_layout_record_is_upgraded():
    record = base_config().to_dict()
    record["data"]["dataset"] = "phantom"
    del record["model"]["unet"]
    record["model"]["features"] = list(NARROW)
    record["model"]["dropout_rates"] = [0.0, 0.1, 0.1, 0.2, 0.2]
    config = from_record(record)
    assert tuple(config.model.unet.features) == NARROW
    assert tuple(config.model.unet.dropout_rates) == (0.0, 0.1, 0.1, 0.2, 0.2)
    assert "features" not in config.model and "dropout_rates" not in config.model
    assert from_record(config.to_dict()).to_dict() == config.to_dict()  # Today's layout is left as it is.


def phantom():
    c = base_config()
    registry.select(c, "phantom")
    return c


def test_validation_names_the_model_fields():
    c = phantom()
    c.model.name = "resnet_unet"
    with pytest.raises(ConfigError, match=r"config\.model\.name: .*known names: unet, vnet"):
        validate(c)
    c = phantom()  # 2-D slices
    c.model.name = "vnet"
    with pytest.raises(ConfigError, match=r"config\.model\.name: 'vnet' takes 3-D volumes; this dataset's samples "
                                          r"are 2-D images"):
        validate(c)
    c = phantom()
    c.model.unet.features = (4, 8, 16)
    with pytest.raises(ConfigError, match=r"config\.model\.unet\.features"):
        validate(c)
    c = phantom()
    c.model.unet.dropout_rates = (0.1,)
    with pytest.raises(ConfigError, match=r"config\.model\.unet\.features"):
        validate(c)


def test_init_from_round_trip(tmp_path):
    _, source = unet_variables(0)
    path = str(tmp_path / "unet.npz")
    written = models.save_variables_npz(source, path)
    _, target = unet_variables(1)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(source), jax.tree.leaves(target)))
    loaded, count = models.load_pretrained(target, path)
    assert count == written == len(jax.tree.leaves(source))
    assert jax.tree.structure(loaded) == jax.tree.structure(target)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(source)):
        np.testing.assert_array_equal(a, b)


def test_init_from_keeps_leaves_the_file_does_not_name(tmp_path):
    _, source = unet_variables(0)
    _, target = unet_variables(1)
    path = str(tmp_path / "encoder0.npz")
    models.save_variables_npz({"params": {"encoder0": source["params"]["encoder0"]}}, path)
    loaded, count = models.load_pretrained(target, path)
    assert count == len(jax.tree.leaves(source["params"]["encoder0"]))
    for a, b in zip(jax.tree.leaves(loaded["params"]["encoder0"]), jax.tree.leaves(source["params"]["encoder0"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(loaded["params"]["out_conv"]), jax.tree.leaves(target["params"]["out_conv"])):
        np.testing.assert_array_equal(a, b)


def test_init_from_rejects_unknown_keys_and_shapes(tmp_path):
    _, target = unet_variables(1)
    bad_key = str(tmp_path / "bad_key.npz")
    np.savez(bad_key, **{"params/nope/kernel": np.zeros(3)})
    with pytest.raises(ValueError, match=r"bad_key\.npz.*params/nope/kernel"):
        models.load_pretrained(target, bad_key)
    key = "params/out_conv/" + sorted(target["params"]["out_conv"])[0]
    bad_shape = str(tmp_path / "bad_shape.npz")
    np.savez(bad_shape, **{key: np.zeros((1, 2, 3))})
    with pytest.raises(ValueError, match=rf"bad_shape\.npz.*{key}"):
        models.load_pretrained(target, bad_shape)


def test_state_with_pretrained_loads_student_and_teacher(tmp_path):
    c = tiny_config(tmp_path, narrow=True)
    validate(c)
    nets = build_networks(c)
    fresh = create_train_state(c, nets, build_optimizer(c), jax.random.key(0))
    other = create_train_state(c, nets, build_optimizer(c), jax.random.key(1))
    path = str(tmp_path / "student.npz")
    models.save_variables_npz({"params": other.params["segmenter"], "batch_stats": other.batch_stats}, path)
    state, count = state_with_pretrained(fresh, path)
    assert count == len(jax.tree.leaves(other.params["segmenter"])) + len(jax.tree.leaves(other.batch_stats))
    for tree, reference in ((state.params["segmenter"], other.params["segmenter"]),
                            (state.teacher["params"]["segmenter"], other.params["segmenter"]),
                            (state.teacher["batch_stats"], other.batch_stats),
                            (state.params["head"], fresh.params["head"])):
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(reference)):
            np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(state) == jax.tree.structure(fresh)


def toy_params():
    return {"segmenter": {"enc_0": {"kernel": jnp.ones((2, 3))}, "out": {"bias": jnp.ones((3,))}},
            "head": {"proj": {"kernel": jnp.ones((3, 4))}},
            "projector": {"fc": {"kernel": jnp.ones((4, 4))}}}


def plain_sgd_config(*multipliers):
    c = base_config()
    c.optim.weight_decay, c.optim.momentum, c.optim.nesterov = 0.0, 0.0, False
    c.optim.lr_multipliers = tuple(multipliers)
    return c


def one_step(config):
    params = toy_params()
    tx = build_optimizer(config)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_lr_multiplier_zero_freezes_and_two_doubles():
    base = one_step(plain_sgd_config())
    frozen = one_step(plain_sgd_config("head/.*=0.0"))
    np.testing.assert_array_equal(frozen["head"]["proj"]["kernel"], 0.0)
    for group in ("segmenter", "projector"):
        for a, b in zip(jax.tree.leaves(frozen[group]), jax.tree.leaves(base[group])):
            np.testing.assert_array_equal(a, b)
            assert np.all(np.asarray(a) != 0)
    doubled = one_step(plain_sgd_config("segmenter/enc_.*=2.0", "segmenter/.*=0.5"))
    np.testing.assert_allclose(doubled["segmenter"]["enc_0"]["kernel"], 2 * base["segmenter"]["enc_0"]["kernel"])
    np.testing.assert_allclose(doubled["segmenter"]["out"]["bias"], 0.5 * base["segmenter"]["out"]["bias"])  # 1st wins
    np.testing.assert_array_equal(doubled["head"]["proj"]["kernel"], base["head"]["proj"]["kernel"])


def test_no_multipliers_is_exactly_the_old_chain():
    c = base_config()
    o = c.optim
    schedule = optax.polynomial_schedule(init_value=o.learning_rate, end_value=0.0, power=o.poly_power,
                                         transition_steps=c.train.steps)
    old = optax.chain(optax.add_decayed_weights(o.weight_decay),
                      optax.sgd(schedule, momentum=o.momentum, nesterov=o.nesterov))
    params = toy_params()
    assert jax.tree.structure(build_optimizer(c).init(params)) == jax.tree.structure(old.init(params))


def test_lr_multipliers_are_checked():
    with pytest.raises(ValueError, match="match no parameter"):
        one_step(plain_sgd_config("heads/.*=0.0"))
    c = phantom()
    c.optim.lr_multipliers = ("head/.*",)
    with pytest.raises(ConfigError, match=r"config\.optim\.lr_multipliers: 'head/\.\*'"):
        validate(c)
    c.optim.lr_multipliers = ("head/(.*=1.0",)
    with pytest.raises(ConfigError, match=r"config\.optim\.lr_multipliers"):
        validate(c)


def test_lr_multipliers_from_the_command_line():
    argv = ["prog", f"--config={REPO / 'configs' / 'demo.py'}",
            "--config.optim.lr_multipliers=('segmenter/encoder.*=0.1','head/.*=2')"]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=flag_values,
                                    lock_config=True, sys_argv=argv)
    flag_values(argv)
    assert tuple(flag_values.config.optim.lr_multipliers) == ("segmenter/encoder.*=0.1", "head/.*=2")
    validate(flag_values.config)
