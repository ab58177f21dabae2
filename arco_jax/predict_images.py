"""Segment RGB photographs with a trained natural-image run (a dataset whose DatasetInfo.intensity
is 'imagenet': Pascal VOC, Cityscapes, SUN RGB-D, or a plug-in of that kind).

  python -m arco_jax.predict --workdir=runs/pascal_sg_60 --input=photos --output=preds
      [--checkpoint=best] [--label_ids]

(`python -m arco_jax.predict` sends such runs here.) --input is a .png, .jpg or .jpeg file, or a
folder of them (not recursive; other files are ignored). --output is a folder (created) that
receives <stem>_label.png and <stem>_overlay.png per image, or, for one input file, the label
map's own .png name (its overlay goes beside it as <name>_overlay.png).

Each image is prepared as the run's dataset prepares a validation image (data/natural.py): its
EXIF orientation applied (what a viewer shows is what is segmented), converted to RGB (grayscale,
palette and RGBA images too), resized to the dataset's data.resize when it has one (bilinear, e.g.
Cityscapes 1024 x 512, SUN 512 x 384), normalised with ImageNet's mean and std; then predicted as
the run's evaluator predicts a val image (evaluators/miou.py: whole, padded to eval.pad_multiple,
or by the run's sliding windows). The labels come back to the input's size (nearest).

Written, each under a temporary name and renamed when complete:
* <stem>_label.png: a palette PNG of the class indices 0 .. num_classes-1 (the ignore label is
  never predicted), coloured with the dataset's palette (VOC's for Pascal, Cityscapes' for
  Cityscapes, VOC's colour map for any other), so viewers show colours and readers (PIL's
  np.asarray) get the indices. With --label_ids a Cityscapes run writes the official labelIds
  (road 7 ... bicycle 33) as a grayscale PNG instead, what cityscapesScripts' evaluation reads.
* <stem>_overlay.png: the image with each class's colour blended in at half opacity (a class
  coloured black, VOC's background, is left untinted).

Every input is decoded and checked (a readable image of 8-bit channels) before the model is
restored, so a bad file in a folder fails in a second, naming the file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from arco_jax import evaluators, inference
from arco_jax.data import natural, registry
from arco_jax.errors import ConfigError
from arco_jax.predict import InputError, scan_name

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # compared in lower case: .JPG is taken too
LABEL_SUFFIX, OVERLAY_SUFFIX = "_label.png", "_overlay.png"
OPACITY = 0.5
# Modes of more than 8 bits a channel: PIL's conversion to RGB would clip them, not rescale them.
DEEP_MODES = ("I", "I;16", "I;16B", "I;16L", "F")
def palette_for(info: registry.DatasetInfo) -> np.ndarray:
    """(256, 3) uint8 class colours: the dataset's own (DatasetInfo.colours: Cityscapes' for its
    19 train ids), VOC's colour map for the classes past them (Pascal and most datasets: all)."""
    palette = natural.voc_palette()
    if info.colours:
        palette[:len(info.colours)] = info.colours
    return palette


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and len(path.name) > len(path.suffix)


def is_image_run(config) -> bool:
    """Whether a run's dataset is of RGB images (DatasetInfo.intensity 'imagenet'); False for a
    dataset not registered here (restoring it names that)."""
    try:
        return registry.info(config).intensity == "imagenet"
    except (ConfigError, ValueError):
        return False


def holds_images(input_path: str | Path) -> bool:
    """Whether an input argument is an image file, or a folder of images and no volumes (how a
    run's kind is told when its workdir cannot be read, so the right input checks run first)."""
    input_path = Path(input_path)
    if input_path.is_dir():
        entries = [p for p in input_path.iterdir() if p.is_file()]
        return any(is_image(p) for p in entries) and not any(scan_name(p) for p in entries)
    return is_image(input_path)


def list_images(input_path: str | Path) -> list[Path]:
    """The image files of a file or folder argument, sorted; errors name the path."""
    input_path = Path(input_path)
    wanted = ", ".join(IMAGE_SUFFIXES)
    if input_path.is_dir():
        paths = sorted(p for p in input_path.iterdir() if p.is_file() and is_image(p))
        if not paths:
            raise InputError(f"{input_path} holds no {wanted} images")
    elif input_path.is_file():
        if not is_image(input_path):
            raise InputError(f"{input_path} is not an image for this natural-image run: expected a {wanted} file")
        paths = [input_path]
    else:
        raise InputError(f"{input_path} does not exist")
    stems: dict[str, Path] = {}
    for path in paths:
        other = stems.setdefault(path.stem, path)
        if other != path:
            raise InputError(f"{other} and {path} would both be written as {path.stem}{LABEL_SUFFIX}")
    return paths


def read_image(path: Path) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3), upright by its EXIF orientation; errors name the file."""
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise InputError(f"{path}: cannot be read as an image ({type(err).__name__}: {err})") from err
    if image.mode in DEEP_MODES:
        raise InputError(f"{path}: a {image.mode} image (more than 8 bits a channel); the run was trained on 8-bit "
                         "RGB: save it as 8-bit RGB or grayscale")
    rgb = np.asarray(image if image.mode == "RGB" else image.convert("RGB"), np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 1:
        raise InputError(f"{path}: expected an (H, W) picture, decoded to shape {rgb.shape}")
    return rgb


def dataset_size(config) -> tuple[int, int] | None:
    """(H, W) the run's dataset resizes its images to (config.data.resize), None if it keeps them."""
    size = tuple(config.data.get("resize", ()) or ())
    return (int(size[0]), int(size[1])) if size else None


def prepare(rgb: np.ndarray, config) -> np.ndarray:
    """What the network sees of an RGB uint8 image: the dataset's resize (bilinear, as
    natural.resize_pair), then ImageNet normalisation (natural.normalize_rgb): float32 (h, w, 3)."""
    size = dataset_size(config)
    if size is not None and rgb.shape[:2] != size:
        rgb = np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.BILINEAR))
    return natural.normalize_rgb(rgb)


def _evaluator(config, workdir):
    try:
        evaluator = evaluators.build(config)
    except ConfigError as err:
        raise inference.WorkdirError(f"{Path(workdir) / inference.CONFIG_FILE}: the run's evaluator: {err}") from err
    if not hasattr(evaluator, "predict_image"):
        raise inference.WorkdirError(f"{workdir}: the run's evaluator {evaluator.name!r} has no predict_image: it "
                                     "predicts no images, and RGB images are predicted as the evaluator predicts one")
    return evaluator


def predict_labels(model: inference.TrainedModel, rgb: np.ndarray) -> np.ndarray:
    """Class indices (H, W) uint8 of an RGB uint8 image (H, W, 3), at the image's own size."""
    image = prepare(rgb, model.config)
    labels = model.evaluator.predict_image(lambda x: np.asarray(model.predict_logits(x)), image)
    labels = np.asarray(labels).astype(np.uint8)
    if labels.shape != rgb.shape[:2]:
        labels = np.asarray(Image.fromarray(labels).resize((rgb.shape[1], rgb.shape[0]), Image.NEAREST))
    return labels


def overlay(rgb: np.ndarray, labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """RGB uint8: each pixel blended with its class colour at OPACITY; black classes untinted."""
    colours = palette[labels].astype(np.float32)
    tinted = (1.0 - OPACITY) * rgb.astype(np.float32) + OPACITY * colours
    keep = (palette[labels] == 0).all(axis=-1, keepdims=True)
    return np.round(np.where(keep, rgb, tinted)).astype(np.uint8)


def label_image(labels: np.ndarray, info: registry.DatasetInfo, label_ids: bool = False) -> Image.Image:
    """The label map as written: a palette PNG of class indices, or Cityscapes' labelIds ('L')."""
    if label_ids:
        from arco_jax.data import cityscapes  # pylint: disable=import-outside-toplevel

        table = np.array([label_id for label_id, _ in cityscapes.TRAIN_CLASSES], np.uint8)
        return Image.fromarray(table[labels], mode="L")
    image = Image.fromarray(labels, mode="P")
    image.putpalette(palette_for(info).ravel().tolist())
    return image


def _save_atomically(image: Image.Image, destination: Path) -> None:
    """Save under a temporary name beside `destination`, then rename: nothing half-written."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f".partial-{destination.name}")
    try:
        image.save(partial, format="PNG")
        partial.replace(destination)
    finally:
        partial.unlink(missing_ok=True)


def overlay_path(label_path: Path) -> Path:
    """Where a label map's overlay goes: <stem>_overlay.png for <stem>_label.png, else <name>_overlay.png."""
    name = label_path.name
    stem = name[:-len(LABEL_SUFFIX)] if name.endswith(LABEL_SUFFIX) else label_path.stem
    return label_path.with_name(f"{stem}{OVERLAY_SUFFIX}")


def destinations(paths: list[Path], input_path: str | Path, output: str | Path) -> dict[Path, tuple[Path, Path]]:
    """{image: (label map, overlay)} for the --output argument, checked before anything is computed:
    a folder, or a .png name for a single input file; no output may overwrite an input."""
    output = Path(output)
    if output.suffix.lower() == ".png":
        if Path(input_path).is_dir():
            raise InputError(f"--output {output} names a file, but --input {input_path} is a folder of {len(paths)} "
                             "image(s): give a folder for --output")
        if output.is_dir():
            raise InputError(f"--output {output} is an existing folder; a file of that name cannot be written")
        targets = {paths[0]: (output, overlay_path(output))}
    else:
        if output.is_file():
            raise InputError(f"--output {output} is an existing file, not a folder; name a folder, or a .png file "
                             "for a single input")
        targets = {p: (output / f"{p.stem}{LABEL_SUFFIX}", output / f"{p.stem}{OVERLAY_SUFFIX}") for p in paths}
    inputs = {p.resolve() for p in paths}
    for path, written in targets.items():
        for target in written:
            if target.resolve() in inputs:
                raise InputError(f"{target}: the prediction of {path.name} would overwrite this input; choose "
                                 "another --output")
    return targets


def predict_image_file(model: inference.TrainedModel, path: Path, label_path: Path, label_ids: bool = False
                       ) -> list[Path]:
    """Segment one image file into its label map and overlay; returns both paths."""
    rgb = read_image(path)
    labels = predict_labels(model, rgb)
    info = registry.info(model.config)
    _save_atomically(label_image(labels, info, label_ids), label_path)
    overlay_file = overlay_path(label_path)
    _save_atomically(Image.fromarray(overlay(rgb, labels, palette_for(info))), overlay_file)
    return [label_path, overlay_file]


def predict(workdir: str | Path, input_path: str | Path, output: str | Path, checkpoint: str | int = "best",
            label_ids: bool = False, config=None) -> list[Path]:
    """Segment an image or a folder of images with a trained natural-image run; returns the files
    written (per image its label map, then its overlay). `config`: the run's, if already read."""
    paths = list_images(input_path)
    for path in paths:
        read_image(path)
    config = inference.read_config(workdir) if config is None else config
    try:
        info = registry.info(config)
    except ConfigError as err:
        raise inference.WorkdirError(f"{Path(workdir) / inference.CONFIG_FILE}: the run's dataset: {err}") from err
    if info.intensity != "imagenet":
        raise inference.WorkdirError(f"{workdir}: the run's dataset {config.data.dataset!r} is not of RGB images "
                                     f"(intensity {info.intensity!r}); give it volumes")
    if label_ids and config.data.dataset != "cityscapes":
        raise InputError(f"--label_ids: Cityscapes' labelIds are for Cityscapes runs; this run's dataset is "
                         f"{config.data.dataset!r}")
    if config.data.num_classes > 256:
        raise inference.WorkdirError(f"{config.data.num_classes} classes do not fit the 8-bit label PNGs")
    targets = destinations(paths, input_path, output)
    _evaluator(config, workdir)
    model = inference.load_model(workdir, checkpoint)
    written = []
    for path, (label_path, _) in targets.items():
        written += predict_image_file(model, path, label_path, label_ids)
    return written
