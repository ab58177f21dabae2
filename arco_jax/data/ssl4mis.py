"""Reader for the SSL4MIS processed layout, shared by ACDC and the built-in phantom.

Layout under a data root:
  train_slices.list   training slice names, e.g. patient099_frame01_slice_15
  train.list, val.list, test.list   volume ("case") names, e.g. patient099_frame01
  data/slices/<slice>.h5   datasets image (H, W) float, label (H, W) integer
  data/<case>.h5           datasets image (D, H, W), label (D, H, W)

The SSL4MIS processing script writes the slices into data/ next to the volumes, while its
loaders read data/slices/; copies of the processed ACDC exist both ways, so slices are read
from data/slices/ when that folder holds any .h5 file, else from data/ (`slice_dir`).

"N labeled patients" means the first K lines of train_slices.list (K from
`labeled_slice_count`); the rest of the list is the unlabeled pool.

Every problem with the files raises DataError naming the file (and key or value). A source
checks every file's keys, shapes and label values when it is built (`check_h5_pair`: the label
is a small part of each file, about 1 s for all of ACDC), so a bad file stops a run before it
compiles rather than when first sampled; intensities are checked when read. Sources open one h5
per item so they can be pickled into data-loading worker processes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np

SPLITS = ("train", "val", "test")
TRAIN_SLICES_LIST = "train_slices.list"
ONE_PATIENT_POLICIES = ("whole", "reference")
# ACDC, SSL4MIS list order: 1 -> patient099 (both frames); 3 -> {099, 038, 050};
# 7 -> {099, 038, 050, 100, 058, 021, 049}.
ACDC_LABELED_SLICES = {1: 32, 3: 68, 7: 136}
# The ARCO reference code uses the first 23 lines for "1 patient" (part of patient099).
ACDC_REFERENCE_ONE_PATIENT_SLICES = 23
_MAX_REPORTED_MISSING = 5


class DataError(ValueError):
    """A dataset file or list is missing or has bad content."""


def _data_dir(root: str | os.PathLike) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist or is not a directory")
    data = root / "data"
    if not data.is_dir():
        raise DataError(f"{data} is missing: an SSL4MIS data root holds data/ (volumes; slices in "
                        "data/slices/ or data/)")
    return data


def _holds_h5(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(e.name.endswith(".h5") and e.is_file() for e in entries)


def slice_dir(root: str | os.PathLike) -> Path:
    """The folder that holds a root's slice files: data/slices/ when it exists and holds any .h5
    file (preferred when data/ holds slices too), else data/ itself, where the SSL4MIS processing
    script writes them. Decided once per root, so all slices come from one folder."""
    data = _data_dir(root)
    slices = data / "slices"
    return slices if slices.is_dir() and _holds_h5(slices) else data


def _slice_dir_description(folder: Path) -> str:
    """Where slices were looked for, for error messages; both places when data/ was the fallback."""
    if folder.name == "slices":
        return f"in {folder}"
    return f"in {folder}; {folder / 'slices'} does not exist or holds no .h5 files"


def read_list(path: str | os.PathLike) -> list[str]:
    """Non-empty, stripped lines of a list file (a trailing '.h5' is dropped, as some sets use)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"list file {path} is missing")
    names = [line.strip().removesuffix(".h5") for line in path.read_text().splitlines()]
    names = [n for n in names if n]
    if not names:
        raise DataError(f"list file {path} is empty")
    return names


def list_train_slices(root: str | os.PathLike) -> list[str]:
    """All training slice names in file order (the order that defines labeled subsets)."""
    _data_dir(root)
    return read_list(Path(root) / TRAIN_SLICES_LIST)


def list_cases(root: str | os.PathLike, split: str) -> list[str]:
    """Volume names of a split ('train', 'val' or 'test')."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _data_dir(root)
    return read_list(Path(root) / f"{split}.list")


def patient_of(name: str) -> str:
    """'patient099_frame01_slice_15' -> 'patient099'."""
    return name.split("_", 1)[0]


def first_patients_slice_count(slice_names: Sequence[str], num_patients: int) -> int:
    """Number of leading list lines before the (num_patients + 1)-th distinct patient starts."""
    if num_patients < 1:
        raise ValueError(f"num_patients must be >= 1, got {num_patients}")
    seen: set[str] = set()
    for index, name in enumerate(slice_names):
        patient = patient_of(name)
        if patient not in seen:
            if len(seen) == num_patients:
                return index
            seen.add(patient)
    if len(seen) < num_patients:
        raise DataError(f"the slice list names only {len(seen)} patients, "
                        f"fewer than the {num_patients} requested")
    return len(slice_names)


def labeled_slice_count(dataset: str, labeled_patients: int, one_patient_policy: str = "whole",
                        root: str | os.PathLike | None = None) -> int:
    """How many leading lines of train_slices.list form the labeled set.

    dataset 'acdc': the published counts (3 -> 68, 7 -> 136; 1 -> 32 with policy 'whole',
      23 with 'reference', the ARCO code's choice). With `root`, any patient count is computed
      from the list, and the published counts are cross-checked against it.
    dataset 'phantom' (or any other SSL4MIS-layout set): computed from the list under `root`
      (first k patients, both frames); the 'reference' policy exists only for ACDC.
    """
    if one_patient_policy not in ONE_PATIENT_POLICIES:
        raise ValueError(f"one_patient_policy must be one of {ONE_PATIENT_POLICIES}, "
                         f"got {one_patient_policy!r}")
    if labeled_patients < 1:
        raise ValueError(f"labeled_patients must be >= 1, got {labeled_patients}")
    dataset = dataset.lower()
    computed = (first_patients_slice_count(list_train_slices(root), labeled_patients)
                if root is not None else None)
    if dataset == "acdc":
        if labeled_patients == 1 and one_patient_policy == "reference":
            return ACDC_REFERENCE_ONE_PATIENT_SLICES
        published = ACDC_LABELED_SLICES.get(labeled_patients)
        if computed is None:
            if published is None:
                raise ValueError(
                    f"no published ACDC slice count for {labeled_patients} labeled patients "
                    f"(known: {sorted(ACDC_LABELED_SLICES)}); pass root to count from the list")
            return published
        if published is not None and computed != published:
            raise DataError(
                f"{Path(root) / TRAIN_SLICES_LIST}: the first {labeled_patients} patients span "
                f"{computed} lines, the SSL4MIS ACDC split has {published}; is this the "
                "community list?")
        return computed
    if labeled_patients == 1 and one_patient_policy == "reference":
        raise ValueError("one_patient_policy='reference' (23 slices) is defined only for ACDC; "
                         "use 'whole'")
    if computed is None:
        raise ValueError(f"dataset {dataset!r} needs root to count labeled slices from its list")
    return computed


def split_labeled(root: str | os.PathLike, num_labeled_slices: int) -> tuple[list[str], list[str]]:
    """(labeled, unlabeled) slice names: the first num_labeled_slices lines, and the rest."""
    names = list_train_slices(root)
    if not 0 < num_labeled_slices < len(names):
        raise DataError(f"{Path(root) / TRAIN_SLICES_LIST} has {len(names)} slices; cannot take "
                        f"{num_labeled_slices} labeled and keep an unlabeled pool")
    return names[:num_labeled_slices], names[num_labeled_slices:]


def _check_files_exist(paths: Sequence[Path], what: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:_MAX_REPORTED_MISSING])
        hidden = len(missing) - _MAX_REPORTED_MISSING
        more = f" and {hidden} more" if hidden > 0 else ""
        raise DataError(f"{len(missing)} of {len(paths)} {what} files are missing: {shown}{more}")


def _read_h5(path: Path, read_image: bool) -> tuple[np.ndarray | None, tuple, np.dtype, np.ndarray]:
    """(image, or None when not read_image; image shape; image dtype; label) of one h5."""
    try:
        with h5py.File(path, "r") as f:
            for key in ("image", "label"):
                if key not in f:
                    raise DataError(
                        f"{path}: dataset '{key}' is missing (found {sorted(f.keys())})")
            image = f["image"][()] if read_image else None
            return image, tuple(f["image"].shape), f["image"].dtype, f["label"][()]
    except OSError as err:
        raise DataError(f"{path}: cannot be read as HDF5 ({err})") from err


def _check_pair(path: Path, image_shape: tuple, image_dtype, label: np.ndarray, num_classes: int,
                ndim: int) -> None:
    if len(image_shape) != ndim:
        raise DataError(f"{path}: 'image' must have {ndim} dims, has shape {image_shape}")
    if image_shape != label.shape:
        raise DataError(f"{path}: 'image' shape {image_shape} != 'label' shape {label.shape}")
    if not np.issubdtype(image_dtype, np.number):
        raise DataError(f"{path}: 'image' has non-numeric dtype {image_dtype}")
    if not np.issubdtype(label.dtype, np.number):
        raise DataError(f"{path}: 'label' has non-numeric dtype {label.dtype}")
    outside = (label < 0) | (label >= num_classes) | (label != np.round(label))
    if outside.any():
        raise DataError(f"{path}: 'label' value {label[outside][0]} is not a class "
                        f"in [0, {num_classes})")


def check_h5_pair(path: Path, num_classes: int, ndim: int) -> None:
    """The checks of `read_h5_pair` that need no image values (keys, dims, shapes, dtypes, label
    values): cheap enough to run over every file before training."""
    _, image_shape, image_dtype, label = _read_h5(path, read_image=False)
    _check_pair(path, image_shape, image_dtype, label, num_classes, ndim)


def read_h5_pair(path: Path, num_classes: int, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, label uint8) from one h5, validated; errors name the file."""
    image, image_shape, image_dtype, label = _read_h5(path, read_image=True)
    _check_pair(path, image_shape, image_dtype, label, num_classes, ndim)
    image = image.astype(np.float32)
    if not np.isfinite(image).all():
        bad = image[~np.isfinite(image)][0]
        raise DataError(f"{path}: 'image' has non-finite values (e.g. {bad})")
    return image, label.astype(np.uint8)


class SliceSource:
    """Random-access source of training slices (grain RandomAccessDataSource protocol).

    Item: dict(image (H, W) float32, label (H, W) uint8, name str). Files are read from
    `slice_dir(root)` (data/slices/ or data/); at construction all must exist and pass
    `check_h5_pair`; intensities are checked when read.
    """

    def __init__(self, root: str | os.PathLike, names: Sequence[str], num_classes: int = 4):
        self._dir = slice_dir(root)
        self._names = list(names)
        if not self._names:
            raise DataError(f"no slice names given for {self._dir}")
        self._num_classes = num_classes
        _check_files_exist([self.path(n) for n in self._names],
                           f"slice ({_slice_dir_description(self._dir)})")
        for name in self._names:
            check_h5_pair(self.path(name), num_classes, ndim=2)

    def path(self, name: str) -> Path:
        """The h5 file of a slice (for readers of more than image and label, e.g. attributes)."""
        return self._dir / f"{name}.h5"

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, index: int) -> dict:
        name = self._names[index]
        image, label = read_h5_pair(self.path(name), self._num_classes, ndim=2)
        return {"image": image, "label": label, "name": name}

    def __repr__(self) -> str:
        return f"SliceSource({self._dir}, {len(self)} slices)"


def load_volume(root: str | os.PathLike, case: str,
                num_classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(image (D, H, W) float32, label (D, H, W) uint8) of one case."""
    path = _data_dir(root) / f"{case}.h5"
    _check_files_exist([path], "volume")
    return read_h5_pair(path, num_classes, ndim=3)


def check_volumes(root: str | os.PathLike, split: str, num_classes: int = 4) -> list[str]:
    """The cases of a split, after checking that every volume exists and passes `check_h5_pair`
    (so a bad test volume stops a run when it opens, not after training)."""
    cases = list_cases(root, split)
    data = _data_dir(root)
    _check_files_exist([data / f"{c}.h5" for c in cases], f"{split} volume (in {data})")
    for case in cases:
        check_h5_pair(data / f"{case}.h5", num_classes, ndim=3)
    return cases


def iterate_volumes(root: str | os.PathLike, split: str,
                    num_classes: int = 4) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yields (case, image, label) for every volume of a split, in list order.

    All files are checked (`check_volumes`) before the first volume is read.
    """
    data = _data_dir(root)
    for case in check_volumes(root, split, num_classes):
        image, label = read_h5_pair(data / f"{case}.h5", num_classes, ndim=3)
        yield case, image, label
