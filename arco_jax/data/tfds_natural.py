"""Pascal VOC, Cityscapes and SUN RGB-D (data/voc.py, cityscapes.py, sun.py) as TensorFlow
Datasets datasets in array_record files, built and read without TensorFlow.

Why: two array_record files instead of tens of thousands of small images, random access for
Grain from local disk. TFDS writes the records with its own protobuf copy and `as_data_source`
reads them in NumPy; the image and label bytes are decoded here with PIL, so TensorFlow (and
OpenCV, which would turn a palette PNG into colours) is never used.

Builders 'pascal', 'cityscapes', 'sun', config 'images', splits 'train' and 'val', records in the
folder reader's order: image (the encoded image: the original file's bytes, or a PNG of the
resized image when data.resize changes its size), label (a grayscale PNG of the train ids, 255
ignored), name (the image id), order (its position). Every image is read through the folder
reader (natural.read_sample), so labels are mapped and checked, and images resized, exactly as
a folder run reads them. The ids and the resize are kept in metadata.json, so opening a run reads
JSON only.

  python -m arco_jax.data.tfds_natural --dataset pascal --manual_dir M --data_dir D [--resize H W]

(M: the dataset's folder; --resize defaults to the dataset's data.resize, () for Pascal). The
files land in <D>/<dataset>/images/<version>/; train from them with config.data.source='tfds' and
config.data.data_dir=D (config.data.resize must be the one built with). The classes are not put in
the TFDS registry (skip_registration), as tfds_acdc.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path
from typing import Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from arco_jax.data import cityscapes, natural, sun, voc
from arco_jax.data.ssl4mis import DataError
from arco_jax.errors import ConfigError

CONFIG = "images"
DATASET_VERSION = "1.0.0"
FILE_FORMAT = "array_record"
SPLITS = ("train", "val")
MODULES = {voc.NAME: voc, cityscapes.NAME: cityscapes, sun.NAME: sun}
SPECS = {voc.NAME: voc.PASCAL, cityscapes.NAME: cityscapes.CITYSCAPES, sun.NAME: sun.SUN}
_BUILD_COMMAND = "python -m arco_jax.data.tfds_natural --dataset {name} --manual_dir <its folder> --data_dir"


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def folder_config(name: str, manual_dir: str | os.PathLike, resize: Sequence[int] | None = None,
                  **fields) -> ml_collections.ConfigDict:
    """config.data of a folder read of dataset `name` (its defaults, then `resize` and `fields`)."""
    data = {**SPECS[name].fields(), "data_dir": os.fspath(manual_dir), "source": "folder", **fields}
    if resize is not None:
        data["resize"] = tuple(resize)
    return ml_collections.ConfigDict({"data": data})


class _NaturalImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One natural-image dataset's train and val images in folder-reader order."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Images as read by arco_jax.data.natural (labels as train ids); array_record."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=CONFIG, description="Train and val images in reader order.")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "The dataset's folder, as its reader (arco_jax.data.<dataset>) describes."

    def __init__(self, *, folder: ml_collections.ConfigDict | None = None, file_format: str = FILE_FORMAT, **kwargs):
        self._folder = folder
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{SPECS[self.name].description}. Records keep the reader's order.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded bytes, decoded with PIL
                "label": tfds.features.Tensor(shape=(), dtype=np.object_),
                "name": tfds.features.Text(),
                "order": np.int32,
            }),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        module = MODULES[self.name]
        store = natural.folder_store(self._folder, module.LAYOUT, module.CODEC)  # every pair checked first
        self.info.metadata["names"] = store.names
        self.info.metadata["resize"] = list(store.resize or ())
        return {split: self._generate_examples(store, split) for split in SPLITS}

    def _generate_examples(self, store: natural.FolderStore, split: str):
        for order, sample in enumerate(store.samples[split]):
            image, label = store.read(split, order)
            stored = sample.image.read_bytes()
            with Image.open(io.BytesIO(stored)) as original:  # the header only
                resized = original.size != (image.shape[1], image.shape[0])
            if resized:  # keep the resized pixels, losslessly
                stored = _png(image)
            yield order, {"image": stored, "label": _png(label), "name": sample.name, "order": order}


class Pascal(_NaturalImages, skip_registration=True):
    name = voc.NAME


class Cityscapes(_NaturalImages, skip_registration=True):
    name = cityscapes.NAME


class Sun(_NaturalImages, skip_registration=True):
    name = sun.NAME


BUILDERS = {voc.NAME: Pascal, cityscapes.NAME: Cityscapes, sun.NAME: Sun}


def build(name: str, manual_dir: str | os.PathLike, data_dir: str | os.PathLike,
          resize: Sequence[int] | None = None, **fields) -> Path:
    """Builds dataset `name` from its folder manual_dir into data_dir; returns the dataset folder.
    `resize` (H, W) or () overrides the dataset's data.resize; `fields` its other data fields
    (e.g. Pascal's train_list). A dataset already built there is reused (TFDS's rule).
    Raises DataError on bad input."""
    if name not in BUILDERS:
        raise DataError(f"dataset {name!r} has no TFDS builder here; known: {', '.join(BUILDERS)}")
    manual_dir = Path(manual_dir)
    if not manual_dir.is_dir() or not any(manual_dir.iterdir()):
        raise DataError(f"manual_dir {manual_dir} does not exist or is empty; it must be "
                        f"{MODULES[name].LAYOUT.manual}")
    builder = BUILDERS[name](folder=folder_config(name, manual_dir, resize, **fields), config=CONFIG,
                             data_dir=os.fspath(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
    return Path(builder.data_dir)


# ----------------------------------------------------------------------------- reading


def prepared_dir(name: str, data_dir: str | os.PathLike) -> Path:
    """<data_dir>/<name>/images/<version>, checked to hold a prepared dataset."""
    path = Path(data_dir) / name / CONFIG / DATASET_VERSION
    if not (path / "dataset_info.json").is_file():
        raise DataError(f"{data_dir} holds no prepared TFDS {name!r} dataset (looked in {path}); build it with "
                        f"`{_BUILD_COMMAND.format(name=name)} {data_dir}`")
    return path


def _decode(payload: bytes, what: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(payload))
        image.load()
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{what}: cannot be decoded ({err})") from err
    return image


class TfdsStore:
    """A prepared dataset's images per split (natural.FolderStore's interface): ids from the
    metadata.json the builder wrote, images and labels decoded from the records with PIL."""

    def __init__(self, name: str, data_dir: str | os.PathLike, resize: Sequence[int] = ()):
        self.path = prepared_dir(name, data_dir)
        info = tfds.builder_from_directory(os.fspath(self.path)).info
        metadata = info.metadata if info.metadata is not None else {}
        names = metadata.get("names")
        if not isinstance(names, dict) or not info.disable_shuffling:
            raise DataError(f"{self.path / 'metadata.json'}: no image ids in reader order (was it built by "
                            "arco_jax.data.tfds_natural?)")
        built = tuple(metadata.get("resize") or ())
        if tuple(resize) != built:
            raise ConfigError(f"config.data.resize: {tuple(resize)}, but {self.path} was built with {built}; set it to "
                              f"{built} or build again into another --data_dir")
        self.names = {}
        for split in SPLITS:
            listed = names.get(split)
            if split not in info.splits or not isinstance(listed, list) or \
                    len(listed) != info.splits[split].num_examples:
                raise DataError(f"{self.path}: split {split!r} is missing or does not match its id list in "
                                "metadata.json")
            self.names[split] = [str(n) for n in listed]
        self.kind = f"TFDS {name}/{CONFIG}"
        self.resize = built or None
        self.where = {split: f"{self.path} split {split!r}" for split in SPLITS}
        self._sources = {}

    def _record(self, split: str, index: int) -> dict:
        if split not in self._sources:
            self._sources[split] = tfds.builder_from_directory(os.fspath(self.path)).as_data_source(split)
        record = self._sources[split][index]
        stored = record["name"].decode() if isinstance(record["name"], bytes) else str(record["name"])
        if (int(record["order"]), stored) != (index, self.names[split][index]):
            raise DataError(f"{self.path} {split}: record {index} holds image {stored!r} at position "
                            f"{int(record['order'])}, not {self.names[split][index]!r}; the files were rebuilt or "
                            "reordered")
        return record

    def read(self, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        record = self._record(split, index)
        what = f"{self.path} {split} image {self.names[split][index]!r}"
        image = _decode(record["image"], what)
        image = np.asarray(image if image.mode == "RGB" else image.convert("RGB"), np.uint8)
        return image, np.asarray(_decode(record["label"], what + " label"), np.uint8)

    def label(self, split: str, index: int) -> np.ndarray:
        record = self._record(split, index)
        return np.asarray(_decode(record["label"], f"{self.path} {split} image {self.names[split][index]!r} label"),
                          np.uint8)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_sources": {}}  # Grain workers reopen the files.


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m arco_jax.data.tfds_natural",
        description="Build Pascal VOC, Cityscapes or SUN RGB-D as TFDS array_record files (no TensorFlow needed).")
    parser.add_argument("--dataset", required=True, choices=sorted(BUILDERS))
    parser.add_argument("--manual_dir", required=True, help="the dataset's folder (see arco_jax/data/<dataset>.py)")
    parser.add_argument("--data_dir", required=True, help="TFDS data folder to write into")
    parser.add_argument("--resize", type=int, nargs="*", default=None, metavar="N",
                        help="HEIGHT WIDTH to resize to (none: as stored); default: the dataset's data.resize")
    args = parser.parse_args(argv)
    if args.resize is not None and len(args.resize) not in (0, 2):
        parser.error("--resize takes HEIGHT WIDTH, or nothing (images as stored)")
    try:
        path = build(args.dataset, args.manual_dir, args.data_dir, args.resize)
    except (DataError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{args.dataset}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
