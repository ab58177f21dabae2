"""ACDC from the official NIfTI download to the SSL4MIS processed layout.

The download (https://www.creatis.insa-lyon.fr/Challenge/acdc/, "training" set, 100 patients):
  training/patientNNN/Info.cfg                         'ED: <frame>' and 'ES: <frame>' lines
  training/patientNNN/patientNNN_frameYY.nii.gz        the ED and ES frames, (x, y, z)
  training/patientNNN/patientNNN_frameYY_gt.nii.gz     0 background, 1 RV, 2 myocardium, 3 LV

The SSL4MIS processed ACDC, which the semi-supervised ACDC papers train on, was made as below,
and `convert` makes it the same way:
- a volume is the NIfTI array with its axes reversed, (x, y, z) -> (z, y, x) = (D, H, W): what
  SimpleITK's GetArrayFromImage returns (SSL4MIS reads with SimpleITK);
- the image is min-max normalised per volume to [0, 1] (in float64) and stored as float32; the
  label is stored as uint8;
- the ED frame becomes frame01 and the ES frame frame02, whatever their numbers in the download
  (patient001's are frame01 and frame12);
- slice files count from 1: `<case>_slice_k` is slice k - 1 of the volume. SSL4MIS's published
  script (code/dataloaders/acdc_data_processing.py) counts from 0, but the distributed data and
  its train_slices.list count from 1 (patient001_frame01 has slice_1 .. slice_10), and the list
  must name files that exist;
- slices are written for every volume (1902 files for the 100 patients), volumes to data/<case>.h5.
We add h5 attributes: `spacing` (z, y, x in mm, from the image's NIfTI header), `phase` (ED/ES)
and `source_frame` (the frame number in the download).

The community split is 70 / 10 / 20 patients (`COMMUNITY_SPLIT`, in list order; each patient
contributes its ED then its ES case). train_slices.list follows train.list case by case and lists
each case's slices in an order that looks random (the processing recorded no seed), so that order
is embedded here (`COMMUNITY_SLICE_ORDER`). Because whole cases come in train.list order, the
first K lines are whole patients: 1 patient -> 32 lines (patient099), 3 -> 68 (+ 038, 050),
7 -> 136 (+ 100, 058, 021, 049). The ARCO code's 23-line "1 patient" set is all of
patient099_frame01 and the first 7 listed slices of patient099_frame02, so the order matters.

Other data (a subset, another release, synthetic test data) take an explicit split; their
training slices are listed case by case in ascending slice order.

Command line: python -m arco_jax.data.acdc --raw_dir RAW --out_dir OUT [--split_file SPLIT.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import shutil
import sys
import tempfile
import types
import zlib
from pathlib import Path
from typing import Callable, Iterator, Mapping, NamedTuple, Sequence

import h5py
import nibabel as nib
import numpy as np

from arco_jax.data.ssl4mis import SPLITS, TRAIN_SLICES_LIST, DataError

CLASS_NAMES = ("background", "RV", "myocardium", "LV")
NUM_CLASSES = len(CLASS_NAMES)
PHASES = ("ED", "ES")
FRAME_NAME_OF_PHASE = {"ED": "frame01", "ES": "frame02"}
FIRST_SLICE_NUMBER = 1
MARKER_FILE = "conversion.json"
_PATIENT_RE = re.compile(r"patient\d+")
_MAX_REPORTED = 5


def _patients(*numbers: int) -> tuple[str, ...]:
    return tuple(f"patient{n:03d}" for n in numbers)


# The SSL4MIS ACDC split (data/ACDC/{train,val,test}.list of HiLab-git/SSL4MIS), in list order.
COMMUNITY_SPLIT: dict[str, tuple[str, ...]] = {
    "train": _patients(
        99, 38, 50, 100, 58, 21, 49, 20, 72, 40, 60, 89, 4, 56, 98, 96, 31, 18, 94, 47, 48, 55,
        97, 74, 43, 41, 63, 37, 95, 54, 26, 88, 32, 69, 6, 71, 12, 73, 61, 17, 25, 10, 57, 29,
        51, 5, 36, 46, 62, 34, 76, 92, 70, 77, 67, 3, 91, 16, 14, 44, 42, 90, 53, 27, 35, 86,
        23, 9, 79, 15),
    "val": _patients(28, 85, 82, 87, 19, 30, 78, 45, 2, 39),
    "test": _patients(11, 13, 84, 33, 93, 22, 68, 24, 83, 81, 80, 1, 7, 66, 8, 65, 75, 64, 59, 52),
}

# SSL4MIS data/ACDC/train_slices.list, one line per case: "<case>: slice numbers in list order".
# The full list is these 140 lines expanded to "<case>_slice_<k>" (1312 slices).
COMMUNITY_SLICE_ORDER = """\
patient099_frame01: 15 11 1 16 9 7 4 13 8 5 14 6 12 3 10 2
patient099_frame02: 5 9 11 2 3 10 1 15 14 4 6 16 13 8 12 7
patient038_frame01: 5 3 4 7 6 2 1 8
patient038_frame02: 8 5 1 7 4 3 6 2
patient050_frame01: 8 3 5 10 6 4 7 2 1 9
patient050_frame02: 10 8 5 3 7 2 1 4 9 6
patient100_frame01: 3 1 5 2 8 7 4 6
patient100_frame02: 1 5 6 8 4 2 7 3
patient058_frame01: 2 3 9 6 8 1 7 5 4
patient058_frame02: 2 9 3 7 1 4 5 6 8
patient021_frame01: 2 4 10 3 1 7 6 9 8 5
patient021_frame02: 9 6 8 7 10 5 2 1 3 4
patient049_frame01: 1 3 5 2 7 4 6
patient049_frame02: 4 6 1 7 3 2 5
patient020_frame01: 8 6 2 1 7 3 4 5
patient020_frame02: 7 5 2 6 8 3 4 1
patient072_frame01: 7 4 2 1 3 8 6 5
patient072_frame02: 7 3 5 1 4 8 6 2
patient040_frame01: 2 5 9 1 3 6 4 7 10 8
patient040_frame02: 8 3 2 9 5 4 6 10 7 1
patient060_frame01: 1 8 7 4 5 6 3 2 9
patient060_frame02: 3 9 8 6 5 7 2 1 4
patient089_frame01: 6 3 2 5 4 1
patient089_frame02: 2 6 3 5 4 1
patient004_frame01: 5 8 2 7 4 1 9 10 6 3
patient004_frame02: 9 4 3 6 7 8 2 1 5 10
patient056_frame01: 2 8 4 3 9 6 1 5 7
patient056_frame02: 4 8 3 6 7 5 1 9 2
patient098_frame01: 2 6 4 7 5 1 3
patient098_frame02: 4 3 5 1 2 6 7
patient096_frame01: 15 12 4 3 9 2 16 17 8 18 11 7 1 10 6 14 5 13
patient096_frame02: 17 8 4 15 14 12 1 16 3 6 2 11 13 10 7 9 18 5
patient031_frame01: 3 2 6 9 1 5 8 10 4 7
patient031_frame02: 10 5 9 4 7 2 1 6 8 3
patient018_frame01: 5 1 6 4 2 3 7 8
patient018_frame02: 5 3 1 6 7 2 8 4
patient094_frame01: 10 9 3 5 1 7 4 8 2 6
patient094_frame02: 8 1 3 10 2 6 5 9 7 4
patient047_frame01: 3 4 9 8 2 7 5 1 6
patient047_frame02: 8 3 7 2 6 9 5 1 4
patient048_frame01: 2 8 3 5 6 4 7 1
patient048_frame02: 5 3 2 1 4 7 8 6
patient055_frame01: 5 8 1 2 6 4 9 3 7
patient055_frame02: 6 9 1 2 7 5 4 8 3
patient097_frame01: 8 4 2 7 6 1 5 3
patient097_frame02: 8 2 6 3 7 4 5 1
patient074_frame01: 5 3 2 6 1 8 4 7
patient074_frame02: 7 6 1 8 5 3 2 4
patient043_frame01: 9 3 10 11 6 12 5 1 4 2 7 8
patient043_frame02: 6 1 5 7 8 11 2 9 4 10 12 3
patient041_frame01: 1 5 2 3 4 6
patient041_frame02: 1 3 2 4 6 5
patient063_frame01: 3 7 1 8 4 2 5 6
patient063_frame02: 8 6 3 7 5 4 1 2
patient037_frame01: 2 6 7 1 4 5 3
patient037_frame02: 6 2 1 7 4 5 3
patient095_frame01: 5 10 12 2 13 8 4 7 1 6 11 3 14 9
patient095_frame02: 12 2 10 6 14 7 3 13 5 9 4 8 11 1
patient054_frame01: 7 1 6 8 2 3 4 5
patient054_frame02: 8 7 4 5 2 6 3 1
patient026_frame01: 6 8 3 7 10 2 9 5 4 1
patient026_frame02: 6 1 3 7 10 9 2 4 5 8
patient088_frame01: 6 15 1 9 8 12 11 13 3 10 2 7 4 16 5 14
patient088_frame02: 4 12 3 5 2 13 6 15 10 11 1 16 7 14 9 8
patient032_frame01: 5 3 4 7 10 8 6 9 1 2
patient032_frame02: 8 2 5 3 10 4 7 6 1 9
patient069_frame01: 1 3 6 4 7 2 5
patient069_frame02: 5 3 4 2 7 1 6
patient006_frame01: 6 10 11 3 8 9 2 5 1 4 7
patient006_frame02: 9 10 4 5 2 3 7 1 6 11 8
patient071_frame01: 8 9 7 5 6 1 10 3 2 4
patient071_frame02: 8 2 4 7 1 3 9 6 5 10
patient012_frame01: 5 1 8 7 3 10 2 6 4 9
patient012_frame02: 8 4 9 7 6 2 3 5 10 1
patient073_frame01: 3 7 5 1 4 2 6
patient073_frame02: 5 7 4 1 3 2 6
patient061_frame01: 4 7 2 5 8 3 1 9 6
patient061_frame02: 8 4 2 3 9 7 5 6 1
patient017_frame01: 4 8 6 2 3 5 9 7 1
patient017_frame02: 3 5 4 8 6 7 1 2 9
patient025_frame01: 7 8 6 1 5 4 3 9 2
patient025_frame02: 3 6 2 1 5 8 7 9 4
patient010_frame01: 9 10 1 2 7 3 8 6 4 5
patient010_frame02: 8 5 9 4 10 2 7 1 3 6
patient057_frame01: 1 7 5 2 3 8 4 6
patient057_frame02: 7 4 1 5 6 3 8 2
patient029_frame01: 9 1 5 7 11 3 4 6 10 8 2
patient029_frame02: 6 8 2 3 10 1 11 4 9 7 5
patient051_frame01: 7 9 3 4 10 8 2 1 6 5
patient051_frame02: 5 10 1 4 3 8 9 7 6 2
patient005_frame01: 3 8 9 1 5 2 4 6 10 7
patient005_frame02: 4 8 3 2 7 10 9 6 5 1
patient036_frame01: 5 2 8 7 1 4 6 3
patient036_frame02: 6 1 8 5 7 3 4 2
patient046_frame01: 6 1 3 7 8 5 4 2 9
patient046_frame02: 1 7 9 6 3 8 5 2 4
patient062_frame01: 1 10 4 9 8 7 2 3 5 6
patient062_frame02: 9 2 7 6 5 10 3 4 1 8
patient034_frame01: 6 2 7 8 9 10 1 4 5 3
patient034_frame02: 1 3 5 10 9 4 8 6 7 2
patient076_frame01: 1 5 6 3 7 2 4 8
patient076_frame02: 6 5 4 3 2 1 8 7
patient092_frame01: 3 9 12 4 6 7 2 11 5 10 13 14 1 8 15
patient092_frame02: 8 1 5 12 14 9 3 6 13 15 11 7 10 4 2
patient070_frame01: 3 4 1 6 5 2
patient070_frame02: 4 2 1 6 3 5
patient077_frame01: 6 4 5 7 8 1 2 3
patient077_frame02: 3 2 7 4 1 8 5 6
patient067_frame01: 8 2 1 3 6 7 4 10 9 5
patient067_frame02: 10 7 6 8 9 4 3 1 5 2
patient003_frame01: 5 3 8 4 2 6 9 10 7 1
patient003_frame02: 2 5 9 6 8 3 7 1 4 10
patient091_frame01: 2 8 6 5 7 4 1 3
patient091_frame02: 6 7 4 1 2 5 3 8
patient016_frame01: 9 5 1 2 8 10 6 3 7 4
patient016_frame02: 2 3 8 5 1 6 4 9 7 10
patient014_frame01: 5 9 1 8 6 2 3 4 7 10
patient014_frame02: 6 3 5 10 7 9 8 2 1 4
patient044_frame01: 4 6 9 5 7 1 8 2 3
patient044_frame02: 3 5 1 7 2 9 6 4 8
patient042_frame01: 2 6 3 8 7 5 4 9 1
patient042_frame02: 4 2 5 9 1 6 8 3 7
patient090_frame01: 4 3 7 6 2 5 1
patient090_frame02: 1 4 2 7 5 3 6
patient053_frame01: 1 7 5 6 3 4 2
patient053_frame02: 2 6 4 5 7 1 3
patient027_frame01: 2 5 6 10 1 4 7 8 9 3
patient027_frame02: 5 9 7 6 1 8 4 3 2 10
patient035_frame01: 8 6 11 5 2 3 9 12 10 7 13 1 4
patient035_frame02: 9 4 3 13 12 10 8 6 1 2 5 11 7
patient086_frame01: 6 5 3 4 7 2 1
patient086_frame02: 1 5 3 2 7 6 4
patient023_frame01: 7 1 5 2 4 8 9 3 6
patient023_frame02: 7 6 9 2 5 1 3 8 4
patient009_frame01: 4 10 7 5 2 6 8 3 1 9
patient009_frame02: 2 4 7 10 9 1 5 8 6 3
patient079_frame01: 5 4 1 2 8 9 6 3 7
patient079_frame02: 6 5 1 4 8 9 7 2 3
patient015_frame01: 6 7 9 1 5 8 4 3 2
patient015_frame02: 5 1 6 3 2 7 4 9 8
"""


@functools.cache
def community_slice_order() -> Mapping[str, tuple[int, ...]]:
    """Case name -> its slice numbers in community train_slices.list order (cases in list order)."""
    order = {}
    for line in COMMUNITY_SLICE_ORDER.splitlines():
        case, _, numbers = line.partition(":")
        order[case] = tuple(int(n) for n in numbers.split())
    return types.MappingProxyType(order)  # cached: read-only


def community_train_slices() -> list[str]:
    """The 1312 lines of the community train_slices.list, in order."""
    return [slice_name(case, n) for case, numbers in community_slice_order().items()
            for n in numbers]


def case_name(patient: str, phase: str) -> str:
    """('patient001', 'ES') -> 'patient001_frame02'."""
    return f"{patient}_{FRAME_NAME_OF_PHASE[phase]}"


def slice_name(case: str, number: int) -> str:
    return f"{case}_slice_{number}"


_CASE_NAME = r"(?P<case>(?P<patient>[^_]+)_frame(?P<frame>\d+))"
_CASE_NAME_RE = re.compile(_CASE_NAME)
_SLICE_NAME_RE = re.compile(_CASE_NAME + r"_slice_(?P<slice>\d+)")


def parse_case_name(case: str) -> tuple[str, int]:
    """'patient099_frame02' -> ('patient099', 2)."""
    match = _CASE_NAME_RE.fullmatch(case)
    if match is None:
        raise DataError(f"case name {case!r} is not '<patient>_frame<NN>'")
    return match["patient"], int(match["frame"])


class SliceName(NamedTuple):
    case: str
    patient: str
    frame: int
    slice: int


def parse_slice_name(name: str) -> SliceName:
    """'patient099_frame01_slice_15' -> SliceName('patient099_frame01', 'patient099', 1, 15)."""
    match = _SLICE_NAME_RE.fullmatch(name)
    if match is None:
        raise DataError(f"slice name {name!r} is not '<patient>_frame<NN>_slice_<k>'")
    return SliceName(match["case"], match["patient"], int(match["frame"]), int(match["slice"]))


# ----------------------------------------------------------------------------- the raw download


@dataclasses.dataclass(frozen=True)
class RawCase:
    """One labelled frame of the download and the SSL4MIS case it becomes."""

    name: str  # patient001_frame01
    patient: str
    phase: str  # 'ED' or 'ES'
    source_frame: int  # frame number in the download
    image_path: Path
    label_path: Path
    shape: tuple[int, int, int]  # (D, H, W), after reversing the NIfTI axes


@dataclasses.dataclass(frozen=True)
class ConversionPlan:
    """Everything the conversion will write, checked against the files before any voxel is read.

    cases: split -> cases in list order (each patient's ED case, then its ES case).
    train_slices: (case name, slice number) in train_slices.list order, grouped by case.
    """

    training_dir: Path
    community: bool
    cases: dict[str, tuple[RawCase, ...]]
    train_slices: tuple[tuple[str, int], ...]
    skipped_patients: tuple[str, ...]

    def train_slice_names(self) -> list[str]:
        return [slice_name(case, n) for case, n in self.train_slices]

    def patients(self, split: str) -> list[str]:
        return list(dict.fromkeys(c.patient for c in self.cases[split]))


class Volume(NamedTuple):
    """image (D, H, W) float32 in [0, 1], label (D, H, W) uint8, spacing (z, y, x) in mm."""

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]


def _shown(items: Sequence[str]) -> str:
    more = len(items) - _MAX_REPORTED
    return ", ".join(items[:_MAX_REPORTED]) + (f" and {more} more" if more > 0 else "")


def _patient_dirs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()
                  if p.is_dir() and _PATIENT_RE.fullmatch(p.name))


def find_training_dir(raw_dir: str | os.PathLike) -> Path:
    """The folder holding the patientNNN folders: raw_dir, raw_dir/training or
    raw_dir/database/training (the layouts of the ACDC zip files)."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DataError(f"raw ACDC folder {raw_dir} does not exist or is not a directory")
    for candidate in (raw_dir, raw_dir / "training", raw_dir / "database" / "training"):
        if candidate.is_dir() and _patient_dirs(candidate):
            return candidate
    raise DataError(f"{raw_dir} holds no patientNNN folders (looked in it, in training/ and in "
                    "database/training/): expected the ACDC download, training/patientNNN/...")


def read_ed_es(info_path: Path) -> dict[str, int]:
    """{'ED': frame, 'ES': frame} from a patient's Info.cfg ('key: value' lines)."""
    if not info_path.is_file():
        raise DataError(f"{info_path} is missing: it names the patient's ED and ES frames")
    values = {}
    for line in info_path.read_text(errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip()
    frames = {}
    for phase in PHASES:
        if phase not in values:
            raise DataError(f"{info_path}: no '{phase}:' line (found keys {sorted(values)})")
        try:
            frames[phase] = int(values[phase])
        except ValueError:
            raise DataError(
                f"{info_path}: {phase} frame {values[phase]!r} is not an integer") from None
        if frames[phase] < 1:
            raise DataError(f"{info_path}: {phase} frame {frames[phase]} is not a frame number")
    if frames["ED"] == frames["ES"]:
        raise DataError(f"{info_path}: ED and ES name the same frame {frames['ED']}")
    return frames


def _load_nifti(path: Path):
    """The nibabel image (header read, voxels not yet), checked to be 3-D."""
    if not path.is_file():
        raise DataError(f"{path} is missing")
    try:
        image = nib.load(path)
    except Exception as err:  # nibabel raises several types for a damaged or foreign file
        raise DataError(f"{path}: cannot be read as NIfTI ({err})") from err
    if len(image.shape) != 3:
        raise DataError(f"{path}: a frame must be a 3-D NIfTI (x, y, z), got shape {image.shape}")
    return image


def _plan_case(patient_dir: Path, patient: str, phase: str, frame: int) -> RawCase:
    stem = f"{patient}_frame{frame:02d}"
    image_path = patient_dir / f"{stem}.nii.gz"
    label_path = patient_dir / f"{stem}_gt.nii.gz"
    for path, what in ((image_path, "image"), (label_path, "ground truth")):
        if not path.is_file():
            raise DataError(f"{path} is missing: the {phase} frame {frame} {what} "
                            f"(Info.cfg of {patient})")
    x, y, z = _load_nifti(image_path).shape
    label_shape = _load_nifti(label_path).shape
    if label_shape != (x, y, z):
        raise DataError(f"{label_path}: ground truth shape {label_shape} differs from the image "
                        f"{image_path.name} shape {(x, y, z)}")
    return RawCase(case_name(patient, phase), patient, phase, frame, image_path, label_path,
                   (z, y, x))


def normalize_split(split: Mapping[str, Sequence[str | int]]) -> dict[str, tuple[str, ...]]:
    """{'train', 'val', 'test'} -> patient names (ints become 'patient%03d'), checked to be a
    split: every key present, no patient twice."""
    if set(split) != set(SPLITS):
        raise DataError(f"a split names patients for exactly {SPLITS}, got keys {sorted(split)}")
    out, seen = {}, {}
    for name in SPLITS:
        patients = tuple(f"patient{p:03d}" if isinstance(p, int) else str(p) for p in split[name])
        if not patients:
            raise DataError(f"split {name!r} names no patient")
        for patient in patients:
            if not _PATIENT_RE.fullmatch(patient):
                raise DataError(
                    f"split {name!r}: {patient!r} is not a patient name like patient001")
            if patient in seen:
                raise DataError(f"{patient} is in split {seen[patient]!r} and again in {name!r}")
            seen[patient] = name
        out[name] = patients
    return out


def read_split_file(path: str | os.PathLike) -> dict[str, tuple[str, ...]]:
    """A JSON split file: {"train": [...], "val": [...], "test": [...]} of patient names."""
    path = Path(path)
    try:
        split = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"split file {path}: {err}") from err
    if not isinstance(split, dict):
        raise DataError(f"split file {path}: expected a JSON object with train, val and test")
    return normalize_split(split)


def plan_conversion(raw_dir: str | os.PathLike,
                    split: Mapping[str, Sequence[str | int]] | None = None) -> ConversionPlan:
    """Checks the download and lays out the conversion; reads NIfTI headers, no voxels.

    split None: the SSL4MIS community split and slice order (needs the 100 training patients with
    the official slice counts). Otherwise {'train', 'val', 'test'} -> patient names, training
    slices in ascending order. Patients present but in no split are skipped (and reported).
    """
    training_dir = find_training_dir(raw_dir)
    community = split is None
    patients_of = COMMUNITY_SPLIT if community else normalize_split(split)
    wanted = [p for name in SPLITS for p in patients_of[name]]
    present = _patient_dirs(training_dir)
    missing = sorted(set(wanted) - set(present))
    if missing:
        what = "the SSL4MIS community split" if community else "the split"
        raise DataError(f"{training_dir}: {len(missing)} patients of {what} are missing: "
                        f"{_shown(missing)}")
    cases = {}
    for name in SPLITS:
        cases[name] = tuple(
            _plan_case(training_dir / patient, patient, phase, frame)
            for patient in patients_of[name]
            for phase, frame in read_ed_es(training_dir / patient / "Info.cfg").items())
    if community:
        order = community_slice_order()
        for case in cases["train"]:
            if len(order[case.name]) != case.shape[0]:
                raise DataError(
                    f"{case.image_path}: {case.shape[0]} slices, but the community "
                    f"train_slices.list has {len(order[case.name])} for {case.name}; is this the "
                    "official ACDC training set? Pass an explicit split for other data")
        train_slices = tuple((case, n) for case, numbers in order.items() for n in numbers)
    else:
        train_slices = tuple((case.name, FIRST_SLICE_NUMBER + i) for case in cases["train"]
                             for i in range(case.shape[0]))
    skipped = tuple(sorted(set(present) - set(wanted)))
    return ConversionPlan(training_dir, community, cases, train_slices, skipped)


def _read_voxels(path: Path, image) -> np.ndarray:
    try:
        return np.asanyarray(image.dataobj)
    except (OSError, EOFError, ValueError, zlib.error) as err:
        raise DataError(f"{path}: voxel data cannot be read ({err})") from err


def read_case(case: RawCase, num_classes: int = NUM_CLASSES) -> Volume:
    """The case as SSL4MIS stores it: (D, H, W) image min-max normalised to [0, 1] float32,
    uint8 label, and the (z, y, x) spacing of the image header; bad content raises DataError."""
    nifti = _load_nifti(case.image_path)
    raw = _read_voxels(case.image_path, nifti)
    if not np.issubdtype(raw.dtype, np.number):
        raise DataError(f"{case.image_path}: non-numeric voxel type {raw.dtype}")
    image = raw.astype(np.float64)
    if not np.isfinite(image).all():
        raise DataError(f"{case.image_path}: non-finite intensities "
                        f"(e.g. {image[~np.isfinite(image)][0]})")
    low, high = image.min(), image.max()
    if high <= low:
        raise DataError(f"{case.image_path}: every voxel is {low}; min-max normalisation is "
                        "undefined")
    image = ((image - low) / (high - low)).astype(np.float32)

    label = _read_voxels(case.label_path, _load_nifti(case.label_path))
    if not np.issubdtype(label.dtype, np.number):
        raise DataError(f"{case.label_path}: non-numeric label type {label.dtype}")
    outside = (~np.isfinite(label) | (label < 0) | (label >= num_classes)
               | (label != np.round(label)))
    if outside.any():
        raise DataError(f"{case.label_path}: label value {label[outside][0]} is not a class in "
                        f"[0, {num_classes})")

    zooms = tuple(float(z) for z in nifti.header.get_zooms()[:3])
    if not all(np.isfinite(z) and z > 0 for z in zooms):
        raise DataError(f"{case.image_path}: voxel sizes {zooms} in the header are not positive")
    x_size, y_size, z_size = zooms
    return Volume(np.ascontiguousarray(image.transpose(2, 1, 0)),
                  np.ascontiguousarray(label.transpose(2, 1, 0)).astype(np.uint8),
                  (z_size, y_size, x_size))


def iterate_train_slices(plan: ConversionPlan) -> Iterator[tuple[RawCase, int, Volume]]:
    """(case, slice number, the case's volume) in train_slices.list order; each volume is read
    once because the list groups slices by case."""
    cases = {case.name: case for case in plan.cases["train"]}
    current_name, current = None, None
    for name, number in plan.train_slices:
        if name != current_name:
            current_name, current = name, read_case(cases[name])
        yield cases[name], number, current


# ----------------------------------------------------------------------------- writing


def _write_h5(path: Path, image: np.ndarray, label: np.ndarray, attrs: dict) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image, compression="gzip")
        f.create_dataset("label", data=label, compression="gzip")
        for key, value in attrs.items():
            f.attrs[key] = value


def _write_layout(plan: ConversionPlan, root: Path, log: Callable[[str], None]) -> dict:
    slices_dir = root / "data" / "slices"
    slices_dir.mkdir(parents=True)
    total = sum(len(cases) for cases in plan.cases.values())
    done = 0
    for split in SPLITS:
        for case in plan.cases[split]:
            volume = read_case(case)
            attrs = {"spacing": np.asarray(volume.spacing, np.float64), "phase": case.phase,
                     "source_frame": case.source_frame}
            _write_h5(root / "data" / f"{case.name}.h5", volume.image, volume.label, attrs)
            for index in range(volume.image.shape[0]):
                name = slice_name(case.name, FIRST_SLICE_NUMBER + index)
                _write_h5(slices_dir / f"{name}.h5", volume.image[index], volume.label[index],
                          attrs)
            done += 1
            log(f"{case.name} ({case.phase}, frame {case.source_frame}, {volume.image.shape}) "
                f"{done}/{total}")
        (root / f"{split}.list").write_text("".join(f"{c.name}\n" for c in plan.cases[split]))
    train_slices = plan.train_slice_names()
    (root / TRAIN_SLICES_LIST).write_text("".join(f"{n}\n" for n in train_slices))
    return {"train_slices": len(train_slices),
            **{f"{s}_volumes": len(plan.cases[s]) for s in SPLITS},
            "slice_files": sum(c.shape[0] for cases in plan.cases.values() for c in cases)}


def convert(raw_dir: str | os.PathLike, out_dir: str | os.PathLike,
            split: Mapping[str, Sequence[str | int]] | None = None,
            log: Callable[[str], None] = lambda message: None) -> Path:
    """Writes the SSL4MIS layout of the download to out_dir; all or nothing.

    Everything is checked (files, Info.cfg, headers, shapes) before the first write; files go to a
    temporary sibling folder renamed to out_dir only when complete. split: see plan_conversion.
    Raises DataError on bad input, FileExistsError if out_dir exists.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; the converter never overwrites")
    plan = plan_conversion(raw_dir, split)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        counts = _write_layout(plan, staging, log)
        marker = {"source": "ACDC NIfTI download", "training_dir": str(plan.training_dir),
                  "split": "ssl4mis-community" if plan.community else "custom",
                  "patients": {s: plan.patients(s) for s in SPLITS},
                  "skipped_patients": list(plan.skipped_patients),
                  "slice_numbering": f"from {FIRST_SLICE_NUMBER}", "frames": FRAME_NAME_OF_PHASE,
                  "class_names": list(CLASS_NAMES), **counts}
        (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m arco_jax.data.acdc",
        description="Convert the ACDC NIfTI download into the SSL4MIS processed layout.")
    parser.add_argument("--raw_dir", required=True,
                        help="the unzipped download (holding training/patientNNN/ or the patients)")
    parser.add_argument("--out_dir", required=True, help="new folder for the SSL4MIS layout")
    parser.add_argument("--split_file", default=None,
                        help='JSON {"train": [...], "val": [...], "test": [...]} of patient names; '
                             "default: the SSL4MIS community split of the 100 training patients")
    args = parser.parse_args(argv)
    try:
        split = read_split_file(args.split_file) if args.split_file else None
        out = convert(args.raw_dir, args.out_dir, split, log=print)
    except (DataError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    marker = json.loads((out / MARKER_FILE).read_text())
    print(f"wrote {out}: {marker['train_slices']} training slices, "
          + ", ".join(f"{marker[f'{s}_volumes']} {s}" for s in SPLITS) + " volumes"
          + (f"; skipped {', '.join(marker['skipped_patients'])}"
             if marker["skipped_patients"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
