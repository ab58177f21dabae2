"""The predict command on a 3-D run: a volume is segmented by the run's sliding windows (window,
stride, window batch size, largest component), after the dataset's z-score, and an h5 in the LA
layout (H, W, D) is read as the LA reader reads it and answered in its own axis order; and the
DatasetInfo fields that declare this.

The run is a VNet of 4 filters on the atrium phantom's settings, written as a workdir as training
writes it (config.json and one checkpoint under checkpoints/best) from a state of the layout the
config builds with weights drawn here (He-normal kernels, BatchNorm the identity): the VNet's own
initialiser costs about 40 s of XLA compilation on a CPU, these weights none, and they label
about half of a test volume foreground. Nothing is trained; the network is compiled once for
the module (windows of 16 x 32 x 32, two at a time).
"""
import dataclasses
import json
import math
import re
import zlib
from pathlib import Path

import h5py
import jax
import ml_collections
import nibabel as nib
import numpy as np
import pytest

from arco_jax import evaluators, inference, methods, predict, train
from arco_jax.checkpointing import Checkpoints
from arco_jax.config import base_config, validate
from arco_jax.data import la, la_phantom, pipeline, registry
from arco_jax.evaluators import sliding_window

WINDOW, STRIDE = (16, 32, 32), (8, 16, 16)
PHANTOM = la_phantom.AtriumPhantomConfig(cases=(2, 1), shape=(20, 36, 28), seed=5)  # W < the window
AFFINE = np.diag([0.625, 0.625, 2.5, 1.0])


def run_config(cache: Path) -> ml_collections.ConfigDict:
    c = base_config()
    registry.select(c, la_phantom.NAME)
    c.data.cache_dir = str(cache)
    c.data.la_phantom.cases, c.data.la_phantom.shape = PHANTOM.cases, PHANTOM.shape
    c.data.labeled_cases = 1
    c.data.patch_size = WINDOW
    c.data.batch_labeled = c.data.batch_unlabeled = 2
    c.model.name = "vnet"
    c.model.vnet = ml_collections.ConfigDict({"n_filters": 4, "dropout": True})
    c.model.rep_dim = 16
    c.pretrain.steps = 0
    c.eval.window, c.eval.stride, c.eval.window_batch_size = WINDOW, STRIDE, 2
    return methods.apply_method(c, "supervised")


def drawn_state(config: ml_collections.ConfigDict):
    """A TrainState of the config's layout: every kernel He-normal (the same for student and
    teacher, as at initialisation), BatchNorm scales and running variances 1, the rest 0."""
    def leaf(path, spec):
        name = jax.tree_util.keystr(path)
        rng = np.random.default_rng(zlib.crc32(name.split("['params']")[-1].encode()))
        if name.endswith("['kernel']"):
            return rng.normal(0.0, math.sqrt(2.0 / math.prod(spec.shape[:-1])), spec.shape).astype(spec.dtype)
        return (np.ones if name.endswith(("['scale']", "['var']")) else np.zeros)(spec.shape, spec.dtype)

    return jax.tree_util.tree_map_with_path(leaf, inference.abstract_train_state(config))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir as training writes it, its state saved as the best checkpoint (step 0)."""
    config = run_config(tmp_path_factory.mktemp("cache"))
    validate(config)
    workdir = tmp_path_factory.mktemp("la_run")
    (workdir / "config.json").write_text(json.dumps(config.to_dict()))
    state = drawn_state(config)
    checkpoints = Checkpoints(workdir / "checkpoints", keep=1, config_hash=train.config_hash(config))
    checkpoints.save_best(0, state, 0.0)
    checkpoints.close()
    return workdir


@pytest.fixture(scope="module")
def model(workdir):
    return inference.load_model(workdir)


def write_la_h5(path: Path, image_dhw: np.ndarray) -> Path:
    """An mri_norm2.h5 of the UA-MT layout: `image` and `label` (H, W, D)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=np.transpose(image_dhw, (1, 2, 0)))
        f.create_dataset("label", data=np.zeros(np.transpose(image_dhw, (1, 2, 0)).shape, np.uint8))
    return path


def zscore(volume: np.ndarray) -> np.ndarray:
    volume = np.ascontiguousarray(volume, np.float32)
    return ((volume - volume.mean(dtype=np.float64)) / volume.std(dtype=np.float64)).astype(np.float32)


def scanner_volume(number: int = 3) -> np.ndarray:
    """A phantom case (D, H, W) in a scanner-like range: neither z-scored nor in [0, 1]."""
    image, _ = la_phantom.generate_case(PHANTOM, number)
    return (300.0 + 120.0 * image).astype(np.float32)


def test_the_run_declares_sliding_windows_zscore_and_the_la_h5_axes(workdir, model):
    assert (model.dataset.intensity, model.dataset.h5_axes) == ("zscore", "hwd")
    # From the registry by dataset name, not from config.json: old workdirs read today's declaration.
    assert registry.info(model.config) is la.INFO
    assert not {"intensity", "h5_axes"} & set(json.loads((workdir / "config.json").read_text())["data"])
    assert isinstance(model.evaluator, sliding_window.SlidingWindow)
    assert (model.evaluator.window, model.evaluator.stride, model.evaluator.window_batch_size) == (WINDOW, STRIDE, 2)


def test_predict_h5_and_nifti_give_the_sliding_window_evaluators_labels(workdir, model, tmp_path):
    """The restored VNet itself: both inputs come back as the evaluator predicts the volume the
    LA reader reads, z-scored, each in the input's own axis order."""
    raw = scanner_volume()
    scans = tmp_path / "scans"
    h5_scan = write_la_h5(scans / "atrium.h5", raw)
    image_dhw, _ = la.read_volume(h5_scan)  # as the dataset reads its own files
    nib.save(nib.Nifti1Image(np.transpose(raw, (2, 1, 0)), AFFINE), scans / "atrium_nii.nii.gz")
    written = predict.predict(workdir, scans, tmp_path / "out")
    assert written == [tmp_path / "out" / "atrium_pred.h5", tmp_path / "out" / "atrium_nii_pred.nii.gz"]

    evaluator = evaluators.build(model.config)
    expected = evaluator.predict_volume(lambda x: np.asarray(model.predict_logits(x)), zscore(image_dhw))
    assert expected.shape == PHANTOM.shape and 0 < expected.mean() < 1  # both classes: the test can fail
    with h5py.File(written[0]) as f, h5py.File(h5_scan) as source:
        labels = f["label"][()]
        assert labels.shape == source["image"].shape == (36, 28, 20) and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.transpose(expected, (1, 2, 0)))
    result = nib.load(written[1])
    np.testing.assert_array_equal(result.affine, AFFINE)
    assert result.shape == (28, 36, 20) and result.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(result.dataobj), np.transpose(expected, (2, 1, 0)))


def test_h5_axes_reach_the_network_depth_first_and_come_back(model, tmp_path):
    """A stand-in network that depends on the depth axis (a running sum along it) tells a
    transposed volume apart; the result overlays the input's `image` voxel for voxel."""
    def depth_sum(windows):
        foreground = np.cumsum(windows[..., 0], axis=1) / windows.shape[1]
        return np.stack([np.zeros_like(foreground), foreground], axis=-1)

    stand_in = dataclasses.replace(model, predict_logits=depth_sum)
    raw = scanner_volume(2)
    scan = write_la_h5(tmp_path / "case" / la.VOLUME_FILE, raw)
    (written,) = predict.predict_scan(stand_in, scan, tmp_path)
    assert written == tmp_path / "mri_norm2_pred.h5"
    expected = sliding_window.predict_labels(depth_sum, zscore(raw), WINDOW, STRIDE, batch_size=2)
    assert 0 < expected.mean() < 1
    with h5py.File(written) as f:
        assert f.attrs["source"] == la.VOLUME_FILE
        np.testing.assert_array_equal(f["label"][()], np.transpose(expected, (1, 2, 0)))


def test_zscore_and_the_runs_window_settings_are_applied(model, tmp_path):
    """A pointwise stand-in marks the voxels below the volume's mean (negative after z-scoring;
    none would be after min-max); with eval.largest_component on, only the largest component of
    them stays. Every batch holds window_batch_size windows of the run's window."""
    shapes = []

    def below_zero(windows):
        shapes.append(windows.shape)
        return np.concatenate([windows, -windows], axis=-1)

    config = ml_collections.ConfigDict(model.config.to_dict())
    config.eval.largest_component = True
    stand_in = dataclasses.replace(model, config=config, predict_logits=below_zero)
    raw = scanner_volume(1)
    scan = write_la_h5(tmp_path / "low.h5", raw)
    predict.predict_scan(stand_in, scan, tmp_path, png=True)
    with h5py.File(tmp_path / "low_pred.h5") as f:
        labels = np.transpose(f["label"][()], (2, 0, 1))
    below = (zscore(raw) < 0).astype(np.int32)
    assert sliding_window.largest_component(below).sum() < below.sum()  # the setting matters here
    np.testing.assert_array_equal(labels, sliding_window.largest_component(below))
    assert set(shapes) == {(2, *WINDOW, 1)}
    pngs = sorted((tmp_path / "low_png").iterdir())
    assert len(pngs) == PHANTOM.shape[0]  # one overlay per slice, from the min-max scaled scan


def test_a_2d_run_keeps_minmax_and_depth_first_h5():
    from arco_jax.data import ssl4mis_datasets

    assert (ssl4mis_datasets.INFO.intensity, ssl4mis_datasets.INFO.h5_axes) == ("minmax", "dhw")
    assert registry.DatasetInfo(num_classes=2, class_names=("a",)).intensity == "minmax"


def test_normalize_and_axis_helpers(tmp_path):
    volume = np.arange(24, dtype=np.float32).reshape(2, 3, 4) * 3 + 5
    np.testing.assert_allclose(predict.normalize(volume, tmp_path, "minmax"), (volume - 5) / 69, rtol=1e-6)
    z = predict.normalize(volume, tmp_path, "zscore")
    assert abs(float(z.mean())) < 1e-6 and abs(float(z.std()) - 1) < 1e-6 and z.dtype == np.float32
    with pytest.raises(predict.InputError, match=re.escape(f"{tmp_path}: every voxel has intensity 2.0")):
        predict.normalize(np.full((2, 2, 2), 2.0, np.float32), tmp_path, "zscore")
    hwd = np.zeros((5, 6, 7))
    assert predict.to_depth_first(hwd, "hwd").shape == (7, 5, 6)
    np.testing.assert_array_equal(predict.from_depth_first(predict.to_depth_first(hwd, "hwd"), "hwd"), hwd)


@pytest.mark.parametrize("fields, problem", [
    (dict(intensity="percentile"), f"intensity must be one of {registry.INTENSITIES}, got 'percentile'"),
    (dict(h5_axes="hwz"), "h5_axes must order the letters of 'dhw' (e.g. 'dhw', 'hwd'), got 'hwz'"),
    (dict(h5_axes="dh"), "got 'dh'"),
    (dict(weak_augment="flip"), "weak_augment must be one of ('resize_rotate', 'rot_flip_crop', 'scale_crop_flip', "
                                "'crop_flip', 'crop'), got 'flip'"),
    (dict(colours=((0, 0, 0), (1, 2, 3), (4, 5, 6))), "colours: 3 for 2 classes"),
    (dict(colours=((0, 0, 0), (1, 2, 300))), "colours[1] must be three integers in 0..255 (R, G, B), got (1, 2, 300)"),
    (dict(colours=((0, 0),)), "colours[0] must be three integers in 0..255 (R, G, B), got (0, 0)"),
])
def test_dataset_info_checks_the_predict_fields(fields, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        registry.DatasetInfo(num_classes=2, class_names=("a",), **fields)


def test_dataset_info_takes_every_view_the_pipeline_has():
    for view in pipeline.WEAK_AUGMENTATIONS:  # 'crop' included (ReCo's unlabeled natural view)
        assert registry.DatasetInfo(num_classes=2, class_names=("a",), weak_augment=view).weak_augment == view


def test_a_run_evaluated_on_whole_images_predicts_no_volumes(model):
    config = ml_collections.ConfigDict(model.config.to_dict())
    config.eval.type = "miou"
    images = dataclasses.replace(model, config=config)
    with pytest.raises(inference.WorkdirError, match=re.escape("evaluator 'miou' has no predict_volume: it predicts no volumes")):
        images.predict_volume(np.zeros(PHANTOM.shape, np.float32))
