"""Writes a dataset folder in nnU-Net's layout (the one data/nifti_folder.py reads) from another
release's files: the shared half of the LiTS and MM-WHS converters.

The folder is built under a temporary name beside the destination and renamed at the end, so an
interrupted or failed conversion leaves nothing behind (and no half-written destination); a
destination that exists already is refused, never overwritten.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import nibabel as nib
import numpy as np

from arco_jax.data import nifti_folder
from arco_jax.data.ssl4mis import DataError

def load_volume(path: Path):
    """A 3-D NIfTI image (errors name the file)."""
    try:
        image = nib.load(path)
    except Exception as err:  # nibabel raises many types (ImageFileError, EOFError, gzip errors).
        raise DataError(f"{path}: cannot be read as NIfTI ({type(err).__name__}: {err})") from err
    if len(image.shape) != 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {tuple(image.shape)}")
    return image


def check_pair(image_path: Path, label_path: Path):
    """(image, label) NIfTI images on one grid (headers only)."""
    image, label = load_volume(image_path), load_volume(label_path)
    nifti_folder.check_same_grid(label_path, label, image_path, image)
    return image, label


def read_voxels(image, path: Path) -> np.ndarray:
    """The voxels as stored (float32), checked finite; errors name the file."""
    try:
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except Exception as err:  # A truncated or corrupt data block only shows here.
        raise DataError(f"{path}: the voxel data cannot be read ({type(err).__name__}: {err})") from err
    bad = ~np.isfinite(data)
    if bad.any():
        raise DataError(f"{path}: {int(bad.sum())} voxel(s) are not finite (NaN or infinite intensities)")
    return data


def integral_int16(voxels: np.ndarray) -> bool:
    info = np.iinfo(np.int16)
    return bool(voxels.size and voxels.min() >= info.min and voxels.max() <= info.max
                and np.array_equal(voxels, np.round(voxels)))


class FolderWriter:
    """Collects cases into a temporary nnU-Net folder; `commit` renames it to the destination."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists():
            raise DataError(f"{self.out_dir} exists already; give a new folder (nothing is overwritten)")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(dir=self.out_dir.parent, prefix=f".{self.out_dir.name}.partial-"))
        (self.work / nifti_folder.IMAGES).mkdir()
        (self.work / nifti_folder.LABELS).mkdir()
        self.cases: list[str] = []

    def add(self, case: str, image, voxels: np.ndarray, labels: np.ndarray) -> None:
        """One case: its image (voxels in the image's array order, on the image's grid) and labels.
        Integer intensities that fit (CT in HU) are stored as int16, others as float32."""
        image_dtype = np.int16 if integral_int16(voxels) else np.float32
        header = image.header.copy()
        header.set_data_dtype(image_dtype)
        scan = nib.Nifti1Image(voxels.astype(image_dtype), image.affine, header)
        scan.header.set_slope_inter(1.0, 0.0)
        nib.save(scan, self.work / nifti_folder.IMAGES / f"{case}_0000.nii.gz")
        label_header = image.header.copy()
        label_header.set_data_dtype(np.uint8)
        label = nib.Nifti1Image(labels.astype(np.uint8), image.affine, label_header)
        label.header.set_slope_inter(1.0, 0.0)
        label.header.set_intent("label")
        nib.save(label, self.work / nifti_folder.LABELS / f"{case}.nii.gz")
        self.cases.append(case)

    def commit(self, channel_names: dict, labels: dict, lists: dict[str, list[str]], extra: dict) -> Path:
        """Write dataset.json and the split lists (<name>.txt), then move the folder into place."""
        meta = {"channel_names": channel_names, "labels": labels, "numTraining": len(self.cases),
                "file_ending": ".nii.gz", **extra}
        (self.work / nifti_folder.DATASET_JSON).write_text(json.dumps(meta, indent=1) + "\n")
        for name, cases in lists.items():
            (self.work / f"{name}.txt").write_text("".join(f"{c}\n" for c in cases))
        self.work.rename(self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def convert(out_dir: str | Path, cases: Iterable, add_case: Callable[[FolderWriter, object], None],
            finish: Callable[[FolderWriter], Path]) -> Path:
    """Run a conversion: add_case(writer, case) for each case, then finish(writer) -> the folder.
    Any error removes the temporary folder and is re-raised."""
    writer = FolderWriter(out_dir)
    try:
        for case in cases:
            add_case(writer, case)
        return finish(writer)
    except BaseException:
        writer.abort()
        raise
