"""LiTS and MM-WHS converters into the nnU-Net folder, on small synthetic releases in each
layout, and configs/lits.py / configs/mmwhs.py opening what they write."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import tiny
from arco_jax.data import convert_lits, convert_mmwhs, registry
from arco_jax.data.ssl4mis import DataError

SHAPE = (20, 16, 5)


def hu_volume(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    label = np.zeros(SHAPE, np.uint8)
    label[4:14, 3:12, 1:4] = 1
    label[7:10, 6:9, 2] = 2
    hu = np.where(label == 1, 60, np.where(label == 2, 140, -900)) + rng.integers(-20, 20, SHAPE)
    return hu.astype(np.int16), label


def write_lits(raw: Path, numbers=(0, 1, 2, 100, 101), spacing=(0.7, 0.7, 2.0)) -> Path:
    for i, number in enumerate(numbers):
        batch = raw / ("Training Batch 1" if number < 50 else "Training Batch 2")
        batch.mkdir(parents=True, exist_ok=True)
        hu, label = hu_volume(number)
        affine = np.diag([*spacing, 1.0])
        nib.save(nib.Nifti1Image(hu, affine), batch / f"volume-{number}.nii")
        nib.save(nib.Nifti1Image(label, affine), batch / f"segmentation-{number}.nii")
    return raw


def write_mmwhs(raw: Path, modality="ct", numbers=range(1001, 1007)) -> Path:
    raw.mkdir(parents=True)
    codes = np.array([0, 205, 420, 500, 550, 600, 820, 850])
    for number in numbers:
        rng = np.random.default_rng(number)
        label = codes[(np.arange(SHAPE[0])[:, None, None] * 8 // SHAPE[0]) * np.ones(SHAPE, int)]  # 8 bands in x
        image = rng.normal(100, 10, SHAPE).astype(np.float32) + label * 0.1
        affine = np.diag([0.5, 0.5, 1.0, 1.0])
        nib.save(nib.Nifti1Image(image, affine), raw / f"{modality}_train_{number}_image.nii.gz")
        nib.save(nib.Nifti1Image(label.astype(np.int16), affine), raw / f"{modality}_train_{number}_label.nii.gz")
    return raw


def test_lits_converts_to_the_folder_with_arco_split(tmp_path):
    out = convert_lits.convert(write_lits(tmp_path / "raw"), tmp_path / "LiTS")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["labels"] == {"background": 0, "liver": 1, "lesion": 2}
    assert (out / "train.txt").read_text().split() == ["lits_000", "lits_001", "lits_002"]
    assert (out / "test.txt").read_text().split() == ["lits_100", "lits_101"]
    image = nib.load(out / "imagesTr" / "lits_001_0000.nii.gz")
    hu, label = hu_volume(1)
    assert image.get_data_dtype() == np.int16  # HU as released
    np.testing.assert_array_equal(np.asarray(image.dataobj), hu)
    np.testing.assert_array_equal(np.asarray(nib.load(out / "labelsTr" / "lits_001.nii.gz").dataobj), label)
    assert not list(tmp_path.glob(".LiTS.partial-*"))


def test_configs_lits_reads_the_converted_folder(tmp_path):
    out = convert_lits.convert(write_lits(tmp_path / "raw", numbers=tuple(range(6)) + (100, 101)), tmp_path / "LiTS")
    c = tiny.load_config("lits")
    c.data.data_dir, c.data.cache_dir, c.data.labeled_cases = str(out), str(tmp_path / "cache"), 1
    registry.resolve(c)
    assert (c.data.num_classes, tuple(c.data.class_names), c.data.in_channels) == (3, ("liver", "lesion"), 1)
    data = registry.open_dataset(c)
    assert data.splits["test"] == ["lits_100", "lits_101"] and len(data.splits["labeled"]) == 1
    assert len(data.splits["val"]) == 0 or set(data.splits["val"]).isdisjoint(data.splits["test"])
    case = data.case("test", 0)
    # The HU window [-200, 250] -> [0, 1]: -900 HU background at 0, liver (60 HU) at 260 / 450.
    assert case.image.min() == 0.0 and case.image.max() <= 1.0
    liver = case.image[..., 0][case.label == 1]
    assert abs(float(np.median(liver)) - 260 / 450) < 0.05


def test_lits_bad_input_is_named_and_nothing_is_written(tmp_path):
    raw = write_lits(tmp_path / "raw", numbers=(0, 1))
    (raw / "Training Batch 1" / "segmentation-1.nii").unlink()
    with pytest.raises(DataError, match=r"volume-1.nii: no segmentation-1.nii beside it"):
        convert_lits.convert(raw, tmp_path / "out")
    raw = write_lits(tmp_path / "raw2", numbers=(0, 1))
    hu, label = hu_volume(1)
    label[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(label, np.diag([0.7, 0.7, 2.0, 1.0])), raw / "Training Batch 1" / "segmentation-1.nii")
    with pytest.raises(DataError, match=r"segmentation-1.nii: label values 3 are not LiTS classes"):
        convert_lits.convert(raw, tmp_path / "out")
    nib.save(nib.Nifti1Image(label[:-1] * 0, np.eye(4)), raw / "Training Batch 1" / "segmentation-1.nii")
    with pytest.raises(DataError, match=r"segmentation-1.nii: shape \(19, 16, 5\) differs from volume-1.nii's"):
        convert_lits.convert(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
    (tmp_path / "taken").mkdir()
    with pytest.raises(DataError, match=r"taken exists already"):
        convert_lits.convert(write_lits(tmp_path / "raw3", numbers=(0,)), tmp_path / "taken")


def test_mmwhs_maps_the_label_codes_and_splits_15_5(tmp_path):
    raw = write_mmwhs(tmp_path / "ct_train", numbers=range(1001, 1021))
    out = convert_mmwhs.convert(raw, tmp_path / "MMWHS_CT")
    meta = json.loads((out / "dataset.json").read_text())
    assert list(meta["labels"]) == ["background", "Myo", "LA", "LV", "RA", "RV", "AA", "PA"]
    assert meta["channel_names"] == {"0": "CT"}
    assert (out / "test.txt").read_text().split() == [f"mmwhs_ct_{n}" for n in range(1016, 1021)]
    assert len((out / "train.txt").read_text().split()) == 15
    label = np.asarray(nib.load(out / "labelsTr" / "mmwhs_ct_1001.nii.gz").dataobj)
    assert sorted(np.unique(label).tolist()) == list(range(8))
    assert np.all(label[:3] == 0) and np.all(label[3:5] == 1) and np.all(label[18:] == 7)  # 205 -> 1, 850 -> 7


def test_configs_mmwhs_reads_an_mr_folder(tmp_path):
    raw = write_mmwhs(tmp_path / "mr_train", modality="mr", numbers=range(1001, 1021))
    out = convert_mmwhs.convert(raw, tmp_path / "MMWHS_MR", modality="mr")
    c = tiny.load_config("mmwhs")
    c.data.data_dir, c.data.cache_dir, c.data.labeled_cases = str(out), str(tmp_path / "cache"), 2
    registry.resolve(c)
    assert c.data.num_classes == 8 and tuple(c.data.class_names)[:2] == ("Myo", "LA")
    data = registry.open_dataset(c)
    assert data.store.plan["normalization"] == ["zscore"]  # MR: per-volume z-score ('auto')
    assert len(data.splits["test"]) == 5 and data.splits["val"] == [] and len(data.splits["unlabeled"]) == 13


def test_mmwhs_refuses_an_unknown_code(tmp_path):
    raw = write_mmwhs(tmp_path / "ct_train", numbers=(1001, 1002))
    path = raw / "ct_train_1002_label.nii.gz"
    label = np.asarray(nib.load(path).dataobj).copy()
    label[0, 0, 0] = 421
    nib.save(nib.Nifti1Image(label, np.diag([0.5, 0.5, 1.0, 1.0])), path)
    with pytest.raises(DataError, match=r"ct_train_1002_label.nii.gz: label codes 421 are not MM-WHS codes"):
        convert_mmwhs.convert(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
    (raw / "ct_train_1002_label.nii.gz").unlink()
    with pytest.raises(DataError, match=r"ct_train_1002_image.nii.gz: no ct_train_1002_label.nii.gz beside it"):
        convert_mmwhs.convert(raw, tmp_path / "out")
