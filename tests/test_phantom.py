"""The synthetic cardiac phantom: determinism, SSL4MIS layout, class statistics, atomicity."""
import re

import h5py
import numpy as np
import pytest

from arco_jax.data import phantom
from arco_jax.data import ssl4mis

TINY = phantom.PhantomConfig(splits=(3, 1, 2), image_size=32, slices=(3, 5), seed=7)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return phantom.write_phantom_dataset(tmp_path_factory.mktemp("phantom") / "tiny", TINY)


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path, tiny_root):
    again = phantom.write_phantom_dataset(tmp_path / "again", TINY)
    assert _files(again) == _files(tiny_root)
    for rel in _files(tiny_root):
        assert (again / rel).read_bytes() == (tiny_root / rel).read_bytes(), rel
    other = phantom.generate_patient(phantom.PhantomConfig(image_size=32, seed=8), 1)
    same = phantom.generate_patient(phantom.PhantomConfig(image_size=32, seed=7), 1)
    assert not np.array_equal(other[0][0], same[0][0])


def test_patient_does_not_depend_on_the_number_of_patients():
    small = phantom.generate_patient(phantom.PhantomConfig(splits=(2, 0, 0), image_size=32), 2)
    large = phantom.generate_patient(phantom.PhantomConfig(splits=(9, 3, 3), image_size=32), 2)
    for (image_a, label_a), (image_b, label_b) in zip(small, large):
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(label_a, label_b)


def test_layout_lists_and_h5_contents(tiny_root):
    patients = phantom.split_patients(TINY)
    assert patients == {"train": ["patient001", "patient002", "patient003"],
                        "val": ["patient004"], "test": ["patient005", "patient006"]}
    for split in ("train", "val", "test"):
        expected = [f"{p}_{f}" for p in patients[split] for f in ("frame01", "frame02")]
        assert (tiny_root / f"{split}.list").read_text() == "".join(c + "\n" for c in expected)

    slice_names = (tiny_root / "train_slices.list").read_text().splitlines()
    expected_slices = []
    for case in phantom.split_cases(TINY)["train"]:
        with h5py.File(tiny_root / "data" / f"{case}.h5", "r") as f:
            image, label = f["image"][()], f["label"][()]
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert image.shape == label.shape and image.shape[1:] == (32, 32)
        assert TINY.slices[0] <= image.shape[0] <= TINY.slices[1]
        assert image.min() == 0.0 and image.max() == 1.0  # min-max per volume
        assert set(np.unique(label)) <= {0, 1, 2, 3}
        for index in range(image.shape[0]):
            name = f"{case}_slice_{index}"
            expected_slices.append(name)
            with h5py.File(tiny_root / "data" / "slices" / f"{name}.h5", "r") as f:
                np.testing.assert_array_equal(f["image"][()], image[index])
                np.testing.assert_array_equal(f["label"][()], label[index])
    assert slice_names == expected_slices
    assert all(re.fullmatch(r"patient\d{3}_frame0[12]_slice_\d+", n) for n in slice_names)
    # Only training slices are written as 2D files.
    assert len(list((tiny_root / "data" / "slices").glob("*.h5"))) == len(slice_names)

    marker = phantom.read_marker(tiny_root)
    assert marker["generator_version"] == phantom.GENERATOR_VERSION
    assert marker["config"] == TINY.to_json()
    assert marker["train_slices"] == len(slice_names)


def test_first_k_lines_are_the_first_k_patients(tiny_root):
    names = ssl4mis.list_train_slices(tiny_root)
    for k in (1, 2, 3):
        count = ssl4mis.first_patients_slice_count(names, k)
        expected = {f"patient{i:03d}" for i in range(1, k + 1)}
        assert {ssl4mis.patient_of(n) for n in names[:count]} == expected
        depth = sum(h5py.File(tiny_root / "data" / f"patient{i:03d}_{f}.h5", "r")["label"].shape[0]
                    for i in range(1, k + 1) for f in ("frame01", "frame02"))
        assert count == depth
        assert ssl4mis.labeled_slice_count("phantom", k, root=tiny_root) == count


def test_class_statistics_make_rv_the_rare_class():
    config = phantom.PhantomConfig(splits=(12, 0, 0), image_size=48, seed=3)
    frames = [phantom.generate_patient(config, n) for n in range(1, 13)]
    labels = np.concatenate([lab.reshape(-1) for patient in frames for _, lab in patient])
    fraction = np.bincount(labels, minlength=4) / labels.size
    assert fraction[0] > 0.8 and min(fraction[1:]) > 0.005
    assert fraction[1] < fraction[2] and fraction[1] < fraction[3]  # RV is the tail class
    slices = [lab[i] for patient in frames for _, lab in patient for i in range(lab.shape[0])]
    present = np.array([[(s == c).any() for c in range(4)] for s in slices]).mean(0)
    assert present[2] == 1.0 and present[3] > 0.9
    assert 0.4 < present[1] < 0.9  # RV absent in apical slices
    for patient in frames:
        (_, ed), (_, es) = patient
        assert (es == 3).sum() < (ed == 3).sum()  # systole: smaller LV cavity
        assert (ed[0] == 1).any() and not (ed[-1] == 1).any()  # RV at the base, not the apex


def test_intensity_alone_does_not_separate_the_classes():
    (image, label), _ = phantom.generate_patient(phantom.PhantomConfig(image_size=64, seed=1), 1)
    lv = image[label == 3]
    lo, hi = np.percentile(lv, [10, 90])
    background_in_lv_range = ((image >= lo) & (image <= hi) & (label == 0)).sum()
    assert background_in_lv_range > 0.3 * lv.size
    myo = image[label == 2]
    lo, hi = np.percentile(myo, [10, 90])
    assert ((image >= lo) & (image <= hi) & (label == 0)).sum() > myo.size


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real_write = phantom._write_h5

    def failing_write(path, image, label):
        calls.append(path)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        real_write(path, image, label)

    monkeypatch.setattr(phantom, "_write_h5", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        phantom.write_phantom_dataset(tmp_path / "ds", TINY)
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_to_overwrite(tiny_root):
    with pytest.raises(FileExistsError, match="already exists"):
        phantom.write_phantom_dataset(tiny_root, TINY)


def test_ensure_phantom_generates_once_then_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCO_JAX_CACHE", str(tmp_path / "cache"))
    params = dict(splits=(2, 1, 1), image_size=32, slices=(3, 4))
    root = phantom.ensure_phantom(**params)
    assert root.parent == tmp_path / "cache" and root.name.startswith("phantom-")
    assert ssl4mis.list_cases(root, "val") == ["patient003_frame01", "patient003_frame02"]

    def no_write(*args, **kwargs):
        raise AssertionError("must reuse the cached dataset")

    monkeypatch.setattr(phantom, "write_phantom_dataset", no_write)
    assert phantom.ensure_phantom(**params) == root
    assert phantom.ensure_phantom(tmp_path / "cache", phantom.PhantomConfig(**params)) == root
    with pytest.raises(AssertionError, match="reuse"):
        phantom.ensure_phantom(**{**params, "seed": 1})  # other parameters -> other directory


def test_ensure_phantom_rejects_a_foreign_directory(tmp_path):
    config = phantom.PhantomConfig(splits=(1, 0, 0), image_size=32, slices=(3, 3))
    (tmp_path / f"phantom-{config.fingerprint()}").mkdir()
    with pytest.raises(FileExistsError, match="does not match"):
        phantom.ensure_phantom(tmp_path, config)


@pytest.mark.parametrize("bad", [dict(splits=(0, 1, 1)), dict(splits=(2, 1)),
                                 dict(slices=(5, 4)), dict(image_size=16), dict(seed=-1)])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        phantom.PhantomConfig(**bad)


def test_config_or_fields_not_both():
    with pytest.raises(TypeError, match="not both"):
        phantom.write_phantom_dataset("unused", TINY, seed=3)
