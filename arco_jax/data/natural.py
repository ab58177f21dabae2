"""What the natural-image datasets (Pascal VOC, Cityscapes, SUN RGB-D: data/voc.py, cityscapes.py,
sun.py) share: reading RGB images and index label PNGs, the labeled subset, and the opened dataset.

Each dataset module says only where its files are (a `Layout`: the image and label file of every
image of a split), how its label values become train ids (a `LabelCodec`) and its class names; the
rest is here, so the three read, check, split and record alike.

Images: any PIL-readable file, converted to RGB uint8 (H, W, 3). Training sources hand them out as
uint8; the weak view (data/pipeline.py 'scale_crop_flip' / 'crop_flip') normalises them with the
ImageNet mean and std after scaling and cropping; evaluation cases are normalised when read.

Labels: PNGs of class indices, a palette ('P') or grayscale ('L', 'I', 'I;16') PNG read as its
indices. A colour (RGB, RGBA) label PNG, e.g. a palette PNG saved again as RGB, is refused naming
the file: its colours are not class ids. Each value goes through the dataset's table; a value the
table does not know (neither a class nor the ignore label 255 after mapping) is an error naming the
file and the values.

The labeled subset (config.data.labeled_images = K) is either
  - the images a split file lists (config.data.labeled_split: one image id per line, as
    `Layout.names` spells them; K must be 0 or the file's count), or
  - the seeded class cover (config.data.labeled_seed = s), documented here because results
    depend on it: shuffle the training images with numpy's default_rng(s); walk them in that order
    and take an image when its label holds a class that no image taken so far holds, until every
    class is held (or the list ends: classes absent from the whole training set are recorded);
    then fill up to K with the next images of the same order not taken yet. Every class present
    in the training set is thus labeled at least once; each taken image adds a class, so the cover
    takes at most num_classes images (Pascal 21 <= 60, Cityscapes 19 <= 20, SUN 37 <= 50). A K
    smaller than the cover is refused. Only the labels the walk visits are read.
  The unlabeled set is every other training image, in list order. `labeled_record` (results.json)
  lists the labeled image ids and the rule that chose them.

Splits: 'val' and 'test' are both the dataset's validation images (Pascal's 1449, Cityscapes' 500,
SUN's test images): the benchmarks report the best validation mIoU over training, which is what
the val-selected 'test' report is here.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Sequence

import ml_collections
import numpy as np
from PIL import Image

from arco_jax.data import registry
from arco_jax.data.ssl4mis import DataError
from arco_jax.errors import ConfigError

IGNORE_LABEL = 255
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
INDEX_MODES = ("P", "L", "I", "I;16")  # PNG modes whose pixels are label indices
SOURCES = ("folder", "tfds")
SPLITS = ("val", "test")
_SHOWN = 5


def normalize_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) -> float32 (x / 255 - mean) / std with ImageNet's mean and std (ReCo)."""
    return ((np.asarray(image, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def voc_palette(count: int = 256) -> np.ndarray:
    """Pascal VOC's colour map (the devkit's labelcolormap: the bits of the index spread over R, G
    and B, high bits first): (count, 3) uint8; 0 black, 1 (128, 0, 0), ..., 255 (224, 224, 192)."""
    palette = np.zeros((count, 3), np.uint8)
    for index in range(count):
        value, colour = index, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                colour[channel] |= ((value >> channel) & 1) << (7 - bit)
            value >>= 3
        palette[index] = colour
    return palette


def _shown(values: np.ndarray) -> str:
    values = np.unique(values)
    text = ", ".join(str(v) for v in values[:_SHOWN].tolist())
    return text + (f" and {len(values) - _SHOWN} more" if len(values) > _SHOWN else "")


@dataclasses.dataclass(frozen=True)
class LabelCodec:
    """How a dataset's stored label values become train ids: `table[v]` for v in 0..255 (the ignore
    label stays 255; -1: a value the dataset's labels never hold). `holds`: those values in words."""

    table: np.ndarray
    holds: str

    @classmethod
    def from_pairs(cls, pairs: dict[int, int], holds: str) -> "LabelCodec":
        table = np.full(256, -1, np.int16)
        for stored, train_id in pairs.items():
            table[stored] = train_id
        return cls(table, holds)

    def decode(self, raw: np.ndarray, path: Path) -> np.ndarray:
        raw = np.asarray(raw)
        outside = (raw < 0) | (raw > 255)
        if outside.any():
            raise DataError(f"{path}: label values {_shown(raw[outside])} are neither classes nor the ignore label "
                            f"{IGNORE_LABEL} (this dataset's label PNGs hold {self.holds})")
        mapped = self.table[raw.astype(np.int64)]
        bad = mapped < 0
        if bad.any():
            raise DataError(f"{path}: label values {_shown(raw[bad])} are neither classes nor the ignore label "
                            f"{IGNORE_LABEL} (this dataset's label PNGs hold {self.holds})")
        return mapped.astype(np.uint8)


def identity_codec(num_classes: int) -> LabelCodec:
    """Values 0..num_classes-1 are the classes, 255 is ignored (Pascal VOC's SegmentationClassAug)."""
    return LabelCodec.from_pairs({**{c: c for c in range(num_classes)}, IGNORE_LABEL: IGNORE_LABEL},
                                 f"0..{num_classes - 1} and {IGNORE_LABEL}")


def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise DataError(f"{path} is missing") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{path}: cannot be read as an image ({err})") from err
    return image


def read_rgb(path: Path) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3) (grayscale, CMYK or RGBA images converted)."""
    image = _open(path)
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"), np.uint8)


def read_label_indices(path: Path) -> np.ndarray:
    """A label PNG's indices (H, W), as stored: a palette PNG gives its indices, not its colours."""
    image = _open(path)
    if image.mode not in INDEX_MODES:
        raise DataError(f"{path}: a {image.mode} label image holds colours, not class indices (a palette PNG saved "
                        "as RGB loses them); give the palette or grayscale index PNGs")
    return np.asarray(image)


def resize_pair(image: np.ndarray, label: np.ndarray, size: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) = size: the image bilinear, the label nearest (ReCo's resizing of Cityscapes and SUN)."""
    if not size or tuple(label.shape) == tuple(size):
        return image, label
    height, width = int(size[0]), int(size[1])
    image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    label = np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST))
    return image, label


@dataclasses.dataclass(frozen=True)
class Sample:
    """One image of a split: its id and files."""

    name: str
    image: Path
    label: Path


def read_sample(sample: Sample, codec: LabelCodec, resize: Sequence[int] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 (H, W, 3), train ids uint8 (H, W)) of one image, checked, resized if asked."""
    label = codec.decode(read_label_indices(sample.label), sample.label)
    image = read_rgb(sample.image)
    if image.shape[:2] != label.shape:
        raise DataError(f"{sample.label}: label size {label.shape[1]} x {label.shape[0]} is not its image's "
                        f"{image.shape[1]} x {image.shape[0]} ({sample.image})")
    return resize_pair(image, label, resize)


def read_sample_label(sample: Sample, codec: LabelCodec, resize: Sequence[int] | None = None) -> np.ndarray:
    """Only the train ids of one image (for the class cover: no image decoded)."""
    label = codec.decode(read_label_indices(sample.label), sample.label)
    if resize and tuple(label.shape) != tuple(resize):
        label = np.asarray(Image.fromarray(label).resize((int(resize[1]), int(resize[0])), Image.NEAREST))
    return label


def check_pairs(samples: Sequence[Sample], where: Callable[[int], str]) -> None:
    """Every image and its label file exist (stat only; nothing is decoded)."""
    for index, sample in enumerate(samples):
        if not sample.image.is_file():
            raise DataError(f"{where(index)}: image '{sample.name}': {sample.image} is missing")
        if not sample.label.is_file():
            raise DataError(f"{where(index)}: image '{sample.name}' ({sample.image}) has no label: {sample.label} is "
                            "missing")


def listed_samples(path: Path, image: Callable[[str], Path], label: Callable[[str], Path]) -> list[Sample]:
    """The images a list file names (one id a line), their files by `image(id)` and `label(id)`,
    each pair checked to exist (messages name the list's line)."""
    entries = read_list(path)
    items = [Sample(name, image(name), label(name)) for _, name in entries]
    check_pairs(items, lambda i: f"list file {path} line {entries[i][0]}")
    return items


def read_list(path: Path) -> list[tuple[int, str]]:
    """(line number, entry) of each non-blank line of a list file, which must exist and not be empty,
    with no entry twice."""
    if not path.is_file():
        raise DataError(f"list file {path} is missing")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"list file {path} cannot be read ({err})") from err
    entries = [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not entries:
        raise DataError(f"list file {path} is empty")
    first: dict[str, int] = {}
    for number, entry in entries:
        if entry in first:
            raise DataError(f"list file {path} line {number}: '{entry}' is listed again (first at line "
                            f"{first[entry]})")
        first[entry] = number
    return entries


# ----------------------------------------------------------------------------- stores


class FolderStore:
    """A dataset folder's images per split ('train', 'val'): names, files, reading.

    Shared by the folder form and, through `read`, by the TFDS builder, so both decode alike. It
    pickles small (paths only) into Grain worker processes."""

    kind = "folder"

    def __init__(self, samples: dict[str, list[Sample]], codec: LabelCodec, resize: Sequence[int] | None,
                 where: dict[str, str]):
        self.samples = samples
        self.names = {split: [s.name for s in items] for split, items in samples.items()}
        self.codec = codec
        self.resize = tuple(resize) if resize else None
        self.where = where  # split -> what lists it, for messages

    def read(self, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        return read_sample(self.samples[split][index], self.codec, self.resize)

    def label(self, split: str, index: int) -> np.ndarray:
        return read_sample_label(self.samples[split][index], self.codec, self.resize)


class ImageSource:
    """Images `positions` of a split of a store (Grain RandomAccessDataSource protocol): item
    dict(image uint8 (H, W, 3), label int32 (H, W), name str). Sizes differ; the weak view crops."""

    def __init__(self, store, split: str, positions: Sequence[int]):
        self._store, self._split, self._positions = store, split, list(positions)

    @property
    def names(self) -> list[str]:
        return [self._store.names[self._split][p] for p in self._positions]

    def __len__(self) -> int:
        return len(self._positions)

    def __getitem__(self, index: int) -> dict:
        position = self._positions[int(index)]
        image, label = self._store.read(self._split, position)
        return {"image": image, "label": label.astype(np.int32), "name": self._store.names[self._split][position]}

    def __repr__(self) -> str:
        return f"ImageSource({self._store.kind}, {self._split}, {len(self)} images)"


# ----------------------------------------------------------------------------- the labeled subset


def class_cover(order: Sequence[int], label_of: Callable[[int], np.ndarray], num_classes: int
                ) -> tuple[list[int], list[int]]:
    """(positions taken, classes never seen): walk `order`, take a position whose label holds a class
    not yet held, until all num_classes are held or the order ends."""
    held = np.zeros(num_classes, bool)
    taken = []
    for position in order:
        if held.all():
            break
        present = np.unique(label_of(position))
        present = present[present < num_classes]
        if present.size and not held[present].all():
            taken.append(int(position))
            held[present] = True
    return taken, np.flatnonzero(~held).tolist()


def seeded_labeled(count: int, k: int, seed: int, label_of: Callable[[int], np.ndarray], num_classes: int,
                   where: str) -> tuple[list[int], list[int], int]:
    """The seeded class cover filled to k (module docstring): (labeled positions in the order taken,
    classes absent from the training set, images the cover needed)."""
    order = np.random.default_rng(seed).permutation(count).tolist()
    cover, missing = class_cover(order, label_of, num_classes)
    if len(cover) > k:
        raise ConfigError(f"config.data.labeled_images: {k} images cannot hold every class: the seeded class cover "
                          f"(labeled_seed {seed}) of {where} needs {len(cover)}; label more images, or list them in "
                          "config.data.labeled_split")
    chosen = set(cover)
    fill = [p for p in order if p not in chosen][:k - len(cover)]
    return cover + fill, missing, len(cover)


def split_file_positions(path: Path, names: Sequence[str], where: str) -> list[int]:
    """Positions of the images a split file lists; a name that is not a training image is an error."""
    position = {name: i for i, name in enumerate(names)}
    positions = []
    for number, name in read_list(path):
        if name not in position:
            raise DataError(f"split file {path} line {number}: image '{name}' is not a training image of {where}")
        positions.append(position[name])
    return positions


def split_file_path(config: ml_collections.ConfigDict) -> Path:
    path = Path(config.data.labeled_split)
    return path if path.is_absolute() else Path(config.data.data_dir) / path


# ----------------------------------------------------------------------------- the opened dataset


class NaturalDataset:
    """A natural-image dataset opened for one run (registry.OpenDataset): labeled and unlabeled
    training images, and the validation images as 'val' and 'test'. The labeled subset is chosen
    when first asked for (evaluation alone never reads the training labels)."""

    def __init__(self, config: ml_collections.ConfigDict, store, title: str):
        d = config.data
        self.store = store
        self.num_classes = d.num_classes
        self._k, self._seed = int(d.labeled_images), int(d.labeled_seed)
        self._split_file = split_file_path(config) if d.labeled_split else None
        self._chosen = None
        train, val = store.names["train"], store.names["val"]
        if self._split_file is None:  # (a split file's count is checked when it is read)
            check_count(self._k, len(train), store.where["train"])
        self.description = (f"{d.data_dir} ({title}, {store.kind}: {len(train)} train images, {len(val)} val "
                            "images)")

    def __str__(self) -> str:
        return self.description

    def _choose(self) -> dict:
        if self._chosen is None:
            train = self.store.names["train"]
            if self._split_file is not None:
                positions = split_file_positions(self._split_file, train, self.store.where["train"])
                if self._k not in (0, len(positions)):
                    raise ConfigError(f"config.data.labeled_images: {self._k}, but the split file {self._split_file} "
                                      f"lists {len(positions)} images (set it to {len(positions)}, or 0: the file's "
                                      "count)")
                check_count(len(positions), len(train), self.store.where["train"])
                rule, missing, cover = f"split file {self._split_file}", None, None
            else:
                positions, missing, cover = seeded_labeled(
                    len(train), self._k, self._seed, lambda p: self.store.label("train", p), self.num_classes,
                    self.store.where["train"])
                rule = f"seeded class cover, labeled_seed {self._seed}"
            self._chosen = {"positions": positions, "rule": rule, "missing": missing, "cover": cover}
        return self._chosen

    @property
    def labeled_count(self) -> int:
        return len(self._choose()["positions"])

    @property
    def labeled_description(self) -> str:
        chosen = self._choose()
        text = f"{self.labeled_count} labeled images ({chosen['rule']}"
        if chosen["cover"] is not None:
            text += f": the first {chosen['cover']} hold every class"
            if chosen["missing"]:
                text += f"; classes {chosen['missing']} are in no training image"
        return text + ")"

    @property
    def labeled_record(self) -> dict:
        chosen = self._choose()
        record = {"labeled_images": self.labeled_count, "labeled_rule": chosen["rule"],
                  "labeled_image_ids": [self.store.names["train"][p] for p in chosen["positions"]]}
        if chosen["missing"]:
            record["classes_in_no_training_image"] = chosen["missing"]
        return record

    def train_sources(self):
        labeled = self._choose()["positions"]
        taken = set(labeled)
        unlabeled = [p for p in range(len(self.store.names["train"])) if p not in taken]
        return ImageSource(self.store, "train", labeled), ImageSource(self.store, "train", unlabeled)

    def cases(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return list(self.store.names["val"])

    def case(self, split: str, index: int) -> registry.Case:
        name = self.cases(split)[index]
        image, label = self.store.read("val", index)
        return registry.Case(name, normalize_rgb(image), label, spacing=None)


def check_count(k: int, train_count: int, where: str) -> None:
    if not 1 <= k <= train_count - 1:
        raise ConfigError(f"config.data.labeled_images: {k} is not in 1..{train_count - 1}: {where} has "
                          f"{train_count} images and at least one must stay unlabeled")


# ----------------------------------------------------------------------------- a dataset's spec


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where one dataset's files are, given its folder and config.data. `samples(root, data, split)`:
    the split's ('train' or 'val') images in a fixed order, raising DataError for a missing list or
    an image without its label; `train_count(root, data)`: how many training images, cheaply (for
    config validation: a list read or a folder listed); `where(root, data, split)`: what lists a
    split, for messages; `manual`: what the folder must hold, in words."""

    samples: Callable[[Path, ml_collections.ConfigDict, str], list[Sample]]
    train_count: Callable[[Path, ml_collections.ConfigDict], int]
    where: Callable[[Path, ml_collections.ConfigDict, str], str]
    manual: str


def _fail(field: str, problem: str) -> None:
    raise ConfigError(f"config.data.{field}: {problem}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_fields(config: ml_collections.ConfigDict, name: str, layout: Layout) -> None:
    """The common fields' types and the data folder (no file is read)."""
    d = config.data
    if d.source not in SOURCES:
        _fail("source", f"{d.source!r} is not one of {', '.join(map(repr, SOURCES))}")
    if not d.data_dir:
        what = (f"the TFDS data folder given to `python -m arco_jax.data.tfds_natural --dataset {name} --data_dir`"
                if d.source == "tfds" else layout.manual)
        _fail("data_dir", f"is required for dataset {name!r} with source {d.source!r} ({what})")
    if str(d.data_dir).startswith(("gs://", "s3://")):
        _fail("data_dir", f"{d.data_dir!r} is in a bucket; PIL and ArrayRecord read local folders here: copy the "
              "data to the machine's disk first")
    if not os.path.isdir(d.data_dir):
        _fail("data_dir", f"{d.data_dir!r} is missing or not a directory")
    check_subset_fields(config)


def check_subset_fields(config: ml_collections.ConfigDict) -> None:
    """The labeled-subset and view fields' types (labeled_images, labeled_split, labeled_seed, resize,
    random_scale)."""
    d = config.data
    if not (_is_int(d.labeled_images) and d.labeled_images >= 0):
        _fail("labeled_images", f"must be an integer >= 1 (or 0 with a labeled_split: the file's count), got "
              f"{d.labeled_images!r}")
    if not isinstance(d.labeled_split, str):
        _fail("labeled_split", f"must be a path to a list of image ids or '', got {d.labeled_split!r}")
    if d.labeled_images == 0 and not d.labeled_split:
        _fail("labeled_images", "0 means 'as many as config.data.labeled_split lists', but no split file is given")
    if not _is_int(d.labeled_seed):
        _fail("labeled_seed", f"must be an integer, got {d.labeled_seed!r}")
    resize = tuple(d.resize)
    if resize and not (len(resize) == 2 and all(_is_int(n) and n >= 1 for n in resize)):
        _fail("resize", f"must be () (images as stored) or (height, width) in pixels, got {resize}")
    if d.random_scale not in (True, False):
        _fail("random_scale", f"must be True or False, got {d.random_scale!r}")


def validate(config: ml_collections.ConfigDict, name: str, layout: Layout) -> None:
    """The fields, and labeled_images against the training images (a list read or a folder listed,
    or the TFDS metadata; no image decoded)."""
    check_fields(config, name, layout)
    d = config.data
    if d.source == "tfds":
        from arco_jax.data import tfds_natural  # pylint: disable=import-outside-toplevel

        store = tfds_natural.TfdsStore(name, d.data_dir, tuple(d.resize))
        count, where = len(store.names["train"]), store.where["train"]
    else:
        root = Path(d.data_dir)
        count, where = layout.train_count(root, d), layout.where(root, d, "train")
    if d.labeled_split:
        path = split_file_path(config)
        listed = len(read_list(path))
        if d.labeled_images not in (0, listed):
            _fail("labeled_images", f"{d.labeled_images}, but the split file {path} lists {listed} images (set it to "
                  f"{listed}, or 0: the file's count)")
        check_count(listed, count, where)
    else:
        check_count(d.labeled_images, count, where)


def folder_store(config: ml_collections.ConfigDict, layout: Layout, codec: LabelCodec) -> FolderStore:
    d = config.data
    root = Path(d.data_dir)
    samples, where = {}, {}
    for split in ("train", "val"):
        samples[split] = layout.samples(root, d, split)
        where[split] = layout.where(root, d, split)
    return FolderStore(samples, codec, tuple(d.resize), where)


def open_store(config: ml_collections.ConfigDict, name: str, layout: Layout, codec: LabelCodec):
    d = config.data
    if d.source == "tfds":
        from arco_jax.data import tfds_natural  # pylint: disable=import-outside-toplevel

        return tfds_natural.TfdsStore(name, d.data_dir, tuple(d.resize))
    return folder_store(config, layout, codec)


# The config.data fields every natural-image dataset has (its own fields may change the defaults).
COMMON_FIELDS = {"labeled_images": 0, "labeled_split": "", "labeled_seed": 0, "source": "folder", "resize": (),
                 "random_scale": True}


def image_info(class_names: tuple[str, ...], colours: tuple[tuple[int, int, int], ...] = ()
               ) -> Callable[[ml_collections.ConfigDict], registry.DatasetInfo]:
    """DatasetSpec.info of a natural-image dataset: RGB, 255 ignored, evaluated per image; the weak
    view scales (data.random_scale) then crops and flips; `colours` the classes' display colours."""
    def info(config):
        scale = config.data.get("random_scale", True)
        return registry.DatasetInfo(num_classes=len(class_names) + 1, class_names=class_names,
                                    ignore_label=IGNORE_LABEL, spatial_rank=2, in_channels=3, eval_unit="image",
                                    weak_augment="scale_crop_flip" if scale else "crop_flip", intensity="imagenet",
                                    colours=colours)
    return info


def make_spec(name: str, title: str, layout: Layout, codec: LabelCodec, class_names: tuple[str, ...],
              fields: dict, description: str, colours: tuple[tuple[int, int, int], ...] = ()
              ) -> registry.DatasetSpec:
    """A registered natural-image dataset: RGB, 255 ignored, evaluated per image by mIoU; the weak
    view scales (data.random_scale) then crops and flips; `colours` as DatasetInfo.colours."""
    def open_dataset(config):
        check_fields(config, name, layout)
        return NaturalDataset(config, open_store(config, name, layout, codec), title)

    return registry.DatasetSpec(name=name, fields=lambda: {**COMMON_FIELDS, **fields},
                                info=image_info(class_names, colours),
                                validate=lambda config: validate(config, name, layout), open=open_dataset,
                                description=description)
