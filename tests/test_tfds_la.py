"""The Left Atrium as TFDS array_record (arco_jax.data.tfds_la): built from a tiny UA-MT folder,
records equal to the h5 reader's volumes in list order, a run with data.source='tfds' opening the
same cases and arrays as 'h5', clear errors, and no TensorFlow import."""
import pickle
import re
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from arco_jax.data import la, registry, tfds_la
from arco_jax.data.ssl4mis import DataError
from arco_jax.errors import ConfigError
from tests.tensorflow_stand_in import run_without_tensorflow
from tests.test_la import TEST, TRAIN, la_config, write_la


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(UA-MT folder, TFDS data folder, {case: (image, label)} as written (H, W, D))."""
    root = tmp_path_factory.mktemp("la") / "data"
    written = write_la(root)
    data_dir = tmp_path_factory.mktemp("tfds")
    assert tfds_la.build_la(root, data_dir) == data_dir / "la" / "volumes" / tfds_la.DATASET_VERSION
    return root, data_dir, written


def tfds_config(data_dir, **fields):
    return la_config(data_dir, source="tfds", **fields)


def test_records_are_the_h5_volumes_depth_first_in_list_order(built):
    root, data_dir, written = built
    for split, cases in (("train", TRAIN), ("test", TEST)):
        records = tfds.data_source("la/volumes", split=split, data_dir=data_dir)
        assert len(records) == len(cases)
        for order, case in enumerate(cases):
            record = records[order]
            assert (record["case"].decode(), int(record["order"])) == (case, order)
            assert record["image"].dtype == np.float32 and record["label"].dtype == np.uint8
            image, label = la.read_volume(la.volume_path(root, case))
            np.testing.assert_array_equal(record["image"], image)
            np.testing.assert_array_equal(record["label"], label)
            np.testing.assert_array_equal(record["image"], np.transpose(written[case][0], (2, 0, 1)))


def test_a_tfds_run_opens_the_same_cases_and_arrays_as_h5(built):
    root, data_dir, _ = built
    registry.validate(tfds_config(data_dir, labeled_cases=3, val_cases=2))
    h5 = registry.open_dataset(la_config(root, labeled_cases=3, val_cases=2))
    ours = registry.open_dataset(tfds_config(data_dir, labeled_cases=3, val_cases=2))
    assert ours.description == (f"{data_dir} (LA, TFDS la/volumes: 10 train cases, the last 2 held out for val; "
                                "3 test cases)")
    assert (ours.labeled_count, ours.labeled_description, ours.labeled_record) == (
        h5.labeled_count, h5.labeled_description, h5.labeled_record)
    for theirs_source, our_source in zip(h5.train_sources(), ours.train_sources()):
        assert our_source.names == theirs_source.names
        copy = pickle.loads(pickle.dumps(our_source))  # Grain workers get a copy.
        for index in range(len(theirs_source)):
            a, b = copy[index], theirs_source[index]
            assert a["name"] == b["name"] and a["label"].dtype == b["label"].dtype == np.int32
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])
    assert [s.names for s in ours.train_sources()] == [TRAIN[:3], TRAIN[3:8]]
    for split in la.SPLITS:
        assert ours.cases(split) == h5.cases(split)
        for a, b in zip(registry.iterate_cases(ours, split), registry.iterate_cases(h5, split)):
            assert a.case == b.case and a.spacing is None
            np.testing.assert_array_equal(a.image, b.image)
            np.testing.assert_array_equal(a.label, b.label)
    assert ours.cases("val") == TRAIN[8:] and ours.cases("test") == TEST


def test_bad_input_is_named(built, tmp_path):
    root, data_dir, _ = built
    config = la_config(root, source="zarr")
    for call in (registry.validate, registry.open_dataset):
        with pytest.raises(ConfigError, match=r"^config\.data\.source: 'zarr' is not one of 'h5', 'tfds'$"):
            call(config)
    with pytest.raises(ConfigError, match=r"config\.data\.data_dir: is required for dataset 'la' with source 'tfds' "
                                          r"\(the TFDS data folder"):
        registry.validate(tfds_config(""))
    looked = re.escape(f"{root} holds no prepared TFDS 'la' dataset (looked in {root / 'la' / 'volumes' / '1.0.0'}) "
                       f"({root} holds train.list: a UA-MT folder, read with config.data.source='h5'); build it with "
                       f"`python -m arco_jax.data.tfds_la --manual_dir <UA-MT data/ folder> --data_dir {root}`")
    for call in (registry.validate, registry.open_dataset):
        with pytest.raises(DataError, match=f"^{looked}$"):
            call(tfds_config(root))
    beyond = re.escape(f"config.data.labeled_cases: 10 is not in 1..9: {data_dir / 'la' / 'volumes' / '1.0.0'} "
                       "split 'train' (train.list) has 10 cases")
    for call in (registry.validate, registry.open_dataset):
        with pytest.raises(ConfigError, match=beyond):
            call(tfds_config(data_dir, labeled_cases=10))
    with pytest.raises(DataError, match=re.escape(f"manual_dir {tmp_path / 'none'} does not exist or is empty. The "
                                                  "processed Left Atrium set")):
        tfds_la.build_la(tmp_path / "none", tmp_path / "out")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / la.TRAIN_LIST).write_text("\n".join(TRAIN))
    with pytest.raises(DataError, match=re.escape(f"list file {tmp_path / 'bad' / la.TEST_LIST} is missing")):
        tfds_la.build_la(tmp_path / "bad", tmp_path / "out")
    assert not (tmp_path / "out" / "la" / "volumes" / "1.0.0").exists()
    assert tfds_la.main(["--manual_dir", str(tmp_path / "none"), "--data_dir", str(tmp_path / "out")]) == 1


def test_records_out_of_list_order_are_refused(built):
    _, data_dir, _ = built
    store = tfds_la.TfdsStore(data_dir)
    store._cases["test"] = [TEST[1], TEST[0], TEST[2]]  # as if the metadata disagreed with the records
    with pytest.raises(DataError, match=re.escape(f"record 0 holds case '{TEST[0]}' of list line 0, not '{TEST[1]}'")):
        store.read("test", 0)


def test_building_and_reading_never_import_tensorflow(built, tmp_path):
    """A stand-in `tensorflow` package on the path (as if TensorFlow were installed) records any
    import; the h5 reader must not import tensorflow_datasets, the TFDS build and reads not TF."""
    root, _, _ = built
    script = textwrap.dedent(f"""\
        import json, sys
        import ml_collections
        from arco_jax.data import registry
        def la_config(data_dir, source="h5"):  # base_config would import JAX: seconds, for nothing here
            return ml_collections.ConfigDict({{"data": {{"dataset": "la", "data_dir": data_dir, "source": source,
                                                       "labeled_cases": 4, "val_cases": 0}}}})
        h5 = registry.open_dataset(la_config({str(root)!r}))
        h5.train_sources()[0][0], h5.case("test", 0)
        h5_imports_tfds = "tensorflow_datasets" in sys.modules
        from arco_jax.data import tfds_la
        tfds_la.main(["--manual_dir", {str(root)!r}, "--data_dir", {str(tmp_path / 'tfds')!r}])
        config = la_config({str(tmp_path / 'tfds')!r}, source="tfds")
        registry.validate(config)
        data = registry.open_dataset(config)
        labeled, unlabeled = data.train_sources()
        unlabeled[len(unlabeled) - 1], data.case("test", 2)
        print(json.dumps({{"h5_imports_tfds": h5_imports_tfds, "tensorflow_loaded": "tensorflow" in sys.modules,
                           "unlabeled": len(unlabeled)}}))
        """)
    result = run_without_tensorflow(script, tmp_path)
    assert result == {"h5_imports_tfds": False, "tensorflow_loaded": False, "unlabeled": len(TRAIN) - 4}
    assert (tmp_path / "tfds" / "la" / "volumes" / "1.0.0" / "dataset_info.json").is_file()
