"""Segment NIfTI or h5 volumes with a trained run, 2-D (ACDC) or 3-D (the Left Atrium), or RGB
images with a natural-image run (Pascal VOC, Cityscapes, SUN RGB-D: arco_jax/predict_images.py).

  python -m arco_jax.predict --workdir=runs/acdc_sg_7 --input=scan.nii.gz --output=preds
      [--checkpoint=best] [--png]

--input is one file or a folder of them (not recursive; other files are ignored). --output is a
folder (created), or, for a single input file, the prediction's own file name when it ends
with the input's kind of suffix (scan.nii.gz -> pred.nii.gz or pred.nii, scan.h5 -> pred.h5;
its PNGs, with --png, go to <stem>_png/ beside it). Each file is written under a temporary name
and renamed when complete, so an interrupted run leaves no half-written prediction:
* NIfTI (.nii, .nii.gz), 3-D: the array is (x, y, z) in NIfTI voxel order. It is turned into
  the SSL4MIS h5 layout, (z, y, x), which is what SimpleITK's GetArrayFromImage gives for the
  same file and what the SSL4MIS ACDC conversion stored, so slices reach the network in the
  orientation it was trained on (ACDC short-axis slices run along z). Written back as
  <name>_pred.nii.gz: a uint8 label map with the input's affine and header (data type uint8,
  no intensity scaling, intent 'label'), so any viewer overlays it on the scan.
* h5 with an `image` dataset, 3-D, in the axis order of the run's dataset's own h5 files
  (DatasetInfo.h5_axes): (D, H, W) for SSL4MIS (ACDC, the phantom), (H, W, D) for UA-MT's LA
  mri_norm2.h5 (la, la_phantom), read depth first as that dataset reads it. Written as
  <name>_pred.h5, dataset `label` (uint8), in the input's own axis order, so it overlays
  `image` voxel for voxel.
Preprocessing is the dataset's (DatasetInfo.intensity), per volume: min-max to [0, 1] for the
SSL4MIS data (a no-op on SSL4MIS h5, which are stored normalised), z-score (x - mean) / std for
the LA (as mri_norm2.h5 is stored). The volume is then predicted as the run's evaluator predicts
a test case: 2-D runs slice by slice (each slice resized to the patch size, nearest, predicted,
argmaxed and resized back, nearest), 3-D runs by sliding windows with the run's eval.window,
eval.stride, eval.window_batch_size and eval.largest_component. --png adds an overlay of every
(H, W) slice (the scan min-max scaled for display) in <output>/<name>_png/.

Every check that needs no voxel data (readable file, 3-D) runs on all inputs before the model
is restored, so a bad file in a folder fails in a second, naming the file.

A run whose dataset is of RGB images (DatasetInfo.intensity 'imagenet') takes .png / .jpg / .jpeg
files instead and writes a label PNG and a colour overlay per image (predict_images.py; --png is
not needed there, --label_ids writes Cityscapes' labelIds).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
from PIL import Image

from arco_jax import files, inference
from arco_jax.data import registry
from arco_jax.data.ssl4mis import DataError
from arco_jax.errors import ConfigError
from arco_jax.evaluators import sliding_window

NIFTI_SUFFIXES = (".nii.gz", ".nii")
H5_SUFFIX = ".h5"
SUFFIXES = (*NIFTI_SUFFIXES, H5_SUFFIX)
PRED_SUFFIX = "_pred"
# Overlay colours of classes 1, 2, 3, ... (ACDC: RV red, myocardium green, LV blue), cycled.
PALETTE = np.array([(230, 60, 60), (60, 200, 80), (70, 130, 240), (240, 200, 40), (200, 80, 220),
                    (60, 210, 210)], dtype=np.float32)
FILL_OPACITY = 0.4
MIN_PNG_SIZE = 256  # Small slices are enlarged (nearest) by an integer factor to at least this.


class InputError(ValueError):
    """A scan that cannot be segmented: unreadable, not 3-D, or with unusable intensities."""


def to_depth_first(array: np.ndarray, axes: str) -> np.ndarray:
    """A 3-D array whose axes are `axes` (a word of the letters d, h, w) as (D, H, W)."""
    return np.transpose(array, [axes.index(a) for a in registry.DEPTH_FIRST])


def from_depth_first(array: np.ndarray, axes: str) -> np.ndarray:
    """A (D, H, W) array in the axis order `axes` (the inverse of to_depth_first)."""
    return np.transpose(array, [registry.DEPTH_FIRST.index(a) for a in axes])


@dataclasses.dataclass(frozen=True)
class Scan:
    """One input volume. volume: float32 (z, y, x) = (D, H, W) raw intensities; nifti: the loaded
    image whose affine and header the prediction keeps (None for h5); h5_axes: the axis order of
    an h5 input's `image` (the prediction is written back in it)."""

    path: Path
    name: str
    volume: np.ndarray
    nifti: nib.Nifti1Image | nib.Nifti2Image | None = None
    h5_axes: str = registry.DEPTH_FIRST


def scan_name(path: Path) -> str | None:
    """File name without its scan suffix ('case.nii.gz' -> 'case'); None if not a scan."""
    for suffix in SUFFIXES:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def list_scans(input_path: str | Path) -> list[Path]:
    """The scan files of a file or folder argument, sorted; errors name the path."""
    input_path = Path(input_path)
    wanted = ", ".join(SUFFIXES)
    if input_path.is_dir():
        paths = sorted(p for p in input_path.iterdir() if p.is_file() and scan_name(p))
        if not paths:
            raise InputError(f"{input_path} holds no {wanted} files")
    elif input_path.is_file():
        if scan_name(input_path) is None:
            raise InputError(f"{input_path} is not a scan: expected a {wanted} file")
        paths = [input_path]
    else:
        raise InputError(f"{input_path} does not exist")
    names: dict[str, Path] = {}
    for path in paths:
        other = names.setdefault(scan_name(path), path)
        if other != path:
            raise InputError(f"{other} and {path} would both be written as {scan_name(path)}{PRED_SUFFIX}")
    return paths


def _load_nifti(path: Path):
    try:
        image = nib.load(path)
    except Exception as err:  # nibabel raises many types (ImageFileError, EOFError, gzip errors).
        raise InputError(f"{path}: cannot be read as NIfTI ({type(err).__name__}: {err})") from err
    if len(image.shape) != 3:
        hint = " (a 4-D cine: pass one frame)" if len(image.shape) == 4 else ""
        raise InputError(f"{path}: a 3-D volume is needed, the NIfTI has shape {image.shape}{hint}")
    return image


def _h5_image_shape(path: Path) -> tuple[int, ...]:
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f:
                raise InputError(f"{path}: dataset 'image' is missing (found {sorted(f.keys())})")
            shape = f["image"].shape
    except OSError as err:
        raise InputError(f"{path}: cannot be read as HDF5 ({err})") from err
    if len(shape) != 3:
        raise InputError(f"{path}: 'image' must be a 3-D volume (D, H, W), has shape {shape}")
    return shape


def check_scan(path: Path) -> None:
    """Header-only checks: the file opens and holds a 3-D volume."""
    if path.name.endswith(H5_SUFFIX):
        _h5_image_shape(path)
    else:
        _load_nifti(path)


def read_scan(path: Path, h5_axes: str = registry.DEPTH_FIRST) -> Scan:
    """The volume in (z, y, x) = (D, H, W) order, float32, finite; an h5 `image` is read as
    stored in the axis order `h5_axes`. Errors name the file."""
    if path.name.endswith(H5_SUFFIX):
        _h5_image_shape(path)
        try:
            with h5py.File(path, "r") as f:
                raw = f["image"][()]
        except OSError as err:
            raise InputError(f"{path}: cannot be read as HDF5 ({err})") from err
        if not np.issubdtype(raw.dtype, np.number):
            raise InputError(f"{path}: 'image' has non-numeric dtype {raw.dtype}")
        volume, nifti = to_depth_first(raw.astype(np.float32), h5_axes), None
    else:
        nifti = _load_nifti(path)
        try:
            volume = np.transpose(nifti.get_fdata(dtype=np.float32), (2, 1, 0))
        except Exception as err:  # A truncated or corrupt data block only shows here.
            raise InputError(f"{path}: the voxel data cannot be read ({type(err).__name__}: {err})") from err
    volume = np.ascontiguousarray(volume)  # one memory order for every input: the same normalisation
    if not np.isfinite(volume).all():
        count = int(np.count_nonzero(~np.isfinite(volume)))
        raise InputError(f"{path}: {count} voxels have non-finite intensities (NaN or Inf)")
    if min(volume.shape) < 1:
        raise InputError(f"{path}: the volume is empty, shape {volume.shape}")
    return Scan(path=path, name=scan_name(path), volume=volume, nifti=nifti,
                h5_axes=registry.DEPTH_FIRST if nifti is not None else h5_axes)


def normalize(volume: np.ndarray, path: Path, intensity: str = "minmax") -> np.ndarray:
    """The per-volume normalisation a dataset's volumes were stored with (DatasetInfo.intensity):
    'minmax' to [0, 1], as the SSL4MIS conversions did, or 'zscore', (x - mean) / std with the
    mean and std of the whole volume, as UA-MT's LA preprocessing did."""
    if intensity not in registry.INTENSITIES:
        raise ValueError(f"intensity must be one of {registry.INTENSITIES}, got {intensity!r}")
    if intensity in ("imagenet", "dataset"):
        raise ValueError(f"intensity {intensity!r} is not a per-volume normalisation (RGB runs: predict_images.py; "
                         "'dataset': DatasetSpec.prepare_scan)")
    low, high = float(volume.min()), float(volume.max())
    if high <= low:
        raise InputError(f"{path}: every voxel has intensity {low}; nothing to segment")
    if intensity == "zscore":
        mean, std = volume.mean(dtype=np.float64), volume.std(dtype=np.float64)
        return ((volume - mean) / std).astype(np.float32)
    return ((volume - low) / (high - low)).astype(np.float32)


def write_nifti(scan: Scan, labels: np.ndarray, path: Path, num_classes: int) -> None:
    """Labels (z, y, x) as a NIfTI on the scan's grid: same affine, qform and sform."""
    write_label_image(scan.nifti, np.transpose(labels, (2, 1, 0)), path, num_classes)


def write_label_image(reference, labels: np.ndarray, path: Path, num_classes: int) -> None:
    """Labels in the reference image's own array order as a NIfTI with its affine and header
    (data type uint8, no intensity scaling, intent 'label')."""
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    image = type(reference)(labels.astype(np.uint8), reference.affine, header)
    image.header.set_slope_inter(1.0, 0.0)
    image.header["cal_min"], image.header["cal_max"] = 0, num_classes - 1  # display window = labels
    image.header.set_intent("label")
    nib.save(image, path)


def write_h5(scan: Scan, labels: np.ndarray, path: Path, step: int, probabilities: np.ndarray | None = None) -> None:
    """Labels (D, H, W) as dataset `label` in the axis order of the scan's `image` (and the class
    probabilities (D, H, W, K) as `probabilities`, the same axis order, classes last)."""
    with h5py.File(path, "w") as f:
        f.create_dataset("label", data=from_depth_first(labels, scan.h5_axes).astype(np.uint8),
                         compression="gzip", compression_opts=1)
        if probabilities is not None:
            order = [registry.DEPTH_FIRST.index(a) for a in scan.h5_axes] + [3]
            f.create_dataset("probabilities", data=np.transpose(probabilities, order).astype(np.float32),
                             compression="gzip", compression_opts=1)
        f.attrs["source"] = scan.path.name
        f.attrs["checkpoint_step"] = step


def _boundary(labels: np.ndarray) -> np.ndarray:
    """Foreground pixels with a face neighbour of another label (the inner contour)."""
    horizontal = labels[:, :-1] != labels[:, 1:]
    vertical = labels[:-1, :] != labels[1:, :]
    edge = np.zeros(labels.shape, bool)
    edge[:, :-1] |= horizontal
    edge[:, 1:] |= horizontal
    edge[:-1, :] |= vertical
    edge[1:, :] |= vertical
    return edge & (labels > 0)


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """RGB uint8 picture of one slice: grayscale image in [0, 1], translucent class fills,
    opaque class contours; enlarged so small slices stay readable."""
    factor = max(1, -(-MIN_PNG_SIZE // max(image.shape)))
    image = np.kron(image, np.ones((factor, factor), np.float32))
    labels = np.kron(labels, np.ones((factor, factor), labels.dtype))
    rgb = np.repeat(np.clip(image, 0.0, 1.0)[..., None] * 255.0, 3, axis=-1)
    colors = PALETTE[(np.maximum(labels, 1) - 1) % len(PALETTE)]
    fill = (labels > 0)[..., None]
    rgb = np.where(fill, (1 - FILL_OPACITY) * rgb + FILL_OPACITY * colors, rgb)
    rgb = np.where(_boundary(labels)[..., None], colors, rgb)
    return np.round(rgb).astype(np.uint8)


def write_overlays(image: np.ndarray, labels: np.ndarray, directory: Path) -> list[Path]:
    """One PNG per (y, x) slice of the (z, y, x) volume: slice_000.png, ...; image in [0, 1]."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (image_slice, label_slice) in enumerate(zip(image, labels)):
        path = directory / f"slice_{index:03d}.png"
        Image.fromarray(overlay(image_slice, label_slice)).save(path)
        paths.append(path)
    return paths


def default_destination(path: Path, output_dir: Path) -> Path:
    """Where a scan's prediction goes in an output folder: <name>_pred.nii.gz or <name>_pred.h5."""
    suffix = H5_SUFFIX if path.name.endswith(H5_SUFFIX) else ".nii.gz"
    return output_dir / f"{scan_name(path)}{PRED_SUFFIX}{suffix}"


def destinations(paths: list[Path], input_path: str | Path, output: str | Path) -> dict[Path, Path]:
    """{scan: prediction file} for the --output argument: a folder, or a file name (a scan
    suffix) for a single input file of the same kind. Checked before anything is computed."""
    output = Path(output)
    if scan_name(output) is None:
        if output.is_file():
            raise InputError(f"--output {output} is an existing file, not a folder; name a folder, or a "
                             f"{', '.join(SUFFIXES)} file for a single input")
        return {path: default_destination(path, output) for path in paths}
    if Path(input_path).is_dir():
        raise InputError(f"--output {output} names a file, but --input {input_path} is a folder of "
                         f"{len(paths)} scan(s): give a folder for --output")
    (path,) = paths
    wanted = (H5_SUFFIX,) if path.name.endswith(H5_SUFFIX) else NIFTI_SUFFIXES
    if not output.name.endswith(wanted):
        raise InputError(f"--output {output}: the prediction of {path.name} is written as "
                         f"{' or '.join(wanted)}, not as {output.name}")
    if output.is_dir():
        raise InputError(f"--output {output} is an existing folder; a file of that name cannot be written")
    return {path: output}


def _write_atomically(destination: Path, write) -> None:
    """write(temporary path) then rename to `destination`: no half-written prediction is left.
    The temporary name keeps the suffix (nibabel picks gzip from it)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f".partial-{destination.name}")
    try:
        write(partial)
        partial.replace(destination)
    finally:
        partial.unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class VolumeOptions:
    """How a volume is segmented beyond the run's own evaluator settings.

    tta: average the class probabilities over every flip of the network's input (4 views of a
      slice, 8 of a 3-D window), each flipped back; largest_component: keep each foreground
      class's largest connected component (26-connected in 3-D; a 3-D run whose
      eval.largest_component is on does so anyway); probabilities: also write the per-class
      probability maps (<stem>_prob.nii.gz, a 4-D float32 NIfTI on the scan's grid, or an h5
      dataset `probabilities` beside `label`)."""

    tta: bool = False
    largest_component: bool = False
    probabilities: bool = False


def segment(model: inference.TrainedModel, volume: np.ndarray, options: VolumeOptions
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """(labels (D, H, W), probabilities (D, H, W, K) or None) of a preprocessed volume."""
    if not (options.tta or options.probabilities):
        labels = model.predict_volume(volume)
        return (sliding_window.largest_component(labels) if options.largest_component else labels), None
    probabilities = model.predict_probabilities(volume, flips=options.tta)
    labels = np.argmax(probabilities, axis=-1).astype(np.int32)
    if options.largest_component or getattr(model.evaluator, "keep_largest_component", False):
        labels = sliding_window.largest_component(labels)
    return labels, (probabilities if options.probabilities else None)


def probability_destination(destination: Path) -> Path:
    """<stem>_prob.nii.gz beside a NIfTI prediction (case_pred.nii.gz -> case_prob.nii.gz)."""
    stem = scan_name(destination)
    stem = stem[: -len(PRED_SUFFIX)] if stem.endswith(PRED_SUFFIX) and len(stem) > len(PRED_SUFFIX) else stem
    return destination.with_name(f"{stem}_prob.nii.gz")


def write_probability_image(reference, probabilities: np.ndarray, path: Path) -> None:
    """Probabilities in the reference image's array order, classes last (x, y, z, K), float32,
    with its affine: one 4-D NIfTI a viewer shows class by class."""
    header = reference.header.copy()
    header.set_data_dtype(np.float32)
    image = type(reference)(probabilities.astype(np.float32), reference.affine, header)
    image.header.set_slope_inter(1.0, 0.0)
    image.header["cal_min"], image.header["cal_max"] = 0.0, 1.0
    nib.save(image, path)


def predict_scan(model: inference.TrainedModel, path: Path, output_dir: Path, png: bool = False,
                 destination: Path | None = None, options: VolumeOptions = VolumeOptions()) -> list[Path]:
    """Segment one scan with the run's preprocessing and prediction, into `destination`
    (default_destination in output_dir when None); returns the files written (prediction
    first, then a probability map, then any PNGs: <name>_png/ in output_dir, or <destination's
    stem>_png/ beside it)."""
    dataset = model.dataset
    scan = read_scan(path, dataset.h5_axes)
    image = normalize(scan.volume, path, dataset.intensity)
    labels, probabilities = segment(model, image, options)
    written = destination if destination is not None else default_destination(path, Path(output_dir))
    extra = []
    if scan.nifti is not None:
        _write_atomically(written, lambda target: write_nifti(scan, labels, target, model.num_classes))
        if probabilities is not None:
            extra.append(probability_destination(written))
            xyz = np.transpose(probabilities, (2, 1, 0, 3))
            _write_atomically(extra[-1], lambda target: write_probability_image(scan.nifti, xyz, target))
    else:
        _write_atomically(written, lambda target: write_h5(scan, labels, target, model.step, probabilities))
    if png:
        display = image if dataset.intensity == "minmax" else normalize(scan.volume, path, "minmax")
        stem = scan.name if destination is None else scan_name(destination)
        extra += write_overlays(display, labels, written.parent / f"{stem}_png")
    return [written, *extra]


CHANNEL_DIGITS = 4  # nnU-Net's channel suffix: <case>_0000.nii.gz, <case>_0001.nii.gz, ...


def group_channels(paths: list[Path], channels: int) -> dict[Path, list[Path]]:
    """{first channel file: the scan's channel files in order} for a run whose dataset keeps one
    file per channel (nnU-Net's <case>_0000.nii.gz, ...); a one-channel run also takes files
    without the suffix. Errors name the file."""
    groups: dict[str, dict[int, Path]] = {}
    for path in paths:
        if path.name.endswith(H5_SUFFIX):
            raise InputError(f"{path}: this run was trained on NIfTI files; give .nii.gz or .nii scans")
        name = scan_name(path)
        case, _, number = name.rpartition("_")
        if not (case and len(number) == CHANNEL_DIGITS and number.isdigit()):
            if channels != 1:
                raise InputError(f"{path}: the run takes {channels} channels, one file each, named "
                                 f"<case>_0000.nii.gz ... <case>_{channels - 1:04d}.nii.gz")
            case, number = name, "0000"
        if int(number) >= channels:
            raise InputError(f"{path}: channel {int(number)}, but the run takes {channels} channel(s)")
        if int(number) in groups.setdefault(case, {}):
            raise InputError(f"{groups[case][int(number)]} and {path} are both channel {int(number)} of {case!r}")
        groups[case][int(number)] = path
    out = {}
    for case, found in sorted(groups.items()):
        missing = [c for c in range(channels) if c not in found]
        if missing:
            raise InputError(f"{next(iter(found.values())).parent / f'{case}_{missing[0]:04d}.nii.gz'} is missing "
                             f"(channel {missing[0]} of scan {case!r})")
        out[found[0]] = [found[c] for c in range(channels)]
    return out


def read_plan(workdir) -> dict:
    """The dataset's preprocessing plan the run recorded (<workdir>/data.json)."""
    path = files.workdir_path(workdir) / registry.DATA_RECORD
    try:
        return json.loads(path.read_text())["preprocessing"]
    except (OSError, KeyError, json.JSONDecodeError) as err:
        raise inference.WorkdirError(f"{path}: the run's preprocessing plan cannot be read ({type(err).__name__}: "
                                     f"{err}); it is written when training starts") from err


def predict_prepared(model: inference.TrainedModel, plan: dict, channel_files: list[Path], destination: Path,
                     png: bool = False, options: VolumeOptions = VolumeOptions()) -> list[Path]:
    """Segment one scan (its channel files) with a run whose dataset prepares scans by a plan
    (DatasetSpec.prepare_scan): the labels go back to the first file's grid and orientation."""
    try:
        prepared = registry.get(model.config.data.dataset).prepare_scan(plan, channel_files)
    except DataError as err:
        raise InputError(str(err)) from err
    labels, probabilities = segment(model, prepared.volume, options)
    on_input = prepared.to_input_grid(labels)
    _write_atomically(destination, lambda target: write_label_image(prepared.reference, on_input, target,
                                                                    model.num_classes))
    written = [destination]
    if probabilities is not None:
        written.append(probability_destination(destination))
        on_grid = prepared.to_input_grid(probabilities)
        _write_atomically(written[-1], lambda target: write_probability_image(prepared.reference, on_grid, target))
    if png:
        written += write_overlays(prepared.display, labels, destination.parent / f"{scan_name(destination)}_png")
    return written


def predict(workdir: str | Path, input_path: str | Path, output: str | Path,
            checkpoint: str | int = "best", png: bool = False, label_ids: bool = False,
            options: VolumeOptions = VolumeOptions()) -> list[Path]:
    """Segment a scan or a folder of scans with a trained run into an output folder, or one
    scan into an output file; returns the files written. A natural-image run goes to
    predict_images, which checks its inputs first as well."""
    from arco_jax import predict_images  # pylint: disable=import-outside-toplevel  (it imports this module)

    try:
        config, unreadable = inference.read_config(workdir), None
    except inference.WorkdirError as err:
        config, unreadable = None, err  # raised after the input checks, which come first
    if config is not None and predict_images.is_image_run(config):
        if options != VolumeOptions():
            raise InputError("--tta, --largest_component and --probabilities are for volumes; this run segments "
                             "RGB images")
        return predict_images.predict(workdir, input_path, output, checkpoint, label_ids, config=config)
    if label_ids:
        raise InputError("--label_ids: Cityscapes' labelIds are for Cityscapes runs; this run segments volumes")
    try:
        paths = list_scans(input_path)
        for path in paths:
            check_scan(path)
    except InputError as err:
        if unreadable is not None and predict_images.holds_images(input_path):
            raise InputError(f"{err}; whether the run takes RGB images is unknown: {unreadable}") from err
        raise
    if unreadable is not None:
        destinations(paths, input_path, output)  # the output's checks, too, come before the workdir's
        raise unreadable
    if registry.get(config.data.dataset).prepare_scan is not None:
        return _predict_by_plan(workdir, config, paths, input_path, output, checkpoint, png, options)
    targets = destinations(paths, input_path, output)
    model = inference.load_model(workdir, checkpoint)
    if model.num_classes > 256:
        raise inference.WorkdirError(f"{model.num_classes} classes do not fit the uint8 label maps")
    named_file = scan_name(Path(output)) is not None
    written = []
    for path, destination in targets.items():
        written += predict_scan(model, path, destination.parent, png, destination if named_file else None, options)
    return written


def _predict_by_plan(workdir, config, paths, input_path, output, checkpoint, png, options) -> list[Path]:
    """predict() for a run whose dataset prepares scans by its plan (one file per channel)."""
    groups = group_channels(paths, config.data.in_channels)
    plan = read_plan(workdir)
    output = Path(output)
    if scan_name(output) is not None:
        if len(groups) != 1:
            raise InputError(f"--output {output} names a file, but --input {input_path} holds {len(groups)} scans: "
                             "give a folder for --output")
        if not output.name.endswith(NIFTI_SUFFIXES) or output.is_dir():
            raise InputError(f"--output {output}: the prediction is written as a .nii.gz or .nii file")
        targets = {first: output for first in groups}
    else:
        if output.is_file():
            raise InputError(f"--output {output} is an existing file, not a folder")
        targets = {}
        for first in groups:
            name = scan_name(first)
            case = name[: -CHANNEL_DIGITS - 1] if name.endswith("_0000") else name
            targets[first] = output / f"{case}{PRED_SUFFIX}.nii.gz"
    model = inference.load_model(workdir, checkpoint)
    written = []
    for first, channel_files in groups.items():
        written += predict_prepared(model, plan, channel_files, targets[first], png, options)
    return written


def _define_flags() -> None:
    """Defined only when run as a program (evaluate has flags of the same names)."""
    from absl import flags

    flags.DEFINE_string("workdir", None, "Workdir of a trained run (config.json, checkpoints/).")
    flags.DEFINE_string("input", None, "A .nii/.nii.gz/.h5 volume or a folder of them; for a natural-image run a "
                        ".png/.jpg/.jpeg image or a folder of them.")
    flags.DEFINE_string("output", None, "Folder for <name>_pred.nii.gz / <name>_pred.h5 (created), or, for one "
                        "input file, the prediction's file name (.nii.gz/.nii for NIfTI, .h5 for h5); for images "
                        "a folder for <stem>_label.png and <stem>_overlay.png, or one image's label .png name.")
    flags.DEFINE_string("checkpoint", "best", "'best', 'last' or a saved step number.")
    flags.DEFINE_bool("png", False, "Also write per-slice overlays of volumes into <output>/<name>_png/ (images "
                      "always get their overlay).")
    flags.DEFINE_bool("label_ids", False, "Cityscapes runs: write the official labelIds (7 road ... 33 bicycle) "
                      "in place of the 19 train ids.")
    flags.DEFINE_bool("tta", False, "Volumes: average the class probabilities over every flip of the network's input "
                      "(4 views per slice, 8 per 3-D window).")
    flags.DEFINE_bool("largest_component", False, "Volumes: keep each foreground class's largest connected component.")
    flags.DEFINE_bool("probabilities", False, "Volumes: also write per-class probability maps (<stem>_prob.nii.gz, "
                      "4-D float32 on the scan's grid; h5: dataset 'probabilities').")
    flags.mark_flags_as_required(["workdir", "input", "output"])


def main(argv) -> None:
    from absl import app, flags, logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    try:
        options = VolumeOptions(tta=f.tta, largest_component=f.largest_component, probabilities=f.probabilities)
        written = predict(f.workdir, f.input, f.output, f.checkpoint, f.png, f.label_ids, options)
    except (InputError, inference.WorkdirError, ConfigError) as err:  # ConfigError: e.g. Drive not mounted
        sys.exit(f"error: {err}")
    # Volumes' slice overlays (<name>_png/slice_000.png ...) are counted, everything else named.
    predictions = [p for p in written if not (p.parent.name.endswith("_png") and p.name.startswith("slice_"))]
    for path in predictions:
        print(f"wrote {path}")
    if len(written) > len(predictions):
        print(f"wrote {len(written) - len(predictions)} PNG overlays")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
