"""Convert the LiTS release (Liver Tumor Segmentation Challenge, 131 training CTs) into the
nnU-Net folder that data/nifti_folder.py reads and configs/lits.py trains on:

  python -m arco_jax.data.convert_lits --raw_dir=/path/to/LiTS --out_dir=/path/to/LiTS_nnunet

raw_dir holds the official download as it unpacks: volume-N.nii and segmentation-N.nii (or
.nii.gz), N = 0 .. 130, in any subfolders (e.g. 'Training Batch 1', 'Training Batch 2').
Written: imagesTr/lits_NNN_0000.nii.gz (HU as stored, int16), labelsTr/lits_NNN.nii.gz (0
background, 1 liver, 2 lesion), dataset.json (channel 'CT'), and ARCO's case split as lists:
train.txt (volumes 0 .. 99, the paper's cases 1-100) and test.txt (volumes 100 .. 130, cases
101-131). The HU window [-200, 250] scaled to [0, 1] is configs/lits.py's normalisation
(data.ct_window), applied when the folder is read, so the folder keeps the scans as released.

Checks, each naming the file: every volume has its segmentation and vice versa, both 3-D on one
grid (shape and affine), finite intensities, labels in {0, 1, 2}; nothing is written unless
every case converts (the folder is built under a temporary name and renamed at the end).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

from arco_jax.data import nnunet_writer
from arco_jax.data.ssl4mis import DataError

PATTERN = re.compile(r"^(volume|segmentation)-(\d+)\.nii(\.gz)?$")
CLASSES = {"background": 0, "liver": 1, "lesion": 2}
TRAIN_CASES = range(0, 100)  # ARCO: training 1-100 (1-based), test 101-131.
TEST_CASES = range(100, 131)


def case_id(number: int) -> str:
    return f"lits_{number:03d}"


def find_pairs(raw_dir: str | Path) -> dict[int, tuple[Path, Path]]:
    """{N: (volume-N, segmentation-N)} found anywhere under raw_dir."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DataError(f"{raw_dir} is not a directory")
    found: dict[str, dict[int, Path]] = {"volume": {}, "segmentation": {}}
    for path in sorted(raw_dir.rglob("*.nii*")):
        match = PATTERN.match(path.name)
        if not match:
            continue
        kind, number = match.group(1), int(match.group(2))
        if number in found[kind]:
            raise DataError(f"{path}: {kind}-{number} is also {found[kind][number]}")
        found[kind][number] = path
    if not found["volume"]:
        raise DataError(f"{raw_dir} holds no volume-N.nii files (the LiTS training release)")
    for kind, other in (("volume", "segmentation"), ("segmentation", "volume")):
        for number, path in found[kind].items():
            if number not in found[other]:
                raise DataError(f"{path}: no {other}-{number}.nii beside it")
    return {n: (found["volume"][n], found["segmentation"][n]) for n in sorted(found["volume"])}


def convert(raw_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the nnU-Net folder; returns it."""
    pairs = find_pairs(raw_dir)

    def add_case(writer: nnunet_writer.FolderWriter, number: int) -> None:
        volume_path, label_path = pairs[number]
        image, label = nnunet_writer.check_pair(volume_path, label_path)
        voxels = nnunet_writer.read_voxels(image, volume_path)
        labels = nnunet_writer.read_voxels(label, label_path)
        bad = ~np.isin(labels, tuple(CLASSES.values()))
        if bad.any():
            values = ", ".join(f"{v:g}" for v in np.unique(labels[bad])[:5].tolist())
            raise DataError(f"{label_path}: label values {values} are not LiTS classes (0 background, 1 liver, "
                            "2 lesion)")
        writer.add(case_id(number), image, voxels, labels)

    def finish(writer: nnunet_writer.FolderWriter) -> Path:
        lists = {"train": [case_id(n) for n in pairs if n in TRAIN_CASES],
                 "test": [case_id(n) for n in pairs if n in TEST_CASES]}
        return writer.commit({"0": "CT"}, CLASSES, lists,
                             {"name": "LiTS", "description": "LiTS training release, converted by arco_jax",
                              "reference": "Bilic et al., The Liver Tumor Segmentation Benchmark (LiTS), 2023"})

    return nnunet_writer.convert(out_dir, pairs, add_case, finish)


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw_dir", required=True, help="The LiTS release: volume-N.nii, segmentation-N.nii.")
    parser.add_argument("--out_dir", required=True, help="The nnU-Net folder to write (must not exist).")
    args = parser.parse_args(argv)
    try:
        out = convert(args.raw_dir, args.out_dir)
    except DataError as err:
        sys.exit(f"error: {err}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
