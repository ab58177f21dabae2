"""The 3-D sliding-window evaluator (the reference's test_3D.py protocol): window positions,
probabilities equal to a plain loop over windows, zero padding and crop-back, the largest
component, the evaluator end to end on a 3-D dataset registered here, 'auto' choosing it, and
its config checks. Fake predict functions only: nothing is compiled."""
from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import pytest

from arco_jax import evaluation, evaluators
from arco_jax.config import ConfigError, base_config, upgrade_record, validate
from arco_jax.data import registry
from arco_jax.evaluators import sliding_window as sw

IGNORE = 255
SPACING = (2.0, 0.7, 0.7)


# ----------------------------------------------------------------------------- fakes and references

def positional_logits(windows: np.ndarray) -> np.ndarray:
    """Three classes whose logits depend on intensity and on the position inside the window, so a
    voxel's windows disagree and the average over overlaps matters."""
    x = windows.sum(axis=-1)
    _, d, h, w = x.shape
    z, y, v = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([x, 0.3 * z - 0.5 * x, np.sin(0.7 * y + 0.3 * v) + 0.1 * x ** 2], axis=-1).astype(np.float32)


def loop_reference(predict, image, window, stride):
    """The reference's test_single_case written out plainly: pad, three nested loops over window
    starts, softmax summed and counted per voxel, divided, cropped back."""
    image = np.asarray(image, np.float32)
    if image.ndim == 3:
        image = image[..., None]
    shape = image.shape[:3]
    pads = [max(w - s, 0) for s, w in zip(shape, window)]
    before = [p // 2 for p in pads]
    image = np.pad(image, [(b, p - b) for b, p in zip(before, pads)] + [(0, 0)])
    dd, hh, ww = image.shape[:3]
    steps = [math.ceil((n - w) / s) + 1 for n, w, s in zip((dd, hh, ww), window, stride)]
    scores, count = None, np.zeros((dd, hh, ww), np.float32)
    for i in range(steps[0]):
        zs = min(stride[0] * i, dd - window[0])
        for j in range(steps[1]):
            ys = min(stride[1] * j, hh - window[1])
            for k in range(steps[2]):
                xs = min(stride[2] * k, ww - window[2])
                patch = image[zs:zs + window[0], ys:ys + window[1], xs:xs + window[2]]
                logits = np.asarray(predict(patch[None]), np.float64)[0]
                e = np.exp(logits - logits.max(-1, keepdims=True))
                if scores is None:
                    scores = np.zeros((dd, hh, ww, logits.shape[-1]))
                scores[zs:zs + window[0], ys:ys + window[1], xs:xs + window[2]] += e / e.sum(-1, keepdims=True)
                count[zs:zs + window[0], ys:ys + window[1], xs:xs + window[2]] += 1
    scores /= count[..., None]
    return scores[before[0]:before[0] + shape[0], before[1]:before[1] + shape[1], before[2]:before[2] + shape[2]]


class Recorder:
    """A predict function that remembers the shape of every batch it was given."""

    def __init__(self, fn):
        self.fn, self.shapes, self.batches = fn, [], []

    def __call__(self, batch):
        self.shapes.append(batch.shape)
        self.batches.append(np.array(batch))
        return self.fn(batch)


# ----------------------------------------------------------------------------- positions

@pytest.mark.parametrize("size, window, stride, starts", [
    (10, 4, 3, [0, 3, 6]),            # ceil(6 / 3) + 1 = 3, the last one exactly at the end
    (11, 4, 3, [0, 3, 6, 7]),         # the last window is pulled back to end flush with the volume
    (8, 8, 2, [0]),                   # the volume is one window
    (9, 8, 8, [0, 1]),
    (88, 80, 4, [0, 4, 8]),           # the reference's LA depth: 80-voxel windows every 4
    (131, 112, 18, [0, 18, 19]),
    (20, 5, 1, list(range(16))),
])
def test_window_starts(size, window, stride, starts):
    assert sw.window_starts(size, window, stride) == starts
    assert len(starts) == math.ceil((size - window) / stride) + 1


def test_window_positions_and_padding_of_a_volume_smaller_than_the_window():
    assert sw.window_positions((10, 11, 8), (4, 4, 8), (3, 3, 2)) == list(
        itertools.product([0, 3, 6], [0, 3, 6, 7], [0]))
    # (5, 20, 24) under an (8, 8, 8) window: 3 missing slices, 1 before and 2 after; the rest fits.
    assert sw.symmetric_padding((5, 20, 24), (8, 8, 8)) == ((1, 2), (0, 0), (0, 0))
    assert sw.symmetric_padding((5, 6, 7), (8, 8, 8)) == ((1, 2), (1, 1), (0, 1))
    assert sw.window_positions((8, 20, 24), (8, 8, 8), (4, 6, 8)) == list(
        itertools.product([0], [0, 6, 12], [0, 8, 16]))
    with pytest.raises(ValueError, match="smaller than the window"):
        sw.window_starts(5, 8, 4)


def test_default_stride_is_the_references_la_strides_scaled_to_the_window():
    assert sw.default_stride((80, 112, 112)) == (4, 18, 18)
    assert sw.default_stride((16, 32, 32)) == (1, 5, 5)
    assert sw.default_stride((160, 224, 224)) == (8, 36, 36)


# ----------------------------------------------------------------------------- probabilities

@pytest.mark.parametrize("channels", [None, 2])
def test_probabilities_equal_a_plain_loop_over_windows(channels):
    rng = np.random.default_rng(0)
    shape = (10, 20, 24) if channels is None else (10, 20, 24, channels)
    image = rng.normal(size=shape).astype(np.float32)
    window, stride = (4, 8, 10), (3, 5, 4)  # 3 x 4 x 5 = 60 windows, 9 batches of 7 (the last one padded)
    predict = Recorder(positional_logits)
    got = sw.sliding_window_probabilities(predict, image, window, stride, batch_size=7)
    want = loop_reference(positional_logits, image, window, stride)
    assert got.shape == (10, 20, 24, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
    # Every call gets a full batch (one compiled program); the 3 windows after the 60th are zeros.
    assert predict.shapes == [(7, *window, channels or 1)] * 9
    assert not predict.batches[-1][4:].any() and predict.batches[-1][3].any()
    labels = sw.predict_labels(positional_logits, image, window, stride, batch_size=7)
    np.testing.assert_array_equal(labels, np.argmax(want, -1))


def test_overlapping_windows_are_averaged_not_overwritten():
    image = np.random.default_rng(1).normal(size=(6, 10, 10)).astype(np.float32)
    dense = sw.sliding_window_probabilities(positional_logits, image, (4, 6, 6), (1, 2, 2), batch_size=5)
    sparse = sw.sliding_window_probabilities(positional_logits, image, (4, 6, 6), (4, 6, 6), batch_size=5)
    assert np.abs(dense - sparse).max() > 1e-2
    np.testing.assert_allclose(dense, loop_reference(positional_logits, image, (4, 6, 6), (1, 2, 2)), atol=2e-6)


def test_a_small_volume_is_zero_padded_symmetrically_and_cropped_back():
    image = np.random.default_rng(2).uniform(1.0, 2.0, size=(5, 6, 7)).astype(np.float32)  # no zeros inside
    predict = Recorder(positional_logits)
    got = sw.sliding_window_probabilities(predict, image, (8, 8, 8), (4, 4, 4), batch_size=2)
    assert got.shape == (5, 6, 7, 3)
    np.testing.assert_allclose(got, loop_reference(positional_logits, image, (8, 8, 8), (4, 4, 4)), atol=2e-6)
    # One window over the padded (8, 8, 8) volume: (1, 2) slices, (1, 1) rows, (0, 1) columns of zeros.
    assert predict.shapes == [(2, 8, 8, 8, 1)]
    seen = predict.batches[0][0, ..., 0]
    np.testing.assert_array_equal(seen[1:6, 1:7, 0:7], image)
    assert seen.sum() == pytest.approx(image.sum(), rel=1e-6)
    assert not predict.batches[0][1].any()
    # The crop is the volume's own voxels: the padded prediction at the offset, not its corner.
    padded = np.pad(image, ((1, 2), (1, 1), (0, 1)))
    logits = positional_logits(padded[None, ..., None])[0]
    e = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(got, (e / e.sum(-1, keepdims=True))[1:6, 1:7, 0:7], atol=1e-6)


def test_bad_arguments_are_refused():
    image = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(ValueError, match="exceeds window"):
        sw.sliding_window_probabilities(positional_logits, image, (4, 4, 4), (4, 5, 4))
    with pytest.raises(ValueError, match="positive"):
        sw.sliding_window_probabilities(positional_logits, image, (4, 4, 0), (1, 1, 1))
    with pytest.raises(ValueError, match="predict returned shape"):
        sw.sliding_window_probabilities(lambda b: positional_logits(b)[:, :2], image, (4, 4, 4), (4, 4, 4))


# ----------------------------------------------------------------------------- largest component

def test_largest_component_keeps_the_largest_blob_of_each_class():
    labels = np.zeros((8, 10, 10), np.int32)
    labels[1:4, 1:5, 1:5] = 1            # 48 voxels of class 1 ...
    labels[4, 5, 5] = 1                  # ... and one more touching its corner (3, 4, 4) diagonally
    labels[6:8, 7:10, 7:10] = 1          # a separate 18-voxel class-1 blob
    labels[0, 7:9, 0:2] = 2              # 4 voxels of class 2, apart from the class-1 blobs ...
    labels[0, 0, 9] = 2                  # ... and a lone class-2 voxel
    kept = sw.largest_component(labels)
    want = np.zeros_like(labels)
    want[1:4, 1:5, 1:5] = want[4, 5, 5] = 1  # 26-connected, as skimage.measure.label's default
    want[0, 7:9, 0:2] = 2                # the smaller class keeps its own largest blob
    np.testing.assert_array_equal(kept, want)
    assert kept.dtype == labels.dtype
    empty = np.zeros((4, 4, 4), np.int32)
    np.testing.assert_array_equal(sw.largest_component(empty), empty)
    one = np.zeros((4, 4, 4), np.int32)
    one[1, 1, 1] = 1
    np.testing.assert_array_equal(sw.largest_component(one), one)


# ----------------------------------------------------------------------------- a 3-D dataset

SHAPES = {"val": [(10, 20, 24), (12, 18, 20), (6, 20, 24)], "test": [(10, 20, 24)]}  # val_2: 6 < 8 slices


def toy_volume(seed: int, shape) -> tuple[np.ndarray, np.ndarray]:
    """Noise with a class-1 box of intensity 1 and a class-2 box of intensity 2; the first slice is
    unlabeled (the ignore label)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, 0.35, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    _, h, w = shape
    for cls, (z, y, x) in ((1, (1, 2, 2)), (2, (2, h - 8, w - 9))):
        image[z:z + 4, y:y + 6, x:x + 7] += cls
        label[z:z + 4, y:y + 6, x:x + 7] = cls
    label[0] = IGNORE
    return image, label


class OpenToyVolumes:
    description = "toy 3-D boxes (in memory)"
    labeled_count = 1
    labeled_description = "1 labeled volume"
    labeled_record = {"labeled_volumes": 1}

    def train_sources(self):
        raise NotImplementedError

    def cases(self, split):
        return [f"{split}_{i}" for i in range(len(SHAPES[split]))]

    def case(self, split, index):
        image, label = toy_volume(100 * (split == "test") + index, SHAPES[split][index])
        return registry.Case(f"{split}_{index}", image, label, SPACING)


TOY = registry.DatasetSpec(
    name="toy_volumes", fields=lambda: {},
    info=lambda config: registry.DatasetInfo(num_classes=3, class_names=("one", "two"), ignore_label=IGNORE,
                                             spatial_rank=3, has_spacing=True, eval_unit="volume"),
    validate=lambda config: None, open=lambda config: OpenToyVolumes())


@pytest.fixture(scope="module")
def toy_registered():
    registry.register(TOY)
    yield
    registry.unregister(TOY.name)


def toy_config():
    c = base_config()
    registry.select(c, TOY.name)
    c.model.name = "vnet"  # a 3-D dataset needs a 3-D model
    c.data.patch_size = (16, 32, 32)
    return c


def intensity_logits(windows: np.ndarray) -> np.ndarray:
    """Class k where the intensity is near k, plus a little position so windows disagree."""
    x = windows[..., 0]
    z = np.arange(x.shape[1], dtype=np.float32)[None, :, None, None]
    return np.stack([-4 * (x - k) ** 2 + 0.05 * k * z for k in range(3)], axis=-1).astype(np.float32)


def test_auto_picks_sliding_window_for_3d_volumes_and_volume_slices_for_the_phantom(toy_registered):
    assert evaluators.type_of(toy_config()) == "sliding_window"
    assert isinstance(evaluators.build(toy_config()), sw.SlidingWindow)
    phantom = base_config()
    registry.select(phantom, "phantom")
    assert evaluators.type_of(phantom) == "volume_slices"
    assert evaluators.select_metric(toy_config()) == ("dice", "max")
    validate(toy_config())


def test_the_evaluator_reports_evaluate_volume_of_the_sliding_window_prediction(toy_registered):
    c = toy_config()
    c.eval.window, c.eval.stride, c.eval.window_batch_size = (8, 16, 16), (4, 8, 8), 3
    evaluator = evaluators.build(c)
    evaluator.distances_in_mm = True
    predict = Recorder(intensity_logits)
    data = registry.open_dataset(c)
    logger = logging.getLogger("arco_jax")
    handler = logging.Handler()
    warnings = []
    handler.emit = lambda record: warnings.append(record.getMessage())
    logger.addHandler(handler)
    try:
        result = evaluator.run(predict, data, "val")
        again = evaluator.run(predict, data, "val")
    finally:
        logger.removeHandler(handler)
    assert set(predict.shapes) == {(3, 8, 16, 16, 1)}  # one batch shape for every case
    # One warning for the split (not one per run), naming the padded case and its shape.
    padded = [m for m in warnings if "zero-padded" in m]
    assert len(padded) == 1 and "val_2 (6, 20, 24)" in padded[0] and "1 of 3 val volumes" in padded[0]
    assert result.record["padded_cases"] == {"val_2": [6, 20, 24]}

    per_case, per_case_mm = {}, {}
    for index, name in enumerate(data.cases("val")):
        case = data.case("val", index)
        pred = np.argmax(loop_reference(intensity_logits, case.image, (8, 16, 16), (4, 8, 8)), -1)
        per_case[name] = evaluation.evaluate_volume(pred, case.label, 3, empty_policy="ssl4mis", ignore_label=IGNORE)
        per_case_mm[name] = evaluation.evaluate_volume(pred, case.label, 3, SPACING, empty_policy="ssl4mis",
                                                       ignore_label=IGNORE)
    for name, rows in per_case.items():
        np.testing.assert_allclose(result.record["per_case"][name], rows, rtol=1e-12)
        np.testing.assert_allclose(result.record["per_case_mm"][name], per_case_mm[name], rtol=1e-12)
    summary = evaluation.summarize(per_case, ["one", "two"])
    for i, metric in enumerate(evaluation.METRIC_NAMES):
        assert result.metrics[metric] == pytest.approx(summary["class_mean"][i], rel=1e-12)
        assert result.record["mean"][metric] == pytest.approx(summary["class_mean"][i], rel=1e-12)
    assert 0.5 < result.metrics["dice"] < 1.0  # a real, imperfect segmentation: the numbers mean something
    assert result.record["mean"]["hd95_mm"] is not None and result.record["cases_with_spacing"] == 3
    assert result.metrics == again.metrics
    assert "| Mean |" in result.table and "Sliding window (8, 16, 16)" in result.table
    assert evaluator.results_fields == {"empty_policy": "ssl4mis", "distance_units": "voxels",
                                        "window": [8, 16, 16], "stride": [4, 8, 8], "largest_component": False}

    # The ignore label is honoured: predicting class 1 on the unlabeled first slice changes nothing.
    def noisy_first_slice(windows):
        logits = intensity_logits(windows)
        logits[:, :1, ..., 1] += 100.0
        return logits

    c.eval.window, c.eval.stride = (10, 16, 16), (10, 8, 8)  # every window starts at slice 0 ...
    quiet = evaluators.build(c).run(intensity_logits, data, "test")
    marked = evaluators.build(c).run(noisy_first_slice, data, "test")
    assert quiet.record["per_case"] == marked.record["per_case"]  # ... so only ignored voxels differ

    c.eval.largest_component = True
    kept = evaluators.build(c).run(intensity_logits, data, "test")
    case = data.case("test", 0)
    pred = sw.largest_component(np.argmax(loop_reference(intensity_logits, case.image, (10, 16, 16),
                                                         (10, 8, 8)), -1))
    np.testing.assert_allclose(kept.record["per_case"]["test_0"],
                               evaluation.evaluate_volume(pred, case.label, 3, empty_policy="ssl4mis",
                                                          ignore_label=IGNORE), rtol=1e-12)
    assert kept.record["per_case"] != quiet.record["per_case"]  # the stray false positives are gone
    assert kept.metrics["dice"] > quiet.metrics["dice"]


# ----------------------------------------------------------------------------- config

def assert_rejected(c, field, *mentions):
    with pytest.raises(ConfigError) as info:
        validate(c)
    message = str(info.value)
    assert message.startswith(f"config.{field}:") and "\n" not in message, message
    for text in mentions:
        assert text in message, message


@pytest.mark.parametrize("field, value, mentions", [
    ("window", (16, 32), ("3 positive integers",)),
    ("window", (16, 0, 32), ("(16, 0, 32)",)),
    ("window", (16, 32, 24), ("multiples of 16",)),
    ("stride", (4, 4), ("3 positive integers",)),
    ("stride", (0, 4, 4), ("(0, 4, 4)",)),
    ("stride", (4, 40, 4), ("exceeds the window (16, 32, 32)",)),
    ("window_batch_size", 0, ("positive integer",)),
    ("window_batch_size", -2, ("-2",)),
])
def test_bad_settings_are_refused_naming_the_field(toy_registered, field, value, mentions):
    c = toy_config()
    c.eval[field] = value
    assert_rejected(c, f"eval.{field}", *mentions)


def test_a_2d_dataset_is_refused_and_2d_configs_are_unchanged(toy_registered):
    c = base_config()
    registry.select(c, "phantom")
    validate(c)  # the new fields' defaults leave 2-D runs valid and evaluated as before
    c.eval.type = "sliding_window"
    assert_rejected(c, "eval.type", "'sliding_window'", "2-D")
    c = toy_config()
    c.eval.type = "volume_slices"
    assert_rejected(c, "eval.type", "3-D")


def test_old_records_upgrade_to_todays_defaults():
    record = base_config().to_dict()
    for field in ("window", "stride", "window_batch_size", "largest_component"):
        del record["eval"][field]
    upgraded = upgrade_record(record)["eval"]
    defaults = base_config().eval
    assert tuple(upgraded["window"]) == defaults.window == ()
    assert tuple(upgraded["stride"]) == defaults.stride == ()
    assert upgraded["window_batch_size"] == defaults.window_batch_size
    assert upgraded["largest_component"] is defaults.largest_component is False
