"""Any NIfTI dataset folder in nnU-Net's layout, as a registered dataset (arco_jax.data.registry),
trained as 2-D slices or 3-D patches.

Layout under config.data.data_dir (nnU-Net v2's raw dataset folder):
  dataset.json                 channel_names {"0": "CT", ...}, labels {"background": 0, "liver": 1,
                               ...} (nnU-Net v1's {"0": "background", ...} is read too; a label
                               named "ignore" becomes the ignore label), file_ending ".nii.gz"
  imagesTr/<case>_0000.nii.gz  channel 0 of each training case (then _0001, ... per channel)
  labelsTr/<case>.nii.gz       its label map (integers 0 .. N-1, or the ignore label)
  imagesTs/                    optional, unlabeled: not read here (`predict` segments such scans)

Arrays: each file is turned to the closest canonical (RAS+) orientation, then read as
(z, y, x) = (D, H, W), the order SimpleITK's GetArrayFromImage gives and this code base's depth
first; spacings likewise. Channels go last: image (D, H, W, C).

Splits (the case ids sorted, then permuted with data.split_seed, so a run names its cases by a
rule, not by the file system's order):
  test       data.test_list (a file of case ids, one per line), or the first
             round(test_fraction * N) cases of the seeded order;
  val        data.val_list, or the next round(val_fraction * N);
  labeled    data.labeled_list, or the first data.labeled_cases of the remaining cases in the
             seeded order;
  unlabeled  every other case (its label is never used for training).
`labeled_record` (results.json) lists the case ids of every split and the preprocessing plan.

Preprocessing (planned once per run from the training cases, applied to every case):
  intensities, per channel (data.normalization: one entry for all channels or one per channel):
    'ct'      clip to data.ct_window (HU, e.g. (-200, 250)) or, when that is empty, to the 0.5 and
              99.5 percentiles of the labeled cases' foreground voxels; then scale to [0, 1]
    'zscore'  per volume (x - mean) / std (MR)
    'minmax'  per volume to [0, 1]
    'none'    as stored
    'auto'    'ct' for a channel named CT in dataset.json, 'zscore' otherwise (nnU-Net's rule)
  spacing: data.resample 'auto' resamples every case to data.target_spacing (mm, (z, y, x)) or,
    when that is empty and the cases' spacings differ, to their median (in 2-D mode only in
    plane: slices keep their own thickness); 'off' keeps each case's grid. Images are resampled
    linearly, labels by nearest neighbour. Evaluation runs on the resampled grid, with the
    resampled spacing for distances in mm.
The preprocessed cases are cached as .npy files under data.cache_dir (default $ARCO_JAX_CACHE
or ~/.cache/arco_jax) in a folder keyed by the data folder's files (names, sizes, times) and the
plan, so a second run starts at once and 2-D training reads slices by memory map. Each file is
written under a temporary name and renamed, so an interrupted build leaves nothing half-written.

Checks (one-line errors naming the field or the file; all before training starts):
  validate  data_dir a local folder with a readable dataset.json whose channel_names, labels and
            file_ending are usable; the fields' values; the split sizes against the case count.
  open      every case has each channel's file and its label; each file is a 3-D NIfTI (a
            folder mixing 2-D and 3-D files is named at its first 2-D file); label and channels
            share the first channel's shape and affine (read from the headers); list files name
            known, distinct cases. Building the cache checks the voxels: finite intensities and
            labels of the dataset's values only.

Its config.data fields: mode ('2d' or '3d'), labeled_cases, labeled_list, val_list, test_list,
val_fraction, test_fraction, split_seed, normalization, ct_window, resample, target_spacing,
cache_dir.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import ml_collections
import nibabel as nib
import numpy as np
from scipy import ndimage

from arco_jax.data import registry
from arco_jax.data.ssl4mis import DataError
from arco_jax.errors import ConfigError

NAME = "nifti_folder"
DATASET_JSON = "dataset.json"
IMAGES, LABELS = "imagesTr", "labelsTr"
FILE_ENDINGS = (".nii.gz", ".nii")
MODES = ("2d", "3d")
NORMALIZATIONS = ("auto", "ct", "zscore", "minmax", "none")
RESAMPLE = ("auto", "off")
SPLITS = ("val", "test")
IGNORE_NAME = "ignore"
CT_PERCENTILES = (0.5, 99.5)
SPACING_TOLERANCE = 1e-3  # Relative: spacings closer than this count as equal.
AFFINE_TOLERANCE = 1e-3  # mm, as nnU-Net's check of image against label geometry.
CACHE_VERSION = 1
_MAX_SHOWN = 5

log = logging.getLogger("arco_jax")


def _fail(field: str, problem: str) -> None:
    raise ConfigError(f"config.data.{field}: {problem}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# dataset.json

class FolderDescription:
    """What dataset.json says: channel names (in channel order), class names (label order),
    the ignore label (or None) and the file ending."""

    def __init__(self, root: Path):
        path = root / DATASET_JSON
        if not path.is_file():
            raise DataError(f"{path} is missing (an nnU-Net dataset folder holds dataset.json, {IMAGES}/ and "
                            f"{LABELS}/)")
        try:
            meta = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{path}: cannot be read as JSON ({err})") from err
        if not isinstance(meta, dict):
            raise DataError(f"{path}: must hold a JSON object, holds {type(meta).__name__}")
        self.path = path
        channels = meta.get("channel_names", meta.get("modality"))
        if not isinstance(channels, dict) or not channels:
            raise DataError(f"{path}: 'channel_names' is missing or empty (e.g. {{\"0\": \"CT\"}})")
        try:
            order = sorted(channels, key=int)
        except ValueError:
            raise DataError(f"{path}: 'channel_names' keys must be channel numbers \"0\", \"1\", ...; "
                            f"got {sorted(channels)}") from None
        if [int(k) for k in order] != list(range(len(order))):
            raise DataError(f"{path}: 'channel_names' must number the channels 0 .. {len(order) - 1}, got {order}")
        self.channel_names = tuple(str(channels[k]) for k in order)
        self.num_classes, self.class_names, self.ignore_label = self._labels(meta.get("labels"))
        ending = meta.get("file_ending", ".nii.gz")
        if ending not in FILE_ENDINGS:
            raise DataError(f"{path}: file_ending {ending!r} is not read here; NIfTI files only "
                            f"({', '.join(FILE_ENDINGS)})")
        self.file_ending = ending

    def _labels(self, labels) -> tuple[int, tuple[str, ...], int | None]:
        where = f"{self.path}: 'labels'"
        if not isinstance(labels, dict) or not labels:
            raise DataError(f"{where} is missing or empty (e.g. {{\"background\": 0, \"liver\": 1}})")
        values = {}
        if all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):  # v2: name -> value
            values = {int(v): str(name) for name, v in labels.items()}
            if len(values) != len(labels):
                raise DataError(f"{where}: two names share a value ({labels})")
        elif all(isinstance(v, str) for v in labels.values()):  # v1: "value" -> name
            try:
                values = {int(k): v for k, v in labels.items()}
            except ValueError:
                raise DataError(f"{where}: keys must be label values when the values are names; got "
                                f"{sorted(labels)}") from None
        else:
            raise DataError(f"{where}: must map names to integer values (region-based labels are not supported), "
                            f"got {labels}")
        ignore = [v for v, name in values.items() if name.lower() == IGNORE_NAME]
        classes = sorted(v for v in values if v not in ignore)
        if classes != list(range(len(classes))) or len(classes) < 2:
            raise DataError(f"{where}: class values must be 0 (background), 1, ..., N-1 with N >= 2; "
                            f"got {classes}")
        ignore_label = ignore[0] if ignore else None
        if ignore_label is not None and ignore_label < len(classes):
            raise DataError(f"{where}: 'ignore' must be above the classes (> {len(classes) - 1}), is {ignore_label}")
        return len(classes), tuple(values[v] for v in classes[1:]), ignore_label

    @property
    def label_values(self) -> set[int]:
        return set(range(self.num_classes)) | ({self.ignore_label} if self.ignore_label is not None else set())


@functools.lru_cache(maxsize=16)
def _description(root: str, mtime_ns: int) -> FolderDescription:
    return FolderDescription(Path(root))


def describe(root: str | os.PathLike) -> FolderDescription:
    """dataset.json of a folder (read once per version of the file)."""
    path = Path(root) / DATASET_JSON
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        mtime = -1
    return _description(str(Path(root).resolve()), mtime)


# ---------------------------------------------------------------------------------------------
# Files and headers

def channel_path(root: Path, case: str, channel: int, ending: str) -> Path:
    return root / IMAGES / f"{case}_{channel:04d}{ending}"


def label_path(root: Path, case: str, ending: str) -> Path:
    return root / LABELS / f"{case}{ending}"


def list_cases(root: Path, description: FolderDescription) -> list[str]:
    """The training cases (sorted): one per label file; each must have every channel's image,
    and every image file must belong to a labeled case and a known channel."""
    ending = description.file_ending
    for folder in (IMAGES, LABELS):
        if not (root / folder).is_dir():
            raise DataError(f"{root / folder} is missing (the nnU-Net layout keeps training images in {IMAGES}/ "
                            f"and their labels in {LABELS}/)")
    cases = sorted(p.name[: -len(ending)] for p in (root / LABELS).iterdir()
                   if p.is_file() and p.name.endswith(ending) and len(p.name) > len(ending))
    if not cases:
        raise DataError(f"{root / LABELS} holds no {ending} label files")
    known = set(cases)
    channels = len(description.channel_names)
    for path in sorted((root / IMAGES).iterdir()):
        if not (path.is_file() and path.name.endswith(ending)):
            continue
        stem = path.name[: -len(ending)]
        case, _, number = stem.rpartition("_")
        if not (len(number) == 4 and number.isdigit()):
            raise DataError(f"{path}: an image file is named <case>_<channel, 4 digits>{ending}")
        if int(number) >= channels:
            raise DataError(f"{path}: channel {int(number)}, but {description.path} names "
                            f"{channels} channel(s) (0 .. {channels - 1})")
        if case not in known:
            raise DataError(f"{path}: case {case!r} has no label file {label_path(root, case, ending)}")
    for channel, name in enumerate(description.channel_names):
        missing = [c for c in cases if not channel_path(root, c, channel, ending).is_file()]
        if len(missing) == len(cases):
            raise DataError(f"{description.path}: channel {channel} ({name!r}) has no files "
                            f"({channel_path(root, cases[0], channel, ending).name}, ... are missing)")
        if missing:
            raise DataError(f"{channel_path(root, missing[0], channel, ending)} is missing (channel {channel}, "
                            f"{name!r}, of case {missing[0]!r})")
    return cases


def _load(path: Path):
    """A NIfTI image as 3-D: a 2-D file (x, y) or a single slice (x, y, 1) is one slice of depth 1,
    an (x, y, z, 1) file is (x, y, z); anything else that is not 3-D is refused."""
    try:
        image = nib.load(path)
    except Exception as err:  # nibabel raises many types (ImageFileError, EOFError, gzip errors).
        raise DataError(f"{path}: cannot be read as NIfTI ({type(err).__name__}: {err})") from err
    shape = tuple(image.shape)
    if len(shape) == 2:  # Small by nature: read now to add the slice axis.
        image = type(image)(np.asarray(image.dataobj)[:, :, None], image.affine, image.header)
    elif len(shape) == 4 and shape[3] == 1:
        image = image.slicer[..., 0]
    elif len(shape) != 3:
        raise DataError(f"{path}: expected a 3-D volume (or a 2-D image), got shape {shape} (one file per "
                        "channel: <case>_0000, <case>_0001, ...)")
    return image


def is_single_slice(image) -> bool:
    return image.shape[2] == 1


def _geometry(image) -> tuple[tuple[int, ...], np.ndarray]:
    return tuple(int(s) for s in image.shape[:3]), np.asarray(image.affine, np.float64)


def check_same_grid(path: Path, image, reference_path: Path, reference) -> None:
    """`image` (read from `path`) has the shape and affine of `reference` (headers only): the
    one check of every pair of files that must lie on one voxel grid."""
    (shape, affine), (reference_shape, reference_affine) = _geometry(image), _geometry(reference)
    if shape != reference_shape:
        raise DataError(f"{path}: shape {shape} differs from {reference_path.name}'s {reference_shape}")
    if not np.allclose(affine, reference_affine, atol=AFFINE_TOLERANCE, rtol=0):
        worst = float(np.abs(affine - reference_affine).max())
        raise DataError(f"{path}: affine differs from {reference_path.name}'s by up to {worst:.4g} mm (the images "
                        "and label of a case must lie on one grid)")


def check_case_headers(root: Path, case: str, description: FolderDescription) -> bool:
    """Every file of a case is a NIfTI image, and label and channels share the first channel's
    shape and affine (headers only: no voxel is read). True for a 2-D case (one slice)."""
    ending = description.file_ending
    first = channel_path(root, case, 0, ending)
    image = _load(first)
    others = [channel_path(root, case, c, ending) for c in range(1, len(description.channel_names))]
    for path in [*others, label_path(root, case, ending)]:
        check_same_grid(path, _load(path), first, image)
    return is_single_slice(image)


def check_headers(root: Path, cases: list[str], description: FolderDescription, mode: str) -> None:
    """Every case's headers; the cases are all 3-D volumes or all 2-D images (then mode '2d')."""
    flat = {case: check_case_headers(root, case, description) for case in cases}
    kinds = set(flat.values())
    first = channel_path(root, cases[0], 0, description.file_ending)
    if len(kinds) == 2:
        odd = next(c for c in cases if flat[c] != flat[cases[0]])
        raise DataError(f"{channel_path(root, odd, 0, description.file_ending)}: a "
                        f"{'2-D image' if flat[odd] else '3-D volume'}, but {first.name} is "
                        f"{'2-D' if flat[cases[0]] else '3-D'}: a folder mixing 2-D and 3-D files is not read")
    if kinds == {True} and mode == "3d":
        _fail("mode", f"'3d', but the cases of {root} are 2-D images ({first.name}): use mode '2d'")


def _canonical_zyx(image) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The voxels of a NIfTI image in the closest canonical orientation as (z, y, x), and the
    spacing in that order."""
    canonical = nib.as_closest_canonical(image)
    data = np.asarray(canonical.dataobj)
    spacing = tuple(float(s) for s in canonical.header.get_zooms()[:3])
    return np.ascontiguousarray(np.transpose(data, (2, 1, 0))), spacing[::-1]


def read_raw_case(root: Path, case: str, description: FolderDescription
                  ) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """(image float32 (D, H, W, C), label int32 (D, H, W), spacing (z, y, x) mm) of one case as
    stored; the voxels are checked here (finite intensities, label values of dataset.json)."""
    ending = description.file_ending
    channels, spacing = [], None
    for c in range(len(description.channel_names)):
        path = channel_path(root, case, c, ending)
        data, spacing_c = _canonical_zyx(_load(path))
        if not np.issubdtype(data.dtype, np.number):
            raise DataError(f"{path}: voxels must be numeric, are {data.dtype}")
        data = data.astype(np.float32, copy=False)
        bad = ~np.isfinite(data)
        if bad.any():
            raise DataError(f"{path}: {int(bad.sum())} voxel(s) are not finite (NaN or infinite intensities)")
        channels.append(data)
        spacing = spacing if spacing is not None else spacing_c
    path = label_path(root, case, ending)
    label, _ = _canonical_zyx(_load(path))
    if not np.issubdtype(label.dtype, np.number) or not np.all(np.isfinite(label)):
        raise DataError(f"{path}: label voxels must be finite numbers")
    if not np.all(label == np.round(label)):
        raise DataError(f"{path}: label voxels must be integers")
    label = label.astype(np.int64)
    values = np.unique(label)
    unknown = sorted(set(values.tolist()) - description.label_values)
    if unknown:
        shown = ", ".join(map(str, unknown[:_MAX_SHOWN])) + (" ..." if len(unknown) > _MAX_SHOWN else "")
        raise DataError(f"{path}: label values {shown} are not in {description.path}'s labels "
                        f"{sorted(description.label_values)}")
    return np.stack(channels, axis=-1), label.astype(np.int32), spacing


# ---------------------------------------------------------------------------------------------
# The preprocessing plan

def channel_normalizations(config: ml_collections.ConfigDict, description: FolderDescription) -> list[str]:
    """The resolved normalisation of each channel ('auto' replaced by 'ct' or 'zscore')."""
    given = tuple(config.data.normalization)
    channels = description.channel_names
    if len(given) not in (1, len(channels)):
        _fail("normalization", f"{len(given)} entries for {len(channels)} channel(s) {list(channels)}: give one "
              "for all channels or one per channel")
    entries = given * len(channels) if len(given) == 1 else given
    return ["ct" if e == "auto" and name.strip().upper() == "CT" else "zscore" if e == "auto" else e
            for e, name in zip(entries, channels)]


def normalize(image: np.ndarray, plan: dict) -> np.ndarray:
    """Per-channel intensity normalisation of image (*spatial, C) by the plan."""
    out = np.empty(image.shape, np.float32)
    for c, rule in enumerate(plan["normalization"]):
        x = image[..., c].astype(np.float32)
        if rule == "ct":
            low, high = plan["ct_clip"][c]
            x = (np.clip(x, low, high) - low) / max(high - low, 1e-8)
        elif rule == "zscore":
            x = (x - x.mean()) / max(float(x.std()), 1e-8)
        elif rule == "minmax":
            low, high = float(x.min()), float(x.max())
            x = (x - low) / (high - low) if high > low else np.zeros_like(x)
        out[..., c] = x
    return out


def resample(image: np.ndarray, label: np.ndarray | None, spacing: tuple[float, ...],
             target: tuple[float, ...] | None) -> tuple[np.ndarray, np.ndarray | None, tuple[float, ...]]:
    """image (D, H, W, C) linearly, label (D, H, W) nearest, to the target spacing (None: as is)."""
    if target is None or np.allclose(spacing, target, rtol=SPACING_TOLERANCE, atol=0):
        return image, label, tuple(spacing)
    shape = image.shape[:3]
    new_shape = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))
    factors = tuple(n / o for n, o in zip(new_shape, shape))
    image = np.stack([ndimage.zoom(image[..., c], factors, order=1, mode="nearest", grid_mode=True)
                      for c in range(image.shape[-1])], axis=-1)
    if label is not None:
        label = ndimage.zoom(label, factors, order=0, mode="nearest", grid_mode=True)
    actual = tuple(o * s / n for o, s, n in zip(shape, spacing, new_shape))
    return image.astype(np.float32), label, actual


def target_spacing(config: ml_collections.ConfigDict, spacings: dict[str, tuple[float, ...]]) -> tuple | None:
    """The spacing every case is resampled to, or None when cases keep their own grid."""
    d = config.data
    if d.resample == "off":
        return None
    if len(d.target_spacing):
        return tuple(float(s) for s in d.target_spacing)
    values = np.asarray(list(spacings.values()), np.float64)
    if np.allclose(values, values[0], rtol=SPACING_TOLERANCE, atol=0):
        return None
    median = np.median(values, axis=0)
    if d.mode == "2d":
        # Slices are the samples: only the in-plane grid is made common; each keeps its thickness.
        if np.allclose(values[:, 1:], values[0, 1:], rtol=SPACING_TOLERANCE, atol=0):
            return None
        return (None, float(median[1]), float(median[2]))
    return tuple(float(s) for s in median)


def _case_target(target: tuple | None, spacing: tuple[float, ...]) -> tuple[float, ...] | None:
    if target is None:
        return None
    return tuple(s if t is None else t for s, t in zip(spacing, target))


# ---------------------------------------------------------------------------------------------
# Splits

def read_case_list(path: str, field: str, known: list[str], root: Path) -> list[str]:
    """Case ids of a list file (one per line), each a known case, none twice. A relative path
    is in the data folder (the converters write train.txt and test.txt there)."""
    file = Path(path) if Path(path).is_absolute() else root / path
    if not file.is_file():
        _fail(field, f"{str(file)!r} is not a file")
    try:
        lines = [(n, line.strip()) for n, line in enumerate(file.read_text().splitlines(), 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{file}: cannot be read ({err})") from err
    if not lines:
        raise DataError(f"{file} (config.data.{field}) is empty")
    known_set, seen = set(known), {}
    for number, case in lines:
        if case not in known_set:
            raise DataError(f"{file} line {number}: case {case!r} is not a case of the folder "
                            f"(e.g. {', '.join(known[:3])})")
        if case in seen:
            raise DataError(f"{file} line {number}: case {case!r} is listed again (first at line {seen[case]})")
        seen[case] = number
    return [case for _, case in lines]


def make_splits(config: ml_collections.ConfigDict, cases: list[str]) -> dict[str, list[str]]:
    """{'labeled', 'unlabeled', 'val', 'test'}: case ids (the one place the splits are made)."""
    d = config.data
    root = Path(d.data_dir)
    order = [cases[i] for i in np.random.default_rng(d.split_seed).permutation(len(cases))]
    taken: dict[str, str] = {}

    def claim(part: str, chosen: list[str], field: str) -> list[str]:
        for case in chosen:
            if case in taken:
                _fail(field, f"case {case!r} is in the {taken[case]} split already")
            taken[case] = part
        return chosen

    def by_fraction(part: str, fraction: float, field: str) -> list[str]:
        free = [c for c in order if c not in taken]
        return claim(part, free[: int(round(fraction * len(cases)))], field)

    test = (claim("test", read_case_list(d.test_list, "test_list", cases, root), "test_list") if d.test_list
            else by_fraction("test", d.test_fraction, "test_fraction"))
    val = (claim("val", read_case_list(d.val_list, "val_list", cases, root), "val_list") if d.val_list
           else by_fraction("val", d.val_fraction, "val_fraction"))
    free = [c for c in order if c not in taken]
    if d.labeled_list:
        labeled = claim("labeled", read_case_list(d.labeled_list, "labeled_list", cases, root), "labeled_list")
    else:
        if d.labeled_cases > len(free) - 1:
            _fail("labeled_cases", f"{d.labeled_cases} of {len(free)} training cases (of {len(cases)}, after "
                  f"{len(test)} test and {len(val)} val) leaves none unlabeled")
        labeled = claim("labeled", free[: d.labeled_cases], "labeled_cases")
    unlabeled = [c for c in order if c not in taken]
    if not unlabeled:
        _fail("labeled_list", f"every training case is labeled ({len(labeled)}); at least one must stay unlabeled")
    return {"labeled": labeled, "unlabeled": unlabeled, "val": val, "test": test}


# ---------------------------------------------------------------------------------------------
# The cache of preprocessed cases

def default_cache_dir() -> Path:
    return Path(os.environ.get("ARCO_JAX_CACHE") or Path.home() / ".cache" / "arco_jax")


def _fingerprint(root: Path, cases: list[str], description: FolderDescription) -> list:
    files = [root / DATASET_JSON]
    for case in cases:
        files += [channel_path(root, case, c, description.file_ending) for c in range(len(description.channel_names))]
        files.append(label_path(root, case, description.file_ending))
    out = []
    for path in files:
        stat = path.stat()
        out.append([str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns])
    return out


def _save_atomically(path: Path, array: np.ndarray) -> None:
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as f:
            np.save(f, array)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _write_json_atomically(path: Path, payload: dict) -> None:
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class PreprocessedCases:
    """The preprocessed cases of one folder and plan, on disk: <case>_image.npy (D, H, W, C)
    float32, <case>_label.npy (D, H, W) uint8 or int16, and plan.json (the plan, each case's
    shape and spacing). Built when missing; read by memory map."""

    def __init__(self, root: Path, cases: list[str], description: FolderDescription,
                 config: ml_collections.ConfigDict, labeled: list[str]):
        d = config.data
        self.root, self.description = root, description
        normalization = channel_normalizations(config, description)
        settings = {"version": CACHE_VERSION, "root": str(root.resolve()), "mode": d.mode,
                    "normalization": normalization, "ct_window": [float(v) for v in d.ct_window],
                    "resample": d.resample, "target_spacing": [float(v) for v in d.target_spacing],
                    "labeled": sorted(labeled) if "ct" in normalization and not len(d.ct_window) else [],
                    "files": _fingerprint(root, cases, description)}
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = Path(d.cache_dir or default_cache_dir()) / NAME / f"{root.resolve().name}-{key}"
        plan_path = self.folder / "plan.json"
        if plan_path.is_file():
            self.plan = json.loads(plan_path.read_text())
        else:
            self.plan = self._build(cases, config, normalization, labeled)
            _write_json_atomically(plan_path, self.plan)
        self._arrays: dict[str, np.ndarray] = {}

    def _build(self, cases: list[str], config, normalization: list[str], labeled: list[str]) -> dict:
        d = config.data
        self.folder.mkdir(parents=True, exist_ok=True)
        log.info("preprocessing %d cases of %s into %s (once)", len(cases), self.root, self.folder)
        spacings = {}
        for case in cases:
            image = _load(channel_path(self.root, case, 0, self.description.file_ending))
            spacings[case] = tuple(float(s) for s in nib.as_closest_canonical(image).header.get_zooms()[:3])[::-1]
        target = target_spacing(config, spacings)
        ct_clip = [None] * len(normalization)
        if "ct" in normalization:
            if len(d.ct_window):
                ct_clip = [[float(d.ct_window[0]), float(d.ct_window[1])] if rule == "ct" else None
                           for rule in normalization]
            else:
                ct_clip = self._foreground_percentiles(labeled, normalization)
        plan = {"normalization": normalization, "ct_clip": ct_clip,
                "target_spacing": None if target is None else list(target), "cases": {}}
        for case in cases:
            image, label, spacing = read_raw_case(self.root, case, self.description)
            image, label, spacing = resample(image, label, spacing, _case_target(target, spacing))
            image = normalize(image, plan)
            dtype = np.uint8 if max(self.description.label_values) < 256 else np.int16
            _save_atomically(self.folder / f"{case}_image.npy", image)
            _save_atomically(self.folder / f"{case}_label.npy", label.astype(dtype))
            plan["cases"][case] = {"shape": list(label.shape), "spacing": list(spacing)}
        return plan

    def _foreground_percentiles(self, labeled: list[str], normalization: list[str]) -> list:
        """The 0.5 / 99.5 percentiles of each CT channel over the labeled cases' foreground (the
        only labels a semi-supervised run may look at)."""
        values = [[] for _ in normalization]
        for case in labeled:
            image, label, _ = read_raw_case(self.root, case, self.description)
            foreground = (label > 0) & (label < self.description.num_classes)
            for c, rule in enumerate(normalization):
                if rule == "ct":
                    values[c].append(image[..., c][foreground])
        clips = []
        for c, rule in enumerate(normalization):
            if rule != "ct":
                clips.append(None)
                continue
            pooled = np.concatenate(values[c]) if values[c] else np.zeros(0, np.float32)
            if pooled.size == 0:
                raise DataError(f"{self.root}: the labeled cases ({', '.join(labeled)}) have no foreground voxel to "
                                "take CT percentiles from; set config.data.ct_window (e.g. (-200, 250))")
            clips.append([float(v) for v in np.percentile(pooled, CT_PERCENTILES)])
        return clips

    def array(self, case: str, kind: str) -> np.ndarray:
        """A case's 'image' or 'label' array, memory-mapped."""
        key = f"{case}_{kind}"
        if key not in self._arrays:
            self._arrays[key] = np.load(self.folder / f"{key}.npy", mmap_mode="r")
        return self._arrays[key]

    def shape(self, case: str) -> tuple[int, ...]:
        return tuple(self.plan["cases"][case]["shape"])

    def spacing(self, case: str) -> tuple[float, ...]:
        return tuple(self.plan["cases"][case]["spacing"])

    def __getstate__(self):  # Grain workers reopen the memory maps themselves.
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state


class SliceSource:
    """Random-access source of the (H, W) slices of some cases (2-D mode): items are dicts with
    image (H, W, C) float32, label (H, W) int32, name '<case>_slice<k>'."""

    def __init__(self, store: PreprocessedCases, cases: list[str]):
        self._store = store
        self._index = [(case, k) for case in cases for k in range(store.shape(case)[0])]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict:
        case, k = self._index[index]
        return {"image": np.array(self._store.array(case, "image")[k]),
                "label": np.array(self._store.array(case, "label")[k], np.int32), "name": f"{case}_slice{k}"}


class VolumeSource:
    """Random-access source of whole preprocessed volumes (3-D mode): image (D, H, W, C), label."""

    def __init__(self, store: PreprocessedCases, cases: list[str]):
        self._store, self._cases = store, list(cases)

    def __len__(self) -> int:
        return len(self._cases)

    def __getitem__(self, index: int) -> dict:
        case = self._cases[index]
        return {"image": np.array(self._store.array(case, "image")),
                "label": np.array(self._store.array(case, "label"), np.int32), "name": case}


class NiftiFolderDataset:
    """An nnU-Net dataset folder opened for one run: splits made, headers checked, cases
    preprocessed (once, into the cache)."""

    def __init__(self, config: ml_collections.ConfigDict):
        validate(config)
        d = config.data
        self.root = Path(d.data_dir)
        self.description_json = describe(self.root)
        cases = list_cases(self.root, self.description_json)
        check_headers(self.root, cases, self.description_json, d.mode)
        self.splits = make_splits(config, cases)
        used = [c for part in ("labeled", "unlabeled", "val", "test") for c in self.splits[part]]
        self.store = PreprocessedCases(self.root, sorted(used), self.description_json, config,
                                       self.splits["labeled"])
        self.mode = d.mode
        labeled = self.splits["labeled"]
        slices = sum(self.store.shape(c)[0] for c in labeled)
        self.labeled_count = len(labeled) if self.mode == "3d" else slices
        unit = f" ({slices} slices)" if self.mode == "2d" else ""
        self.labeled_description = f"{len(labeled)} labeled case{'s' if len(labeled) != 1 else ''}{unit}"
        self.labeled_record = {"labeled_cases": len(labeled), "labeled_case_ids": list(labeled),
                               "split_case_ids": {k: list(v) for k, v in self.splits.items()},
                               "preprocessing": {k: self.store.plan[k]
                                                 for k in ("normalization", "ct_clip", "target_spacing")}}
        if self.mode == "2d":
            self.labeled_record["labeled_slices"] = slices
        counts = ", ".join(f"{len(v)} {k}" for k, v in self.splits.items())
        self.description = f"{self.root} (NIfTI folder, {self.mode}: {len(cases)} cases; {counts})"

    def __str__(self) -> str:
        return self.description

    def train_sources(self):
        source = SliceSource if self.mode == "2d" else VolumeSource
        return source(self.store, self.splits["labeled"]), source(self.store, self.splits["unlabeled"])

    def cases(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return list(self.splits[split])

    def case(self, split: str, index: int) -> registry.Case:
        case = self.cases(split)[index]
        image = np.array(self.store.array(case, "image"))
        label = np.array(self.store.array(case, "label"), np.int32)
        return registry.Case(case, image, label, spacing=self.store.spacing(case))


# ---------------------------------------------------------------------------------------------
# New scans (predict)

def _nearest_to(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resize to an exact shape (voxel centres mapped onto each other)."""
    index = [np.minimum(((np.arange(n) + 0.5) * m / n).astype(np.int64), m - 1) for n, m in zip(shape, labels.shape)]
    return labels[np.ix_(*index)]


def prepare_scan(plan: dict, paths: list) -> registry.PreparedScan:
    """A new scan (one NIfTI file per channel) as the run's plan prepares its cases: closest
    canonical orientation, (z, y, x), resampled to the plan's spacing, normalised; and the way
    back for its labels (to the stored grid, then to the file's own orientation and axis order).
    Errors name the file."""
    paths = [Path(p) for p in paths]
    if len(paths) != len(plan["normalization"]):
        raise DataError(f"{paths[0]}: {len(paths)} channel file(s), the run was trained on "
                        f"{len(plan['normalization'])}")
    images = [_load(path) for path in paths]
    affine = _geometry(images[0])[1]
    for path, image in zip(paths[1:], images[1:]):
        check_same_grid(path, image, paths[0], images[0])
    channels = []
    for path, image in zip(paths, images):
        try:
            data, spacing = _canonical_zyx(image)
        except Exception as err:  # A truncated or corrupt data block only shows here.
            raise DataError(f"{path}: the voxel data cannot be read ({type(err).__name__}: {err})") from err
        data = data.astype(np.float32, copy=False)
        if not np.isfinite(data).all():
            raise DataError(f"{path}: {int(np.count_nonzero(~np.isfinite(data)))} voxel(s) are not finite")
        channels.append(data)
    volume = np.stack(channels, axis=-1)
    stored = volume.shape[:3]
    target = plan.get("target_spacing")
    volume, _, _ = resample(volume, None, spacing, _case_target(tuple(target) if target else None, spacing))
    first = volume[..., 0]
    low, high = float(first.min()), float(first.max())
    display = (first - low) / (high - low) if high > low else np.zeros_like(first)
    volume = normalize(volume, plan)
    orientation = nib.orientations.io_orientation(affine)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), orientation)
    reference = images[0]

    def to_input_grid(array: np.ndarray) -> np.ndarray:
        """Labels (D, H, W), or per-voxel values (D, H, W, K), onto the file's grid (nearest)."""
        array = np.asarray(array)
        extra = array.shape[3:]
        array = _nearest_to(array, stored)  # (z, y, x) canonical
        canonical_xyz = np.transpose(array, (2, 1, 0, *range(3, array.ndim)))
        restored = nib.orientations.apply_orientation(canonical_xyz, back)
        return np.ascontiguousarray(restored).reshape(tuple(reference.shape[:3]) + extra)

    return registry.PreparedScan(volume=volume, to_input_grid=to_input_grid, reference=reference, display=display)


# ---------------------------------------------------------------------------------------------
# The registry entry

def _check_fields(config: ml_collections.ConfigDict) -> None:
    d = config.data
    if not d.data_dir:
        _fail("data_dir", f"is required for dataset {NAME!r} (an nnU-Net dataset folder with {DATASET_JSON}, "
              f"{IMAGES}/ and {LABELS}/)")
    if str(d.data_dir).startswith(("gs://", "s3://")):
        _fail("data_dir", f"{d.data_dir!r} is in a bucket; nibabel needs a local folder: copy the data first")
    if not os.path.isdir(d.data_dir):
        _fail("data_dir", f"{d.data_dir!r} is missing or not a directory")
    if d.mode not in MODES:
        _fail("mode", f"{d.mode!r} is not one of {', '.join(map(repr, MODES))}")
    for field in ("val_fraction", "test_fraction"):
        value = d[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            _fail(field, f"must be a fraction in [0, 1), got {value!r}")
    if not (_is_int(d.labeled_cases) and d.labeled_cases >= 1):
        _fail("labeled_cases", f"must be an integer >= 1, got {d.labeled_cases!r}")
    if not _is_int(d.split_seed):
        _fail("split_seed", f"must be an integer, got {d.split_seed!r}")
    bad = [n for n in d.normalization if n not in NORMALIZATIONS]
    if not len(d.normalization) or bad:
        _fail("normalization", f"{tuple(d.normalization)!r}: each entry one of {', '.join(NORMALIZATIONS)}")
    window = tuple(d.ct_window)
    if window and not (len(window) == 2 and window[0] < window[1]):
        _fail("ct_window", f"must be () or (low, high) with low < high (HU), got {window!r}")
    if d.resample not in RESAMPLE:
        _fail("resample", f"{d.resample!r} is not one of {', '.join(map(repr, RESAMPLE))}")
    spacing = tuple(d.target_spacing)
    if spacing and not (len(spacing) == 3 and all(isinstance(s, (int, float)) and s > 0 for s in spacing)):
        _fail("target_spacing", f"must be () (the cases' median, when they differ) or three spacings > 0 in mm, "
              f"(z, y, x); got {spacing!r}")
    if spacing and d.resample == "off":
        _fail("target_spacing", f"{spacing!r} is given but config.data.resample is 'off'")


def validate(config: ml_collections.ConfigDict) -> None:
    """The fields and dataset.json (no image is read)."""
    _check_fields(config)
    try:
        description = describe(config.data.data_dir)
    except DataError as err:
        raise ConfigError(f"config.data.data_dir: {err}") from err
    channel_normalizations(config, description)


def info(config: ml_collections.ConfigDict) -> registry.DatasetInfo:
    """Classes and channels from dataset.json; needs data.data_dir (a ConfigError until it is set,
    which registry.resolve(strict=False) passes over at config time)."""
    d = config.data
    three_d = d.get("mode", "2d") == "3d"
    common = dict(spatial_rank=3 if three_d else 2, has_spacing=True, eval_unit="volume",
                  weak_augment="rot_flip_crop" if three_d else "resize_rotate", intensity="dataset")
    if not (d.get("data_dir") and os.path.isfile(os.path.join(d.data_dir, DATASET_JSON))):
        if all(d.get(k) is not None for k in ("num_classes", "class_names", "in_channels")):
            # A trained run's config.json, read where the folder is not (predict on another machine).
            return registry.DatasetInfo(num_classes=d.num_classes, class_names=tuple(d.class_names),
                                        ignore_label=d.get("ignore_label"), in_channels=d.in_channels, **common)
        if not d.get("data_dir"):
            _fail("data_dir", f"is required for dataset {NAME!r} (its classes and channels are in {DATASET_JSON})")
    try:
        description = describe(d.data_dir)
    except DataError as err:
        raise ConfigError(f"config.data.data_dir: {err}") from err
    return registry.DatasetInfo(
        num_classes=description.num_classes, class_names=description.class_names,
        ignore_label=description.ignore_label, in_channels=len(description.channel_names), **common)


def _fields() -> dict:
    return {"mode": "2d", "labeled_cases": 4, "labeled_list": "", "val_list": "", "test_list": "",
            "val_fraction": 0.1, "test_fraction": 0.2, "split_seed": 0, "normalization": ("auto",),
            "ct_window": (), "resample": "auto", "target_spacing": (), "cache_dir": ""}


NIFTI_FOLDER = registry.DatasetSpec(
    name=NAME, fields=_fields, info=info, validate=validate, open=NiftiFolderDataset, prepare_scan=prepare_scan,
    description="any NIfTI dataset folder in nnU-Net's layout (imagesTr, labelsTr, dataset.json): 2-D slices or "
                "3-D patches, per-volume eval")
