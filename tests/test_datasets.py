"""The two dataset forms behind one interface: an SSL4MIS folder and the same data built as
TFDS give the same labeled/unlabeled sources, the same volumes and spacings, the same training
batches, and the same evaluation."""
import shutil

import h5py
import ml_collections
import numpy as np
import pytest

from arco_jax import evaluate, train
from arco_jax.config import ConfigError, base_config, validate
from arco_jax.data import datasets, phantom, registry, ssl4mis, tfds_acdc
from arco_jax.data.ssl4mis import DataError

TINY = phantom.PhantomConfig(splits=(3, 1, 2), image_size=32, slices=(3, 4), seed=2)
SPACING = (10.0, 1.5, 1.25)
NUM_LABELED = 7


@pytest.fixture(scope="module")
def h5_root(tmp_path_factory):
    """The phantom with a voxel spacing on every volume, as the ACDC converter writes it."""
    root = phantom.write_phantom_dataset(tmp_path_factory.mktemp("h5") / "ds", TINY)
    for path in (root / "data").glob("*.h5"):
        with h5py.File(path, "a") as f:
            f.attrs["spacing"] = SPACING
    return root


@pytest.fixture(scope="module")
def tfds_dir(h5_root, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    tfds_acdc.build_acdc(h5_root, data_dir)
    return data_dir


@pytest.fixture(scope="module")
def both(h5_root, tfds_dir):
    return datasets.Ssl4misData(h5_root), datasets.TfdsData(tfds_dir)


def items(source) -> list[dict]:
    return [source[i] for i in range(len(source))]


def test_train_sources_split_the_list_at_the_same_slice(both):
    (h5_labeled, h5_unlabeled), (tf_labeled, tf_unlabeled) = (d.train_sources(NUM_LABELED, 4) for d in both)
    assert len(h5_labeled) == len(tf_labeled) == NUM_LABELED
    assert len(h5_unlabeled) == len(tf_unlabeled) > 0
    for ours, theirs in [*zip(items(tf_labeled), items(h5_labeled)), *zip(items(tf_unlabeled), items(h5_unlabeled))]:
        assert ours["name"] == theirs["name"]
        np.testing.assert_array_equal(ours["image"], theirs["image"])
        np.testing.assert_array_equal(ours["label"], theirs["label"])


@pytest.mark.parametrize("split", ssl4mis.SPLITS)
def test_volumes_and_spacings_agree(both, split):
    h5, tf = both
    assert h5.cases(split) == tf.cases(split) == ssl4mis.list_cases(h5.root, split)
    for a, b in zip(datasets.iterate_volumes(h5, split, 4), datasets.iterate_volumes(tf, split, 4)):
        assert a.case == b.case and a.spacing == b.spacing == SPACING
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)


def test_a_process_share_of_a_split_is_every_nth_volume(both):
    h5, _ = both
    cases = h5.cases("test")
    share = [v.case for v in datasets.iterate_volumes(h5, "test", 4, range(1, len(cases), 2))]
    assert share == cases[1::2]


class FirstSlicesLabeled:
    """An opened dataset whose labeled set is the first NUM_LABELED training slices."""

    def __init__(self, data):
        self.data = data

    def train_sources(self):
        return self.data.train_sources(NUM_LABELED, 4)


def test_training_batches_are_the_same_from_either_source(both):
    config = base_config()
    registry.select(config, "acdc")
    config.data.patch_size, config.data.batch_labeled, config.data.batch_unlabeled = (32, 32), 2, 2
    config.data.num_workers = 0
    streams = [train.make_streams(config, FirstSlicesLabeled(data)) for data in both]
    try:
        for _ in range(3):
            (l1, u1), (l2, u2) = (next(s) for s in streams)
            for key in ("image", "label"):
                np.testing.assert_array_equal(l1[key], l2[key])
            np.testing.assert_array_equal(u1["image"], u2["image"])
    finally:
        for s in streams:
            s.close()


def test_open_data_follows_the_config(h5_root, tfds_dir, tmp_path, monkeypatch):
    # The tiny phantom's list is no ACDC list: count its first patient as the labeled set.
    for form in (datasets.Ssl4misData, datasets.TfdsData):
        monkeypatch.setattr(form, "labeled_slice_count", lambda self, *args: 3)
    config = base_config()
    registry.select(config, "acdc")
    config.data.data_dir = str(h5_root)
    opened = registry.open_dataset(config)
    assert isinstance(opened.data, datasets.Ssl4misData) and opened.labeled_count == 3
    config.data.source, config.data.data_dir = "tfds", str(tfds_dir)
    validate(config)
    opened = registry.open_dataset(config)
    assert isinstance(opened.data, datasets.TfdsData) and str(tfds_dir) in opened.description
    config.data.data_dir = str(tmp_path)
    with pytest.raises(DataError, match="holds no prepared ACDC 'slices' dataset"):
        registry.open_dataset(config)


def test_config_rejects_tfds_for_the_phantom_and_unknown_sources():
    config = base_config()
    registry.select(config, "phantom")
    config.data.source = "tfds"
    with pytest.raises(ConfigError, match="data.source.*built for ACDC only"):
        validate(config)
    config.data.source = "zarr"
    with pytest.raises(ConfigError, match="data.source"):
        validate(config)


def test_tfds_labeled_count_is_checked_against_the_published_acdc_split(both):
    _, tf = both
    with pytest.raises(DataError, match="first 3 patients span .* the SSL4MIS ACDC split has 68"):
        tf.labeled_slice_count("acdc", 3, "whole")
    with pytest.raises(DataError, match="holds ACDC, not 'phantom'"):
        tf.labeled_slice_count("phantom", 3, "whole")


def test_evaluation_reads_a_tfds_run_from_its_data_dir(tfds_dir, h5_root, tmp_path, monkeypatch):
    config = base_config()
    registry.select(config, "acdc")
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.source, config.data.data_dir = "tfds", str(tmp_path / "moved")
    # The tiny phantom's list is no ACDC list: count its first patient as the labeled set.
    monkeypatch.setattr(datasets.TfdsData, "labeled_slice_count", lambda self, *args: 3)
    with pytest.raises(DataError, match="moved .*data.data_dir in .*is not a directory"):
        evaluate.open_eval_data(config, tmp_path, None)
    data = evaluate.open_eval_data(config, tmp_path, tfds_dir)
    assert isinstance(data.data, datasets.TfdsData)
    assert data.cases("val") == ssl4mis.list_cases(h5_root, "val")


def test_a_bad_spacing_is_named(h5_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(h5_root, root)
    case = ssl4mis.list_cases(root, "val")[0]
    with h5py.File(root / "data" / f"{case}.h5", "a") as f:
        f.attrs["spacing"] = (1.0, -1.0, 1.0)
    with pytest.raises(DataError, match=f"{case}.h5: 'spacing' .* finite positive"):
        datasets.Ssl4misData(root).volume("val", 0, 4)
