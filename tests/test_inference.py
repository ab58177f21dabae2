"""Inference on a trained workdir: restoring a chosen checkpoint, the evaluate command's files
and numbers (voxel and millimetre distances), and the predict command on NIfTI and h5 scans.

A tiny run (phantom 3/1/1 patients of 32 px, 2 steps, supervised term only so the step
compiles quickly) is trained once for the module; it saves steps 1 and 2 under
checkpoints/last and the better one under checkpoints/best.
"""
import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from arco_jax import evaluate, evaluation, inference, predict, train
from arco_jax.data import registry, ssl4mis
from arco_jax.evaluators import cardiac, sliding_window

import tiny

REPO = Path(__file__).resolve().parent.parent
CLASS_NAMES = ("RV", "Myo", "LV")
NUM_CLASSES = 4
# (x, y, z) voxel sizes 1.5 x 1.5 mm in plane, 10 mm slices, with a rotation and an origin.
NIFTI_AFFINE = np.array([[0.0, -1.5, 0.0, 40.0],
                         [1.5, 0.0, 0.0, -25.0],
                         [0.0, 0.0, 10.0, 7.5],
                         [0.0, 0.0, 0.0, 1.0]])


def tiny_config(cache_dir: Path):
    c = tiny.tiny_config(cache_dir, steps=2, every=1)
    for term in ("unsup", "contrast", "eqv", "nn"):
        c.loss_weights[term] = 0.0
    c.train.keep_checkpoints = 2
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("phantom_cache")
    config = tiny_config(cache)
    workdir = tmp_path_factory.mktemp("run")
    results = train.train_and_evaluate(config, workdir)
    return types.SimpleNamespace(config=config, workdir=workdir, results=results,
                                 root=registry.open_dataset(config).data.root)


@pytest.fixture(scope="module")
def model(run):
    return inference.load_model(run.workdir, "last")


def phantom_volume(run, index: int = 0) -> tuple[str, np.ndarray, np.ndarray]:
    return list(ssl4mis.iterate_volumes(run.root, "test", NUM_CLASSES))[index]


# ----------------------------------------------------------------------------- loading

def test_load_model_restores_the_requested_checkpoint(run, model):
    best_step = json.loads((run.workdir / "checkpoints" / "best.json").read_text())["step"]
    best = inference.load_model(run.workdir, "best")
    step_one = inference.load_model(run.workdir, 1)
    assert (best.directory, best.step) == ("best", best_step)
    assert (model.directory, model.step) == ("last", 2)
    assert (step_one.directory, step_one.step) == ("last", 1)
    images = np.random.default_rng(0).random((3, 32, 32, 1), dtype=np.float32)
    logits_one, logits_two = (np.asarray(m.predict_logits(images)) for m in (step_one, model))
    assert logits_two.shape == (3, 32, 32, NUM_CLASSES) and np.isfinite(logits_two).all()
    assert not np.allclose(logits_one, logits_two)  # two different states were restored
    np.testing.assert_array_equal(np.asarray(best.predict_logits(images)),
                                  logits_one if best_step == 1 else logits_two)


def test_load_model_takes_a_relative_workdir(run, monkeypatch):
    """As `--workdir=runs/demo` on the command line (Orbax itself needs absolute paths)."""
    monkeypatch.chdir(run.workdir.parent)
    relative = inference.load_model(run.workdir.name, 1)
    assert (relative.directory, relative.step) == ("last", 1)


def test_load_model_takes_the_network_that_eval_model_names(run, model, tmp_path):
    config = json.loads((run.workdir / "config.json").read_text())
    config["eval"]["model"] = "teacher"
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "checkpoints").symlink_to(run.workdir / "checkpoints")
    teacher = inference.load_model(tmp_path, "last")
    assert teacher.config.eval.model == "teacher" and teacher.step == 2
    images = np.random.default_rng(1).random((2, 32, 32, 1), dtype=np.float32)
    # After two updates the EMA teacher (decay 0.99) is still close to, but not, the student.
    assert not np.allclose(np.asarray(teacher.predict_logits(images)), np.asarray(model.predict_logits(images)))


def test_load_model_errors_name_the_path(run, tmp_path):
    with pytest.raises(inference.WorkdirError, match=re.escape(str(tmp_path / "missing"))):
        inference.load_model(tmp_path / "missing")
    with pytest.raises(inference.WorkdirError, match=re.escape(f"{tmp_path / 'config.json'} is missing")):
        inference.load_model(tmp_path)
    with pytest.raises(inference.WorkdirError, match=r"no checkpoint at step 7 \(available: best: \[\d\]; "
                                                     r"last: \[1, 2\]\)"):
        inference.load_model(run.workdir, 7)
    with pytest.raises(inference.WorkdirError, match="'best', 'last' or a step number"):
        inference.load_model(run.workdir, "newest")
    shutil.copy(run.workdir / "config.json", tmp_path / "config.json")
    with pytest.raises(inference.WorkdirError, match=re.escape(f"{tmp_path / 'checkpoints' / 'best'} holds no checkpoint")):
        inference.load_model(tmp_path, "best")


# ----------------------------------------------------------------------------- evaluate

def read_per_case(directory: Path) -> list[dict]:
    with (directory / "per_case.csv").open() as f:
        return list(csv.DictReader(f))


def assert_summary_is_the_mean_of_the_rows(summary: dict, rows: list[dict], metrics) -> None:
    for metric in metrics:
        class_means = []
        for cls in CLASS_NAMES:
            values = [float(r[metric]) for r in rows if r["class"] == cls]
            assert summary["per_class"][cls][metric] == pytest.approx(np.nanmean(values), rel=1e-12)
            class_means.append(np.nanmean(values))
        assert summary["mean"][metric] == pytest.approx(np.mean(class_means), rel=1e-12)


def test_evaluate_writes_consistent_files_for_the_best_checkpoint(run):
    report = evaluate.evaluate_workdir(run.workdir, split="test", checkpoint="best")
    directory = run.workdir / "eval" / "test-best"
    assert report.directory == directory
    rows = read_per_case(directory)
    summary = json.loads((directory / "summary.json").read_text())
    assert summary == report.summary
    assert (directory / "table.md").read_text() == report.table

    best_step = run.results["best_val"]["step"]
    assert summary["checkpoint_step"] == best_step and summary["checkpoint_directory"] == "best"
    assert summary["split"] == "test" and summary["empty_policy"] == "ssl4mis"
    assert summary["empty_policy_description"] == evaluation.EMPTY_POLICIES["ssl4mis"]
    assert summary["units"] == {"dice": "fraction", "jaccard": "fraction", "hd95": "voxels", "asd": "voxels"}
    assert list(rows[0]) == ["case", "class", "dice", "jaccard", "hd95", "asd"]
    assert len(rows) == 2 * len(CLASS_NAMES) and summary["num_cases"] == 2
    assert_summary_is_the_mean_of_the_rows(summary, rows, evaluation.METRIC_NAMES)
    # Same protocol, same state: the numbers of training's own test report.
    trained = run.results["test"]["best"]["per_case"]
    for row in rows:
        expected = trained[row["case"]][CLASS_NAMES.index(row["class"])]
        assert [float(row[m]) for m in evaluation.METRIC_NAMES] == pytest.approx(expected, abs=1e-9)
    assert f"| Mean | {100 * summary['mean']['dice']:.2f} |" in report.table
    assert f"step {best_step}" in report.table and "HD95 (voxels)" in report.table


def test_evaluate_command_line_uses_the_requested_checkpoint_split_and_policy(run):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    completed = subprocess.run(
        [sys.executable, "-m", "arco_jax.evaluate", f"--workdir={run.workdir}", "--split=val",
         "--checkpoint=1", "--empty_policy=worst"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stderr
    directory = run.workdir / "eval" / "val-1"
    summary = json.loads((directory / "summary.json").read_text())
    assert (summary["checkpoint"], summary["checkpoint_step"], summary["split"]) == ("1", 1, "val")
    assert summary["empty_policy"] == "worst"
    rows = read_per_case(directory)
    assert {r["case"] for r in rows} == set(ssl4mis.list_cases(run.root, "val"))
    assert_summary_is_the_mean_of_the_rows(summary, rows, evaluation.METRIC_NAMES)
    assert (directory / "table.md").read_text().strip() in completed.stdout


def test_evaluate_command_line_names_a_missing_checkpoint(run):
    completed = subprocess.run(
        [sys.executable, "-m", "arco_jax.evaluate", f"--workdir={run.workdir}", "--checkpoint=9"],
        cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=120)
    assert completed.returncode != 0
    assert "no checkpoint at step 9" in completed.stderr and "last: [1, 2]" in completed.stderr


def copy_with_spacing(run, tmp_path: Path, spacings: dict) -> Path:
    """The phantom root copied, with a spacing on the named test volumes ('attr' or 'dataset')."""
    root = tmp_path / "data_root"
    shutil.copytree(run.root, root)
    for case, (how, spacing) in spacings.items():
        with h5py.File(root / "data" / f"{case}.h5", "a") as f:
            if how == "attr":
                f.attrs["spacing"] = spacing
            else:
                f.create_dataset("spacing", data=np.asarray(spacing))
    return root


def test_evaluate_reports_millimetres_when_every_volume_has_a_spacing(run, model, tmp_path):
    cases = ssl4mis.list_cases(run.root, "test")
    spacings = {cases[0]: ("attr", (10.0, 1.5, 1.5)), cases[1]: ("dataset", (8.0, 1.25, 1.4))}
    root = copy_with_spacing(run, tmp_path, spacings)
    report = evaluate.evaluate_workdir(run.workdir, checkpoint="last", empty_policy="worst", data_dir=root)
    summary, rows = report.summary, read_per_case(report.directory)
    assert summary["data_dir"] == str(root) and summary["cases_with_spacing"] == 2
    assert summary["units"]["hd95_mm"] == "mm" and summary["units"]["hd95"] == "voxels"
    assert list(rows[0])[-2:] == ["hd95_mm", "asd_mm"]
    assert_summary_is_the_mean_of_the_rows(summary, rows, ("dice", "hd95", "asd", "hd95_mm", "asd_mm"))
    for case, image, label in ssl4mis.iterate_volumes(root, "test", NUM_CLASSES):
        pred = model.predict_volume(image)
        spacing = spacings[case][1]
        voxels = evaluation.evaluate_volume(pred, label, NUM_CLASSES, empty_policy="worst")
        mm = evaluation.evaluate_volume(pred, label, NUM_CLASSES, spacing, empty_policy="worst")
        for k, cls in enumerate(CLASS_NAMES):
            row = next(r for r in rows if r["case"] == case and r["class"] == cls)
            got = [float(row[m]) for m in ("dice", "jaccard", "hd95", "asd", "hd95_mm", "asd_mm")]
            assert got == pytest.approx([*voxels[k], *mm[k, 2:]], rel=1e-12)
    assert any(float(r["hd95_mm"]) != float(r["hd95"]) for r in rows)
    assert "## Distances in mm" in report.table and "HD95 (mm)" in report.table


def test_evaluate_leaves_millimetres_out_when_some_volumes_lack_a_spacing(run, tmp_path, caplog):
    case = ssl4mis.list_cases(run.root, "test")[0]
    root = copy_with_spacing(run, tmp_path, {case: ("attr", (10.0, 1.5, 1.5))})
    report = evaluate.evaluate_workdir(run.workdir, checkpoint="last", data_dir=root)
    assert report.summary["cases_with_spacing"] == 1 and "hd95_mm" not in report.summary["mean"]
    assert "hd95_mm" not in read_per_case(report.directory)[0]
    assert any("1 of 2 test volumes have a spacing" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)


def test_bad_spacing_and_bad_arguments_are_named(run, tmp_path):
    path = tmp_path / "case.h5"
    with h5py.File(path, "w") as f:
        f.attrs["spacing"] = (1.5, 1.5)
    with pytest.raises(ssl4mis.DataError, match=re.escape(f"{path}: 'spacing' [1.5, 1.5] must be 3 finite positive")):
        evaluate.read_spacing(path)
    with pytest.raises(ValueError, match="split='train'"):
        evaluate.evaluate_workdir(run.workdir, split="train")
    with pytest.raises(ValueError, match="empty_policy='zero'"):
        evaluate.evaluate_workdir(run.workdir, empty_policy="zero")
    with pytest.raises(ssl4mis.DataError, match=re.escape(str(tmp_path / "nowhere"))):
        evaluate.evaluate_workdir(run.workdir, data_dir=tmp_path / "nowhere")


# ----------------------------------------------------------------------------- predict

def write_nifti(path: Path, image_zyx: np.ndarray, affine=NIFTI_AFFINE) -> Path:
    """A scan in NIfTI voxel order (x, y, z) from an SSL4MIS (z, y, x) volume."""
    nib.save(nib.Nifti1Image(np.transpose(image_zyx, (2, 1, 0)).astype(np.float32), affine), path)
    return path


def write_h5_scan(path: Path, image_zyx: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image_zyx)
    return path


def test_predict_nifti_keeps_the_grid_and_matches_the_h5_route(run, model, tmp_path):
    case, image, _ = phantom_volume(run)
    scans = tmp_path / "scans"
    scans.mkdir()
    # Scanner-like range (a power of two, so min-max normalisation restores the h5's exactly).
    write_nifti(scans / "heart.nii.gz", 1024.0 * image)
    write_h5_scan(scans / "heart_copy.h5", image)
    written = predict.predict(run.workdir, scans, tmp_path / "out", checkpoint="last")
    assert written == [tmp_path / "out" / "heart_pred.nii.gz", tmp_path / "out" / "heart_copy_pred.h5"]

    source, result = nib.load(scans / "heart.nii.gz"), nib.load(tmp_path / "out" / "heart_pred.nii.gz")
    np.testing.assert_array_equal(result.affine, NIFTI_AFFINE)
    assert result.header.get_zooms() == source.header.get_zooms() == (1.5, 1.5, 10.0)
    assert result.header.get_sform(coded=True)[1] == source.header.get_sform(coded=True)[1]
    assert result.header.get_qform(coded=True)[1] == source.header.get_qform(coded=True)[1]
    assert result.shape == source.shape and result.get_data_dtype() == np.uint8
    labels = np.asarray(result.dataobj)
    assert labels.dtype == np.uint8 and labels.max() < NUM_CLASSES
    with h5py.File(tmp_path / "out" / "heart_copy_pred.h5") as f:
        h5_labels = f["label"][()]
    assert h5_labels.dtype == np.uint8 and h5_labels.shape == image.shape
    np.testing.assert_array_equal(h5_labels, model.predict_volume(image))
    np.testing.assert_array_equal(np.transpose(labels, (2, 1, 0)), h5_labels)


def test_predict_feeds_slices_in_the_ssl4mis_orientation(run, model, tmp_path):
    """A stand-in network that labels the top half of each slice it sees 1 and the rest 0:
    the top rows must be low y, whatever the x, in every z slice of the NIfTI result."""
    def top_half(images):
        n, h, w, _ = images.shape
        top = (np.arange(h) < h // 2)[None, :, None]
        labels = np.broadcast_to(top, (n, h, w)).astype(np.int64)
        return np.eye(NUM_CLASSES, dtype=np.float32)[labels]

    stand_in = dataclasses.replace(model, predict_logits=top_half)
    _, image, _ = phantom_volume(run)
    image = image[:, :, :24]  # x shorter than y: a transposed slice would not even fit back
    scan = write_nifti(tmp_path / "oblong.nii", image)
    predict.predict_scan(stand_in, scan, tmp_path)
    labels = np.asarray(nib.load(tmp_path / "oblong_pred.nii.gz").dataobj)  # (x, y, z)
    assert labels.shape == (24, 32, image.shape[0])
    np.testing.assert_array_equal(labels[:, :16, :], 1)
    np.testing.assert_array_equal(labels[:, 16:, :], 0)


def test_predict_command_line_writes_png_overlays(run, tmp_path):
    _, image, _ = phantom_volume(run, 1)
    scan = write_nifti(tmp_path / "scan.nii.gz", image)
    completed = subprocess.run(
        [sys.executable, "-m", "arco_jax.predict", f"--workdir={run.workdir}", f"--input={scan}",
         f"--output={tmp_path / 'out'}", "--png"],
        cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "out" / "scan_pred.nii.gz").is_file()
    pngs = sorted((tmp_path / "out" / "scan_png").iterdir())
    assert [p.name for p in pngs] == [f"slice_{k:03d}.png" for k in range(image.shape[0])]
    from PIL import Image

    with Image.open(pngs[0]) as picture:
        assert picture.mode == "RGB" and picture.size == (256, 256)  # 32 px enlarged 8x


def test_predict_writes_one_input_into_the_file_that_output_names(run, tmp_path):
    """--output pred.nii.gz for one scan is that file (not a folder of that name); .nii and
    .h5 likewise; PNGs go to <stem>_png/ beside it; nothing temporary is left."""
    _, image, _ = phantom_volume(run)
    scan = write_nifti(tmp_path / "scan.nii.gz", 1024.0 * image)
    h5_scan = write_h5_scan(tmp_path / "scan.h5", image)
    out = tmp_path / "out"
    written = predict.predict(run.workdir, scan, out / "pred.nii.gz", checkpoint="last", png=True)
    assert written[0] == out / "pred.nii.gz" and (out / "pred.nii.gz").is_file()
    assert [p.parent for p in written[1:]] == [out / "pred_png"] * image.shape[0]
    assert predict.predict(run.workdir, scan, out / "plain.nii", checkpoint="last") == [out / "plain.nii"]
    assert predict.predict(run.workdir, h5_scan, out / "labels.h5", checkpoint="last") == [out / "labels.h5"]
    labels = np.asarray(nib.load(out / "pred.nii.gz").dataobj)
    np.testing.assert_array_equal(np.asarray(nib.load(out / "plain.nii").dataobj), labels)
    with h5py.File(out / "labels.h5", "r") as f:
        np.testing.assert_array_equal(f["label"][()], np.transpose(labels, (2, 1, 0)))
    assert sorted(p.name for p in out.iterdir()) == ["labels.h5", "plain.nii", "pred.nii.gz", "pred_png"]


@pytest.mark.parametrize("problem, message", [
    ("folder_into_file", r"--output .*pred\.nii\.gz names a file, but --input .* is a folder of 2 scan\(s\)"),
    ("nifti_into_h5", r"the prediction of scan\.nii\.gz is written as \.nii\.gz or \.nii, not as pred\.h5"),
    ("h5_into_nifti", r"the prediction of other\.h5 is written as \.h5, not as pred\.nii\.gz"),
    ("file_is_a_folder", r"pred\.nii\.gz is an existing folder"),
    ("folder_is_a_file", r"--output .*taken is an existing file, not a folder"),
])
def test_predict_rejects_an_output_it_cannot_write_before_restoring_the_model(tmp_path, problem, message):
    scans = tmp_path / "scans"
    scans.mkdir()
    nifti = write_nifti(scans / "scan.nii.gz", np.random.default_rng(0).random((3, 8, 8)).astype(np.float32))
    h5_scan = write_h5_scan(scans / "other.h5", np.ones((3, 8, 8), np.float32))
    source, output = {"folder_into_file": (scans, tmp_path / "pred.nii.gz"),
                      "nifti_into_h5": (nifti, tmp_path / "pred.h5"),
                      "h5_into_nifti": (h5_scan, tmp_path / "pred.nii.gz"),
                      "file_is_a_folder": (nifti, tmp_path / "pred.nii.gz"),
                      "folder_is_a_file": (nifti, tmp_path / "taken")}[problem]
    if problem == "file_is_a_folder":
        output.mkdir()
    if problem == "folder_is_a_file":
        output.write_text("not a folder")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(predict.InputError, match=message):  # no workdir: the checks come first
        predict.predict(tmp_path / "no_workdir", source, output)
    assert sorted(tmp_path.rglob("*")) == before


def test_an_interrupted_write_leaves_no_prediction(model, tmp_path, monkeypatch):
    scan = write_nifti(tmp_path / "scan.nii.gz", np.random.default_rng(1).random((3, 16, 16)).astype(np.float32))

    def fails_halfway(scan, labels, path, num_classes):
        path.write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(predict, "write_nifti", fails_halfway)
    with pytest.raises(OSError, match="disk full"):
        predict.predict_scan(model, scan, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_overlay_colours_fills_and_contours():
    image = np.full((4, 4), 0.5, np.float32)
    labels = np.zeros((4, 4), np.int32)
    labels[1:3, 1:3] = 1
    picture = predict.overlay(image, labels)
    factor = predict.MIN_PNG_SIZE // 4
    assert picture.shape == (256, 256, 3)
    np.testing.assert_array_equal(picture[0, 0], [128, 128, 128])  # background: plain gray
    np.testing.assert_array_equal(picture[factor, factor], predict.PALETTE[0])  # contour: opaque
    inside = picture[2 * factor - 1, 2 * factor - 1].astype(float)
    expected = (1 - predict.FILL_OPACITY) * 127.5 + predict.FILL_OPACITY * predict.PALETTE[0]
    np.testing.assert_allclose(inside, expected, atol=1)


@pytest.mark.parametrize("problem, message", [
    ("2d", r"a 3-D volume is needed, the NIfTI has shape \(8, 8\)"),
    ("4d", r"the NIfTI has shape \(8, 8, 3, 2\) \(a 4-D cine: pass one frame\)"),
    ("garbage", "cannot be read as NIfTI"),
    ("h5_slice", r"'image' must be a 3-D volume \(D, H, W\), has shape \(8, 8\)"),
    ("h5_without_image", r"dataset 'image' is missing \(found \['label'\]\)"),
    ("not_a_scan", r"is not a scan: expected a \.nii\.gz, \.nii, \.h5 file"),
])
def test_predict_rejects_bad_files_before_restoring_the_model(tmp_path, problem, message):
    path = {"2d": tmp_path / "x.nii", "4d": tmp_path / "x.nii.gz", "garbage": tmp_path / "x.nii.gz",
            "h5_slice": tmp_path / "x.h5", "h5_without_image": tmp_path / "x.h5",
            "not_a_scan": tmp_path / "x.png"}[problem]
    if problem in ("2d", "4d"):
        shape = (8, 8) if problem == "2d" else (8, 8, 3, 2)
        nib.save(nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4)), path)
    elif problem in ("garbage", "not_a_scan"):
        path.write_bytes(b"not an image at all")
    else:
        with h5py.File(path, "w") as f:
            f.create_dataset("image" if problem == "h5_slice" else "label", data=np.ones((8, 8)))
    # The workdir does not exist: the input checks must come first.
    with pytest.raises(predict.InputError, match=re.escape(str(path)) + ".*" + message):
        predict.predict(tmp_path / "no_workdir", path, tmp_path / "out")
    if problem != "not_a_scan":  # the same file found in a folder
        with pytest.raises(predict.InputError, match=re.escape(str(path))):
            predict.predict(tmp_path / "no_workdir", tmp_path, tmp_path / "out")


def test_predict_rejects_unusable_intensities_and_empty_inputs(model, tmp_path):
    volume = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    volume[1, 2, 3] = np.nan
    nan_scan = write_nifti(tmp_path / "nan.nii.gz", volume)
    with pytest.raises(predict.InputError, match=re.escape(f"{nan_scan}: 1 voxels have non-finite intensities")):
        predict.predict_scan(model, nan_scan, tmp_path)
    flat = write_h5_scan(tmp_path / "flat.h5", np.full((3, 16, 16), 7.0, np.float32))
    with pytest.raises(predict.InputError, match=re.escape(f"{flat}: every voxel has intensity 7.0")):
        predict.predict_scan(model, flat, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no scans here")
    with pytest.raises(predict.InputError, match=re.escape(f"{empty} holds no .nii.gz, .nii, .h5 files")):
        predict.list_scans(empty)
    with pytest.raises(predict.InputError, match=re.escape(f"{tmp_path / 'absent'} does not exist")):
        predict.list_scans(tmp_path / "absent")
    twins = tmp_path / "twins"
    twins.mkdir()
    for name in ("a.nii", "a.h5"):
        (twins / name).write_bytes(b"")
    with pytest.raises(predict.InputError, match="would both be written as a_pred"):
        predict.list_scans(twins)


def test_evaluate_reports_ed_es_and_ejection_fractions_for_cardiac_cases(run, tmp_path):
    cases = ssl4mis.list_cases(run.root, "test")
    assert cardiac.applies(CLASS_NAMES, cases)  # the phantom's patientNNN_frame01 / frame02
    spacing = (10.0, 1.5, 1.5)
    root = copy_with_spacing(run, tmp_path, {case: ("attr", spacing) for case in cases})
    report = evaluate.evaluate_workdir(run.workdir, checkpoint="last", data_dir=root)
    heart = report.summary["cardiac"]
    assert heart["volume_unit"] == "mL" and set(heart["phases"]) == {"ED", "ES"}
    model = inference.load_model(run.workdir, "last")
    volumes = {}
    for case, image, label in ssl4mis.iterate_volumes(root, "test", NUM_CLASSES):
        pred = model.predict_volume(image)
        volumes[case] = {"pred": [float(np.sum(pred == c)) * np.prod(spacing) / 1000 for c in range(NUM_CLASSES)],
                         "true": [float(np.sum(label == c)) * np.prod(spacing) / 1000 for c in range(NUM_CLASSES)]}
    (patient, entry), = heart["patients"].items()
    ed, es = entry["ED"], entry["ES"]
    assert ed.endswith("frame01") and es.endswith("frame02")
    lv = CLASS_NAMES.index("LV") + 1
    for source in ("pred", "true"):
        edv, esv = volumes[ed][source][lv], volumes[es][source][lv]
        assert entry[f"LV_EDV_{source}"] == pytest.approx(edv) and entry[f"LV_ESV_{source}"] == pytest.approx(esv)
        assert entry[f"LV_EF_{source}"] == (pytest.approx(100 * (edv - esv) / edv) if edv > 0 else None)
    assert entry["LV_EF_true"] > 0  # the phantom's ES is the smaller heart
    # Each phase's means are those of its own case.
    per_case = run.results["test"]["last"]["per_case"]
    assert heart["phases"]["ED"]["per_class"]["LV"]["dice"] == pytest.approx(per_case[ed][lv - 1][0])
    assert "## End diastole and end systole" in report.table and "| LV_EDV |" in report.table


def test_cardiac_report_pairs_frames_and_falls_back_to_voxels():
    per_case = {f"p{n}_frame{f:02d}": [[0.9, 0.8, 1.0, 0.5]] * 3 for n in (1, 2) for f in (1, 12)}
    voxels = {"p1_frame01": {"pred": [0, 50, 10, 100], "true": [0, 60, 10, 110], "voxel_mm3": None},
              "p1_frame12": {"pred": [0, 20, 10, 40], "true": [0, 30, 10, 44], "voxel_mm3": None},
              "p2_frame01": {"pred": [0, 40, 10, 80], "true": [0, 40, 10, 80], "voxel_mm3": None},
              "p2_frame12": {"pred": [0, 30, 10, 40], "true": [0, 20, 10, 20], "voxel_mm3": None}}
    heart = cardiac.report(per_case, voxels, CLASS_NAMES, ("dice", "jaccard", "hd95", "asd"))
    assert heart["volume_unit"] == "voxels" and heart["phases"]["ES"]["cases"] == 2
    assert heart["patients"]["p1"]["LV_EF_pred"] == pytest.approx(60.0)
    assert heart["patients"]["p1"]["RV_EF_true"] == pytest.approx(50.0)
    lv_ef = heart["clinical"]["LV_EF"]
    assert lv_ef["mean_true"] == pytest.approx((60.0 + 75.0) / 2) and lv_ef["mean_pred"] == pytest.approx(55.0)
    assert lv_ef["mean_abs_error"] == pytest.approx((0.0 + 25.0) / 2) and lv_ef["patients"] == 2
    assert not cardiac.applies(CLASS_NAMES, ["case01"]) and not cardiac.applies(("liver",), list(per_case))


def test_predict_options_flips_components_and_probability_maps(run, model, tmp_path):
    case, image, _ = phantom_volume(run)
    scans = tmp_path / "scans"
    scans.mkdir()
    write_nifti(scans / "heart.nii.gz", 1024.0 * image)
    write_h5_scan(scans / "heart_copy.h5", image)
    options = predict.VolumeOptions(tta=True, largest_component=True, probabilities=True)
    written = predict.predict(run.workdir, scans, tmp_path / "out", checkpoint="last", options=options)
    out = tmp_path / "out"
    assert written == [out / "heart_pred.nii.gz", out / "heart_prob.nii.gz", out / "heart_copy_pred.h5"]
    # What the options mean: flip-averaged probabilities, their argmax, each class's largest component.
    expected_p = model.predict_probabilities(image, flips=True)
    expected = sliding_window.largest_component(np.argmax(expected_p, -1))
    labels = np.transpose(np.asarray(nib.load(out / "heart_pred.nii.gz").dataobj), (2, 1, 0))
    np.testing.assert_array_equal(labels, expected)
    probability_map = nib.load(out / "heart_prob.nii.gz")
    assert probability_map.shape == (*nib.load(scans / "heart.nii.gz").shape, NUM_CLASSES)
    np.testing.assert_array_equal(probability_map.affine, NIFTI_AFFINE)
    np.testing.assert_allclose(np.transpose(np.asarray(probability_map.dataobj), (2, 1, 0, 3)), expected_p, atol=1e-6)
    with h5py.File(out / "heart_copy_pred.h5") as f:
        np.testing.assert_array_equal(f["label"][()], expected)
        np.testing.assert_allclose(f["probabilities"][()], expected_p, atol=1e-6)
    # The flips are averaged: the probabilities are not the plain ones.
    assert not np.allclose(expected_p, model.predict_probabilities(image), atol=1e-4)
    for labels_of_class in (expected == c for c in range(1, NUM_CLASSES)):
        assert ndimage.label(labels_of_class, structure=np.ones((3, 3, 3)))[1] <= 1
