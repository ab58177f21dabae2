"""ACDC converter: the SSL4MIS recipe on tiny synthetic NIfTI files, the community split and
slice order, and one clear error (and no half dataset) for each kind of bad download."""
import json
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from arco_jax.data import acdc, ssl4mis
from arco_jax.data.ssl4mis import DataError

ZOOMS = (1.25, 1.5, 10.0)  # (x, y, z) in the header -> spacing (z, y, x) = (10, 1.5, 1.25)


def _save(path, array, zooms=ZOOMS):
    image = nib.Nifti1Image(array, np.diag([*zooms[:3], 1.0]))
    image.header.set_zooms(zooms)
    nib.save(image, path)


def write_patient(training_dir, patient, depth, frames=(1, 9), size=(5, 4), seed=0):
    """One patient in the download's layout; returns {frame: (image xyz, label xyz)}."""
    rng = np.random.default_rng(seed)
    folder = Path(training_dir) / patient
    folder.mkdir(parents=True)
    ed, es = frames
    (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 170.0\n")
    arrays = {}
    for frame in frames:
        image = rng.integers(-20, 900, (*size, depth)).astype(np.int16)
        label = rng.integers(0, 4, (*size, depth)).astype(np.uint8)
        _save(folder / f"{patient}_frame{frame:02d}.nii.gz", image)
        _save(folder / f"{patient}_frame{frame:02d}_gt.nii.gz", label)
        arrays[frame] = (image, label)
    return arrays


CUSTOM_SPLIT = {"train": ["patient902", "patient901"], "val": ["patient903"],
                "test": ["patient905"]}


@pytest.fixture(scope="module")
def custom_raw(tmp_path_factory):
    """Five made-up patients; patient902's ED is frame 4; patient904 is in no split."""
    raw = tmp_path_factory.mktemp("raw") / "ACDC"
    training = raw / "database" / "training"
    arrays = {
        "patient901": write_patient(training, "patient901", 3, seed=1),
        "patient902": write_patient(training, "patient902", 4, frames=(4, 11), seed=2),
        "patient903": write_patient(training, "patient903", 2, seed=3),
        "patient904": write_patient(training, "patient904", 2, seed=4),
        "patient905": write_patient(training, "patient905", 3, size=(6, 3), seed=5),
    }
    return raw, arrays


@pytest.fixture(scope="module")
def custom_out(custom_raw, tmp_path_factory):
    raw, _ = custom_raw
    return acdc.convert(raw, tmp_path_factory.mktemp("out") / "ssl4mis", CUSTOM_SPLIT)


@pytest.fixture
def damaged(custom_raw, tmp_path):
    """A private copy of the tiny download that a test may damage."""
    raw, _ = custom_raw
    return shutil.copytree(raw / "database" / "training", tmp_path / "training")


def _read(path):
    with h5py.File(path, "r") as f:
        return f["image"][()], f["label"][()], dict(f.attrs)


def test_community_split_and_slice_order_are_the_ssl4mis_lists():
    split = acdc.COMMUNITY_SPLIT
    assert [len(split[s]) for s in ("train", "val", "test")] == [70, 10, 20]
    everyone = [p for s in split.values() for p in s]
    assert sorted(everyone) == [f"patient{n:03d}" for n in range(1, 101)]
    order = acdc.community_slice_order()
    assert list(order) == [f"{p}_{f}" for p in split["train"] for f in ("frame01", "frame02")]
    for case, numbers in order.items():
        assert sorted(numbers) == list(range(1, len(numbers) + 1)), case  # slices count from 1
    for patient in split["train"]:  # both frames of a patient have the same slice count
        assert len(order[f"{patient}_frame01"]) == len(order[f"{patient}_frame02"])
    names = acdc.community_train_slices()
    assert len(names) == 1312 and names[:2] == ["patient099_frame01_slice_15",
                                                "patient099_frame01_slice_11"]
    for patients, count in ssl4mis.ACDC_LABELED_SLICES.items():
        assert ssl4mis.first_patients_slice_count(names, patients) == count
    assert {ssl4mis.patient_of(n) for n in names[:68]} == {"patient038", "patient050",
                                                           "patient099"}
    assert {ssl4mis.patient_of(n) for n in names[:136]} == {
        f"patient{n:03d}" for n in (21, 38, 49, 50, 58, 99, 100)}
    assert acdc.parse_slice_name(names[0]) == ("patient099_frame01", "patient099", 1, 15)
    with pytest.raises(DataError, match="is not '<patient>_frame<NN>_slice_<k>'"):
        acdc.parse_slice_name("patient099_slice_3")
    first_23 = names[:ssl4mis.ACDC_REFERENCE_ONE_PATIENT_SLICES]
    assert sum(n.startswith("patient099_frame01_") for n in first_23) == 16
    assert first_23[16:] == [f"patient099_frame02_slice_{k}" for k in (5, 9, 11, 2, 3, 10, 1)]


def test_convert_follows_the_ssl4mis_recipe(custom_raw, custom_out):
    _, arrays = custom_raw
    raw_image, raw_label = arrays["patient902"][4]  # the ED frame, numbered 4 in the download
    image, label, attrs = _read(custom_out / "data" / "patient902_frame01.h5")
    expected = raw_image.astype(np.float64).transpose(2, 1, 0)
    expected = ((expected - expected.min()) / (expected.max() - expected.min())).astype(np.float32)
    assert image.dtype == np.float32 and image.shape == (4, 4, 5)  # (z, y, x)
    np.testing.assert_array_equal(image, expected)
    assert image.min() == 0.0 and image.max() == 1.0
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, raw_label.transpose(2, 1, 0))
    np.testing.assert_allclose(attrs["spacing"], (10.0, 1.5, 1.25))
    assert attrs["phase"] == "ED" and attrs["source_frame"] == 4
    es_image, _, es_attrs = _read(custom_out / "data" / "patient902_frame02.h5")
    assert es_attrs["phase"] == "ES" and es_attrs["source_frame"] == 11
    # Slices count from 1: slice_k is volume slice k - 1, for every case of every split.
    for k in range(1, 5):
        slice_image, slice_label, _ = _read(
            custom_out / "data" / "slices" / f"patient902_frame02_slice_{k}.h5")
        np.testing.assert_array_equal(slice_image, es_image[k - 1])
    assert not (custom_out / "data" / "slices" / "patient902_frame02_slice_0.h5").exists()
    assert (custom_out / "data" / "slices" / "patient905_frame02_slice_3.h5").is_file()
    slice_files = len(list((custom_out / "data" / "slices").iterdir()))
    assert slice_files == 2 * (4 + 3 + 2 + 3)


def test_convert_writes_lists_in_split_order_and_reads_with_ssl4mis(custom_out):
    assert ssl4mis.list_cases(custom_out, "train") == [
        "patient902_frame01", "patient902_frame02", "patient901_frame01", "patient901_frame02"]
    assert ssl4mis.list_cases(custom_out, "test") == ["patient905_frame01", "patient905_frame02"]
    names = ssl4mis.list_train_slices(custom_out)
    assert names == ([f"patient902_frame0{f}_slice_{k}" for f in (1, 2) for k in range(1, 5)]
                     + [f"patient901_frame0{f}_slice_{k}" for f in (1, 2) for k in range(1, 4)])
    assert ssl4mis.labeled_slice_count("custom", 1, root=custom_out) == 8
    source = ssl4mis.SliceSource(custom_out, names)
    assert source[8]["image"].shape == (4, 5) and source[8]["name"] == "patient901_frame01_slice_1"
    volumes = list(ssl4mis.iterate_volumes(custom_out, "test"))
    assert [v[0] for v in volumes] == ["patient905_frame01", "patient905_frame02"]
    assert volumes[0][1].shape == (3, 3, 6)
    marker = json.loads((custom_out / acdc.MARKER_FILE).read_text())
    assert marker["split"] == "custom" and marker["skipped_patients"] == ["patient904"]
    assert marker["train_slices"] == 14 and marker["slice_files"] == 24


def test_axes_and_values_equal_simpleitk_as_ssl4mis_reads_them(custom_raw, custom_out):
    sitk = pytest.importorskip("SimpleITK")
    raw, _ = custom_raw
    path = raw / "database" / "training" / "patient905" / "patient905_frame09.nii.gz"
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    reference = ((reference - reference.min()) / (reference.max() - reference.min()))
    image, label, attrs = _read(custom_out / "data" / "patient905_frame02.h5")
    np.testing.assert_array_equal(image, reference.astype(np.float32))
    gt = sitk.ReadImage(str(path).replace(".nii.gz", "_gt.nii.gz"))
    np.testing.assert_array_equal(label, sitk.GetArrayFromImage(gt))
    np.testing.assert_allclose(attrs["spacing"], sitk.ReadImage(str(path)).GetSpacing()[::-1])


@pytest.fixture(scope="module")
def community_raw(tmp_path_factory):
    """All 100 training patients at 4 x 3 pixels, with the official slice counts of the 70
    training patients (2 slices for the others)."""
    training = tmp_path_factory.mktemp("community") / "training"
    order = acdc.community_slice_order()
    for number, patient in enumerate(p for s in acdc.COMMUNITY_SPLIT.values() for p in s):
        depth = len(order.get(f"{patient}_frame01", (1, 2)))
        write_patient(training, patient, depth, size=(4, 3), seed=number)
    return training.parent


def test_community_conversion_reproduces_the_ssl4mis_lists(community_raw, tmp_path):
    out = acdc.convert(community_raw, tmp_path / "acdc")
    assert ssl4mis.list_train_slices(out) == acdc.community_train_slices()
    for split, patients in acdc.COMMUNITY_SPLIT.items():
        assert ssl4mis.list_cases(out, split) == [f"{p}_frame0{f}" for p in patients
                                                 for f in (1, 2)]
    assert [ssl4mis.labeled_slice_count("acdc", k, root=out) for k in (1, 3, 7)] == [32, 68, 136]
    assert json.loads((out / acdc.MARKER_FILE).read_text())["split"] == "ssl4mis-community"
    image, _ = ssl4mis.load_volume(out, "patient099_frame02")
    assert image.shape == (16, 3, 4)


def test_community_split_rejects_other_slice_counts(community_raw, tmp_path):
    training = shutil.copytree(community_raw / "training", tmp_path / "training")
    shutil.rmtree(training / "patient038")
    write_patient(training, "patient038", 5, size=(4, 3))
    with pytest.raises(DataError, match=r"patient038_frame01.*5 slices.*community.*has 8"):
        acdc.plan_conversion(training)
    shutil.rmtree(training / "patient050")
    with pytest.raises(DataError, match=r"1 patients of the SSL4MIS community split are missing: "
                                        r"patient050"):
        acdc.plan_conversion(training)


def _damage_info_without_es(training):
    (training / "patient901" / "Info.cfg").write_text("ED: 1\nGroup: NOR\n")


def _damage_missing_info(training):
    (training / "patient901" / "Info.cfg").unlink()


def _damage_missing_frame(training):
    (training / "patient901" / "patient901_frame09.nii.gz").unlink()


def _damage_gt_shape(training):
    _save(training / "patient902" / "patient902_frame11_gt.nii.gz", np.zeros((5, 4, 3), np.uint8))


def _damage_four_d(training):
    _save(training / "patient903" / "patient903_frame01.nii.gz",
          np.zeros((5, 4, 2, 2), np.int16), zooms=(1.0, 1.0, 1.0, 1.0))


def _damage_non_finite(training):
    image = np.ones((6, 3, 3), np.float32)
    image[1, 2, 0] = np.nan
    _save(training / "patient905" / "patient905_frame09.nii.gz", image)


def _damage_label_range(training):
    label = np.zeros((6, 3, 3), np.uint8)
    label[0, 0, 2] = 5
    _save(training / "patient905" / "patient905_frame01_gt.nii.gz", label)


@pytest.mark.parametrize("damage, message", [
    (_damage_info_without_es, r"patient901/Info.cfg: no 'ES:' line"),
    (_damage_missing_info, r"patient901/Info.cfg is missing"),
    (_damage_missing_frame, r"patient901_frame09.nii.gz is missing: the ES frame 9 image"),
    (_damage_gt_shape, r"patient902_frame11_gt.nii.gz: ground truth shape \(5, 4, 3\) differs "
                       r"from the image patient902_frame11.nii.gz shape \(5, 4, 4\)"),
    (_damage_four_d, r"patient903_frame01.nii.gz: a frame must be a 3-D NIfTI"),
    (_damage_non_finite, r"patient905_frame09.nii.gz: non-finite intensities"),
    (_damage_label_range, r"patient905_frame01_gt.nii.gz: label value 5 is not a class"),
])
def test_bad_downloads_raise_naming_the_file_and_leave_nothing(damaged, tmp_path, damage,
                                                               message):
    damage(damaged)
    out = tmp_path / "out" / "acdc"
    with pytest.raises(DataError, match=message):
        acdc.convert(damaged, out, CUSTOM_SPLIT)
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # no staging folder left


def test_split_problems_and_existing_output(damaged, custom_out):
    with pytest.raises(DataError, match="patients of the split are missing: patient999"):
        acdc.plan_conversion(damaged, {**CUSTOM_SPLIT, "test": ["patient999"]})
    with pytest.raises(DataError, match="patient901 is in split 'train' and again in 'val'"):
        acdc.plan_conversion(damaged, {**CUSTOM_SPLIT, "val": ["patient901"]})
    with pytest.raises(DataError, match="exactly"):
        acdc.plan_conversion(damaged, {"train": ["patient901"]})
    with pytest.raises(DataError, match="holds no patientNNN folders"):
        acdc.find_training_dir(custom_out)  # an SSL4MIS layout is not the download
    with pytest.raises(FileExistsError):
        acdc.convert(damaged, custom_out, CUSTOM_SPLIT)


def test_command_line(custom_raw, tmp_path, capsys):
    raw, _ = custom_raw
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"train": [901], "val": ["patient903"], "test": [905]}))
    out = tmp_path / "cli"
    assert acdc.main(["--raw_dir", str(raw), "--out_dir", str(out),
                      "--split_file", str(split_file)]) == 0
    printed = capsys.readouterr().out
    assert "6 training slices" in printed and "skipped patient902, patient904" in printed
    assert ssl4mis.list_cases(out, "train") == ["patient901_frame01", "patient901_frame02"]
    nowhere = ["--raw_dir", str(tmp_path / "nowhere"), "--out_dir", str(tmp_path / "x")]
    assert acdc.main(nowhere) == 1
    assert "does not exist" in capsys.readouterr().err
