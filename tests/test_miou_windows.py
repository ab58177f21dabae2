"""mIoU by sliding windows (eval.window = (H, W)): windows over a whole image give the whole-image
confusion matrix for a pointwise network, overlaps are averaged (against a plain loop), small images
are padded, the settings are checked; and the confusion matrix of two processes, each evaluating its
share of the images, is their sum. Fake predict functions only: nothing is compiled."""
from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest

from arco_jax import evaluators, parallel
from arco_jax.config import ConfigError, base_config
from arco_jax.data import registry
from arco_jax.evaluators import miou

NUM_CLASSES, IGNORE = 4, 255
SHAPES = ((20, 30), (24, 40), (31, 17))  # the last is smaller than the window (24, 24) in width
WINDOW, STRIDE = (24, 24), (10, 12)


def miou_config(window=(), stride=(), batch=3):
    c = base_config()
    d = c.data
    d.num_classes, d.class_names, d.ignore_label, d.spatial_rank, d.in_channels = (
        NUM_CLASSES, ("a", "b", "c"), IGNORE, 2, 3)
    c.eval.type = "miou"
    c.eval.pad_multiple = 16
    c.eval.window, c.eval.stride, c.eval.window_batch_size = tuple(window), tuple(stride), batch
    return c


def case(index: int, shape) -> registry.Case:
    rng = np.random.default_rng(index)
    label = rng.integers(0, NUM_CLASSES, shape).astype(np.uint8)
    label[:2] = IGNORE
    return registry.Case(f"image_{index}", rng.normal(size=(*shape, 3)).astype(np.float32), label)


class Images:
    """An opened dataset (registry.OpenDataset) of the SHAPES images; records what was read."""

    def __init__(self, shapes=SHAPES):
        self.shapes, self.read = list(shapes), []

    def cases(self, split):
        return [f"image_{i}" for i in range(len(self.shapes))]

    def case(self, split, index):
        self.read.append(index)
        return case(index, self.shapes[index])


MIX = np.random.default_rng(7).normal(size=(3, NUM_CLASSES)).astype(np.float32)


def pointwise(images: np.ndarray, shapes: list | None = None) -> np.ndarray:
    """Logits of each pixel from its own channels only (a 1 x 1 convolution)."""
    if shapes is not None:
        shapes.append(images.shape)
    return images @ MIX


def positional(windows: np.ndarray) -> np.ndarray:
    """Logits that depend on where a pixel lies in its window: a pixel's windows disagree."""
    _, h, w, _ = windows.shape
    y, x = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    base = windows @ MIX
    return (base + np.stack([0.2 * x, 0.15 * y, np.sin(0.5 * x + 0.3 * y), -0.1 * x], axis=-1)).astype(np.float32)


def softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def loop_reference(predict, image, window, stride):
    """Windows written out: pad symmetrically to the window, every stride with the last flush with
    the edge, softmax summed and counted per pixel, divided, cropped back, argmaxed. Also what
    the first and the last window over each pixel alone say, and how many windows cover it."""
    (h, w), (wh, ww) = image.shape[:2], window
    ph, pw = max(wh - h, 0), max(ww - w, 0)
    padded = np.pad(image, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    H, W = padded.shape[:2]
    total, count = np.zeros((H, W, NUM_CLASSES)), np.zeros((H, W, 1))
    first, last = np.full((H, W), -1), np.full((H, W), -1)
    ys = sorted({min(y, H - wh) for y in range(0, H - wh + stride[0], stride[0])})
    xs = sorted({min(x, W - ww) for x in range(0, W - ww + stride[1], stride[1])})
    for y in ys:
        for x in xs:
            logits = predict(padded[None, y:y + wh, x:x + ww])[0]
            total[y:y + wh, x:x + ww] += softmax(logits)
            count[y:y + wh, x:x + ww] += 1
            region = first[y:y + wh, x:x + ww]
            region[region < 0] = np.argmax(logits, -1)[region < 0]
            last[y:y + wh, x:x + ww] = np.argmax(logits, -1)
    crop = (slice(ph // 2, ph // 2 + h), slice(pw // 2, pw // 2 + w))
    return np.argmax((total / count)[crop], -1), first[crop], last[crop], count[crop][..., 0]


def test_windows_over_the_image_give_the_whole_image_confusion_of_a_pointwise_net():
    whole = miou.MeanIoU(miou_config()).run(pointwise, Images(), "val")
    shapes = []
    windowed = miou.MeanIoU(miou_config(WINDOW, STRIDE)).run(lambda x: pointwise(x, shapes), Images(), "val")
    confusion = np.asarray(whole.record["confusion"])
    assert confusion.sum() == sum(np.sum(case(i, s).label != IGNORE) for i, s in enumerate(SHAPES))
    assert (np.diag(confusion) > 0).all() and (confusion - np.diag(np.diag(confusion))).sum() > 0  # can fail
    np.testing.assert_array_equal(windowed.record["confusion"], confusion)
    assert windowed.metrics == whole.metrics
    assert set(shapes) == {(3, *WINDOW, 3)}  # one compiled shape: full batches of the window
    assert "Sliding window (24, 24) (H, W) at stride (10, 12)" in windowed.table
    assert "Sliding window" not in whole.table


def test_overlapping_windows_are_averaged():
    evaluator = miou.MeanIoU(miou_config(WINDOW, STRIDE, batch=2))
    for index, shape in enumerate(SHAPES):
        image = case(index, shape).image
        expected, first, last, count = loop_reference(positional, image, WINDOW, STRIDE)
        assert count.max() >= 2  # pixels under several windows
        labels = evaluator.predict_image(positional, image)
        assert labels.shape == shape
        np.testing.assert_array_equal(labels, expected)
        # Where windows overlap, the average is neither the first nor the last window's answer.
        overlap = count > 1
        assert (labels[overlap] != first[overlap]).any() and (labels[overlap] != last[overlap]).any()


def test_default_stride_is_two_thirds_of_the_window():
    assert miou.default_stride((512, 512)) == (341, 341)
    assert miou.default_stride((1, 2)) == (1, 1)
    assert miou.window_settings(miou_config((48, 96))) == ((48, 96), (32, 64))
    assert miou.window_settings(miou_config()) == ((), ())
    evaluator = miou.MeanIoU(miou_config((16, 16)))
    assert evaluator.results_fields == {"ignore_label": IGNORE, "window": [16, 16], "stride": [10, 10]}
    assert miou.MeanIoU(miou_config()).results_fields == {"ignore_label": IGNORE}


@pytest.mark.parametrize("window, stride, batch, message", [
    ((32,), (), 4, "config.eval.window: must be 2 positive integers (H, W) for sliding-window mIoU"),
    ((32, 0), (), 4, "config.eval.window: must be 2 positive integers"),
    ((32, 32), (8,), 4, "config.eval.stride: must be 2 positive integers (H, W), or () for two thirds"),
    ((32, 32), (8, 40), 4, "config.eval.stride: (8, 40) exceeds the window (32, 32)"),
    ((32, 40), (), 4, "config.eval.window: (32, 40) must be multiples of 16, what the 'unet' model takes"),
    ((32, 32), (), 0, "config.eval.window_batch_size: must be a positive integer, got 0"),
])
def test_bad_window_settings_are_named(window, stride, batch, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        evaluators.validate(miou_config(window, stride, batch))


def test_whole_images_take_no_window_checks():
    evaluators.validate(miou_config(batch=0))  # window_batch_size is unused without windows


def test_two_processes_each_count_their_share_and_the_sum_is_every_image(monkeypatch):
    """Process p evaluates images p, p + 2, ...; gather_text brings both matrices to each process,
    and both report the confusion of every image (as one process does)."""
    single = miou.MeanIoU(miou_config()).run(pointwise, Images(), "val")
    sent, read = {}, {}

    def fake_gather(text):  # process 1 runs first; process 0 then receives both
        me = jax.process_index()
        sent[me] = text
        return [sent[0], sent[1]] if me == 0 else [text]

    monkeypatch.setattr(parallel, "gather_text", fake_gather)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    results = {}
    for process in (1, 0):
        monkeypatch.setattr(jax, "process_index", lambda p=process: p)
        images = Images()
        results[process] = miou.MeanIoU(miou_config()).run(pointwise, images, "val")
        read[process] = images.read
    assert read == {0: [0, 2], 1: [1]}
    shares = [np.asarray(json.loads(sent[p])) for p in (0, 1)]
    assert all(s.sum() > 0 for s in shares)  # each process counted pixels of its own
    np.testing.assert_array_equal(results[0].record["confusion"], single.record["confusion"])
    np.testing.assert_array_equal(shares[0] + shares[1], single.record["confusion"])
    assert results[0].metrics == single.metrics


def test_sum_over_processes_adds_the_gathered_matrices(monkeypatch):
    a, b = np.arange(4).reshape(2, 2), np.array([[5, 0], [1, 2]])
    monkeypatch.setattr(parallel, "gather_text", lambda text: [text, json.dumps(b.tolist())])
    total = miou.sum_over_processes(a)
    np.testing.assert_array_equal(total, a + b)
    assert total.dtype == np.int64
