"""Grain training streams: augmentation, batches, epochs, sharding, determinism and resume."""
import grain
import numpy as np
import pytest
from absl import flags

from arco_jax.data import phantom
from arco_jax.data import pipeline

CONFIG = phantom.PhantomConfig(splits=(3, 1, 1), image_size=40, slices=(3, 4), seed=2)
ONE_PROCESS = grain.sharding.ShardOptions(shard_index=0, shard_count=1)
PATCH = (32, 32)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return phantom.write_phantom_dataset(tmp_path_factory.mktemp("pipeline") / "ds", CONFIG)


def _streams(root, **overrides):
    kwargs = dict(num_labeled_slices=8, labeled_batch_size=4, unlabeled_batch_size=4,
                  patch_size=PATCH, seed=0, shard=ONE_PROCESS)
    kwargs.update(overrides)
    return pipeline.make_train_streams(root, **kwargs)


def _take(streams, n):
    return [next(streams) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    for (la, ua), (lb, ub) in zip(batches_a, batches_b, strict=True):
        for a, b in ((la, lb), (ua, ub)):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])


class _IndexedSource:
    """Elements whose image is filled with (index + 1): the index survives any augmentation."""

    def __init__(self, size):
        self._size = size

    def __len__(self):
        return self._size

    def __getitem__(self, index):
        return {"image": np.full((12, 12), index + 1.0, np.float32),
                "label": np.full((12, 12), index % 4, np.uint8), "name": str(index)}


def _element_ids(batch):
    return [int(x) - 1 for x in batch["image"].reshape(batch["image"].shape[0], -1).max(axis=1)]


def _asymmetric_label(shape=(24, 20)):
    label = np.zeros(shape, np.uint8)
    label[3:9, 2:7] = 1
    label[12:20, 9:16] = 2
    label[5:8, 12:18] = 3
    label[20:23, 1:4] = 3
    return label


def _dihedral(array):
    out = []
    for k in range(4):
        for axis in (0, 1):
            out.append(np.flip(np.rot90(array, k), axis))
    return out


def test_weak_augment_moves_image_and_label_together_and_keeps_label_values():
    label = _asymmetric_label()
    image = label.astype(np.float32) * 0.25  # image = f(label): checks identical geometry
    resized = pipeline.resize_nearest(label, (32, 32))
    branches = {"identity": 0, "rot90_flip": 0, "rotation": 0}
    rng = np.random.default_rng(0)
    for _ in range(400):
        out_image, out_label = pipeline.weak_augment(image, label, (32, 32), rng)
        assert out_image.shape == out_label.shape == (32, 32)
        assert out_image.dtype == np.float32 and out_label.dtype == np.uint8
        assert set(np.unique(out_label)) <= {0, 1, 2, 3}
        np.testing.assert_array_equal(out_image, out_label.astype(np.float32) * 0.25)
        if np.array_equal(out_label, resized):
            branches["identity"] += 1
        elif any(np.array_equal(out_label, d) for d in _dihedral(resized)):
            branches["rot90_flip"] += 1
        else:
            branches["rotation"] += 1
    # Reference probabilities: 1/2 rot90+flip, 1/4 rotation, 1/4 nothing (a rotation by
    # -1, 0 or 1 degree leaves this label unchanged: 3/40 of the rotations look like identity).
    assert 170 <= branches["rot90_flip"] <= 230
    assert 70 <= branches["rotation"] <= 115 and 80 <= branches["identity"] <= 130


def test_resize_is_nearest_neighbour():
    label = _asymmetric_label()
    out = pipeline.resize_nearest(label, (48, 40))
    assert out.shape == (48, 40) and set(np.unique(out)) == set(np.unique(label))
    np.testing.assert_array_equal(out[::2, ::2], label)


def test_batches_shapes_dtypes_and_ranges(root):
    streams = _streams(root, unlabeled_with_labels=False)
    labeled, unlabeled = next(streams)
    assert labeled["image"].shape == (4, *PATCH, 1) and labeled["image"].dtype == np.float32
    assert labeled["label"].shape == (4, *PATCH) and labeled["label"].dtype == np.int32
    assert set(unlabeled) == {"image"} and unlabeled["image"].shape == (4, *PATCH, 1)
    for batch in (labeled, unlabeled):
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert set(np.unique(labeled["label"])) <= {0, 1, 2, 3} and labeled["label"].max() > 0
    with_labels = _streams(root, unlabeled_with_labels=True)
    assert next(with_labels)[1]["label"].shape == (4, *PATCH)


def test_same_seed_same_stream_other_seed_other_stream(root):
    first = _take(_streams(root), 3)
    _assert_same(first, _take(_streams(root), 3))
    other = _take(_streams(root, seed=1), 3)
    assert not np.array_equal(first[0][0]["image"], other[0][0]["image"])


def test_every_epoch_is_a_new_permutation_of_the_source():
    size, batch = 12, 4
    stream = iter(pipeline.make_stream(_IndexedSource(size), global_batch_size=batch,
                                       patch_size=(12, 12), seed=5, shard=ONE_PROCESS))
    ids = [i for _ in range(2 * size // batch) for i in _element_ids(next(stream))]
    first, second = ids[:size], ids[size:]
    assert sorted(first) == sorted(second) == list(range(size))
    assert first != second and first != list(range(size))


def test_labeled_and_unlabeled_streams_use_independent_seeds():
    ids = []
    for stream in (0, 1):
        it = iter(pipeline.make_stream(_IndexedSource(16), global_batch_size=8, patch_size=(12, 12),
                                       seed=5, stream=stream, shard=ONE_PROCESS))
        ids.append(_element_ids(next(it)))
    assert ids[0] != ids[1]


def test_process_shards_are_disjoint_and_together_form_the_global_batch():
    def stream(index, count, batch):
        shard = grain.sharding.ShardOptions(shard_index=index, shard_count=count)
        return iter(pipeline.make_stream(_IndexedSource(10), global_batch_size=batch,
                                         patch_size=(12, 12), seed=9, shard=shard))

    single = stream(0, 1, 4)
    shards = [stream(0, 2, 4), stream(1, 2, 4)]
    for _ in range(5):  # crosses epoch boundaries (10 elements, 4 per step)
        global_ids = _element_ids(next(single))
        parts = [_element_ids(next(s)) for s in shards]
        assert all(len(p) == 2 for p in parts)
        assert sorted(parts[0] + parts[1]) == sorted(global_ids)
        assert parts[0] == global_ids[0::2] and parts[1] == global_ids[1::2]
    with pytest.raises(ValueError, match="not divisible"):
        stream(0, 2, 5)
    with pytest.raises(ValueError, match="2 or 3 axes"):
        pipeline.make_stream(_IndexedSource(4), global_batch_size=2, patch_size=(12,), seed=0, shard=ONE_PROCESS)


class _RgbSource:
    """Non-square three-channel images whose channels differ, labels with an ignore value."""

    def __len__(self):
        return 6

    def __getitem__(self, index):
        image = np.stack([np.full((20, 28), index + 1 + c / 4, np.float32) for c in range(3)], -1)
        label = np.full((20, 28), index % 3, np.uint8)
        label[:, :4] = 255
        return {"image": image, "label": label}


def test_multichannel_non_square_images_keep_channels_and_shape_and_fill_with_the_ignore_label():
    stream = iter(pipeline.make_stream(_RgbSource(), global_batch_size=6, patch_size=(16, 32), seed=3,
                                       shard=ONE_PROCESS, fill_label=255))
    rotated = 0
    for _ in range(4):
        batch = next(stream)
        assert batch["image"].shape == (6, 16, 32, 3) and batch["label"].shape == (6, 16, 32)
        for image, label in zip(batch["image"], batch["label"]):
            filled = image[..., 0] == 0  # rotation corners: image 0, label the fill value
            index = int(np.max(image[..., 0])) - 1
            np.testing.assert_allclose(image[~filled], np.broadcast_to([index + 1, index + 1.25, index + 1.5],
                                                                       image[~filled].shape))
            assert set(np.unique(label[~filled])) <= {index % 3, 255}
            if filled.any():
                rotated += 1
                assert np.all(label[filled] == 255)
    assert rotated > 0  # some draws rotate by an angle, bringing in corners


def test_restoring_the_state_reproduces_the_next_batches(root):
    streams = _streams(root)
    _take(streams, 3)
    state = streams.get_state()
    expected = _take(streams, 4)

    resumed = _streams(root)
    resumed.set_state(state)
    _assert_same(_take(resumed, 4), expected)


def test_grain_checkpoint_handler_round_trip(root, tmp_path):
    streams = _streams(root)
    _take(streams, 2)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(tmp_path, item=streams.labeled)
    expected = next(streams.labeled)

    fresh = _streams(root)
    handler.restore(tmp_path, item=fresh.labeled)
    np.testing.assert_array_equal(next(fresh.labeled)["image"], expected["image"])


def test_one_worker_process_gives_the_in_process_stream(root):
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    in_process = _take(_streams(root), 3)
    streams = _streams(root, worker_count=1)
    try:
        _assert_same(_take(streams, 3), in_process)
    finally:
        streams.close()
