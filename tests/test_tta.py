"""Class probabilities of a volume (slice by slice and by sliding windows) and test-time flips,
with fake predictors: what `predict --probabilities --tta` builds on."""
import numpy as np
import pytest

from arco_jax import evaluation, inference
from arco_jax.evaluators import sliding_window

WEIGHTS = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)


def pointwise(images):
    """Logits of each pixel from its own channels: equivariant under every flip."""
    return images @ WEIGHTS


def positional(images):
    """Logits that depend on the pixel's position too: flips change them."""
    ramp = np.linspace(-2, 2, images.shape[2], dtype=np.float32)[None, None, :, None]
    return images @ WEIGHTS + ramp * np.array([1.0, 0.0, -1.0], np.float32)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture
def volume():
    return np.random.default_rng(1).normal(size=(3, 20, 24, 2)).astype(np.float32)


def test_slice_probabilities_argmax_is_the_label_map(volume):
    probabilities = evaluation.predict_volume_probabilities(positional, volume, (16, 16), slice_batch_size=2)
    labels = evaluation.predict_volume(positional, volume, (16, 16), slice_batch_size=2)
    assert probabilities.shape == (3, 20, 24, 3)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.argmax(probabilities, -1), labels)


def test_window_probabilities_argmax_is_the_label_map(volume):
    probabilities = sliding_window.sliding_window_probabilities(pointwise, volume, (2, 16, 16), (1, 8, 8), 2)
    labels = sliding_window.predict_labels(pointwise, volume, (2, 16, 16), (1, 8, 8), 2)
    np.testing.assert_array_equal(np.argmax(probabilities, -1), labels)
    np.testing.assert_allclose(probabilities, softmax(pointwise(volume[None]))[0], rtol=1e-5, atol=1e-6)


def test_flips_average_the_flipped_back_views():
    images = np.random.default_rng(2).normal(size=(2, 8, 10, 2)).astype(np.float32)
    # An equivariant predictor is unchanged by the averaging.
    np.testing.assert_allclose(softmax(inference.flip_averaged(pointwise, 2)(images)), softmax(pointwise(images)),
                               rtol=1e-5, atol=1e-6)
    # Otherwise: the mean of the four views' probabilities, each flipped back.
    views = [(), (1,), (2,), (1, 2)]
    expected = np.mean([np.flip(softmax(positional(np.flip(images, a))), a) for a in views], axis=0)
    got = softmax(inference.flip_averaged(positional, 2)(images))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, softmax(positional(images)), atol=1e-3)
