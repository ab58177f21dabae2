"""Convert the MM-WHS release (Multi-Modality Whole Heart Segmentation, 20 CT and 20 MR training
volumes) into the nnU-Net folder that data/nifti_folder.py reads and configs/mmwhs.py trains on:

  python -m arco_jax.data.convert_mmwhs --raw_dir=/path/to/MM-WHS/ct_train --out_dir=/path/to/MMWHS_CT
      [--modality=ct|mr]

raw_dir holds the official files, <modality>_train_<NNNN>_image.nii.gz and
<modality>_train_<NNNN>_label.nii.gz (NNNN = 1001 .. 1020), in any subfolders. The label codes
map to classes as the challenge defines them:

  205 myocardium (Myo) -> 1    420 left atrium (LA) -> 2     500 left ventricle (LV) -> 3
  550 right atrium (RA) -> 4   600 right ventricle (RV) -> 5  820 ascending aorta (AA) -> 6
  850 pulmonary artery (PA) -> 7                             0 background -> 0

and any other code is an error naming the file. Written: imagesTr/mmwhs_<modality>_NNNN_0000.nii.gz
(as stored), labelsTr/... (0 .. 7), dataset.json (channel 'CT' or 'MR'), and ARCO's 15 / 5 split
as lists: train.txt (the first 15 volumes by number) and test.txt (the last 5; the paper states
the sizes, not the cases). Nothing is written unless every case converts.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

from arco_jax.data import nnunet_writer
from arco_jax.data.ssl4mis import DataError

LABEL_CODES = {0: 0, 205: 1, 420: 2, 500: 3, 550: 4, 600: 5, 820: 6, 850: 7}
CLASSES = {"background": 0, "Myo": 1, "LA": 2, "LV": 3, "RA": 4, "RV": 5, "AA": 6, "PA": 7}
MODALITIES = ("ct", "mr")
TRAIN_COUNT = 15  # ARCO: 15 training and 5 test volumes.


def case_id(modality: str, number: int) -> str:
    return f"mmwhs_{modality}_{number:04d}"


def map_labels(codes: np.ndarray, path: Path) -> np.ndarray:
    """Challenge label codes -> classes 0 .. 7; any other code is an error naming the file."""
    values = np.unique(codes)
    unknown = [v for v in values.tolist() if v not in LABEL_CODES]
    if unknown:
        shown = ", ".join(str(int(v)) if float(v).is_integer() else str(v) for v in unknown[:5])
        raise DataError(f"{path}: label codes {shown} are not MM-WHS codes ({', '.join(map(str, LABEL_CODES))})")
    table = np.zeros(max(LABEL_CODES) + 1, np.uint8)
    for code, cls in LABEL_CODES.items():
        table[code] = cls
    return table[codes.astype(np.int64)]


def find_pairs(raw_dir: str | Path, modality: str) -> dict[int, tuple[Path, Path]]:
    raw_dir = Path(raw_dir)
    if modality not in MODALITIES:
        raise DataError(f"--modality {modality!r} is not one of {', '.join(MODALITIES)}")
    if not raw_dir.is_dir():
        raise DataError(f"{raw_dir} is not a directory")
    pattern = re.compile(rf"^{modality}_train_(\d+)_(image|label)\.nii(\.gz)?$")
    found: dict[str, dict[int, Path]] = {"image": {}, "label": {}}
    for path in sorted(raw_dir.rglob("*.nii*")):
        match = pattern.match(path.name)
        if match:
            number, kind = int(match.group(1)), match.group(2)
            if number in found[kind]:
                raise DataError(f"{path}: volume {number}'s {kind} is also {found[kind][number]}")
            found[kind][number] = path
    if not found["image"]:
        raise DataError(f"{raw_dir} holds no {modality}_train_NNNN_image.nii.gz files (the MM-WHS training release)")
    for kind, other in (("image", "label"), ("label", "image")):
        for number, path in found[kind].items():
            if number not in found[other]:
                raise DataError(f"{path}: no {modality}_train_{number}_{other}.nii.gz beside it")
    return {n: (found["image"][n], found["label"][n]) for n in sorted(found["image"])}


def convert(raw_dir: str | Path, out_dir: str | Path, modality: str = "ct") -> Path:
    """Write the nnU-Net folder; returns it."""
    pairs = find_pairs(raw_dir, modality)
    if len(pairs) <= TRAIN_COUNT:
        print(f"warning: {len(pairs)} volumes; ARCO's split takes {TRAIN_COUNT} for training and the rest for test",
              file=sys.stderr)

    def add_case(writer: nnunet_writer.FolderWriter, number: int) -> None:
        image_path, label_path = pairs[number]
        image, label = nnunet_writer.check_pair(image_path, label_path)
        voxels = nnunet_writer.read_voxels(image, image_path)
        codes = nnunet_writer.read_voxels(label, label_path)
        writer.add(case_id(modality, number), image, voxels, map_labels(codes, label_path))

    def finish(writer: nnunet_writer.FolderWriter) -> Path:
        numbers = list(pairs)
        lists = {"train": [case_id(modality, n) for n in numbers[:TRAIN_COUNT]],
                 "test": [case_id(modality, n) for n in numbers[TRAIN_COUNT:]]}
        return writer.commit({"0": modality.upper()}, CLASSES, lists,
                             {"name": f"MM-WHS {modality.upper()}",
                              "description": "MM-WHS training release, converted by arco_jax",
                              "reference": "Zhuang et al., Multi-Modality Whole Heart Segmentation (MM-WHS), 2019"})

    return nnunet_writer.convert(out_dir, pairs, add_case, finish)


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw_dir", required=True, help="The MM-WHS release folder (e.g. ct_train).")
    parser.add_argument("--out_dir", required=True, help="The nnU-Net folder to write (must not exist).")
    parser.add_argument("--modality", default="ct", choices=MODALITIES)
    args = parser.parse_args(argv)
    try:
        out = convert(args.raw_dir, args.out_dir, args.modality)
    except DataError as err:
        sys.exit(f"error: {err}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
