"""Volumetric ARCO end to end: a tiny 3-D dataset defined here (blobs in noise, volumes of
different sizes, no val split, as the LA protocol) trains the VNet with every ARCO term on
(3-D strong view, voxel samplers, banks, L_nn over 3-D cells, equivariance under 3-D warps),
and is tested on the last state by sliding windows; and UA-MT's weak view (in-plane rot90 and
flip, then a random crop with the reference's padding)."""
from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest

from arco_jax import train
from arco_jax.config import base_config
from arco_jax.data import pipeline, registry
from tests import tiny

TRAIN_SHAPES = [(20, 40, 36), (18, 36, 40), (24, 34, 34), (20, 38, 38), (19, 40, 35), (22, 33, 37)]
TEST_SHAPES = [(20, 36, 36), (17, 40, 34)]


def blob_volume(seed: int, shape) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoid brighter than the noise around it (class 1)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float32)
    centre = np.array(shape) / 2 + rng.uniform(-2, 2, 3)
    radii = np.array(shape) / rng.uniform(3.0, 4.0, 3)
    label = (np.sum(((grid - centre) / radii) ** 2, -1) <= 1).astype(np.uint8)
    image = rng.normal(0.0, 0.3, shape).astype(np.float32) + 1.2 * label
    return image, label


class Volumes:
    def __init__(self, seeds):
        self.seeds = list(seeds)

    def __len__(self):
        return len(self.seeds)

    def __getitem__(self, index):
        image, label = blob_volume(self.seeds[index], TRAIN_SHAPES[self.seeds[index] % len(TRAIN_SHAPES)])
        return {"image": image, "label": label}


class OpenBlobs:
    description = "blob volumes (in memory)"
    labeled_description = "2 labeled volumes"
    labeled_record = {"labeled_cases": 2}

    def train_sources(self):
        return Volumes([0, 1]), Volumes(range(2, 6))

    def cases(self, split):
        return [] if split == "val" else [f"blob{i}" for i in range(len(TEST_SHAPES))]

    def case(self, split, index):
        image, label = blob_volume(100 + index, TEST_SHAPES[index])
        return registry.Case(f"blob{index}", image, label)


BLOBS = registry.DatasetSpec(
    name="toy_blobs", fields=lambda: {},
    info=lambda config: registry.DatasetInfo(num_classes=2, class_names=("blob",), spatial_rank=3,
                                             eval_unit="volume", weak_augment="rot_flip_crop", intensity="zscore"),
    validate=lambda config: None, open=lambda config: OpenBlobs())


@pytest.fixture(scope="module")
def blobs_registered():
    registry.register(BLOBS)
    yield
    registry.unregister(BLOBS.name)


def blobs_config(steps: int = 1) -> ml_collections.ConfigDict:
    c = base_config()
    registry.select(c, BLOBS.name)
    c.model.name = "vnet"
    c.model.vnet = ml_collections.ConfigDict({"n_filters": 4, "dropout": True})
    c.model.rep_dim = 16  # the reference's 3-D representation
    tiny.tiny_arco(c)
    d = c.data
    d.patch_size = (16, 32, 32)
    d.batch_labeled = d.batch_unlabeled = 2
    c.pretrain.steps = 0
    c.train.steps = steps
    c.train.log_every = c.train.eval_every = c.train.checkpoint_every = steps
    c.eval.stride = (8, 16, 16)
    c.eval.window_batch_size = 4
    return c


def test_rot_flip_crop_is_the_reference_view():
    rng = np.random.default_rng(0)
    image = np.arange(10 * 12 * 14, dtype=np.float32).reshape(10, 12, 14)[..., None]
    label = (image[..., 0] % 2).astype(np.int32)
    out, out_label = pipeline.rot_flip_crop(image, label, (8, 8, 8), rng, fill_label=0)
    assert out.shape == (8, 8, 8, 1) and out_label.shape == (8, 8, 8)
    np.testing.assert_array_equal(out_label, out[..., 0].astype(np.int32) % 2)  # one transform for both
    # Depth is never rotated or flipped: consecutive slices differ by one plane of 12 x 14 values.
    np.testing.assert_array_equal(np.diff(out[:, 0, 0, 0]), 12 * 14)
    # A sample not larger than the patch is padded by (patch - size) // 2 + 3 on both sides first.
    small = np.ones((6, 8, 20, 1), np.float32)
    for seed in range(20):
        cropped, cropped_label = pipeline.rot_flip_crop(small, np.ones((6, 8, 20), np.int32), (8, 8, 8),
                                                        np.random.default_rng(seed), fill_label=7)
        assert cropped.shape == (8, 8, 8, 1)
        assert set(np.unique(cropped_label)) <= {1, 7} and np.all((cropped[..., 0] == 1) == (cropped_label == 1))
    # The crop starts uniformly in [0, size - patch): the last position is never taken, as randint.
    depth_coded = np.arange(12, dtype=np.float32)[:, None, None, None] * np.ones((12, 9, 9, 1), np.float32)
    firsts = {int(pipeline.rot_flip_crop(depth_coded, np.zeros((12, 9, 9), np.int32), (8, 4, 4),
                                         np.random.default_rng(s))[0][0, 0, 0, 0]) for s in range(200)}
    assert firsts == {0, 1, 2, 3}


def test_stage1_cubes_are_the_reference_windows_of_volumes():
    """pooled_windows on volumes: cubes of side `window` every window/2 voxels along each axis
    (row-major), each average-pooled to grid^3 cells, as a plain loop over the cubes."""
    from arco_jax.models.relational import num_windows, pooled_windows, window_starts

    maps = np.random.default_rng(0).normal(size=(2, 12, 16, 20, 3)).astype(np.float32)
    window, grid = 8, 4
    cell = window // grid
    expected = []
    for i in window_starts(12, window):
        for j in window_starts(16, window):
            for k in window_starts(20, window):
                cube = maps[:, i:i + window, j:j + window, k:k + window]
                expected.append(cube.reshape(2, grid, cell, grid, cell, grid, cell, 3).mean(axis=(2, 4, 6)))
    out = np.asarray(pooled_windows(maps, window, grid))
    assert out.shape == (2, num_windows((12, 16, 20), window), grid, grid, grid, 3) == (2, 2 * 3 * 4, 4, 4, 4, 3)
    np.testing.assert_allclose(out, np.stack(expected, axis=1), rtol=1e-5, atol=1e-6)


def test_volumetric_arco_trains_and_is_tested_by_sliding_windows(blobs_registered, tmp_path):
    results = train.train_and_evaluate(blobs_config(), tmp_path / "run")
    assert results["evaluator"] == "sliding_window" and set(results["test"]) == {"last"}
    record = results["test"]["last"]
    assert record["num_cases"] == 2 and set(record["per_class"]) == {"blob"}
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in lines if r["split"] == "val"]  # no val split: no selection
    (train_line,) = [r for r in lines if r["split"] == "train"]
    for term in ("sup", "unsup", "contrast", "eqv", "nn"):
        assert np.isfinite(train_line[f"loss_{term}"]) and train_line[f"loss_{term}"] > 0, term
    assert train_line["contrast_classes"] > 0


@pytest.mark.slow  # a second compiled 3-D job (about 45 s); the cubes are tested against a loop above
def test_volumetric_stage1_then_arco(blobs_registered, tmp_path):
    """One step of 3-D stage 1 (relational pretraining over cubes of the logits), then one of ARCO."""
    c = blobs_config()
    c.pretrain.steps, c.pretrain.window, c.pretrain.window_grid, c.pretrain.queue_size = 1, 16, 4, 8
    train.train_and_evaluate(c, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stage1_line, train_line = [r for r in lines if r["split"] == "train"]
    assert (stage1_line["stage"], train_line["stage"]) == (1, 2)
    assert all(np.isfinite(stage1_line[f"loss_{term}"]) for term in ("sup", "rel_global", "rel_local"))
