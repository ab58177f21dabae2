"""The predict command on a natural-image run: RGB images (PNG / JPEG, a file or a folder) become
palette label PNGs of the input's size and colour overlays, labelled as the run's evaluator labels
the same image; Cityscapes' resize and palette (and labelIds), sliding windows, and every bad input
named before the model is restored.

The run is a narrow UNet trained 2 steps (supervised term only) on a tiny Pascal VOC folder (the
40 x 48 images of tests/test_natural_datasets.py), once for the module (about 40 s on 2 cores).
Where the predicted classes must vary for a check to mean anything, a pointwise stand-in network
replaces the trained one (nothing compiled).
"""
import dataclasses
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image

from arco_jax import evaluators, inference, methods, predict, predict_images, train
from arco_jax.config import base_config
from arco_jax.data import cityscapes, natural, registry
from tests import tiny
from arco_jax.evaluators.sliding_window import sliding_window_probabilities
from tests.test_natural_datasets import CITY_VAL, VOC_VAL, dataset_config, write_cityscapes, write_voc

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    root = tmp_path_factory.mktemp("pascal")
    write_voc(root)
    c = base_config()
    registry.select(c, "pascal")
    d = c.data
    d.data_dir, d.labeled_images, d.patch_size, d.num_workers = str(root), 10, (32, 32), 0
    d.batch_labeled = d.batch_unlabeled = 2
    tiny.narrow_model(c)
    c.pretrain.steps = 0
    methods.apply_method(c, "supervised")
    c.train.steps = c.train.eval_every = c.train.checkpoint_every = c.train.log_every = 2
    c.eval.pad_multiple = 16
    workdir = tmp_path_factory.mktemp("run")
    train.train_and_evaluate(c, workdir)
    return types.SimpleNamespace(config=c, root=root, workdir=workdir)


@pytest.fixture(scope="module")
def model(run):
    return inference.load_model(run.workdir, "last")


MIX = np.random.default_rng(3).normal(size=(3, 21)).astype(np.float32)


def pointwise(images):
    """Logits of each pixel from its own colour: several classes over a photograph."""
    return np.asarray(images) @ MIX


def stand_in(model, config=None, logits=pointwise):
    return dataclasses.replace(model, config=config or model.config, predict_logits=logits)


def photo(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((shape[1], shape[0]), Image.BILINEAR))


def read_png(path):
    with Image.open(path) as image:
        return image.mode, np.asarray(image), image.getpalette()


def test_a_folder_of_jpeg_and_png_gives_label_maps_and_overlays(run, model, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    shapes = {"street.png": (37, 53), "beach.JPG": (40, 48)}
    Image.fromarray(photo(shapes["street.png"])).save(photos / "street.png")
    Image.fromarray(photo(shapes["beach.JPG"], 1)).save(photos / "beach.JPG", format="JPEG", quality=95)
    (photos / "notes.txt").write_text("not an image: ignored")
    out = tmp_path / "out"
    written = predict.predict(run.workdir, photos, out, checkpoint="last")
    assert written == [out / "beach_label.png", out / "beach_overlay.png", out / "street_label.png",
                       out / "street_overlay.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)  # nothing temporary left
    for name, shape in shapes.items():
        stem = Path(name).stem
        mode, labels, palette = read_png(out / f"{stem}_label.png")
        assert mode == "P" and labels.shape == shape and labels.dtype == np.uint8
        assert labels.max() < 21  # classes 0..20; the ignore label 255 never written
        assert palette[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]  # VOC's colour map
        overlay_mode, picture, _ = read_png(out / f"{stem}_overlay.png")
        assert overlay_mode == "RGB" and picture.shape == (*shape, 3)


def test_labels_are_the_evaluators_labels_of_the_val_image(run, model, tmp_path):
    """A val image of the run's own dataset, given as a file, is labelled as the run's evaluator
    labels it when it reads it from the dataset (the trained network, then a stand-in whose
    classes vary)."""
    image_file = run.root / "JPEGImages" / f"{VOC_VAL[1]}.jpg"
    data = registry.open_dataset(run.config)
    case = data.case("val", 1)
    evaluator = evaluators.build(run.config)
    expected = evaluator.predict_image(lambda x: np.asarray(model.predict_logits(x)), case.image)
    written = predict.predict(run.workdir, image_file, tmp_path / "pred.png", checkpoint="last")
    assert written == [tmp_path / "pred.png", tmp_path / "pred_overlay.png"]
    np.testing.assert_array_equal(read_png(tmp_path / "pred.png")[1], expected)

    fake = stand_in(model)
    expected = evaluator.predict_image(pointwise, case.image)
    assert len(np.unique(expected)) >= 3  # a wrong preprocessing would show
    (label_file, _) = predict_images.predict_image_file(fake, image_file, tmp_path / "fake.png")
    np.testing.assert_array_equal(read_png(label_file)[1], expected)


def test_sliding_windows_of_the_run_are_used(model, tmp_path):
    calls = []

    def recording(images):
        calls.append(images.shape)
        return pointwise(images)

    config = ml_collections.ConfigDict(model.config.to_dict())
    config.eval.window, config.eval.stride, config.eval.window_batch_size = (16, 16), (8, 8), 2
    path = tmp_path / "wide.png"
    Image.fromarray(photo((24, 40), 4)).save(path)
    predict_images.predict_image_file(stand_in(model, config, recording), path, tmp_path / "wide_label.png")
    assert set(calls) == {(2, 16, 16, 3)} and len(calls) == 4  # 2 x 4 windows, 2 at a time
    image = natural.normalize_rgb(photo((24, 40), 4))
    expected = np.argmax(sliding_window_probabilities(pointwise, image, (16, 16), (8, 8), 2), -1)
    np.testing.assert_array_equal(read_png(tmp_path / "wide_label.png")[1], expected)


def test_cityscapes_runs_resize_as_the_dataset_and_use_its_palette_and_label_ids(model, tmp_path):
    """The image resized as the Cityscapes reader resizes it (here to 20 x 24), predicted, and the
    labels brought back to the input's 40 x 48; Cityscapes' colours; --label_ids gives labelIds."""
    root = tmp_path / "cityscapes"
    write_cityscapes(root)
    city = dataset_config("cityscapes", root, resize=(20, 24))
    config = ml_collections.ConfigDict(model.config.to_dict())
    config.data = city.data
    fake = stand_in(model, config, lambda x: np.asarray(x) @ MIX[:, :19])
    city_dir, stem = CITY_VAL[0].split("/")
    image_file = root / cityscapes.IMAGE_DIR / "val" / city_dir / f"{stem}{cityscapes.IMAGE_SUFFIX}"
    case = registry.open_dataset(city).case("val", 0)
    assert case.image.shape == (20, 24, 3)
    small = evaluators.build(config).predict_image(lambda x: np.asarray(x) @ MIX[:, :19], case.image)
    assert len(np.unique(small)) >= 3
    expected = np.asarray(Image.fromarray(small.astype(np.uint8)).resize((48, 40), Image.NEAREST))
    label_file, overlay_file = predict_images.predict_image_file(fake, image_file, tmp_path / "city_label.png")
    mode, labels, palette = read_png(label_file)
    assert mode == "P" and labels.shape == (40, 48)
    np.testing.assert_array_equal(labels, expected)
    assert palette[:6] == [128, 64, 128, 244, 35, 232]  # road, sidewalk
    ids_file, _ = predict_images.predict_image_file(fake, image_file, tmp_path / "ids.png", label_ids=True)
    mode, ids, _ = read_png(ids_file)
    table = np.array([label_id for label_id, _ in cityscapes.TRAIN_CLASSES])
    assert mode == "L"
    np.testing.assert_array_equal(ids, table[expected])
    # The overlay blends every class (none of Cityscapes' colours is black) at half opacity.
    rgb = np.asarray(Image.open(image_file).convert("RGB"), np.float32)
    colours = np.array(cityscapes.COLOURS, np.float32)[expected]  # the dataset's own colours
    np.testing.assert_allclose(read_png(overlay_file)[1], np.round(0.5 * rgb + 0.5 * colours), atol=1)


def test_overlay_leaves_black_classes_untinted():
    rgb = np.full((2, 3, 3), 100, np.uint8)
    labels = np.array([[0, 1, 1], [0, 2, 15]], np.uint8)
    palette = natural.voc_palette()
    picture = predict_images.overlay(rgb, labels, palette)
    np.testing.assert_array_equal(picture[:, 0], 100)  # background: black in VOC's map
    np.testing.assert_array_equal(picture[0, 1], [114, 50, 50])  # (100 + (128, 0, 0)) / 2
    np.testing.assert_array_equal(picture[1, 2], [146, 114, 114])  # person (192, 128, 128)
    assert palette[255].tolist() == [224, 224, 192] and palette[3].tolist() == [128, 128, 0]


def test_grayscale_and_rgba_images_are_converted(run, model, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(photo((30, 20))[..., 0], mode="L").save(photos / "gray.png")
    Image.fromarray(np.dstack([photo((20, 30), 2), np.full((20, 30), 255, np.uint8)]), mode="RGBA").save(
        photos / "alpha.png")
    fake = stand_in(model)
    for path, shape in ((photos / "gray.png", (30, 20)), (photos / "alpha.png", (20, 30))):
        label_file, _ = predict_images.predict_image_file(fake, path, tmp_path / f"{path.stem}_label.png")
        assert read_png(label_file)[1].shape == shape


def _no_restore(*args, **kwargs):
    raise AssertionError("the model was restored before the inputs were checked")


@pytest.mark.parametrize("problem, message", [
    ("garbage", r"bad\.jpg: cannot be read as an image"),
    ("truncated", r"cut\.png: cannot be read as an image"),
    ("deep", r"deep\.png: a I;16 image \(more than 8 bits a channel\)"),
    ("same_stem", r"a\.jpg and .*a\.png would both be written as a_label\.png"),
    ("folder_into_file", r"--output .*pred\.png names a file, but --input .* is a folder of 2 image\(s\)"),
    ("overwrites_input", r"a_label\.png: the prediction of a\.jpg would overwrite this input"),
    ("no_images", r"holds no \.png, \.jpg, \.jpeg images"),
    ("not_an_image", r"x\.nii\.gz is not an image for this natural-image run"),
    ("label_ids", r"--label_ids: Cityscapes' labelIds are for Cityscapes runs; this run's dataset is 'pascal'"),
])
def test_bad_inputs_are_named_before_the_model_is_restored(run, tmp_path, monkeypatch, problem, message):
    monkeypatch.setattr(inference, "load_model", _no_restore)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(photo((20, 20))).save(folder / "a.jpg")
    source, output, kwargs = folder, tmp_path / "out", {}
    if problem == "garbage":
        (folder / "bad.jpg").write_bytes(b"not an image at all")
    elif problem == "truncated":
        Image.fromarray(photo((64, 64))).save(folder / "cut.png")
        data = (folder / "cut.png").read_bytes()
        (folder / "cut.png").write_bytes(data[:len(data) // 2])
    elif problem == "deep":
        Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(folder / "deep.png")
    elif problem == "same_stem":
        Image.fromarray(photo((20, 20))).save(folder / "a.png")
    elif problem == "folder_into_file":
        Image.fromarray(photo((20, 20))).save(folder / "b.png")
        output = tmp_path / "pred.png"
    elif problem == "overwrites_input":
        Image.fromarray(photo((20, 20))).save(folder / "a_label.png")
        output = folder
    elif problem == "no_images":
        (folder / "a.jpg").unlink()
        (folder / "scan.txt").write_text("x")
    elif problem == "not_an_image":
        source = tmp_path / "x.nii.gz"
        source.write_bytes(b"\0")
    elif problem == "label_ids":
        kwargs = {"label_ids": True}
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(predict.InputError, match=message):
        predict.predict(run.workdir, source, output, checkpoint="last", **kwargs)
    assert sorted(tmp_path.rglob("*")) == before


def test_without_a_workdir_the_image_checks_still_come_first(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(predict.InputError, match=re.escape(str(tmp_path / "bad.png")) + ": cannot be read"):
        predict_images.predict(tmp_path / "no_workdir", tmp_path, tmp_path / "out")
    Image.fromarray(photo((8, 8))).save(tmp_path / "bad.png")
    with pytest.raises(inference.WorkdirError, match="no_workdir does not exist"):
        predict_images.predict(tmp_path / "no_workdir", tmp_path, tmp_path / "out")
    with pytest.raises(predict.InputError, match=r"holds no \.nii\.gz, \.nii, \.h5 files; whether the run takes RGB "
                                                 r"images is unknown: workdir .*no_workdir does not exist"):
        predict.predict(tmp_path / "no_workdir", tmp_path, tmp_path / "out")


def test_an_interrupted_write_leaves_no_file(model, tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    Image.fromarray(photo((16, 16))).save(path)

    def fails_halfway(self, target, *args, **kwargs):
        Path(target).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", fails_halfway)
    with pytest.raises(OSError, match="disk full"):
        predict_images.predict_image_file(stand_in(model), path, tmp_path / "out" / "a_label.png")
    assert list((tmp_path / "out").iterdir()) == []


def test_volume_normalisation_refuses_rgb_runs(tmp_path):
    with pytest.raises(ValueError, match="intensity 'imagenet' is not a per-volume normalisation"):
        predict.normalize(np.arange(8, dtype=np.float32).reshape(2, 2, 2), tmp_path, "imagenet")


def test_command_line_names_what_it_wrote(run, tmp_path):
    image = tmp_path / "one.jpg"
    Image.fromarray(photo((24, 32))).save(image)
    completed = subprocess.run(
        [sys.executable, "-m", "arco_jax.predict", f"--workdir={run.workdir}", f"--input={image}",
         f"--output={tmp_path / 'out'}", "--checkpoint=last"],
        cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["wrote", str(tmp_path / "out" / "one_label.png"), "wrote",
                                        str(tmp_path / "out" / "one_overlay.png")]
    completed = subprocess.run(
        [sys.executable, "-m", "arco_jax.predict", f"--workdir={run.workdir}", f"--input={tmp_path / 'none'}",
         f"--output={tmp_path / 'out'}"], cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True, text=True, timeout=180)
    assert completed.returncode == 1 and "none does not exist" in completed.stderr
