"""ACDC as a TensorFlow Datasets dataset in array_record files, built and read without TensorFlow.

Why: array_record gives fast random access from any file system (local disk, GCS on a TPU VM)
without one small h5 file per slice, and Grain reads it directly. TFDS writes the records with its
own protobuf copy and reads them back with `as_data_source` in NumPy, so TensorFlow is never
imported (tests check it).

Builder `acdc`, two configs:
  'slices'   train split: image (H, W) float32, label (H, W) uint8, name, patient, frame, slice
             (the number in the name), order (the line of train_slices.list), spacing (z, y, x)
             when known. Records are in train_slices.list order, so records [0, K) are the
             labeled set of the SSL4MIS protocol.
  'volumes'  train / val / test splits: image (D, H, W), label (D, H, W), case, patient, frame,
             order (line of the split list), spacing when known. Records in list order.
The builder reads its manual_dir, which holds either the SSL4MIS processed layout
(train_slices.list, {train,val,test}.list, data/...) or the raw ACDC download (read with
arco_jax.data.acdc, community split). Build with `build_acdc(manual_dir, data_dir)` or
`python -m arco_jax.data.tfds_acdc --manual_dir M --data_dir D`; the files land in
<data_dir>/acdc/<config>/<version>/.

Readers: `tfds_slice_source` (a Grain RandomAccessDataSource for pipeline.make_stream),
`tfds_slice_names`, `tfds_labeled_slice_count` and `iterate_tfds_volumes` (as
ssl4mis.iterate_volumes). They open the prepared folder directly (tfds.builder_from_directory), so
reading needs neither this builder's code nor the TFDS registry.

The class is not put in the TFDS registry (skip_registration): `tfds.builder('acdc')` would clash
with any other dataset of that name, and nothing here needs the registry.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np
import tensorflow_datasets as tfds

from arco_jax.data import acdc, ssl4mis
from arco_jax.data.ssl4mis import DataError

NAME = "acdc"
DATASET_VERSION = "1.0.0"
CONFIGS = ("slices", "volumes")
FILE_FORMAT = "array_record"

_CITATION = r"""@article{bernard2018deep,
  title={Deep Learning Techniques for Automatic MRI Cardiac Multi-Structures Segmentation and
         Diagnosis: Is the Problem Solved?},
  author={Bernard, Olivier and Lalande, Alain and Zotti, Clement and Cervenansky, Frederick and
          others},
  journal={IEEE Transactions on Medical Imaging}, volume={37}, number={11}, pages={2514--2525},
  year={2018}
}"""

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
ACDC needs registration; TFDS cannot download it. Put one of these in manual_dir:

(a) The raw download. Register at https://www.creatis.insa-lyon.fr/Challenge/acdc/, download the
    training set (100 patients, NIfTI) and unzip it so that manual_dir holds
    training/patient001/ ... training/patient100/ (database/training/ or the patient folders
    directly also work), each with Info.cfg, patientNNN_frameYY.nii.gz and
    patientNNN_frameYY_gt.nii.gz. It is converted as SSL4MIS did, with the SSL4MIS community
    split (70 / 10 / 20 patients) and slice order.

(b) The SSL4MIS processed ACDC (as distributed by the SSL4MIS project, or written by
    `python -m arco_jax.data.acdc --raw_dir RAW --out_dir OUT`): train_slices.list, train.list,
    val.list, test.list, data/<case>.h5 and data/slices/<slice>.h5 (or data/<slice>.h5, where the
    SSL4MIS script writes them). Use this for other splits: convert with --split_file first.
"""


def _tensor(ndim: int, dtype) -> tfds.features.Tensor:
    # zlib: images are float32 and labels mostly zeros; the raw proto would upcast uint8 to int64.
    return tfds.features.Tensor(shape=(None,) * ndim, dtype=dtype, encoding="zlib")


def _features(config: str) -> tfds.features.FeaturesDict:
    ndim = 2 if config == "slices" else 3
    common = {
        "image": _tensor(ndim, np.float32),
        "label": _tensor(ndim, np.uint8),
        "patient": tfds.features.Text(),
        "frame": np.int32,
        "order": np.int32,
        "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32, optional=True),
    }
    if config == "slices":
        return tfds.features.FeaturesDict(
            {**common, "name": tfds.features.Text(), "slice": np.int32})
    return tfds.features.FeaturesDict({**common, "case": tfds.features.Text()})


def _read_spacing(path: Path) -> np.ndarray | None:
    """The (z, y, x) spacing attribute written by arco_jax.data.acdc, or None."""
    with h5py.File(path, "r") as f:
        spacing = f.attrs.get("spacing")
    if spacing is None:
        return None
    spacing = np.asarray(spacing, np.float32)
    if spacing.shape != (3,):
        raise DataError(f"{path}: attribute 'spacing' must be (z, y, x), got {spacing!r}")
    return spacing


class Acdc(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """ACDC cardiac MRI (background, RV, myocardium, LV), SSL4MIS layout and split."""

    name = NAME
    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "SSL4MIS layout and community split; array_record."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="slices",
                                description="Training slices in train_slices.list order."),
        tfds.core.BuilderConfig(name="volumes",
                                description="Train, val and test volumes in list order."),
    ]

    def __init__(self, *, file_format: str = FILE_FORMAT, **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="ACDC cine-MRI, ED and ES frames of 100 patients, as the SSL4MIS processed "
                        "layout: images min-max normalised per volume, labels 0 background, 1 RV, "
                        "2 myocardium, 3 LV. Records keep list order.",
            features=_features(self.builder_config.name),
            homepage="https://www.creatis.insa-lyon.fr/Challenge/acdc/",
            citation=_CITATION,
            disable_shuffling=True,  # record i is line i of the list: "first K" keeps its meaning
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)
        if (root / ssl4mis.TRAIN_SLICES_LIST).is_file():
            source, self.info.metadata["source"] = root, "ssl4mis"
        else:
            source = acdc.plan_conversion(root)
            self.info.metadata["source"] = "raw ACDC, SSL4MIS community split"
        splits = ("train",) if self.builder_config.name == "slices" else ssl4mis.SPLITS
        return {split: self._generate_examples(source, split) for split in splits}

    def _generate_examples(self, source: Path | acdc.ConversionPlan, split: str):
        """(list position, example) in list order: integer keys, which disable_shuffling keeps
        as the record order."""
        raw = isinstance(source, acdc.ConversionPlan)
        if self.builder_config.name == "slices":
            return _raw_slices(source) if raw else _ssl4mis_slices(source)
        return _raw_volumes(source, split) if raw else _ssl4mis_volumes(source, split)


def _slice_example(name: str, order: int, image, label, spacing) -> dict:
    parts = acdc.parse_slice_name(name)
    return {"image": image, "label": label, "name": name, "patient": parts.patient,
            "frame": parts.frame, "slice": parts.slice, "order": order, "spacing": spacing}


def _volume_example(case: str, order: int, image, label, spacing) -> dict:
    patient, frame = acdc.parse_case_name(case)
    return {"image": image, "label": label, "case": case, "patient": patient, "frame": frame,
            "order": order, "spacing": spacing}


def _ssl4mis_slices(root: Path):
    names = ssl4mis.list_train_slices(root)
    source = ssl4mis.SliceSource(root, names, acdc.NUM_CLASSES)  # checks every file exists
    for order, name in enumerate(names):
        item = source[order]
        spacing = _read_spacing(source.path(name))  # data/slices/ or data/, as the source reads
        yield order, _slice_example(name, order, item["image"], item["label"], spacing)


def _ssl4mis_volumes(root: Path, split: str):
    volumes = ssl4mis.iterate_volumes(root, split, acdc.NUM_CLASSES)
    for order, (case, image, label) in enumerate(volumes):
        spacing = _read_spacing(root / "data" / f"{case}.h5")
        yield order, _volume_example(case, order, image, label, spacing)


def _raw_slices(plan: acdc.ConversionPlan):
    for order, (case, number, volume) in enumerate(acdc.iterate_train_slices(plan)):
        index = number - acdc.FIRST_SLICE_NUMBER
        yield order, _slice_example(acdc.slice_name(case.name, number), order, volume.image[index],
                                    volume.label[index], np.asarray(volume.spacing, np.float32))


def _raw_volumes(plan: acdc.ConversionPlan, split: str):
    for order, case in enumerate(plan.cases[split]):
        volume = acdc.read_case(case)
        yield order, _volume_example(case.name, order, volume.image, volume.label,
                                     np.asarray(volume.spacing, np.float32))


def build_acdc(manual_dir: str | os.PathLike, data_dir: str | os.PathLike,
               configs: Sequence[str] = CONFIGS) -> dict[str, Path]:
    """Builds the configs from manual_dir into data_dir (array_record); config -> its folder.

    A config already built is reused (TFDS's own rule). Raises DataError on bad input.
    """
    manual_dir = Path(manual_dir)
    if not manual_dir.is_dir() or not any(manual_dir.iterdir()):
        raise DataError(f"manual_dir {manual_dir} does not exist or is empty.\n"
                        f"{_MANUAL_DOWNLOAD_INSTRUCTIONS}")
    built = {}
    for config in configs:
        if config not in CONFIGS:
            raise ValueError(f"config must be one of {CONFIGS}, got {config!r}")
        builder = Acdc(config=config, data_dir=os.fspath(data_dir))
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
        built[config] = Path(builder.data_dir)
    return built


# ----------------------------------------------------------------------------- reading


def prepared_dir(data_dir: str | os.PathLike, config: str) -> Path:
    """<data_dir>/acdc/<config>/<version>, checked to hold a prepared dataset."""
    if config not in CONFIGS:
        raise ValueError(f"config must be one of {CONFIGS}, got {config!r}")
    path = Path(data_dir) / NAME / config / DATASET_VERSION
    if not (path / "dataset_info.json").is_file():
        raise DataError(f"{path} holds no prepared ACDC '{config}' dataset; build it with "
                        "`python -m arco_jax.data.tfds_acdc --manual_dir M --data_dir D`")
    return path


def _open(path: Path, split: str, **kwargs):
    builder = tfds.builder_from_directory(os.fspath(path))
    if split not in builder.info.splits:
        raise DataError(f"{path} has splits {sorted(builder.info.splits)}, not {split!r}")
    if not builder.info.disable_shuffling:
        raise DataError(f"{path} was written with shuffled records; list order is lost")
    return builder.as_data_source(split, **kwargs)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def tfds_slice_names(data_dir: str | os.PathLike, split: str = "train") -> list[str]:
    """Slice names in list order (images are not decompressed)."""
    skip = {"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()}
    source = _open(prepared_dir(data_dir, "slices"), split, decoders=skip)
    return [_text(source[i]["name"]) for i in range(len(source))]


class TfdsSliceSource:
    """Records [start, stop) of the 'slices' config (Grain RandomAccessDataSource protocol).

    Item: dict(image (H, W) float32, label (H, W) uint8, name str), as ssl4mis.SliceSource.
    The array_record files are opened lazily in each process, so the source pickles small into
    Grain worker processes. An item whose stored list position is not its index raises DataError.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", start: int = 0,
                 stop: int | None = None, num_classes: int = acdc.NUM_CLASSES):
        self._path = prepared_dir(data_dir, "slices")
        self._split = split
        total = len(_open(self._path, split))
        stop = total if stop is None else stop
        if not 0 <= start < stop <= total:
            raise DataError(f"{self._path} split {split!r} has {total} slices; cannot take "
                            f"records [{start}, {stop})")
        self._start, self._stop = start, stop
        self._num_classes = num_classes
        self._source = None

    def __len__(self) -> int:
        return self._stop - self._start

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} slices")
        if self._source is None:
            self._source = _open(self._path, self._split)
        record = self._source[self._start + index]
        if int(record["order"]) != self._start + index:
            raise DataError(f"{self._path}: record {self._start + index} holds list line "
                            f"{int(record['order'])}; the files are out of list order")
        label = record["label"]
        if label.size and label.max() >= self._num_classes:
            raise DataError(f"{self._path}: slice {_text(record['name'])} has label "
                            f"{label.max()} outside [0, {self._num_classes})")
        return {"image": record["image"], "label": label, "name": _text(record["name"])}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_source": None}

    def __repr__(self) -> str:
        return f"TfdsSliceSource({self._path}, {self._split}[{self._start}:{self._stop}])"


def tfds_slice_source(data_dir: str | os.PathLike, split: str = "train", start: int = 0,
                      stop: int | None = None,
                      num_classes: int = acdc.NUM_CLASSES) -> TfdsSliceSource:
    """Slices [start, stop) in list order: (0, K) is the labeled set, (K, None) the unlabeled."""
    return TfdsSliceSource(data_dir, split, start, stop, num_classes)


def tfds_labeled_slice_count(data_dir: str | os.PathLike, labeled_patients: int,
                             one_patient_policy: str = "whole") -> int:
    """The labeled-set size for `labeled_patients`, as ssl4mis.labeled_slice_count for ACDC:
    counted from the stored list order and checked against the published counts."""
    if one_patient_policy not in ssl4mis.ONE_PATIENT_POLICIES:
        raise ValueError(f"one_patient_policy must be one of {ssl4mis.ONE_PATIENT_POLICIES}, "
                         f"got {one_patient_policy!r}")
    if labeled_patients == 1 and one_patient_policy == "reference":
        return ssl4mis.ACDC_REFERENCE_ONE_PATIENT_SLICES
    computed = ssl4mis.first_patients_slice_count(tfds_slice_names(data_dir), labeled_patients)
    published = ssl4mis.ACDC_LABELED_SLICES.get(labeled_patients)
    if published is not None and computed != published:
        raise DataError(f"{prepared_dir(data_dir, 'slices')}: the first {labeled_patients} "
                        f"patients span {computed} records, the SSL4MIS ACDC split has "
                        f"{published}; was it built from the community list?")
    return computed


def volume_source(data_dir: str | os.PathLike, split: str):
    """Random access to the 'volumes' records of a split (list order)."""
    return _open(prepared_dir(data_dir, "volumes"), split)


def tfds_volume_cases(data_dir: str | os.PathLike, split: str) -> list[str]:
    """Case names of a split in list order (images are not decompressed)."""
    skip = {"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()}
    source = _open(prepared_dir(data_dir, "volumes"), split, decoders=skip)
    return [_text(source[i]["case"]) for i in range(len(source))]


def read_volume(source, index: int, num_classes: int = acdc.NUM_CLASSES, where: str = "volumes"
                ) -> tuple[str, np.ndarray, np.ndarray, np.ndarray | None]:
    """(case, image (D, H, W) float32, label (D, H, W) uint8, spacing or None) of record
    `index`, checked to be list line `index` with labels in range."""
    record = source[index]
    case = _text(record["case"])
    if int(record["order"]) != index:
        raise DataError(f"{where}: record {index} holds list line {int(record['order'])}; "
                        "the files are out of list order")
    label = record["label"]
    if label.size and label.max() >= num_classes:
        raise DataError(f"{where}: volume {case} has label {label.max()} outside [0, {num_classes})")
    return case, record["image"], label, record.get("spacing")


def iterate_tfds_volumes(data_dir: str | os.PathLike, split: str,
                         num_classes: int = acdc.NUM_CLASSES
                         ) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yields (case, image (D, H, W) float32, label (D, H, W) uint8) in list order, as
    ssl4mis.iterate_volumes."""
    source = volume_source(data_dir, split)
    where = f"{prepared_dir(data_dir, 'volumes')} {split}"
    for index in range(len(source)):
        yield read_volume(source, index, num_classes, where)[:3]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m arco_jax.data.tfds_acdc",
        description="Build ACDC as TFDS array_record files (no TensorFlow needed).")
    parser.add_argument("--manual_dir", required=True,
                        help="the ACDC download or an SSL4MIS processed layout")
    parser.add_argument("--data_dir", required=True, help="TFDS data folder to write into")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated configs")
    args = parser.parse_args(argv)
    try:
        built = build_acdc(args.manual_dir, args.data_dir, args.configs.split(","))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for config, path in built.items():
        print(f"{config}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
