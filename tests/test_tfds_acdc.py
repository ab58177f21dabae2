"""ACDC as TFDS array_record: built from the SSL4MIS layout and from the raw download, read back
without TensorFlow, equal item by item to the h5 layout, in list order."""
import pickle
import textwrap

import grain
import nibabel as nib
import numpy as np
import pytest
import tensorflow_datasets as tfds

from arco_jax.data import acdc, phantom, pipeline, ssl4mis, tfds_acdc
from arco_jax.data.ssl4mis import DataError
from tests.tensorflow_stand_in import run_without_tensorflow

TINY = phantom.PhantomConfig(splits=(3, 1, 1), image_size=32, slices=(3, 4), seed=1)


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    return phantom.write_phantom_dataset(tmp_path_factory.mktemp("h5") / "ds", TINY)


@pytest.fixture(scope="module")
def phantom_tfds(phantom_root, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    tfds_acdc.build_acdc(phantom_root, data_dir)
    return data_dir


def test_slices_equal_the_h5_source_in_list_order(phantom_root, phantom_tfds):
    names = ssl4mis.list_train_slices(phantom_root)
    h5 = ssl4mis.SliceSource(phantom_root, names)
    source = tfds_acdc.tfds_slice_source(phantom_tfds)
    assert len(source) == len(h5) == len(names)
    for index in range(len(h5)):
        ours, theirs = source[index], h5[index]
        assert ours["name"] == theirs["name"]
        assert ours["image"].dtype == np.float32 and ours["label"].dtype == np.uint8
        np.testing.assert_array_equal(ours["image"], theirs["image"])
        np.testing.assert_array_equal(ours["label"], theirs["label"])
    assert tfds_acdc.tfds_slice_names(phantom_tfds) == names
    labeled = tfds_acdc.tfds_slice_source(phantom_tfds, stop=7)
    unlabeled = tfds_acdc.tfds_slice_source(phantom_tfds, start=7)
    assert [labeled[i]["name"] for i in range(len(labeled))] == names[:7]
    assert [unlabeled[i]["name"] for i in range(len(unlabeled))] == names[7:]
    record = tfds.data_source("acdc/slices", split="train", data_dir=phantom_tfds)[5]
    parts = acdc.parse_slice_name(names[5])
    assert (record["patient"].decode(), record["frame"], record["slice"], record["order"]) == (
        parts.patient, parts.frame, parts.slice, 5)
    assert record["spacing"] is None  # the phantom's h5 files carry no spacing


def test_volumes_equal_iterate_volumes(phantom_root, phantom_tfds):
    for split in ssl4mis.SPLITS:
        ours = list(tfds_acdc.iterate_tfds_volumes(phantom_tfds, split))
        theirs = list(ssl4mis.iterate_volumes(phantom_root, split))
        assert [case for case, _, _ in ours] == [case for case, _, _ in theirs]
        for (_, image, label), (_, h5_image, h5_label) in zip(ours, theirs):
            assert image.ndim == 3 and image.dtype == np.float32 and label.dtype == np.uint8
            np.testing.assert_array_equal(image, h5_image)
            np.testing.assert_array_equal(label, h5_label)


def test_grain_stream_over_tfds_equals_the_h5_stream(phantom_root, phantom_tfds):
    names = ssl4mis.list_train_slices(phantom_root)
    source = pickle.loads(pickle.dumps(tfds_acdc.tfds_slice_source(phantom_tfds)))
    common = dict(global_batch_size=2, patch_size=(32, 32), seed=3,
                  shard=grain.sharding.NoSharding())
    ours = iter(pipeline.make_stream(source, **common))
    theirs = iter(pipeline.make_stream(ssl4mis.SliceSource(phantom_root, names), **common))
    for _ in range(3):
        a, b = next(ours), next(theirs)
        assert a["image"].shape == (2, 32, 32, 1)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def _write_patient(training, patient, depth, seed):
    rng = np.random.default_rng(seed)
    folder = training / patient
    folder.mkdir(parents=True)
    (folder / "Info.cfg").write_text("ED: 1\nES: 10\n")
    for frame in (1, 10):
        for suffix, array in (("", rng.integers(0, 700, (4, 3, depth)).astype(np.int16)),
                              ("_gt", rng.integers(0, 4, (4, 3, depth)).astype(np.uint8))):
            image = nib.Nifti1Image(array, np.diag([1.25, 1.5, 10.0, 1.0]))
            nib.save(image, folder / f"{patient}_frame{frame:02d}{suffix}.nii.gz")


def test_raw_download_builds_the_community_order(tmp_path):
    training = tmp_path / "raw" / "training"
    order = acdc.community_slice_order()
    for number, patient in enumerate(p for s in acdc.COMMUNITY_SPLIT.values() for p in s):
        _write_patient(training, patient, len(order.get(f"{patient}_frame01", (1, 2))), number)
    data_dir = tmp_path / "tfds"
    tfds_acdc.build_acdc(training.parent, data_dir)
    converted = acdc.convert(training.parent, tmp_path / "h5")

    assert tfds_acdc.tfds_slice_names(data_dir) == acdc.community_train_slices()
    h5 = ssl4mis.SliceSource(converted, ssl4mis.list_train_slices(converted))
    source = tfds_acdc.tfds_slice_source(data_dir)
    for index in range(0, len(h5), 7):
        np.testing.assert_array_equal(source[index]["image"], h5[index]["image"])
        np.testing.assert_array_equal(source[index]["label"], h5[index]["label"])
    for split in ssl4mis.SPLITS:
        ours = list(tfds_acdc.iterate_tfds_volumes(data_dir, split))
        theirs = list(ssl4mis.iterate_volumes(converted, split))
        assert [v[0] for v in ours] == [v[0] for v in theirs]
        np.testing.assert_array_equal(ours[-1][1], theirs[-1][1])
    counts = [tfds_acdc.tfds_labeled_slice_count(data_dir, k) for k in (1, 3, 7)]
    assert counts == [32, 68, 136]
    assert tfds_acdc.tfds_labeled_slice_count(data_dir, 1, "reference") == 23
    record = tfds.data_source("acdc/volumes", split="val", data_dir=data_dir)[0]
    np.testing.assert_allclose(record["spacing"], (10.0, 1.5, 1.25))
    assert record["case"] == b"patient028_frame01"


def test_clear_errors(phantom_tfds, tmp_path):
    with pytest.raises(DataError, match="holds no prepared ACDC 'volumes' dataset"):
        tfds_acdc.prepared_dir(tmp_path, "volumes")
    with pytest.raises(DataError, match="(?s)does not exist or is empty.*registration"):
        tfds_acdc.build_acdc(tmp_path / "nothing", tmp_path / "out")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("not ACDC")
    with pytest.raises(DataError, match="holds no patientNNN folders"):
        tfds_acdc.build_acdc(tmp_path / "junk", tmp_path / "out")
    with pytest.raises(DataError, match=r"cannot take records \[0, 99\)"):
        tfds_acdc.tfds_slice_source(phantom_tfds, stop=99)
    with pytest.raises(DataError, match="has splits"):
        tfds_acdc.tfds_slice_source(phantom_tfds, split="val")
    with pytest.raises(DataError, match="SSL4MIS ACDC split has 68"):
        tfds_acdc.tfds_labeled_slice_count(phantom_tfds, 3)


def test_building_and_reading_never_import_tensorflow(phantom_root, tmp_path):
    """A stand-in `tensorflow` package on the path (as if TensorFlow were installed) records
    any import; building both configs and reading them must not trigger it."""
    script = textwrap.dedent(f"""\
        import json, sys
        from arco_jax.data import tfds_acdc
        tfds_acdc.build_acdc({str(phantom_root)!r}, {str(tmp_path / 'tfds')!r})
        source = tfds_acdc.tfds_slice_source({str(tmp_path / 'tfds')!r})
        item = source[len(source) - 1]
        volumes = list(tfds_acdc.iterate_tfds_volumes({str(tmp_path / 'tfds')!r}, "test"))
        print(json.dumps({{"tensorflow_loaded": "tensorflow" in sys.modules,
                           "slices": len(source), "volumes": len(volumes)}}))
        """)
    result = run_without_tensorflow(script, tmp_path)
    assert result == {"tensorflow_loaded": False,
                      "slices": len(ssl4mis.list_train_slices(phantom_root)), "volumes": 2}
