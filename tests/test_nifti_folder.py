"""The NIfTI dataset folder (nnU-Net layout): dataset.json, splits, preprocessing, caching, the
bad-input messages, and one tiny 2-D and 3-D training run each through configs/nifti_folder.py."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import tiny
from arco_jax import inference, predict, train
from arco_jax.config import validate
from arco_jax.data import nifti_folder, pipeline, registry
from arco_jax.data.ssl4mis import DataError
from arco_jax.errors import ConfigError

SPACING_A = (0.8, 0.8, 2.5)  # (x, y, z) mm: anisotropic, thick slices
SPACING_B = (1.0, 1.0, 2.5)
SHAPE = (24, 20, 6)  # (x, y, z)
LABELS = {"background": 0, "liver": 1, "lesion": 2}


def phantom_case(seed: int, shape=SHAPE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(CT channel in HU, MR channel, label) (x, y, z): a liver-like blob with a lesion inside."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    cx, cy = shape[0] / 2 + rng.uniform(-2, 2), shape[1] / 2 + rng.uniform(-2, 2)
    r = np.hypot(x - cx, y - cy)
    label = np.where(r < 7, 1, 0)
    label[(r < 3) & (z >= 1) & (z < shape[2] - 1)] = 2
    ct = np.where(label == 1, 60.0, np.where(label == 2, 150.0, -800.0)) + rng.normal(0, 20, shape)
    mr = np.where(label > 0, 3.0, 1.0) * 100 + rng.normal(0, 5, shape)
    return ct.astype(np.float32), mr.astype(np.float32), label.astype(np.uint8)


def affine_for(spacing, flip_x=False) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    if flip_x:  # An LPS-like x axis: canonical reading flips it back.
        affine[0, 0] = -spacing[0]
        affine[0, 3] = spacing[0] * (SHAPE[0] - 1)
    return affine


def write_folder(root: Path, cases=6, channels=("CT", "T2"), labels=LABELS, spacings=None) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    spacings = spacings or [SPACING_A if i % 2 else SPACING_B for i in range(cases)]
    for i in range(cases):
        ct, mr, label = phantom_case(i)
        affine = affine_for(spacings[i], flip_x=i == 0)
        for c, data in enumerate((ct, mr)[: len(channels)]):
            nib.save(nib.Nifti1Image(data, affine), root / "imagesTr" / f"case{i:02d}_{c:04d}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"case{i:02d}.nii.gz")
    meta = {"channel_names": {str(c): name for c, name in enumerate(channels)}, "labels": labels,
            "numTraining": cases, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def load_config(mode: str = "2d", method: str | None = None):
    return tiny.load_config("nifti_folder", f"mode={mode}" + (f",method={method}" if method else ""))


def folder_config(root: Path, cache: Path, mode: str = "2d", method: str | None = None, **fields):
    c = load_config(mode, method)
    d = c.data
    d.data_dir, d.cache_dir = str(root), str(cache)
    d.labeled_cases, d.val_fraction, d.test_fraction = 2, 0.2, 0.2
    d.num_workers = 0
    for key, value in fields.items():
        d[key] = value
    registry.resolve(c)
    return c


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("nnunet") / "Dataset001_Liver")


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def test_metadata_comes_from_dataset_json(folder, cache):
    c = folder_config(folder, cache)
    assert (c.data.num_classes, tuple(c.data.class_names), c.data.in_channels, c.data.ignore_label,
            c.data.spatial_rank) == (3, ("liver", "lesion"), 2, None, 2)
    validate(c)
    c3 = folder_config(folder, cache, mode="3d")
    assert c3.data.spatial_rank == 3 and c3.model.name == "vnet"


def test_v1_labels_and_the_ignore_label_are_read(tmp_path):
    root = write_folder(tmp_path / "v1", cases=3, channels=("MR",),
                        labels={"0": "background", "1": "liver", "2": "lesion"})
    assert nifti_folder.describe(root).class_names == ("liver", "lesion")
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "liver": 1, "lesion": 2, "ignore": 3}
    (root / "dataset.json").write_text(json.dumps(meta))
    description = nifti_folder.describe(root)
    assert (description.num_classes, description.ignore_label) == (3, 3)


def test_splits_are_seeded_and_disjoint(folder, cache):
    data = registry.open_dataset(folder_config(folder, cache))
    s = data.splits
    cases = [f"case{i:02d}" for i in range(6)]
    assert sorted(s["labeled"] + s["unlabeled"] + s["val"] + s["test"]) == cases
    assert (len(s["test"]), len(s["val"]), len(s["labeled"])) == (1, 1, 2)
    order = [cases[i] for i in np.random.default_rng(0).permutation(6)]
    assert s["test"] == order[:1] and s["val"] == order[1:2] and s["labeled"] == order[2:4]
    assert data.labeled_record["split_case_ids"] == s
    assert data.labeled_count == 2 * SHAPE[2] and data.labeled_record["labeled_slices"] == 12
    other = registry.open_dataset(folder_config(folder, cache, split_seed=3)).splits
    assert other != s


def test_list_files_choose_the_splits(folder, cache, tmp_path):
    (tmp_path / "test.txt").write_text("case05\ncase04\n")
    (tmp_path / "labeled.txt").write_text("case00\n")
    data = registry.open_dataset(folder_config(folder, cache, test_list=str(tmp_path / "test.txt"),
                                               labeled_list=str(tmp_path / "labeled.txt"), val_fraction=0.0))
    assert data.splits["test"] == ["case05", "case04"] and data.splits["labeled"] == ["case00"]
    assert data.splits["val"] == [] and len(data.splits["unlabeled"]) == 3


def test_preprocessing_orients_resamples_and_normalises_per_channel(folder, cache):
    data = registry.open_dataset(folder_config(folder, cache, mode="3d"))
    plan = data.store.plan
    # Spacings differ (0.8 and 1.0 mm in plane): the 3-D mode resamples to their median.
    assert plan["target_spacing"] == pytest.approx([2.5, 0.9, 0.9])
    assert plan["normalization"] == ["ct", "zscore"]
    low, high = plan["ct_clip"][0]
    assert 0 < low < 100 < high < 250  # Foreground HU (liver 60, lesion 150) of the labeled cases only.
    case = data.case("test", 0)
    raw_ct, raw_mr, raw_label = phantom_case(int(case.case[-2:]))
    spacing = SPACING_A if int(case.case[-2:]) % 2 else SPACING_B
    expected = tuple(round(n * s / 0.9) for n, s in zip(SHAPE[:2], spacing[:2]))
    assert case.image.shape == (SHAPE[2], *expected[::-1], 2) and case.label.shape == case.image.shape[:3]
    assert case.spacing == pytest.approx((2.5, SHAPE[1] * spacing[1] / expected[1], SHAPE[0] * spacing[0] / expected[0]))
    ct = case.image[..., 0]
    assert ct.min() >= 0.0 and ct.max() <= 1.0 and np.mean(ct[case.label == 0] == 0.0) > 0.95
    mr = case.image[..., 1]
    assert abs(mr.mean()) < 1e-4 and abs(mr.std() - 1) < 1e-3
    # Voxel counts per class survive nearest resampling within the area ratio.
    ratio = np.prod(spacing[:2]) / 0.81
    assert np.sum(case.label == 1) == pytest.approx(np.sum(raw_label == 1) * ratio, rel=0.15)


def test_canonical_orientation_undoes_a_flipped_axis(tmp_path, cache):
    root = write_folder(tmp_path / "flip", cases=3, channels=("MR",), spacings=[SPACING_B] * 3)
    data = registry.open_dataset(folder_config(root, cache, normalization=("none",), val_fraction=0.0,
                                               test_fraction=0.0, labeled_cases=1))
    ct, _, label = phantom_case(0)  # One channel: the CT array was written.
    arrays = data.store.array("case00", "image")[..., 0], data.store.array("case00", "label")
    # case00 was stored with x running right-to-left; the reader turns it to RAS, (z, y, x).
    np.testing.assert_array_equal(arrays[1], np.transpose(label[::-1], (2, 1, 0)))
    np.testing.assert_allclose(arrays[0], np.transpose(ct[::-1], (2, 1, 0)))
    # 2-D mode with equal spacings: no resampling.
    assert data.store.plan["target_spacing"] is None


def test_the_2d_mode_resamples_in_plane_only_and_a_ct_window_is_used(folder, cache):
    data = registry.open_dataset(folder_config(folder, cache, ct_window=(-200.0, 250.0)))
    assert data.store.plan["target_spacing"] == [None, pytest.approx(0.9), pytest.approx(0.9)]
    assert data.store.plan["ct_clip"][0] == [-200.0, 250.0]
    labeled, unlabeled = data.train_sources()
    assert len(labeled) == data.labeled_count and len(unlabeled) == 2 * SHAPE[2]
    item = labeled[0]
    assert item["image"].ndim == 3 and item["image"].shape[-1] == 2 and item["label"].dtype == np.int32
    ct = item["image"][..., 0]
    assert ct.min() == 0.0 and ct.max() <= 1.0  # -800 HU background clips to the window's floor.


def test_the_cache_is_reused_and_follows_the_files(tmp_path, cache):
    root = write_folder(tmp_path / "c", cases=4, channels=("CT",), spacings=[SPACING_B] * 4)
    c = folder_config(root, cache, val_fraction=0.0, test_fraction=0.25, labeled_cases=1)
    first = registry.open_dataset(c).store.folder
    stamp = (first / "plan.json").stat().st_mtime_ns
    assert registry.open_dataset(c).store.folder == first and (first / "plan.json").stat().st_mtime_ns == stamp
    ct, _, label = phantom_case(7)
    nib.save(nib.Nifti1Image(label, affine_for(SPACING_B)), root / "labelsTr" / "case03.nii.gz")
    assert registry.open_dataset(c).store.folder != first  # A changed file makes a new cache.
    assert not list(cache.rglob("*.tmp"))


@pytest.mark.parametrize("mutate, pattern", [
    (lambda r, m: m.pop("labels"), r"dataset.json: 'labels' is missing"),
    (lambda r, m: m.update(labels={"background": 0, "liver": 2}), r"class values must be 0 \(background\), 1"),
    (lambda r, m: m.update(channel_names={"0": "CT", "1": "T2", "2": "ADC"}),
     r"channel 2 \('ADC'\) has no files"),
    (lambda r, m: m.update(file_ending=".png"), r"file_ending '.png' is not read here"),
])
def test_bad_dataset_json_is_named(tmp_path, cache, mutate, pattern):
    root = write_folder(tmp_path / "bad", cases=3)
    meta = json.loads((root / "dataset.json").read_text())
    mutate(root, meta)
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises((ConfigError, DataError), match=pattern):
        c = folder_config(root, cache, labeled_cases=1, val_fraction=0.0, test_fraction=0.0)
        registry.open_dataset(c)


def _open(root, cache):
    return registry.open_dataset(folder_config(root, cache, labeled_cases=1, val_fraction=0.0, test_fraction=0.0))


def test_a_label_on_another_grid_is_named(tmp_path, cache):
    root = write_folder(tmp_path / "grid", cases=3)
    _, _, label = phantom_case(1)
    shifted = affine_for(SPACING_A)
    shifted[:3, 3] += 2.0
    nib.save(nib.Nifti1Image(label, shifted), root / "labelsTr" / "case01.nii.gz")
    with pytest.raises(DataError, match=r"case01.nii.gz: affine differs from case01_0000.nii.gz's by up to 2 mm"):
        _open(root, cache)
    nib.save(nib.Nifti1Image(label[:-1], affine_for(SPACING_A)), root / "labelsTr" / "case01.nii.gz")
    with pytest.raises(DataError, match=r"case01.nii.gz: shape \(23, 20, 6\) differs from case01_0000"):
        _open(root, cache)


def test_nan_intensities_and_unknown_labels_are_named_and_nothing_half_written(tmp_path, cache):
    root = write_folder(tmp_path / "nan", cases=3)
    ct, _, label = phantom_case(2)
    ct[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(ct, affine_for(SPACING_B)), root / "imagesTr" / "case02_0000.nii.gz")
    with pytest.raises(DataError, match=r"case02_0000.nii.gz: 1 voxel\(s\) are not finite"):
        _open(root, cache)
    assert not list(cache.rglob("plan.json")) and not list(cache.rglob("*.tmp"))
    ct, _, label = phantom_case(2)
    nib.save(nib.Nifti1Image(ct, affine_for(SPACING_B)), root / "imagesTr" / "case02_0000.nii.gz")
    label[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(label, affine_for(SPACING_B)), root / "labelsTr" / "case02.nii.gz")
    with pytest.raises(DataError, match=r"case02.nii.gz: label values 7 are not in .*dataset.json's labels"):
        _open(root, cache)


def test_missing_files_and_a_mix_of_2d_and_3d_are_named(tmp_path, cache):
    root = write_folder(tmp_path / "miss", cases=3)
    (root / "imagesTr" / "case01_0001.nii.gz").unlink()
    with pytest.raises(DataError, match=r"case01_0001.nii.gz is missing \(channel 1, 'T2', of case 'case01'\)"):
        _open(root, cache)
    root = write_folder(tmp_path / "mix", cases=3, channels=("MR",))
    _, mr, label = phantom_case(2)
    nib.save(nib.Nifti1Image(mr[..., 0], affine_for(SPACING_B)), root / "imagesTr" / "case02_0000.nii.gz")
    nib.save(nib.Nifti1Image(label[..., 0], affine_for(SPACING_B)), root / "labelsTr" / "case02.nii.gz")
    with pytest.raises(DataError, match=r"case02_0000.nii.gz: a 2-D image, but case00_0000.nii.gz is 3-D: a folder "
                                        "mixing 2-D and 3-D files"):
        _open(root, cache)
    (root / "imagesTr" / "stray_0000.nii.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"stray_0000.nii.gz: case 'stray' has no label file"):
        _open(root, cache)


@pytest.mark.parametrize("field, value, pattern", [
    ("mode", "4d", "config.data.mode: '4d' is not one of"),
    ("resample", "on", "config.data.resample: 'on' is not one of"),
    ("val_fraction", 1.5, r"config.data.val_fraction: must be a fraction in \[0, 1\)"),
    ("normalization", ("ct", "ct", "ct"), "config.data.normalization: 3 entries for 2 channel"),
    ("ct_window", (250.0, -200.0), "config.data.ct_window: must be"),
    ("labeled_cases", 4, "config.data.labeled_cases: 4 of 4 training cases"),
])
def test_bad_fields_are_named(folder, cache, field, value, pattern):
    c = folder_config(folder, cache)
    c.data[field] = value
    with pytest.raises(ConfigError, match=pattern):
        registry.open_dataset(c)


def tiny_run_config(root, cache, mode):
    """The labeled-only method: the folder's plumbing is under test here, ARCO's step with several
    channels in tests/test_plugin_dataset.py."""
    c = folder_config(root, cache, mode=mode, method="supervised")
    tiny.tiny_arco(c)
    t = c.train
    t.steps, t.log_every, t.eval_every, t.checkpoint_every = 2, 2, 2, 2
    c.data.batch_labeled = c.data.batch_unlabeled = 2
    c.arco.remat_student = False  # Tiny shapes: nothing to save.
    if mode == "2d":
        tiny.narrow_model(c)
        c.data.patch_size = (32, 32)
    else:
        c.model.vnet.n_filters = 4
        c.model.rep_dim = 8
        c.data.patch_size = (16, 16, 16)
        c.eval.window = (16, 16, 16)
        c.eval.stride = (16, 16, 16)
    return c


def check_results(results):
    assert results["dataset"] == "nifti_folder" and results["labeled_cases"] == 2
    assert results["split_case_ids"]["labeled"] == results["labeled_case_ids"]
    assert set(results["test"]) == {"best", "last"}
    for record in results["test"].values():
        assert list(record["per_case"]) == results["split_case_ids"]["test"]
        assert np.asarray(record["per_case"][results["split_case_ids"]["test"][0]]).shape == (2, 4)


@pytest.fixture(scope="module")
def trained_2d(folder, tmp_path_factory):
    """One tiny 2-D run on the two-channel folder (trained once for the tests that need a run)."""
    cache = tmp_path_factory.mktemp("cache2d")
    workdir = tmp_path_factory.mktemp("run2d") / "run"
    results = train.train_and_evaluate(tiny_run_config(folder, cache, "2d"), workdir)
    return results, workdir, cache


def test_the_2d_config_trains_and_evaluates_on_the_folder(trained_2d):
    """Two channels through the UNet and the slice-wise evaluator; the run records its data."""
    results, workdir, _ = trained_2d
    check_results(results)
    record = json.loads((workdir / registry.DATA_RECORD).read_text())
    assert record["split_case_ids"] == results["split_case_ids"]
    assert record["preprocessing"]["normalization"] == ["ct", "zscore"]


@pytest.mark.slow
def test_the_3d_config_trains_and_evaluates_on_the_folder(folder, cache, tmp_path):
    """The same folder as (D, H, W, 2) volumes through the VNet and sliding windows (the LA tests
    cover that path; slow)."""
    check_results(train.train_and_evaluate(tiny_run_config(folder, cache, "3d"), tmp_path / "run"))


def scan_folder(folder: Path, cases, target: Path) -> Path:
    target.mkdir()
    for case in cases:
        for c in range(2):
            name = f"{case}_{c:04d}.nii.gz"
            (target / name).write_bytes((folder / "imagesTr" / name).read_bytes())
    return target


def test_predict_applies_the_plan_and_writes_on_the_input_grid(trained_2d, folder, tmp_path):
    results, workdir, cache = trained_2d
    test_case = results["split_case_ids"]["test"][0]
    scans = scan_folder(folder, ["case00", test_case], tmp_path / "imagesTs")
    written = predict.predict(workdir, scans, tmp_path / "out", checkpoint="last", png=True)
    assert {p.name for p in written if p.suffix != ".png"} == {"case00_pred.nii.gz", f"{test_case}_pred.nii.gz"}
    model = inference.load_model(workdir, "last")
    data = registry.open_dataset(config_with_cache(model.config, cache))
    plan = json.loads((workdir / registry.DATA_RECORD).read_text())["preprocessing"]
    for case in ("case00", test_case):
        source = nib.load(scans / f"{case}_0000.nii.gz")
        out = nib.load(tmp_path / "out" / f"{case}_pred.nii.gz")
        assert out.shape == source.shape and np.allclose(out.affine, source.affine)
        assert out.get_data_dtype() == np.uint8
        # The same labels as the evaluator's prediction of the cached case, brought back to the file's grid.
        image = data.store.array(case, "image")
        prepared = nifti_folder.prepare_scan(plan, [scans / f"{case}_{c:04d}.nii.gz" for c in range(2)])
        np.testing.assert_allclose(prepared.volume, image, atol=1e-5)
        expected = prepared.to_input_grid(model.predict_volume(np.array(image)))
        np.testing.assert_array_equal(np.asarray(out.dataobj), expected)
    assert (tmp_path / "out" / "case00_pred_png" / "slice_000.png").is_file()


def config_with_cache(config, cache):
    c = config.copy_and_resolve_references()
    c.data.cache_dir = str(cache)
    return c


def test_labels_go_back_to_a_flipped_and_resampled_grid(folder, tmp_path):
    """prepare_scan then to_input_grid returns a label map to the file's own voxels: exactly
    without resampling, and within nearest-neighbour error through a resampling."""
    label_file = folder / "labelsTr" / "case00.nii.gz"  # case00 has a flipped x axis.
    original = np.asarray(nib.load(label_file).dataobj)
    plan = {"normalization": ["none"], "ct_clip": [None], "target_spacing": None}
    prepared = nifti_folder.prepare_scan(plan, [label_file])
    np.testing.assert_array_equal(prepared.to_input_grid(prepared.volume[..., 0].astype(np.int32)), original)
    # Per-voxel values with a class axis (probability maps) take the same way back.
    stacked = np.stack([prepared.volume[..., 0], 2 * prepared.volume[..., 0]], axis=-1)
    np.testing.assert_array_equal(prepared.to_input_grid(stacked), np.stack([original, 2 * original], axis=-1))
    plan["target_spacing"] = [2.5, 0.9, 0.9]
    prepared = nifti_folder.prepare_scan(plan, [label_file])
    assert prepared.volume.shape[1:3] != original.shape[:2][::-1]
    back = prepared.to_input_grid(np.rint(prepared.volume[..., 0]).astype(np.int32))
    assert back.shape == original.shape and np.mean(back == original) > 0.95


def test_predict_names_bad_scans(trained_2d, folder, tmp_path):
    _, workdir, _ = trained_2d
    scans = scan_folder(folder, ["case01"], tmp_path / "scans")
    (scans / "case01_0001.nii.gz").unlink()
    with pytest.raises(predict.InputError, match=r"case01_0001.nii.gz is missing \(channel 1 of scan 'case01'\)"):
        predict.predict(workdir, scans, tmp_path / "out")
    single = tmp_path / "plain.nii.gz"
    single.write_bytes((folder / "imagesTr" / "case01_0000.nii.gz").read_bytes())
    with pytest.raises(predict.InputError, match=r"plain.nii.gz: the run takes 2 channels, one file each"):
        predict.predict(workdir, single, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_3d_volumes_with_channels_make_patch_batches(folder, cache):
    data = registry.open_dataset(folder_config(folder, cache, mode="3d"))
    labeled, unlabeled = data.train_sources()
    streams = pipeline.make_source_streams(labeled, unlabeled, labeled_batch_size=2, unlabeled_batch_size=2,
                                           patch_size=(4, 16, 16), seed=0, augmentation="rot_flip_crop")
    batch_l, batch_u = next(streams)
    assert batch_l["image"].shape == (2, 4, 16, 16, 2) and batch_l["label"].shape == (2, 4, 16, 16)
    assert batch_u["image"].shape == (2, 4, 16, 16, 2) and "label" not in batch_u
    assert set(np.unique(batch_l["label"])) <= {0, 1, 2}
    streams.close()


def test_predict_needs_no_data_folder(trained_2d, folder, tmp_path):
    """The run's config.json and data.json hold what predict needs: the folder may be elsewhere."""
    _, workdir, _ = trained_2d
    moved = tmp_path / "run"
    shutil.copytree(workdir, moved)
    record = json.loads((moved / "config.json").read_text())
    record["data"]["data_dir"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(record))
    scans = scan_folder(folder, ["case03"], tmp_path / "scans")
    here = predict.predict(moved, scans, tmp_path / "a", checkpoint="last")
    there = predict.predict(workdir, scans, tmp_path / "b", checkpoint="last")
    np.testing.assert_array_equal(np.asarray(nib.load(here[0]).dataobj), np.asarray(nib.load(there[0]).dataobj))
