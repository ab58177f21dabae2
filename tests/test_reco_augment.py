"""ReCo's strong view for natural images (augment.py, config.augment): ClassMix by the teacher's
classes, the RGB colour jitter (brightness, contrast, saturation, hue), the horizontal flip, the
wiring from the config into objective.strong_view, and the configs that use them (tiny arrays)."""
import colorsys
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arco_jax import augment, losses, objective
from arco_jax import config as config_lib
from arco_jax.config import ConfigError, validate
from arco_jax.data import natural
from tests.tiny import load_config

B, H, W, K = 4, 12, 14, 6
MEAN, STD = tuple(map(float, natural.IMAGENET_MEAN)), tuple(map(float, natural.IMAGENET_STD))


def _labels(seed=0, classes=K, batch=B):
    """Blocky label maps (3 x 3 cells of random classes), image 1 of one class only, 255 ignored at a corner."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, classes, (batch, 4, 5))
    labels = np.kron(cells, np.ones((3, 3), np.int64))[:, :H, :W].astype(np.int32)
    labels[1] = 2
    labels[:, :2, :2] = 255
    return jnp.asarray(labels)


_MASK = jax.jit(functools.partial(augment.classmix_mask, num_classes=K))
_CLASSMIX = jax.jit(functools.partial(augment.classmix, num_classes=K))


# ----------------------------------------------------------------------------- ClassMix

def test_classmix_mask_is_exactly_the_pixels_of_half_the_classes_present():
    labels = np.asarray(_labels())
    for seed in range(5):
        mask = np.asarray(_MASK(jax.random.PRNGKey(seed), jnp.asarray(labels)))
        assert mask.shape == labels.shape and mask.dtype == bool
        for b in range(B):
            present = set(np.unique(labels[b])) - {255}
            chosen = set(np.unique(labels[b][mask[b]]))
            assert chosen <= present and len(chosen) == len(present) // 2
            np.testing.assert_array_equal(mask[b], np.isin(labels[b], sorted(chosen)))
        assert not mask[1].any()  # one class: half of it is none
        assert not mask[:, :2, :2].any()  # the ignore label is no class


def test_classmix_mask_draws_every_class_about_half_the_time():
    labels = jnp.asarray(np.kron(np.arange(4).reshape(1, 2, 2), np.ones((3, 3), np.int64)).astype(np.int32))
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    masks = np.asarray(jax.vmap(lambda k: _MASK(k, labels))(keys))  # (400, 1, 6, 6)
    chosen = np.stack([masks[:, 0, 0, 0], masks[:, 0, 0, 3], masks[:, 0, 3, 0], masks[:, 0, 3, 3]], axis=1)
    np.testing.assert_array_equal(chosen.sum(axis=1), 2)  # always 2 of the 4
    assert np.all(np.abs(chosen.mean(axis=0) - 0.5) < 0.1)
    assert len({tuple(row) for row in chosen}) == 6  # all 6 pairs occur


def test_classmix_pastes_the_chosen_classes_onto_the_partner_in_all_three_arrays():
    labels = _labels(1)
    batch = np.arange(B, dtype=np.float32)
    # Channel 0: which image a pixel came from; channel 1: its label; confidences: its label again.
    images = jnp.stack([jnp.broadcast_to(batch[:, None, None], labels.shape), labels.astype(jnp.float32)], -1)
    confidences = labels.astype(jnp.float32) / 1000.0
    key = jax.random.PRNGKey(3)
    mixed_images, mixed_labels, mixed_conf = map(np.asarray, _CLASSMIX(key, images, labels, confidences))
    keep = np.asarray(_MASK(key, labels))
    partner = np.roll(np.asarray(labels), -1, axis=0)
    np.testing.assert_array_equal(mixed_labels, np.where(keep, np.asarray(labels), partner))
    source = np.where(keep, batch[:, None, None], np.roll(batch, -1)[:, None, None])
    np.testing.assert_array_equal(mixed_images[..., 0], source)
    np.testing.assert_array_equal(mixed_images[..., 1], mixed_labels)  # image and label of one source pixel
    np.testing.assert_allclose(mixed_conf, mixed_labels / 1000.0, rtol=1e-6)
    assert keep.any() and not keep.all()


def test_classmix_is_a_function_of_the_key_eager_or_jitted():
    labels = _labels(2)
    images = jax.random.uniform(jax.random.PRNGKey(0), labels.shape + (3,))
    confidences = jax.random.uniform(jax.random.PRNGKey(1), labels.shape)
    first = _CLASSMIX(jax.random.PRNGKey(5), images, labels, confidences)
    again = augment.classmix(jax.random.PRNGKey(5), images, labels, confidences, num_classes=K)
    other = _CLASSMIX(jax.random.PRNGKey(6), images, labels, confidences)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(first[1]), np.asarray(other[1]))
    assert [x.shape for x in first] == [images.shape, labels.shape, confidences.shape]


def test_classmix_works_on_volumes():
    labels = jnp.asarray(np.random.default_rng(0).integers(0, 3, (2, 3, 4, 5)).astype(np.int32))
    mask = np.asarray(augment.classmix_mask(jax.random.PRNGKey(0), labels, 3))
    for b in range(2):
        chosen = np.unique(np.asarray(labels[b])[mask[b]])
        assert len(chosen) == 1 and np.array_equal(mask[b], np.asarray(labels[b]) == chosen[0])


# ----------------------------------------------------------------------------- colour jitter

def _jitter(images, key=0, p=1.0, strength=augment.JITTER_STRENGTH, **settings):
    return np.asarray(augment.colour_jitter(jax.random.PRNGKey(key), jnp.asarray(images), p=p, strength=strength,
                                            settings=augment.ColourJitter(**settings)))


def test_hsv_conversions_are_colorsys():
    rgb = np.random.default_rng(0).uniform(size=(200, 3)).astype(np.float32)
    rgb[:5] = rgb[:5, :1]
    rgb[5:13] = np.array([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)])
    expected = np.array([colorsys.rgb_to_hsv(*p) for p in rgb])
    np.testing.assert_allclose(augment.rgb_to_hsv(jnp.asarray(rgb)), expected, atol=1e-6)
    np.testing.assert_allclose(augment.hsv_to_rgb(jnp.asarray(expected, jnp.float32)), rgb, atol=1e-6)


def test_colour_jitter_keeps_a_gray_image_gray_and_in_range():
    gray = np.random.default_rng(1).uniform(size=(6, 5, 7, 1)).astype(np.float32)
    out = _jitter(np.repeat(gray, 3, axis=-1), saturation=1.0, hue=0.5)
    np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-6)
    np.testing.assert_allclose(out[..., 0], out[..., 2], atol=1e-6)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_colour_jitter_keeps_normalised_images_in_the_normalised_range():
    rgb = np.random.default_rng(2).uniform(size=(8, 5, 7, 3)).astype(np.float32)
    normalised = (rgb - np.array(MEAN)) / np.array(STD)
    out = _jitter(normalised.astype(np.float32), saturation=0.25, hue=0.25, mean=MEAN, std=STD)
    back = out * np.array(STD) + np.array(MEAN)
    assert back.min() >= -1e-5 and back.max() <= 1 + 1e-5
    assert not np.allclose(out, normalised, atol=1e-3)


@pytest.mark.parametrize("normalised", [False, True])
def test_colour_jitter_at_zero_strength_is_the_identity(normalised):
    rgb = np.random.default_rng(3).uniform(size=(4, 5, 7, 3)).astype(np.float32)
    settings = dict(mean=MEAN, std=STD) if normalised else {}
    images = ((rgb - np.array(MEAN)) / np.array(STD)).astype(np.float32) if normalised else rgb
    out = _jitter(images, strength=(1.0, 1.0), saturation=0.0, hue=0.0, **settings)
    np.testing.assert_allclose(out, images, atol=2e-6)
    np.testing.assert_array_equal(_jitter(images, p=0.0, saturation=0.25, hue=0.25, **settings), images)


def test_hue_jitter_turns_each_image_by_one_angle_and_keeps_saturation_and_value():
    rgb = np.random.default_rng(4).uniform(0.1, 0.9, size=(6, 4, 5, 3)).astype(np.float32)
    out = _jitter(rgb, strength=(1.0, 1.0), saturation=0.0, hue=0.25)
    hsv_in, hsv_out = np.asarray(augment.rgb_to_hsv(jnp.asarray(rgb))), np.asarray(augment.rgb_to_hsv(jnp.asarray(out)))
    np.testing.assert_allclose(hsv_out[..., 1:], hsv_in[..., 1:], atol=1e-5)
    turn = (hsv_out[..., 0] - hsv_in[..., 0] + 0.5) % 1.0 - 0.5
    per_image = turn.reshape(6, -1)
    np.testing.assert_allclose(per_image, np.broadcast_to(per_image[:, :1], per_image.shape), atol=1e-5)
    assert np.all(np.abs(per_image[:, 0]) <= 0.25) and np.ptp(per_image[:, 0]) > 0.05


def test_saturation_jitter_scales_each_pixels_distance_from_its_luma():
    rgb = np.random.default_rng(5).uniform(0.4, 0.6, size=(6, 4, 5, 3)).astype(np.float32)
    out = _jitter(rgb, strength=(1.0, 1.0), saturation=0.25, hue=0.0)
    luma = np.array([0.2989, 0.587, 0.114], np.float32)
    gray = (rgb @ luma)[..., None]  # out = gray + s (rgb - gray), s per image
    chroma_in, chroma_out = rgb - gray, out - gray
    factor = (chroma_out.reshape(6, -1) / chroma_in.reshape(6, -1))
    np.testing.assert_allclose(factor, np.broadcast_to(factor[:, :1], factor.shape), rtol=1e-3)
    assert np.all((factor[:, 0] >= 0.75 - 1e-4) & (factor[:, 0] <= 1.25 + 1e-4))


def test_colour_jitter_is_a_function_of_the_key_and_applies_with_p():
    rgb = np.random.default_rng(6).uniform(size=(64, 3, 3, 3)).astype(np.float32)
    first, again, other = (_jitter(rgb, key, p=0.8, hue=0.25) for key in (1, 1, 2))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    changed = np.any(first != rgb, axis=(1, 2, 3))
    assert 0.6 <= changed.mean() <= 0.95
    with pytest.raises(ValueError, match="colour_jitter: needs RGB images"):
        _jitter(rgb[..., :1])


def test_horizontal_flip_mirrors_the_three_arrays_of_the_flipped_samples():
    labels = _labels(3)
    images = jnp.stack([labels.astype(jnp.float32)] * 3, -1)
    flipped = augment.horizontal_flip(jax.random.PRNGKey(0), images, labels, labels / 10.0, p=0.5)
    images_f, labels_f, conf_f = map(np.asarray, flipped)
    mirrored = np.all(labels_f == np.asarray(labels)[:, :, ::-1], axis=(1, 2))
    kept = np.all(labels_f == np.asarray(labels), axis=(1, 2))
    assert np.all(mirrored | kept) and mirrored.any()
    np.testing.assert_array_equal(images_f[..., 0], labels_f)
    np.testing.assert_allclose(conf_f, labels_f / 10.0)


# ----------------------------------------------------------------------------- the strong view

def test_strong_augment_defaults_are_the_reference_view_draw_for_draw():
    labels = _labels(4)
    images = jax.random.uniform(jax.random.PRNGKey(0), labels.shape + (1,))
    confidences = jax.random.uniform(jax.random.PRNGKey(1), labels.shape)
    key = jax.random.PRNGKey(7)
    out = augment.strong_augment(key, images, labels, confidences, warp_labels=True)
    x, y, c = augment.cutmix(key, images, labels, confidences)
    jitter_key, blur_key, warp_key = jax.random.split(jax.random.fold_in(key, 1), 3)
    x = augment.gaussian_blur(blur_key, augment.intensity_jitter(jitter_key, x))
    expected = augment.smooth_warp(warp_key, x, y, c, p=0.5)
    for a, b in zip(out, expected):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_strong_augment_reco_view_jits_and_keeps_the_classmix_pairs():
    labels = _labels(5)
    rgb = jax.random.uniform(jax.random.PRNGKey(0), labels.shape + (3,))
    confidences = labels.astype(jnp.float32) / 1000.0
    view = jax.jit(functools.partial(augment.strong_augment, warp_labels=True, warp_prob=0.0, value_range=None,
                                     mix="classmix", num_classes=K, jitter_prob=0.8, flip_prob=0.5,
                                     colour=augment.ColourJitter(0.25, 0.25, MEAN, STD)))
    images_s, labels_s, conf_s = view(jax.random.PRNGKey(9), (rgb - jnp.array(MEAN)) / jnp.array(STD), labels,
                                      confidences)
    assert images_s.shape == rgb.shape and labels_s.shape == labels.shape
    np.testing.assert_allclose(np.asarray(conf_s), np.asarray(labels_s) / 1000.0, rtol=1e-6)
    with pytest.raises(ValueError, match="needs num_classes"):
        augment.strong_augment(jax.random.PRNGKey(0), rgb, labels, confidences, warp_labels=True, mix="classmix")
    with pytest.raises(ValueError, match="mix must be one of"):
        augment.strong_augment(jax.random.PRNGKey(0), rgb, labels, confidences, warp_labels=True, mix="mixup")


def test_strong_view_mixes_by_the_teachers_classes_as_the_config_says():
    config = load_config("pascal")
    nets = types.SimpleNamespace(image_range=None)
    settings = objective.strong_view_settings(config, nets)
    assert settings == dict(warp_labels=True, warp_prob=0.0, value_range=None, mix="classmix", num_classes=21,
                            jitter_prob=0.8, colour=augment.ColourJitter(0.25, 0.25, MEAN, STD), blur_prob=0.5,
                            flip_prob=0.5, rescale=(0.5, 1.5), fill_label=255)
    labels = _labels(6, classes=21)
    teacher_logits = jax.nn.one_hot(labels, 21) * 10.0  # the ignore corner: all-zero logits -> class 0
    fwd = types.SimpleNamespace(config=config, nets=nets, teacher_net=lambda images, key: (teacher_logits, None))
    images = jnp.zeros(labels.shape + (3,))
    _, pseudo, confidence = objective.strong_view(fwd, images, jax.random.PRNGKey(0), jax.random.PRNGKey(1))
    teacher = jnp.where(labels == 255, 0, labels)
    key = jax.random.PRNGKey(1)
    # ReCo's order: the rescale (fold_in(key, 2)) of image, pseudo-labels and confidences, then ClassMix, then flip.
    _, rescaled, rescaled_conf = augment.random_rescale(jax.random.fold_in(key, 2), images, teacher,
                                                        jnp.max(jax.nn.softmax(teacher_logits), -1),
                                                        scale_range=(0.5, 1.5), fill_label=255)
    keep = np.asarray(augment.classmix_mask(key, rescaled, 21))
    flip = np.asarray(jax.random.bernoulli(jax.random.fold_in(jax.random.fold_in(key, 1), 1), 0.5, (B,)))
    rescaled, rescaled_conf = np.asarray(rescaled), np.asarray(rescaled_conf)
    mixed = np.where(keep, rescaled, np.roll(rescaled, -1, axis=0))
    mixed_conf = np.where(keep, rescaled_conf, np.roll(rescaled_conf, -1, axis=0))
    mixed, mixed_conf = (np.where(flip[:, None, None], x[:, :, ::-1], x) for x in (mixed, mixed_conf))
    np.testing.assert_array_equal(np.asarray(pseudo), mixed)
    np.testing.assert_array_equal(np.asarray(confidence), mixed_conf)
    np.testing.assert_array_equal(mixed_conf == 0, mixed == 255)  # the rescale's padding: no pseudo-label
    assert confidence.shape == labels.shape


def test_strong_view_defaults_stay_cutmix_and_intensity_jitter():
    config = config_lib.base_config()
    settings = objective.strong_view_settings(config, types.SimpleNamespace(image_range=(0.0, 1.0)))
    assert (settings["mix"], settings["colour"], settings["jitter_prob"], settings["warp_prob"],
            settings["flip_prob"], settings["rescale"], settings["fill_label"]) == (
                "cutmix", None, 0.5, 0.5, 0.0, None, None)
    assert config.loss.supervised == "ce_dice"


# ----------------------------------------------------------------------------- configs

@pytest.mark.parametrize("name", ["pascal", "cityscapes", "sun"])
def test_natural_configs_take_reco_view_and_ce(name):
    config = load_config(name)
    g = config.augment
    assert (g.mix, g.jitter, g.jitter_prob, g.saturation, g.hue, g.blur_prob, g.warp_prob, g.flip_prob) == (
        "classmix", "colour", 0.8, 0.25, 0.25, 0.5, 0.0, 0.5)
    assert config.loss.supervised == "ce"
    validate(config, check_data=False)
    assert load_config(name, "method=supervised").loss.supervised == "ce"


def test_constants_agree_between_config_and_the_code():
    assert config_lib.MIXES == augment.MIXES and config_lib.SUPERVISED_LOSSES == losses.SUPERVISED_LOSSES


@pytest.mark.parametrize("field, value, message", [
    ("augment.mix", "mixup", "config.augment.mix: 'mixup' is not one of"),
    ("augment.jitter", "rgb", "config.augment.jitter: 'rgb' is not one of"),
    ("augment.jitter_prob", 1.5, "config.augment.jitter_prob: is a probability in"),
    ("augment.flip_prob", -0.1, "config.augment.flip_prob: is a probability in"),
    ("augment.hue", 0.6, r"config.augment.hue: must lie in \[0, 0.5\]"),
    ("loss.supervised", "dice", "config.loss.supervised: 'dice' is not one of"),
])
def test_bad_augment_and_loss_fields_are_named(field, value, message):
    config = load_config("pascal")
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=message):
        validate(config, check_data=False)


def test_colour_fields_need_the_colour_jitter_and_rgb_images():
    config = load_config("pascal")
    config.augment.jitter = "intensity"
    with pytest.raises(ConfigError, match="config.augment.saturation: 0.25 is drawn by the 'colour' jitter only"):
        validate(config, check_data=False)
    acdc = load_config("acdc")
    acdc.augment.jitter = "colour"
    with pytest.raises(ConfigError, match="config.augment.jitter: 'colour' needs RGB images .* 1 channel"):
        validate(acdc, check_data=False)
    acdc.augment.jitter, acdc.augment.mix = "intensity", "classmix"
    validate(acdc, check_data=False)  # ClassMix is for any label maps
