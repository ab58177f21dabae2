"""The SSL4MIS-layout reader: lists, labeled subsets, sources, and clear errors on bad files."""
import pickle
import shutil

import h5py
import numpy as np
import pytest

from arco_jax.data import phantom
from arco_jax.data import ssl4mis
from arco_jax.data.ssl4mis import DataError

CONFIG = phantom.PhantomConfig(splits=(3, 1, 1), image_size=32, slices=(3, 4), seed=1)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return phantom.write_phantom_dataset(tmp_path_factory.mktemp("ssl4mis") / "ds", CONFIG)


@pytest.fixture
def copy(root, tmp_path):
    """A private copy of the dataset that a test may damage."""
    return shutil.copytree(root, tmp_path / "copy")


def _write(path, **datasets):
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            f.create_dataset(key, data=value)


def test_lists_cases_and_volumes(root):
    assert ssl4mis.list_cases(root, "test") == ["patient005_frame01", "patient005_frame02"]
    names = ssl4mis.list_train_slices(root)
    assert names[0] == "patient001_frame01_slice_0"
    image, label = ssl4mis.load_volume(root, "patient004_frame02")
    assert image.dtype == np.float32 and label.dtype == np.uint8 and image.ndim == 3
    seen = [case for case, _, _ in ssl4mis.iterate_volumes(root, "val")]
    assert seen == ["patient004_frame01", "patient004_frame02"]
    with pytest.raises(ValueError, match="split"):
        ssl4mis.list_cases(root, "training")


def test_slice_source_items_and_pickling(root):
    names = ssl4mis.list_train_slices(root)[:5]
    source = ssl4mis.SliceSource(root, names)
    assert len(source) == 5
    item = source[3]
    assert item["name"] == names[3]
    assert item["image"].shape == (32, 32) and item["image"].dtype == np.float32
    assert item["label"].dtype == np.uint8 and item["label"].max() < 4
    volume_image, _ = ssl4mis.load_volume(root, names[3].rsplit("_slice_", 1)[0])
    np.testing.assert_array_equal(item["image"], volume_image[int(names[3].rsplit("_", 1)[1])])
    clone = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(clone[3]["label"], item["label"])


def test_split_labeled_takes_the_first_lines(root):
    names = ssl4mis.list_train_slices(root)
    labeled, unlabeled = ssl4mis.split_labeled(root, 7)
    assert labeled == names[:7] and unlabeled == names[7:]
    for bad in (0, len(names)):
        with pytest.raises(DataError, match="unlabeled pool"):
            ssl4mis.split_labeled(root, bad)


def test_first_patients_slice_count_on_an_acdc_like_list():
    names = ([f"patient099_frame0{f}_slice_{i}" for f in (1, 2) for i in range(1, 17)]
             + [f"patient038_frame0{f}_slice_{i}" for f in (1, 2) for i in range(1, 9)]
             + [f"patient050_frame0{f}_slice_{i}" for f in (1, 2) for i in range(1, 11)]
             + ["patient100_frame01_slice_1"])
    assert ssl4mis.first_patients_slice_count(names, 1) == 32
    assert ssl4mis.first_patients_slice_count(names, 3) == 68
    assert ssl4mis.first_patients_slice_count(names, 4) == len(names)
    with pytest.raises(DataError, match="only 4 patients"):
        ssl4mis.first_patients_slice_count(names, 5)


def test_labeled_slice_count_policies(root):
    assert ssl4mis.labeled_slice_count("ACDC", 3) == 68
    assert ssl4mis.labeled_slice_count("acdc", 7) == 136
    assert ssl4mis.labeled_slice_count("acdc", 1, "whole") == 32
    assert ssl4mis.labeled_slice_count("acdc", 1, "reference") == 23
    with pytest.raises(ValueError, match="no published ACDC"):
        ssl4mis.labeled_slice_count("acdc", 5)
    with pytest.raises(ValueError, match="one_patient_policy"):
        ssl4mis.labeled_slice_count("acdc", 1, "half")
    # A list whose first 3 patients do not span 68 lines is not the community split.
    with pytest.raises(DataError, match="68"):
        ssl4mis.labeled_slice_count("acdc", 3, root=root)
    names = ssl4mis.list_train_slices(root)
    expected = ssl4mis.first_patients_slice_count(names, 2)
    assert ssl4mis.labeled_slice_count("phantom", 2, root=root) == expected
    with pytest.raises(ValueError, match="only for ACDC"):
        ssl4mis.labeled_slice_count("phantom", 1, "reference", root=root)
    with pytest.raises(ValueError, match="needs root"):
        ssl4mis.labeled_slice_count("phantom", 1)


def test_missing_root_data_dir_and_list(tmp_path, copy):
    with pytest.raises(DataError, match="does not exist"):
        ssl4mis.list_train_slices(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"data is missing"):
        ssl4mis.list_cases(tmp_path, "train")
    (copy / "val.list").unlink()
    with pytest.raises(DataError, match=r"val\.list is missing"):
        ssl4mis.list_cases(copy, "val")
    (copy / "test.list").write_text("\n\n")
    with pytest.raises(DataError, match=r"test\.list is empty"):
        ssl4mis.list_cases(copy, "test")


def test_missing_slice_files_are_reported_at_construction(copy):
    names = ssl4mis.list_train_slices(copy)
    for name in names[2:10]:
        (copy / "data" / "slices" / f"{name}.h5").unlink()
    with pytest.raises(DataError, match=rf"8 of {len(names)} .*{names[2]}\.h5.* and 3 more"):
        ssl4mis.SliceSource(copy, names)
    (copy / "data" / "patient001_frame01.h5").unlink()
    with pytest.raises(DataError, match=r"1 of 6 train volume .*patient001_frame01\.h5"):
        next(ssl4mis.iterate_volumes(copy, "train"))


def _tiny_root(root, slices_in, names=("patient001_frame01_slice_1", "patient001_frame01_slice_2"), fill=0.0):
    """A two-slice SSL4MIS root with its slice files in `slices_in` ('data' or 'data/slices')."""
    (root / slices_in).mkdir(parents=True, exist_ok=True)
    (root / ssl4mis.TRAIN_SLICES_LIST).write_text("".join(f"{n}\n" for n in names))
    _write(root / "data" / "patient001_frame01.h5", image=np.zeros((2, 8, 8), np.float32),
           label=np.zeros((2, 8, 8), np.uint8))
    for k, name in enumerate(names):
        _write(root / slices_in / f"{name}.h5", image=np.full((8, 8), fill + k, np.float32),
               label=np.full((8, 8), k, np.uint8))
    return root


def _items(source):
    return [(item["name"], item["image"].tolist(), item["label"].tolist()) for item in source]


def test_slices_in_data_or_data_slices_give_the_same_items(tmp_path):
    nested = _tiny_root(tmp_path / "nested", "data/slices")
    flat = _tiny_root(tmp_path / "flat", "data")  # Where the SSL4MIS processing script writes them.
    assert ssl4mis.slice_dir(nested) == nested / "data" / "slices"
    assert ssl4mis.slice_dir(flat) == flat / "data"
    names = ssl4mis.list_train_slices(flat)
    assert names == ssl4mis.list_train_slices(nested)
    assert _items(ssl4mis.SliceSource(flat, names)) == _items(ssl4mis.SliceSource(nested, names))
    (flat / "data" / "slices").mkdir()  # An empty data/slices/ does not hide the slices in data/.
    assert _items(ssl4mis.SliceSource(flat, names)) == _items(ssl4mis.SliceSource(nested, names))


def test_data_slices_is_preferred_when_both_hold_slices(tmp_path):
    root = _tiny_root(_tiny_root(tmp_path / "both", "data", fill=5.0), "data/slices")
    names = ssl4mis.list_train_slices(root)
    assert ssl4mis.slice_dir(root) == root / "data" / "slices"
    assert ssl4mis.SliceSource(root, names)[1]["image"][0, 0] == 1.0


def test_missing_slice_error_names_the_folders_searched(tmp_path):
    flat = _tiny_root(tmp_path / "flat", "data")
    with pytest.raises(DataError, match="1 of 1 slice") as err:
        ssl4mis.SliceSource(flat, ["patient001_frame01_slice_9"])
    assert f"in {flat / 'data'};" in str(err.value) and str(flat / "data" / "slices") in str(err.value)
    nested = _tiny_root(tmp_path / "nested", "data/slices")
    with pytest.raises(DataError, match="1 of 1 slice") as err:
        ssl4mis.SliceSource(nested, ["patient001_frame01_slice_9"])
    assert f"in {nested / 'data' / 'slices'})" in str(err.value)
    assert str(nested / "data" / "slices" / "patient001_frame01_slice_9.h5") in str(err.value)


IMAGE = np.zeros((8, 8), np.float32)
LABEL = np.zeros((8, 8), np.uint8)


@pytest.mark.parametrize("datasets, message", [
    (dict(image=IMAGE), "'label' is missing"),
    (dict(label=LABEL), "'image' is missing"),
    (dict(image=IMAGE, label=np.zeros((8, 9), np.uint8)),
     r"shape \(8, 8\) != 'label' shape \(8, 9\)"),
    (dict(image=IMAGE[None], label=LABEL[None]), "must have 2 dims"),
    (dict(image=np.full((8, 8), np.nan, np.float32), label=LABEL), "non-finite"),
    (dict(image=IMAGE, label=LABEL + 7), r"value 7 is not a class in \[0, 4\)"),
    (dict(image=IMAGE, label=np.full((8, 8), 1.5)), r"value 1\.5 is not a class"),
])
def test_bad_slice_content_names_file_and_problem(copy, datasets, message):
    name = ssl4mis.list_train_slices(copy)[0]
    path = copy / "data" / "slices" / f"{name}.h5"
    _write(path, **datasets)
    with pytest.raises(DataError, match=message) as err:
        ssl4mis.SliceSource(copy, [name])[0]
    assert str(path) in str(err.value)


def test_labels_and_shapes_are_checked_when_the_source_is_built(copy):
    """Only intensities wait for the read: a bad label anywhere in the list stops construction."""
    names = ssl4mis.list_train_slices(copy)
    path = copy / "data" / "slices" / f"{names[-1]}.h5"
    _write(path, image=IMAGE, label=LABEL + 5)
    with pytest.raises(DataError, match=rf"{path}: 'label' value 5"):
        ssl4mis.SliceSource(copy, names)
    _write(path, image=np.full((8, 8), np.inf, np.float32), label=LABEL)
    source = ssl4mis.SliceSource(copy, names)
    with pytest.raises(DataError, match=rf"{path}: 'image' has non-finite"):
        source[len(names) - 1]


def test_not_an_h5_file_and_bad_volume(copy):
    name = ssl4mis.list_train_slices(copy)[0]
    path = copy / "data" / "slices" / f"{name}.h5"
    path.write_text("not hdf5")
    with pytest.raises(DataError, match="cannot be read as HDF5"):
        ssl4mis.SliceSource(copy, [name])[0]
    volume = copy / "data" / "patient004_frame01.h5"
    _write(volume, image=np.zeros((3, 8, 8), np.float32), label=np.full((3, 8, 8), 4, np.uint8))
    with pytest.raises(DataError, match=rf"{volume}.*value 4"):
        ssl4mis.load_volume(copy, "patient004_frame01")
    with pytest.raises(DataError, match="patient004_frame03.h5"):
        ssl4mis.load_volume(copy, "patient004_frame03")
