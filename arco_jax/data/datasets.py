"""One interface over the two on-disk forms of a segmentation dataset, so training, the volume
evaluation and the variance study read either without knowing which:

  Ssl4misData   the SSL4MIS processed layout (h5 files and list files): a user's ACDC folder,
                or the built-in phantom; nothing to build first.
  TfdsData      ACDC prepared by `arco_jax.data.tfds_acdc` (array_record, read without
                TensorFlow): fewer, larger files, which suits GCS and many hosts.

Both keep list order, so "the first K training slices" is the same labeled set in either, and
both name the file and the problem in a DataError.

The registered datasets built on them (ACDC, the phantom) are in ssl4mis_datasets.py.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterator, Protocol

import h5py
import numpy as np

from arco_jax.data import ssl4mis
from arco_jax.data.ssl4mis import DataError

SOURCES = ("h5", "tfds")
SPACING_KEY = "spacing"


@dataclasses.dataclass(frozen=True)
class Volume:
    """A labeled volume of a split: image (D, H, W) float32, label (D, H, W) uint8, and the
    (z, y, x) voxel spacing in mm when the data records it."""

    case: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float] | None


def _checked_spacing(raw, where: str) -> tuple[float, float, float]:
    try:
        values = np.asarray(raw, dtype=np.float64).ravel()
    except (TypeError, ValueError) as err:
        raise DataError(f"{where}: '{SPACING_KEY}' {raw!r} is not numeric") from err
    if values.shape != (3,) or not np.all(np.isfinite(values) & (values > 0)):
        raise DataError(f"{where}: '{SPACING_KEY}' {values.tolist()} must be 3 finite positive numbers "
                        "(z, y, x) in mm")
    return tuple(float(v) for v in values)


def read_h5_spacing(path: Path) -> tuple[float, float, float] | None:
    """The (z, y, x) spacing stored in a volume h5 (attribute, else dataset), or None."""
    try:
        with h5py.File(path, "r") as f:
            if SPACING_KEY in f.attrs:
                raw = f.attrs[SPACING_KEY]
            elif SPACING_KEY in f:
                raw = f[SPACING_KEY][()]
            else:
                return None
    except OSError as err:
        raise DataError(f"{path}: cannot be read as HDF5 ({err})") from err
    return _checked_spacing(raw, str(path))


class SegmentationData(Protocol):
    """What the trainer and the evaluators need from a dataset."""

    description: str

    def labeled_slice_count(self, dataset: str, labeled_patients: int, one_patient_split: str) -> int:
        """K, the size of the labeled set: the first K training slices in list order."""

    def train_sources(self, num_labeled: int, num_classes: int) -> tuple[object, object]:
        """(labeled, unlabeled) Grain random-access sources of training slices."""

    def cases(self, split: str) -> list[str]:
        """The volumes of a split, in list order."""

    def volume(self, split: str, index: int, num_classes: int) -> Volume:
        """Volume `index` of `cases(split)`."""


def iterate_volumes(data: SegmentationData, split: str, num_classes: int,
                    indices: range | None = None) -> Iterator[Volume]:
    """The volumes of a split in list order (or those at `indices`)."""
    for index in indices if indices is not None else range(len(data.cases(split))):
        yield data.volume(split, index, num_classes)


class Ssl4misData:
    """The SSL4MIS processed layout under `root`. With `num_classes`, listing a split's cases
    also checks its volumes (`ssl4mis.check_volumes`: every file there, shapes and labels), so
    a missing or bad test volume stops a run when it starts; without, only the list is read."""

    def __init__(self, root: str | os.PathLike, num_classes: int | None = None):
        self.root = Path(root)
        self.description = str(self.root)
        self._num_classes = num_classes
        self._cases = {}  # split -> list, read once (volume() looks a case up by index)

    def __str__(self) -> str:
        return self.description

    def labeled_slice_count(self, dataset: str, labeled_patients: int, one_patient_split: str) -> int:
        return ssl4mis.labeled_slice_count(dataset, labeled_patients, one_patient_split, root=self.root)

    def train_sources(self, num_labeled: int, num_classes: int):
        labeled, unlabeled = ssl4mis.split_labeled(self.root, num_labeled)
        return (ssl4mis.SliceSource(self.root, labeled, num_classes),
                ssl4mis.SliceSource(self.root, unlabeled, num_classes))

    def cases(self, split: str) -> list[str]:
        if split not in self._cases:
            self._cases[split] = (ssl4mis.list_cases(self.root, split) if self._num_classes is None
                                  else ssl4mis.check_volumes(self.root, split, self._num_classes))
        return self._cases[split]

    def volume(self, split: str, index: int, num_classes: int) -> Volume:
        case = self.cases(split)[index]
        image, label = ssl4mis.load_volume(self.root, case, num_classes)
        return Volume(case, image, label, read_h5_spacing(self.root / "data" / f"{case}.h5"))


class TfdsData:
    """ACDC prepared by `arco_jax.data.tfds_acdc` under the TFDS folder `data_dir`."""

    def __init__(self, data_dir: str | os.PathLike):
        from arco_jax.data import tfds_acdc  # pylint: disable=import-outside-toplevel

        self._tfds = tfds_acdc
        self.data_dir = Path(data_dir)
        self.description = f"{self.data_dir} (TFDS acdc)"
        self._volumes = {}  # split -> data source, opened once
        self._cases = {}
        tfds_acdc.prepared_dir(self.data_dir, "slices")  # Both configs must be there, before training.
        tfds_acdc.prepared_dir(self.data_dir, "volumes")

    def __str__(self) -> str:
        return self.description

    def labeled_slice_count(self, dataset: str, labeled_patients: int, one_patient_split: str) -> int:
        if dataset != "acdc":
            raise DataError(f"{self.data_dir}: the TFDS source holds ACDC, not {dataset!r}")
        return self._tfds.tfds_labeled_slice_count(self.data_dir, labeled_patients, one_patient_split)

    def train_sources(self, num_labeled: int, num_classes: int):
        return (self._tfds.tfds_slice_source(self.data_dir, "train", 0, num_labeled, num_classes),
                self._tfds.tfds_slice_source(self.data_dir, "train", num_labeled, None, num_classes))

    def _source(self, split: str):
        if split not in self._volumes:
            self._volumes[split] = self._tfds.volume_source(self.data_dir, split)
        return self._volumes[split]

    def cases(self, split: str) -> list[str]:
        if split not in self._cases:
            self._cases[split] = self._tfds.tfds_volume_cases(self.data_dir, split)
        return self._cases[split]

    def volume(self, split: str, index: int, num_classes: int) -> Volume:
        case, image, label, spacing = self._tfds.read_volume(self._source(split), index, num_classes,
                                                             where=f"{self.data_dir} {split}")
        return Volume(case, image, label,
                      None if spacing is None else _checked_spacing(spacing, f"{self.data_dir} {split} {case}"))
