"""configs/acdc.py on folders shaped like the processed ACDC in circulation: the community
list's first patients (68 slices for 3), slices in data/ (where the SSL4MIS processing writes
them) or data/slices/, val and test volumes in data/. Bad files stop the run when the data is
opened, before any compile, naming the file."""
import re

import h5py
import numpy as np
import pytest

import configs.acdc
from arco_jax import train
from arco_jax.config import validate
from arco_jax.data import registry, ssl4mis
from arco_jax.data.ssl4mis import DataError

PLACEMENTS = ("data", "data/slices")
# The community list's first three patients, slices per frame: 68 lines, then one more patient.
PATIENTS = (("patient099", 16), ("patient038", 8), ("patient050", 10), ("patient100", 2))
CASES = {"val": ("patient028_frame01",), "test": ("patient011_frame01", "patient011_frame02")}
SIZE = (6, 5)


def _write(path, image, label):
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image)
        f.create_dataset("label", data=label)


def _label(shape, seed):
    return np.random.default_rng(seed).integers(0, 4, shape).astype(np.uint8)


def write_acdc_like(root, slices_in):
    """An SSL4MIS ACDC root: lists, slices in `slices_in`, val/test volumes in data/ (min-max
    normalised images, labels 0..3), as the real processed set holds them."""
    (root / slices_in).mkdir(parents=True)
    names = [f"{p}_frame0{f}_slice_{i}" for p, n in PATIENTS for f in (1, 2) for i in range(1, n + 1)]
    (root / ssl4mis.TRAIN_SLICES_LIST).write_text("".join(f"{n}\n" for n in names))
    for k, name in enumerate(names):
        _write(root / slices_in / f"{name}.h5", np.full(SIZE, k / len(names), np.float32), _label(SIZE, k))
    (root / "train.list").write_text("".join(f"{p}_frame0{f}\n" for p, _ in PATIENTS for f in (1, 2)))
    for split, cases in CASES.items():
        (root / f"{split}.list").write_text("".join(f"{c}\n" for c in cases))
        for k, case in enumerate(cases):
            image = np.linspace(0, 1, 3 * SIZE[0] * SIZE[1], dtype=np.float32).reshape(3, *SIZE)
            _write(root / "data" / f"{case}.h5", image, _label((3, *SIZE), 100 + k))
    return root, names


def acdc_config(root, labeled_patients=3):
    config = configs.acdc.get_config()
    config.data.data_dir = str(root)
    config.data.labeled_patients = labeled_patients
    config.data.num_workers = 0
    return config


@pytest.fixture(params=PLACEMENTS)
def acdc_root(request, tmp_path):
    root, names = write_acdc_like(tmp_path / "ACDC", request.param)
    return root, request.param, names


def test_both_placements_open_with_the_published_labeled_set(acdc_root):
    root, slices_in, names = acdc_root
    config = acdc_config(root)
    validate(config)
    opened = registry.open_dataset(config)
    assert opened.labeled_count == 68
    labeled, unlabeled = opened.train_sources()
    assert labeled.names == names[:68] and unlabeled.names == names[68:]
    assert {ssl4mis.patient_of(n) for n in labeled.names} == {"patient099", "patient038", "patient050"}
    assert str(labeled.path(names[0])) == str(root / slices_in / f"{names[0]}.h5")
    assert opened.cases("val") == list(CASES["val"]) and opened.cases("test") == list(CASES["test"])
    case = opened.case("test", 1)
    assert case.image.shape == case.label.shape == (3, *SIZE) and case.label.max() <= 3


def _damage_missing_slice(root, slices_in, names):
    path = root / slices_in / f"{names[70]}.h5"
    path.unlink()
    return path, "1 of 4 slice .*files are missing"


def _damage_slice_label(root, slices_in, names):
    path = root / slices_in / f"{names[3]}.h5"
    _write(path, np.zeros(SIZE, np.float32), np.full(SIZE, 4, np.uint8))
    return path, r"'label' value 4 is not a class in \[0, 4\)"


def _damage_slice_shape(root, slices_in, names):
    path = root / slices_in / f"{names[69]}.h5"
    _write(path, np.zeros(SIZE, np.float32), np.zeros((SIZE[0], SIZE[1] + 1), np.uint8))
    return path, r"'image' shape \(6, 5\) != 'label' shape \(6, 6\)"


def _damage_missing_volume(root, slices_in, names):
    path = root / "data" / "patient011_frame02.h5"
    path.unlink()
    return path, "1 of 2 test volume .*files are missing"


def _damage_volume_shape(root, slices_in, names):
    path = root / "data" / "patient011_frame02.h5"
    _write(path, np.zeros((3, *SIZE), np.float32), np.zeros((2, *SIZE), np.uint8))
    return path, r"'image' shape \(3, 6, 5\) != 'label' shape \(2, 6, 5\)"


def _damage_volume_label(root, slices_in, names):
    path = root / "data" / "patient028_frame01.h5"
    label = _label((3, *SIZE), 0)
    label[1, 2, 3] = 255
    _write(path, np.zeros((3, *SIZE), np.float32), label)
    return path, r"'label' value 255 is not a class in \[0, 4\)"


@pytest.mark.parametrize("damage", [_damage_missing_slice, _damage_slice_label, _damage_slice_shape,
                                    _damage_missing_volume, _damage_volume_shape, _damage_volume_label],
                         ids=lambda f: f.__name__.removeprefix("_damage_"))
def test_bad_files_stop_the_run_before_any_compile_naming_the_file(acdc_root, damage, tmp_path, monkeypatch):
    root, slices_in, names = acdc_root
    path, message = damage(root, slices_in, names)

    def must_not_build(*args, **kwargs):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(train, "build_networks", must_not_build)
    with pytest.raises(DataError, match=message) as err:
        train.train_and_evaluate(acdc_config(root), tmp_path / "run")
    assert re.search(re.escape(str(path)), str(err.value)), str(err.value)
    assert "\n" not in str(err.value)


def test_a_list_that_is_not_the_community_split_is_refused_naming_it(tmp_path):
    root, _ = write_acdc_like(tmp_path / "ACDC", "data")
    names = ssl4mis.list_train_slices(root)
    (root / ssl4mis.TRAIN_SLICES_LIST).write_text("".join(f"{n}\n" for n in names[1:]))
    with pytest.raises(DataError, match=re.escape(str(root / ssl4mis.TRAIN_SLICES_LIST)) + ".*67 lines.*68"):
        registry.open_dataset(acdc_config(root))
