"""The built-in 3-D atrium phantom (arco_jax.data.la_phantom): deterministic per case, written
once in the UA-MT layout and read by the LA reader unchanged, not separable by intensity
alone, its field errors named, and configs/la_demo.py valid on it. Tiny volumes."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from arco_jax.config import base_config, validate
from arco_jax.data import generated, la, la_phantom, registry
from arco_jax.errors import ConfigError
from tests.tiny import load_config

TINY = la_phantom.AtriumPhantomConfig(cases=(4, 2), shape=(16, 32, 32), seed=3)


def phantom_config(cache: Path, **fields):
    c = base_config()
    registry.select(c, la_phantom.NAME)
    c.data.cache_dir = str(cache)
    c.data.la_phantom.cases, c.data.la_phantom.shape, c.data.la_phantom.seed = TINY.cases, TINY.shape, TINY.seed
    c.data.labeled_cases = 2
    c.data.patch_size, c.model.name = (16, 32, 32), "vnet"
    for key, value in fields.items():
        c.data[key] = value
    return c


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_cases_are_deterministic_and_independent_of_the_case_count():
    image, label = la_phantom.generate_case(TINY, 1)
    again, again_label = la_phantom.generate_case(la_phantom.AtriumPhantomConfig(cases=(9, 3), shape=TINY.shape,
                                                                                 seed=TINY.seed), 1)
    np.testing.assert_array_equal(image, again)
    np.testing.assert_array_equal(label, again_label)
    other, _ = la_phantom.generate_case(TINY, 2)
    assert image.shape == TINY.shape and image.dtype == np.float32 and label.dtype == np.uint8
    assert not np.array_equal(image, other)
    assert set(np.unique(label)) == {0, 1}
    assert abs(float(image.mean())) < 1e-4 and abs(float(image.std()) - 1) < 1e-3  # z-scored, as mri_norm2
    assert ndimage.label(label)[1] >= 1 and 0.005 < label.mean() < 0.3


def test_bright_distractors_make_intensity_alone_insufficient():
    """A ventricle and an aorta of blood intensity sit outside the atrium: a threshold at the
    atrium's lower intensity quartile marks many background voxels too."""
    config = la_phantom.AtriumPhantomConfig(cases=(2, 1), shape=(40, 64, 64))
    outside = []
    for number in (1, 2, 3):
        image, label = la_phantom.generate_case(config, number)
        threshold = np.percentile(image[label == 1], 25)
        outside.append(np.sum((image > threshold) & (label == 0)) / np.sum(label == 1))
    assert min(outside) > 0.1, outside


def test_written_once_in_the_ua_mt_layout_and_read_by_the_la_reader(cache):
    config = phantom_config(cache)
    validate(config)
    data = registry.open_dataset(config)
    root = data.root
    assert root.parent == cache and root.name == f"la_phantom-{TINY.fingerprint()}"
    marker = generated.read_marker(root)
    assert marker["config"] == TINY.to_json() and marker["train_volumes"] == 4
    assert la.read_list(root / la.TRAIN_LIST) == [(n, la_phantom.case_name(n)) for n in range(1, 5)]
    labeled, unlabeled = data.train_sources()
    assert labeled.names == ["ATRIUM001", "ATRIUM002"] and unlabeled.names == ["ATRIUM003", "ATRIUM004"]
    assert data.cases("test") == ["ATRIUM005", "ATRIUM006"] and data.cases("val") == []
    case = data.case("test", 1)
    image, label = la_phantom.generate_case(TINY, 6)
    np.testing.assert_array_equal(case.image, image)  # stored (H, W, D), read back depth first
    np.testing.assert_array_equal(case.label, label)
    stamp = (root / la.CASE_DIR / "ATRIUM001" / la.VOLUME_FILE).stat().st_mtime_ns
    assert registry.open_dataset(phantom_config(cache)).root == root  # reused, not rewritten
    assert (root / la.CASE_DIR / "ATRIUM001" / la.VOLUME_FILE).stat().st_mtime_ns == stamp


def test_a_foreign_folder_under_the_phantom_name_is_refused(tmp_path):
    root = tmp_path / f"la_phantom-{TINY.fingerprint()}"
    root.mkdir()
    (root / generated.MARKER_FILE).write_text(json.dumps({"generator_version": 0, "config": {}}))
    with pytest.raises(FileExistsError, match=re.escape(f"{root} exists but its {generated.MARKER_FILE} does not match")):
        la_phantom.ensure_atrium_phantom(tmp_path, TINY)


@pytest.mark.parametrize("fields, message", [
    ({"labeled_cases": 4}, "config.data.labeled_cases: 4 is not in 1..3: the phantom has 4 train cases"),
    ({"labeled_cases": 0}, "config.data.labeled_cases: must be an integer >= 1"),
    ({"la_phantom": {"cases": (1, 1), "shape": (16, 32, 32), "seed": 0}},
     "config.data.la_phantom: cases must be (train >= 2, test >= 1) volumes, got (1, 1)"),
    ({"la_phantom": {"cases": (4, 2), "shape": (8, 32, 32), "seed": 0}},
     "config.data.la_phantom: shape must be (D, H, W) with every size >= 16 voxels"),
    ({"data_dir": "/nonexistent/phantom"}, "config.data.data_dir: '/nonexistent/phantom' is not a directory"),
])
def test_bad_fields_are_named(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(phantom_config(tmp_path, **fields))
    assert not any(tmp_path.iterdir())  # nothing generated for a bad config


def test_the_demo_config_is_the_la_config_scaled_down(cache):
    from arco_jax import evaluators, methods

    c = load_config("la_demo")
    validate(c)
    assert c.data.dataset == "la_phantom" and tuple(c.data.patch_size) == (32, 48, 48)
    assert (c.model.name, c.model.rep_dim, c.method, c.arco.sampler) == ("vnet", 16, "arco_sag", "sag")
    assert evaluators.type_of(c) == "sliding_window" and tuple(c.eval.window) == tuple(c.data.patch_size)
    assert registry.info(c).weak_augment == "rot_flip_crop"
    assert methods.stage2_method_name(load_config("la_demo", "method=supervised")) == "supervised"
