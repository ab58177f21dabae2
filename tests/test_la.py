"""The Left Atrium dataset (arco_jax.data.la) on tiny synthetic volumes in the UA-MT layout:
registry metadata, the (H, W, D) -> (D, H, W) transpose, the labeled / unlabeled / val / test
splits from the lists, and one clear error naming the field or file for each bad input."""
import pickle
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from arco_jax.config import base_config
from arco_jax.data import la, registry
from arco_jax.data.ssl4mis import DataError
from arco_jax.errors import ConfigError

SHAPE = (20, 18, 12)  # (H, W, D) as stored; (12, 20, 18) as read
TRAIN = [f"TRAIN{i:02d}" for i in range(10)]
TEST = [f"TEST{i:02d}" for i in range(3)]


def write_case(root: Path, case: str, seed: int, shape=SHAPE, label_shape=None, keys=("image", "label"),
               label_values=(0, 1)):
    folder = root / la.CASE_DIR / case
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    image = rng.normal(size=shape).astype(np.float32)
    label = rng.choice(np.asarray(label_values, np.uint8), size=label_shape or shape)
    with h5py.File(folder / la.VOLUME_FILE, "w") as f:
        for key, array in (("image", image), ("label", label)):
            if key in keys:
                f.create_dataset(key, data=array)
    return image, label


def write_la(root: Path, train=TRAIN, test=TEST) -> dict:
    """The UA-MT layout under root; returns {case: (image, label)} as written, (H, W, D)."""
    root.mkdir(parents=True, exist_ok=True)
    arrays = {case: write_case(root, case, seed) for seed, case in enumerate([*train, *test])}
    (root / la.TRAIN_LIST).write_text("\n".join(train) + "\n")
    (root / la.TEST_LIST).write_text("\n".join(test) + "\n")
    return arrays


def la_config(root, **fields):
    c = base_config()
    registry.select(c, "la")
    c.data.data_dir = str(root)
    for key, value in fields.items():
        c.data[key] = value
    return c


@pytest.fixture
def root(tmp_path):
    written = write_la(tmp_path / "data")
    return tmp_path / "data", written


def test_selecting_la_records_its_metadata_and_fields(root):
    c = la_config(root[0])
    assert "la" in registry.names()
    assert (c.data.num_classes, tuple(c.data.class_names), c.data.ignore_label, c.data.spatial_rank,
            c.data.in_channels) == (2, ("left atrium",), None, 3, 1)
    info = registry.info(c)
    assert (info.has_spacing, info.eval_unit, info.weak_augment) == (False, "volume", "rot_flip_crop")
    assert (c.data.labeled_cases, c.data.val_cases) == (4, 0)
    registry.validate(c)


def test_volumes_are_read_depth_first(root):
    path, written = root
    data = registry.open_dataset(la_config(path))
    case = data.case("test", 0)
    image, label = written[TEST[0]]
    assert case.case == TEST[0] and case.spacing is None
    assert case.image.shape == case.label.shape == (12, 20, 18)
    assert case.image.dtype == np.float32 and np.issubdtype(case.label.dtype, np.integer)
    np.testing.assert_array_equal(case.image, np.transpose(image, (2, 0, 1)))
    np.testing.assert_array_equal(case.label, np.transpose(label, (2, 0, 1)))
    assert case.image[3, 5, 7] == image[5, 7, 3]
    labeled, _ = data.train_sources()
    item = labeled[1]
    assert item["image"].dtype == np.float32 and item["label"].dtype == np.int32
    np.testing.assert_array_equal(item["image"], np.transpose(written[TRAIN[1]][0], (2, 0, 1)))
    np.testing.assert_array_equal(item["label"], np.transpose(written[TRAIN[1]][1], (2, 0, 1)))


def test_splits_follow_the_lists(root):
    path, written = root
    data = registry.open_dataset(la_config(path, labeled_cases=3, val_cases=2))
    labeled, unlabeled = data.train_sources()
    assert labeled.names == TRAIN[:3] and unlabeled.names == TRAIN[3:8]
    assert (len(labeled), len(unlabeled)) == (3, 5)
    assert data.cases("val") == TRAIN[8:] and data.cases("test") == TEST
    assert data.labeled_count == 3
    assert data.labeled_description == "3 labeled cases (first 3 of train.list)"
    assert data.labeled_record == {"labeled_cases": 3, "labeled_case_ids": TRAIN[:3]}
    val = data.case("val", 1)
    assert val.case == TRAIN[9]
    np.testing.assert_array_equal(val.image, np.transpose(written[TRAIN[9]][0], (2, 0, 1)))
    # Unlabeled items keep their label: the weak view transforms image and label together.
    assert unlabeled[0]["name"] == TRAIN[3] and unlabeled[0]["label"].shape == (12, 20, 18)
    assert pickle.loads(pickle.dumps(unlabeled))[4]["name"] == TRAIN[7]  # Grain workers get a copy.
    assert [c.case for c in registry.iterate_cases(data, "test")] == TEST
    with pytest.raises(ValueError, match="split must be one of"):
        data.cases("train")

    data = registry.open_dataset(la_config(path, labeled_cases=1))  # The defaults: no val split.
    labeled, unlabeled = data.train_sources()
    assert labeled.names == TRAIN[:1] and unlabeled.names == TRAIN[1:] and data.cases("val") == []
    assert data.labeled_description == "1 labeled case (first 1 of train.list)"


def _raises(config, error, pattern, *, at_validate=True):
    """The error at validate (when the check is a validate check) and at open, matching `pattern`."""
    if at_validate:
        with pytest.raises(error, match=pattern):
            registry.validate(config)
    with pytest.raises(error, match=pattern):
        registry.open_dataset(config)


@pytest.mark.parametrize("fields, pattern", [
    ({"labeled_cases": 0}, r"config\.data\.labeled_cases: must be an integer >= 1.*got 0"),
    ({"labeled_cases": True}, r"config\.data\.labeled_cases: must be an integer >= 1.*got True"),
    ({"labeled_cases": 10}, r"config\.data\.labeled_cases: 10 is not in 1\.\.9: .*train\.list has 10 cases"),
    ({"labeled_cases": 8, "val_cases": 2},
     r"config\.data\.labeled_cases: 8 is not in 1\.\.7: .*val_cases holds out 2 and at least one must stay unlabeled"),
    ({"val_cases": -1}, r"config\.data\.val_cases: must be an integer >= 0.*got -1"),
])
def test_bad_fields_are_named(root, fields, pattern):
    _raises(la_config(root[0], **fields), ConfigError, pattern)


def test_data_dir_is_required_and_must_be_a_directory(tmp_path):
    _raises(la_config(""), ConfigError, r"config\.data\.data_dir: is required for dataset 'la'")
    missing = tmp_path / "nowhere"
    _raises(la_config(missing), ConfigError,
            re.escape(f"config.data.data_dir: '{missing}' is missing or not a directory"))


def test_missing_lists_are_named(root):
    path, _ = root
    (path / "test.list").unlink()
    _raises(la_config(path), DataError, re.escape(f"list file {path / 'test.list'} is missing"), at_validate=False)
    (path / "train.list").unlink()
    _raises(la_config(path), DataError, re.escape(f"list file {path / 'train.list'} is missing"))


def test_a_listed_case_without_its_folder_or_file_is_named_with_list_and_line(root):
    path, _ = root
    (path / la.CASE_DIR / TRAIN[2] / la.VOLUME_FILE).unlink()
    (path / la.CASE_DIR / TRAIN[2]).rmdir()
    _raises(la_config(path), DataError, re.escape(
        f"{path / 'train.list'} line 3: case '{TRAIN[2]}': folder {path / la.CASE_DIR / TRAIN[2]} is missing"),
        at_validate=False)
    write_case(path, TRAIN[2], 0)
    (path / la.CASE_DIR / TEST[1] / la.VOLUME_FILE).unlink()
    _raises(la_config(path), DataError, re.escape(
        f"{path / 'test.list'} line 2: case '{TEST[1]}': {path / la.CASE_DIR / TEST[1] / la.VOLUME_FILE} is missing"),
        at_validate=False)


def test_bad_lists_are_named(root):
    path, _ = root
    (path / "train.list").write_text("\n".join([*TRAIN, TRAIN[4]]))
    _raises(la_config(path), DataError,
            re.escape(f"{path / 'train.list'} line 11: case '{TRAIN[4]}' is listed again (first at line 5)"),
            at_validate=False)
    (path / "train.list").write_text("\n".join([*TRAIN, TEST[0]]))
    _raises(la_config(path), DataError,
            re.escape(f"{path / 'test.list'} line 1: case '{TEST[0]}' is also in {path / 'train.list'} (line 11)"),
            at_validate=False)
    (path / "test.list").write_text("\n\n")
    _raises(la_config(path), DataError, re.escape(f"list file {path / 'test.list'} is empty"), at_validate=False)


def test_bad_volumes_are_named_at_open(root):
    path, _ = root
    file = path / la.CASE_DIR / TRAIN[5] / la.VOLUME_FILE
    write_case(path, TRAIN[5], 0, keys=("image",))
    _raises(la_config(path), DataError, re.escape(f"{file}: dataset 'label' is missing (found ['image'])"),
            at_validate=False)
    write_case(path, TRAIN[5], 0, label_shape=(20, 18, 11))
    _raises(la_config(path), DataError,
            re.escape(f"{file}: 'image' shape (20, 18, 12) != 'label' shape (20, 18, 11)"), at_validate=False)


def test_label_values_are_checked_when_the_case_is_read(root):
    path, _ = root
    write_case(path, TRAIN[0], 0, label_values=(0, 1, 2, 7))
    write_case(path, TEST[2], 0, label_values=(0, 1, 3))
    data = registry.open_dataset(la_config(path))  # Values are not read at open.
    labeled, _ = data.train_sources()
    with pytest.raises(DataError, match=re.escape(
            f"{path / la.CASE_DIR / TRAIN[0] / la.VOLUME_FILE}: 'label' has values 2, 7 outside {{0, 1}}")):
        labeled[0]
    labeled[1]  # The other cases read.
    with pytest.raises(DataError, match=re.escape(
            f"{path / la.CASE_DIR / TEST[2] / la.VOLUME_FILE}: 'label' has values 3 outside {{0, 1}}")):
        data.case("test", 2)


def test_the_la_config_file_has_the_reference_settings(root):
    from arco_jax import evaluators, methods
    from arco_jax.config import validate
    from tests.tiny import load_config

    data_root, _ = root
    c = load_config("la")
    c.data.data_dir = str(data_root)
    validate(c)
    assert (c.model.name, c.model.rep_dim, tuple(c.data.patch_size)) == ("vnet", 16, (80, 112, 112))
    assert (c.data.batch_labeled, c.data.batch_unlabeled, c.train.steps, c.method) == (4, 4, 6000, "arco_sag")
    assert (c.pretrain.steps, c.pretrain.window, c.pretrain.window_grid, c.pretrain.queue_size) == (6000, 20, 4, 36)
    from arco_jax.pretrain import local_embedding_size
    assert local_embedding_size(c) == (700, 4 ** 3 * 2)  # the reference's 700 cubes of the logits
    assert (c.arco.num_anchors, c.arco.num_negatives, c.arco.temperature, c.arco.ema_decay) == (256, 512, 0.5, 0.99)
    assert (c.optim.learning_rate, c.optim.nesterov, c.optim.weight_decay) == (0.01, True, 1e-4)
    assert tuple(c.eval.stride) == (4, 18, 18) and evaluators.type_of(c) == "sliding_window"
    assert registry.info(c).weak_augment == "rot_flip_crop" and c.arco.negatives == "other_classes"
    baseline = load_config("la", "method=supervised")
    baseline.data.data_dir = str(data_root)
    validate(baseline)
    assert methods.stage2_method_name(baseline) == "supervised"
