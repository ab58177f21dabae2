"""ReCo's views beyond the strong one (augment.py, objective.py, step.py, data/pipeline.py): the random
rescale of the unlabeled images with their pseudo-labels and confidences before mixing, the labeled
images' jitter and blur, the unlabeled stream's plain crop, their config fields and the natural
configs that turn them on (tiny arrays, a few compiled functions reused)."""
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from arco_jax import augment, losses, methods, objective, train
from arco_jax import step as step_lib
from arco_jax import config as config_lib
from arco_jax import state as state_lib
from arco_jax.config import ConfigError, validate
from arco_jax.core import Batch, LossOutput, TrainState
from arco_jax.data import natural, pipeline
from tests.tiny import load_config
from arco_jax.step import make_stage2_step

H, W = 13, 11  # odd sizes: PIL's nearest source (i + .5) size / n is never a tie there (see rescale_crop)
IGNORE = 255
MEAN, STD = tuple(map(float, natural.IMAGENET_MEAN)), tuple(map(float, natural.IMAGENET_STD))


_RESCALE_CROP = jax.jit(functools.partial(augment.rescale_crop, fill_label=IGNORE))
_RANDOM_RESCALE = jax.jit(functools.partial(augment.random_rescale, scale_range=(0.5, 1.5), fill_label=IGNORE))


def _pil_reference(image, label, confidence, scale, top, left):
    """ReCo's build_data.transform(augmentation=False) on one sample: PIL resize (bilinear image,
    nearest label and confidence) to int(size * scale), padding at the bottom and right (image by
    reflection, label 255, confidence 0), the crop at (top, left)."""
    height, width = label.shape
    size = (int(width * scale), int(height * scale))
    image = np.stack([np.asarray(Image.fromarray(image[..., c], mode="F").resize(size, Image.BILINEAR))
                      for c in range(image.shape[-1])], axis=-1)
    label = np.asarray(Image.fromarray(label.astype(np.uint8)).resize(size, Image.NEAREST)).astype(np.int32)
    confidence = np.asarray(Image.fromarray(confidence, mode="F").resize(size, Image.NEAREST))
    pads = [(0, max(height - size[1], 0)), (0, max(width - size[0], 0))]
    image = np.pad(image, pads + [(0, 0)], mode="reflect")
    label = np.pad(label, pads, constant_values=IGNORE)
    confidence = np.pad(confidence, pads)
    window = (slice(top, top + height), slice(left, left + width))
    return image[window], label[window], confidence[window]


# ----------------------------------------------------------------------------- the rescale

def test_rescale_crop_is_pils_resize_reflection_padding_and_crop():
    rng = np.random.default_rng(0)
    scales = np.array([0.5, 0.61, 0.73, 0.99, 1.0, 1.13, 1.37, 1.5], np.float32)  # 0.5: pads longer than the image
    images = rng.random((len(scales), H, W, 3)).astype(np.float32)
    labels = rng.integers(0, 5, (len(scales), H, W)).astype(np.int32)
    confidences = rng.random((len(scales), H, W)).astype(np.float32)
    offsets = np.array([[rng.integers(0, max(int(n * s) - n, 0) + 1) for n in (H, W)] for s in scales], np.int32)
    out = [np.asarray(x) for x in _RESCALE_CROP(images, labels, confidences, scales, offsets)]
    assert [x.shape for x in out] == [images.shape, labels.shape, confidences.shape]
    for b, scale in enumerate(scales):
        image, label, confidence = _pil_reference(images[b], labels[b], confidences[b], float(scale), *offsets[b])
        np.testing.assert_allclose(out[0][b], image, atol=2e-6, err_msg=f"scale {scale}")
        np.testing.assert_array_equal(out[1][b], label, err_msg=f"scale {scale}")
        np.testing.assert_array_equal(out[2][b], confidence, err_msg=f"scale {scale}")
    np.testing.assert_array_equal(out[0][4], images[4])  # scale 1: the identity
    assert (out[1][0] == IGNORE).sum() == H * W - (H // 2) * (W // 2)


BATCH = 128  # one batch shape for every rescale below: one compilation of each function


def _block_labels(seed, classes):
    """(BATCH, H, W) label maps of 3 x 3 blocks of random classes."""
    cells = np.random.default_rng(seed).integers(0, classes, (BATCH, 5, 4))
    return np.kron(cells, np.ones((3, 3), np.int64))[:, :H, :W].astype(np.int32)


def test_random_rescale_moves_labels_and_confidences_with_the_image_and_pads_no_pseudo_labels():
    labels = _block_labels(1, 3)
    images = np.eye(3, dtype=np.float32)[labels]  # one channel per class: the image is its label map
    confidences = (labels + 1) / 10.0  # never 0 before the rescale
    key = jax.random.PRNGKey(0)
    out_images, out_labels, out_conf = map(np.asarray, _RANDOM_RESCALE(key, jnp.asarray(images), jnp.asarray(labels),
                                                                       jnp.asarray(confidences)))
    assert (out_images.shape, out_labels.shape, out_conf.shape) == (images.shape, labels.shape, labels.shape)
    padded = out_labels == IGNORE
    np.testing.assert_array_equal(out_conf == 0, padded)  # padding: no class and confidence 0, nowhere else
    np.testing.assert_allclose(out_conf[~padded], (out_labels[~padded] + 1) / 10.0, rtol=1e-6)  # pairs kept
    # Each label's class has weight in the bilinear image at its pixel (the nearest source lies within
    # the filter), and where the image is one class alone, that class is the label.
    weight = np.take_along_axis(out_images, np.where(padded, 0, out_labels)[..., None], -1)[..., 0]
    assert weight[~padded].min() > 0
    pure = (out_images.max(-1) > 1 - 1e-5) & ~padded
    assert pure.mean() > 0.4
    np.testing.assert_array_equal(out_images.argmax(-1)[pure], out_labels[pure])
    # About half the scales are below 1 and pad, at the bottom and right only: the kept part is
    # the top-left int(H s) x int(W s), every size of s in [0.5, 1) occurring.
    pads = padded.any(axis=(1, 2))
    assert 0.35 < pads.mean() < 0.65
    rows = (~padded).any(axis=2).sum(axis=1)
    assert set(np.unique(rows[pads])) == set(range(H // 2, H)) and np.all(rows[~pads] == H)
    for b in np.flatnonzero(pads):
        kept = ~padded[b]
        assert kept[0, 0] and np.array_equal(kept, np.outer(kept[:, 0], kept[0, :]))
    changed = np.any(np.abs(out_images - images) > 1e-6, axis=(1, 2, 3))
    assert changed.mean() > 0.85  # a scale whose crop is the image itself is rare
    other = _RANDOM_RESCALE(jax.random.PRNGKey(1), jnp.asarray(images), jnp.asarray(labels), jnp.asarray(confidences))
    assert not np.array_equal(np.asarray(other[1]), out_labels)  # another key, another view


_STRONG_SETTINGS = dict(warp_labels=True, warp_prob=0.0, mix="classmix", num_classes=4, jitter_prob=0.0,
                        blur_prob=0.0, flip_prob=0.5)


def test_strong_augment_rescales_first_and_the_padding_stays_no_pseudo_label_through_classmix():
    labels = jnp.asarray(_block_labels(2, 4))
    images = jax.random.uniform(jax.random.PRNGKey(0), labels.shape + (3,))
    confidences = jnp.full(labels.shape, 0.99)
    key = jax.random.PRNGKey(5)
    view = jax.jit(functools.partial(augment.strong_augment, rescale=(0.5, 1.5), fill_label=IGNORE, **_STRONG_SETTINGS))
    image_s, label_s, conf_s = map(np.asarray, view(key, images, labels, confidences))
    # The same view by hand: random_rescale with fold_in(key, 2), then the strong view without it.
    rescaled = _RANDOM_RESCALE(jax.random.fold_in(key, 2), images, labels, confidences)
    expected = jax.jit(functools.partial(augment.strong_augment, **_STRONG_SETTINGS))(key, *rescaled)
    np.testing.assert_allclose(image_s, np.asarray(expected[0]), atol=1e-6)
    np.testing.assert_array_equal(label_s, np.asarray(expected[1]))
    np.testing.assert_array_equal(conf_s == 0, label_s == IGNORE)
    assert (label_s == IGNORE).any()
    with pytest.raises(ValueError, match="rescale needs fill_label"):
        augment.strong_augment(key, images, labels, confidences, rescale=(0.5, 1.5), **_STRONG_SETTINGS)


def test_pseudo_label_loss_leaves_out_invalid_pixels_as_recos_ignore_index():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(2, 6, 5, 4)).astype(np.float32))
    pseudo = rng.integers(0, 4, (2, 6, 5)).astype(np.int32)
    confidence = rng.uniform(0.9, 1.0, (2, 6, 5)).astype(np.float32)
    valid = np.ones((2, 6, 5), bool)
    valid[:, 4:] = False
    pseudo[~valid], confidence[~valid] = IGNORE, 0.0
    loss = losses.pseudo_label_loss(logits, jnp.asarray(pseudo), jnp.asarray(confidence), 0.95, jnp.asarray(valid))
    # By hand (ReCo's compute_unsupervised_loss): weight = confident / valid pixels, CE of the valid ones.
    ce = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.where(valid, pseudo, 0)[..., None], -1)[..., 0]
    weight = (confidence >= 0.95).reshape(2, -1).sum(1) / valid.reshape(2, -1).sum(1)
    np.testing.assert_allclose(float(loss), (weight[:, None, None] * ce)[valid].mean(), rtol=1e-5)
    other = logits.at[:, 4:].set(100.0)  # the invalid pixels' predictions do not count
    np.testing.assert_allclose(float(losses.pseudo_label_loss(other, jnp.asarray(pseudo), jnp.asarray(confidence),
                                                              0.95, jnp.asarray(valid))), float(loss), rtol=1e-6)
    everywhere = np.where(valid, pseudo, 1)
    np.testing.assert_allclose(
        float(losses.pseudo_label_loss(logits, jnp.asarray(everywhere), jnp.asarray(confidence), 0.95,
                                       jnp.ones(valid.shape, bool))),
        float(losses.pseudo_label_loss(logits, jnp.asarray(everywhere), jnp.asarray(confidence), 0.95)), rtol=1e-6)


# ----------------------------------------------------------------------------- the labeled view

def test_labeled_photometric_is_the_jitter_then_the_blur_with_their_probabilities():
    rgb = jax.random.uniform(jax.random.PRNGKey(0), (400, 4, 4, 3))
    colour = augment.ColourJitter()
    key = jax.random.PRNGKey(1)
    out = np.asarray(jax.jit(functools.partial(augment.labeled_photometric, jitter_prob=0.8, blur_prob=0.5,
                                               colour=colour))(key, rgb))
    jitter_key, blur_key = jax.random.split(key)
    jittered = jax.jit(functools.partial(augment.colour_jitter, p=0.8, settings=colour))(jitter_key, rgb)
    expected = np.asarray(jax.jit(functools.partial(augment.gaussian_blur, p=0.5))(blur_key, jittered))
    np.testing.assert_allclose(out, expected, atol=1e-6)
    changed = lambda x, y: np.any(np.abs(np.asarray(x) - np.asarray(y)) > 1e-6, axis=(1, 2, 3))  # noqa: E731
    assert abs(changed(jittered, rgb).mean() - 0.8) < 0.06 and abs(changed(expected, jittered).mean() - 0.5) < 0.07
    # Without colour settings the intensity jitter, which takes any channels (colour_jitter would refuse one).
    gray = np.asarray(jax.jit(functools.partial(augment.labeled_photometric, jitter_prob=1.0, blur_prob=0.0,
                                                value_range=(0.0, 1.0)))(key, rgb[..., :1]))
    assert changed(gray, rgb[..., :1]).all() and gray.min() >= 0.0 and gray.max() <= 1.0


def test_equivariance_view_takes_the_strong_views_jitter_kind_and_probabilities():
    key = jax.random.PRNGKey(3)
    unit = types.SimpleNamespace(image_range=(0.0, 1.0))
    # ACDC: the intensity jitter and blur at p=.5 each, drawn as they always were.
    gray = jax.random.uniform(jax.random.PRNGKey(0), (6, 5, 5, 1))
    jitter_key, blur_key = jax.random.split(key)
    before = augment.gaussian_blur(blur_key, augment.intensity_jitter(jitter_key, gray, value_range=(0.0, 1.0)))
    np.testing.assert_array_equal(objective.equivariance_photometric(load_config("acdc"), unit, key, gray), before)
    # Pascal: ImageNet-normalised RGB gets the colour jitter with augment.jitter_prob (0.8), not
    # the intensity jitter at 0.5.
    config = load_config("pascal")
    rgb = (jax.random.uniform(jax.random.PRNGKey(0), (6, 5, 5, 3)) - jnp.asarray(MEAN)) / jnp.asarray(STD)
    normalised = types.SimpleNamespace(image_range=None)
    out = objective.equivariance_photometric(config, normalised, key, rgb)
    expected = augment.labeled_photometric(key, rgb, jitter_prob=0.8, blur_prob=0.5,
                                           colour=augment.ColourJitter(0.25, 0.25, mean=MEAN, std=STD))
    np.testing.assert_allclose(out, expected, atol=1e-6)
    intensity = augment.labeled_photometric(key, rgb, jitter_prob=0.5, blur_prob=0.5)
    assert np.abs(np.asarray(out) - np.asarray(intensity)).max() > 1e-2


def _fake_state(config, tx):
    params = {"segmenter": {"w": jnp.ones(3)}, "head": {"w": jnp.ones(2)}, "projector": {}}
    return TrainState(step=jnp.int32(0), params=params, batch_stats={}, opt_state=tx.init(params),
                      teacher={"params": {"segmenter": params["segmenter"], "head": params["head"]},
                               "batch_stats": {}},
                      rng=jax.random.PRNGKey(4), bad_step=jnp.int32(-1),
                      bad_terms=jnp.zeros(len(state_lib.term_names(config)), bool))


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    rgb = rng.random((3, 2, 6, 6, 3)).astype(np.float32)
    normalised = (rgb - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return Batch(image_l=jnp.asarray(normalised[0]), label_l=jnp.asarray(rng.integers(0, 21, (2, 6, 6), np.int32)),
                 image_u=jnp.asarray(normalised[1]))


def test_every_stage2_step_trains_on_the_labeled_view_and_defaults_leave_the_batch(monkeypatch):
    # Each built-in stage-2 method hands the labeled view to the shared step (step.py imports no
    # loss code, so the view is passed in).
    for name in ("arco", "supervised", "mean_teacher"):
        given = {}
        monkeypatch.setattr(step_lib, "make_stage2_step", lambda *args, **kwargs: given.update(
            view=kwargs.get("labeled_view")))
        methods.get(name).make_step(None, None, None)
        assert given["view"] is objective.labeled_view, name
    monkeypatch.undo()
    config = load_config("pascal")
    nets = types.SimpleNamespace(image_range=None)
    tx = optax.sgd(0.1)
    seen = {}

    def record(params, state, batch, key, progress, config, nets):
        seen["batch"] = batch
        return jnp.sum(params["segmenter"]["w"]), LossOutput({"sup": jnp.float32(0)}, state.batch_stats, None, {})

    state, batch = _fake_state(config, tx), _batch()
    make_stage2_step(config, nets, tx, record, labeled_view=objective.labeled_view)(state, batch)
    got = seen["batch"]
    view = objective.labeled_view(config, nets, batch, jax.random.fold_in(state.rng, state.step))
    np.testing.assert_array_equal(np.asarray(got.image_l), np.asarray(view.image_l))
    assert not np.allclose(np.asarray(got.image_l), np.asarray(batch.image_l), atol=1e-4)  # p = .8, .5 of 2 images
    assert got.label_l is batch.label_l and got.image_u is batch.image_u  # labels and unlabeled images untouched
    raw = np.asarray(got.image_l) * np.array(STD) + np.array(MEAN)
    assert raw.min() > -1e-5 and raw.max() < 1 + 1e-5  # jittered in RGB, normalised again
    defaults = load_config("pascal")
    defaults.augment.labeled_jitter_prob = defaults.augment.labeled_blur_prob = 0.0
    assert objective.labeled_view(defaults, nets, batch, jax.random.PRNGKey(0)) is batch
    assert objective.labeled_view(config_lib.base_config(), nets, batch, jax.random.PRNGKey(0)) is batch
    assert not objective.rescales_unlabeled(config_lib.base_config()) and objective.rescales_unlabeled(config)


# ----------------------------------------------------------------------------- the unlabeled stream

def test_crop_view_is_a_plain_window_never_scaled_or_flipped():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    label = rng.integers(0, 21, (20, 24)).astype(np.int32)
    crop = pipeline.WEAK_AUGMENTATIONS["crop"]
    starts = set()
    for seed in range(12):
        out_image, out_label = crop(image, label, (16, 16), np.random.default_rng(seed), IGNORE)
        matches = [(top, left) for top in range(5) for left in range(9)
                   if np.array_equal(out_label, label[top:top + 16, left:left + 16])]
        assert matches, f"seed {seed}: not a window of the image"
        top, left = matches[0]
        starts.add((top, left))
        np.testing.assert_allclose(out_image, natural.normalize_rgb(image[top:top + 16, left:left + 16]), rtol=1e-6)
    assert len(starts) > 6
    out_image, out_label = crop(image, label, (24, 32), np.random.default_rng(0), IGNORE)  # larger: padded
    assert (out_label[20:] == IGNORE).all() and (out_label[:, 24:] == IGNORE).all()
    np.testing.assert_array_equal(out_label[:20, :24], label)


def test_unlabeled_stream_takes_its_own_view():
    ramp = np.broadcast_to(np.arange(40, dtype=np.uint8)[None, :, None] * 6, (32, 40, 3)).copy()
    source = [{"image": ramp, "label": np.zeros((32, 40), np.int32)}] * 8
    config = load_config("pascal")  # as the trainer builds its streams: data.unlabeled_view 'crop'
    d = config.data
    d.patch_size, d.batch_labeled, d.batch_unlabeled, d.num_workers = (16, 16), 8, 8, 0
    streams = train.make_streams(config, types.SimpleNamespace(train_sources=lambda: (source, source)))
    labeled, unlabeled = next(streams)
    streams.close()
    rising = lambda images: np.diff(images[:, 0, :, 0], axis=1).mean(axis=1) > 0  # noqa: E731
    assert rising(unlabeled["image"]).all()  # never flipped
    assert not rising(labeled["image"]).all()  # the labeled stream's flip
    d.unlabeled_view = ""  # both streams the dataset's weak view again
    streams = train.make_streams(config, types.SimpleNamespace(train_sources=lambda: (source, source)))
    _, unlabeled = next(streams)
    streams.close()
    assert not rising(unlabeled["image"]).all()


# ----------------------------------------------------------------------------- configs

@pytest.mark.parametrize("name, scale", [("pascal", (0.5, 1.5)), ("sun", (0.5, 1.5)), ("cityscapes", (1.0, 1.0))])
def test_natural_configs_turn_on_recos_views(name, scale):
    config = load_config(name)
    g = config.augment
    assert (g.labeled_jitter_prob, g.labeled_blur_prob, tuple(g.unlabeled_scale)) == (0.8, 0.5, scale)
    assert config.data.unlabeled_view == "crop"
    validate(config, check_data=False)
    supervised = load_config(name, "method=supervised")
    assert (supervised.augment.labeled_jitter_prob, supervised.data.unlabeled_view) == (0.8, "crop")


def test_defaults_leave_every_view_as_it_was():
    config = config_lib.base_config()
    g = config.augment
    assert (g.labeled_jitter_prob, g.labeled_blur_prob, tuple(g.unlabeled_scale)) == (0.0, 0.0, (1.0, 1.0))
    assert config.data.unlabeled_view == ""
    validate(load_config("acdc"), check_data=False)


@pytest.mark.parametrize("field, value, message", [
    ("augment.labeled_jitter_prob", 1.2, "config.augment.labeled_jitter_prob: is a probability in"),
    ("augment.labeled_blur_prob", -0.5, "config.augment.labeled_blur_prob: is a probability in"),
    ("augment.unlabeled_scale", (0.0, 1.5), r"config.augment.unlabeled_scale: must be \(low, high\) with 0 < low"),
    ("augment.unlabeled_scale", (1.5, 0.5), r"config.augment.unlabeled_scale: must be \(low, high\)"),
    ("augment.unlabeled_scale", (0.5, 1.0, 1.5), r"config.augment.unlabeled_scale: must be \(low, high\)"),
    ("augment.unlabeled_scale", ("0.5", "1.5"), r"config.augment.unlabeled_scale: must be \(low, high\)"),
    ("data.unlabeled_view", "flip", "config.data.unlabeled_view: 'flip' is not one of"),
    ("data.unlabeled_view", "resize_rotate", "config.data.unlabeled_view: 'resize_rotate' is not a view of what "
     "dataset 'pascal' gives"),
])
def test_bad_view_fields_are_named(field, value, message):
    config = load_config("pascal")
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=message) as raised:
        validate(config, check_data=False)
    assert "\n" not in str(raised.value)


def test_natural_views_do_not_fit_the_medical_datasets():
    config = load_config("acdc")
    config.data.unlabeled_view = "crop"
    with pytest.raises(ConfigError, match="config.data.unlabeled_view: 'crop' is not a view of what dataset 'acdc'"):
        validate(config, check_data=False)
    config.data.unlabeled_view = "resize_rotate"  # its own view, named
    validate(config, check_data=False)
