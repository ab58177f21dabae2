"""The Left Atrium (arco_jax.data.la) as a TensorFlow Datasets dataset in array_record files, built
and read without TensorFlow.

Why: one compressed array_record file per split instead of 100 h5 files, random access for Grain,
and volumes stored depth first, so reading skips the h5 decode and the transpose. TFDS writes the
records with its own protobuf copy and `as_data_source` reads them in NumPy: TensorFlow is never
imported (tests check it).

Builder `la`, config 'volumes', splits 'train' (train.list) and 'test' (test.list), records in
list order: image (D, H, W) float32 (z-scored as in mri_norm2.h5), label (D, H, W) uint8 {0, 1},
case (the list's id), order (its line index in the list). Each volume is read with la.read_volume,
so it is transposed and checked exactly as the h5 reader does. Both lists are also kept in the
dataset's metadata.json, so opening a run reads JSON only, not the volumes.

Build with `build_la(manual_dir, data_dir)` or
`python -m arco_jax.data.tfds_la --manual_dir M --data_dir D` (M: the UA-MT data/ folder); the
files land in <data_dir>/la/volumes/<version>/. Train from it with config.data.source='tfds' and
config.data.data_dir=D: la.LADataset then reads the cases through TfdsStore, with the same splits
as the h5 folder. The class is not put in the TFDS registry (skip_registration), as tfds_acdc.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from arco_jax.data import la
from arco_jax.data.ssl4mis import DataError

NAME = la.NAME
CONFIG = "volumes"
DATASET_VERSION = "1.0.0"
FILE_FORMAT = "array_record"
SPLITS = ("train", "test")
_LISTS = {"train": la.TRAIN_LIST, "test": la.TEST_LIST}
_BUILD_COMMAND = "python -m arco_jax.data.tfds_la --manual_dir <UA-MT data/ folder> --data_dir"

_CITATION = r"""@article{xiong2021global,
  title={A global benchmark of algorithms for segmenting the left atrium from late
         gadolinium-enhanced cardiac magnetic resonance imaging},
  author={Xiong, Zhaohan and Xia, Qing and Hu, Zhiqiang and others},
  journal={Medical Image Analysis}, volume={67}, pages={101832}, year={2021}
}
@inproceedings{yu2019uncertainty,
  title={Uncertainty-aware Self-ensembling Model for Semi-supervised 3D Left Atrium Segmentation},
  author={Yu, Lequan and Wang, Shujun and Li, Xiaomeng and Fu, Chi-Wing and Heng, Pheng-Ann},
  booktitle={MICCAI}, pages={605--613}, year={2019}
}"""

_MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "The processed Left Atrium set (2018 Atrial Segmentation Challenge, 100 volumes) is in the data/ "
    "folder of the UA-MT GitHub repository (https://github.com/yulequan/UA-MT): use that folder as "
    f"manual_dir. It holds {la.TRAIN_LIST} (80 cases), {la.TEST_LIST} (20) and "
    f"'{la.CASE_DIR}/<case>/{la.VOLUME_FILE}'.")


def _tensor(dtype) -> tfds.features.Tensor:
    # zlib: images are float32 and labels mostly zeros; the raw proto would upcast uint8 to int64.
    return tfds.features.Tensor(shape=(None, None, None), dtype=dtype, encoding="zlib")


class La(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Left Atrium MRI (background, left atrium), UA-MT processed layout and split."""

    name = NAME
    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "UA-MT layout and lists, volumes depth first; array_record."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=CONFIG, description="Train and test volumes in list order.")]

    def __init__(self, *, file_format: str = FILE_FORMAT, **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Left Atrium late gadolinium-enhanced MRI, the UA-MT processed set: images "
                        "z-scored per volume, labels 0 background / 1 left atrium, axes (D, H, W). "
                        "Records keep list order.",
            features=tfds.features.FeaturesDict({
                "image": _tensor(np.float32),
                "label": _tensor(np.uint8),
                "case": tfds.features.Text(),
                "order": np.int32,
            }),
            homepage="https://github.com/yulequan/UA-MT",
            citation=_CITATION,
            disable_shuffling=True,  # record i is line i of the list: "first K" keeps its meaning
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        store = la.H5Store(dl_manager.manual_dir)  # lists and every file's metadata, before any write
        cases = {"train": store.train_cases, "test": store.test_cases}
        self.info.metadata["cases"] = cases
        return {split: self._generate_examples(store, split, cases[split]) for split in SPLITS}

    def _generate_examples(self, store: la.H5Store, split: str, cases: list[str]):
        """(list position, example): integer keys, which disable_shuffling keeps as record order."""
        for order, case in enumerate(cases):
            image, label = store.read(split, order)
            yield order, {"image": image, "label": label, "case": case, "order": order}


def build_la(manual_dir: str | os.PathLike, data_dir: str | os.PathLike) -> Path:
    """Builds the UA-MT folder manual_dir into data_dir (array_record); returns the dataset folder.

    A dataset already built there is reused (TFDS's own rule). Raises DataError on bad input.
    """
    manual_dir = Path(manual_dir)
    if not manual_dir.is_dir() or not any(manual_dir.iterdir()):
        raise DataError(f"manual_dir {manual_dir} does not exist or is empty. {_MANUAL_DOWNLOAD_INSTRUCTIONS}")
    builder = La(config=CONFIG, data_dir=os.fspath(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
    return Path(builder.data_dir)


# ----------------------------------------------------------------------------- reading


def prepared_dir(data_dir: str | os.PathLike) -> Path:
    """<data_dir>/la/volumes/<version>, checked to hold a prepared dataset."""
    data_dir = Path(data_dir)
    path = data_dir / NAME / CONFIG / DATASET_VERSION
    if not (path / "dataset_info.json").is_file():
        hint = ""
        if (data_dir / la.TRAIN_LIST).is_file():
            hint = f" ({data_dir} holds {la.TRAIN_LIST}: a UA-MT folder, read with config.data.source='h5')"
        raise DataError(f"{data_dir} holds no prepared TFDS '{NAME}' dataset (looked in {path}){hint}; build it "
                        f"with `{_BUILD_COMMAND} {data_dir}`")
    return path


def _open(path: Path, split: str):
    builder = tfds.builder_from_directory(os.fspath(path))
    if split not in builder.info.splits:
        raise DataError(f"{path} has splits {sorted(builder.info.splits)}, not {split!r}")
    return builder.as_data_source(split)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _checked(record: dict, index: int, case: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(image, label) of a record, which must be list line `index`, case `case`."""
    order, stored = int(record["order"]), _text(record["case"])
    if (order, stored) != (index, case):
        raise DataError(f"{where}: record {index} holds case {stored!r} of list line {order}, not {case!r}; "
                        "the files are out of list order or were rebuilt after opening")
    return record["image"], record["label"]


class TfdsStore(la.ListedCases):
    """The cases of a prepared `la` folder (la.H5Store's interface): case ids from the
    metadata.json the builder wrote, volumes read from the records. Opening reads JSON only."""

    kind = f"TFDS {NAME}/{CONFIG}"

    def __init__(self, data_dir: str | os.PathLike):
        self.path = prepared_dir(data_dir)
        info = tfds.builder_from_directory(os.fspath(self.path)).info
        if not info.disable_shuffling:
            raise DataError(f"{self.path} was written with shuffled records; list order is lost")
        cases = info.metadata.get("cases") if info.metadata is not None else None
        if not isinstance(cases, dict):
            raise DataError(f"{self.path / 'metadata.json'}: no case lists (was it built by arco_jax.data.tfds_la?)")
        self._cases = {}
        for split in SPLITS:
            if split not in info.splits:
                raise DataError(f"{self.path} has splits {sorted(info.splits)}, not {split!r}")
            names = cases.get(split)
            if not isinstance(names, list) or len(names) != info.splits[split].num_examples:
                raise DataError(f"{self.path / 'metadata.json'}: the {split!r} case list does not match the split's "
                                f"{info.splits[split].num_examples} records")
            self._cases[split] = [str(name) for name in names]
        self.train_where = f"{self.path} split 'train' ({la.TRAIN_LIST})"
        self._sources = {}  # split -> data source, opened on first read

    def read(self, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        if split not in self._sources:
            self._sources[split] = _open(self.path, split)
        return _checked(self._sources[split][index], index, self._cases[split][index], f"{self.path} {split}")

    def source(self, split: str, positions: range) -> TfdsVolumeSource:
        return TfdsVolumeSource(self.path, split, positions, [self._cases[split][i] for i in positions])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_sources": {}}


class TfdsVolumeSource:
    """Records `positions` of a split (Grain RandomAccessDataSource protocol), as la.VolumeSource:
    item dict(image (D, H, W) float32, label (D, H, W) int32, name str).

    The array_record files are opened lazily in each process, so the source pickles small into
    Grain worker processes.
    """

    def __init__(self, path: Path, split: str, positions: range, names: list[str]):
        self._path, self._split = Path(path), split
        self._positions, self._names = list(positions), list(names)
        self._source = None

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def __len__(self) -> int:
        return len(self._positions)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if self._source is None:
            self._source = _open(self._path, self._split)
        position = self._positions[index]
        image, label = _checked(self._source[position], position, self._names[index],
                                f"{self._path} {self._split}")
        return {"image": image, "label": label.astype(np.int32), "name": self._names[index]}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_source": None}

    def __repr__(self) -> str:
        return f"TfdsVolumeSource({self._path}, {self._split}, {len(self)} volumes)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m arco_jax.data.tfds_la",
        description="Build the Left Atrium (UA-MT layout) as TFDS array_record files (no TensorFlow needed).")
    parser.add_argument("--manual_dir", required=True, help="the UA-MT data/ folder (train.list, test.list, "
                        f"'{la.CASE_DIR}')")
    parser.add_argument("--data_dir", required=True, help="TFDS data folder to write into")
    args = parser.parse_args(argv)
    try:
        path = build_la(args.manual_dir, args.data_dir)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{CONFIG}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
