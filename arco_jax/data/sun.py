"""SUN RGB-D, 37 classes, RGB only, as ReCo and ARCO train on it: a registered dataset 'sun'
(arco_jax.data.registry; shared reading in data/natural.py).

Layout under config.data.data_dir: the folder ReCo's dataset/sun_preprocess.py leaves (from
SUNRGBD-train_images.tgz, SUNRGBD-test_images.tgz and sunrgbd_train_test_labels.tar.gz; ReCo also
distributes it preprocessed):
  SUNRGBD-train_images/img-<NNNNNN>.jpg     training images
  SUNRGBD-test_images/img-<NNNNNN>.jpg      test images, the validation split here
  sunrgbd_train_test_labels/img-<NNNNNN>.png   labels of both, by the same number: 0 unlabeled,
                                               1..37 the classes (grayscale indices)
Image ids are the file stems ('img-005051'), sorted. As ReCo (its label map subtracts one), label 0
is ignored (255) and 1..37 become the 37 classes 0..36: wall is class 0, the framework's
"background" here. Images are resized to 512 x 384 (bilinear; labels nearest) when read
(data.resize = (384, 512), as ReCo's preprocessing; a preprocessed folder is already that size).
Depth is not read.

Labeled subsets of the paper: 50 / 150 / 500 images (data.labeled_images), by the seeded class
cover or from data.labeled_split (natural.py).
"""
from __future__ import annotations

from pathlib import Path

import ml_collections

from arco_jax.data import natural
from arco_jax.data.ssl4mis import DataError

NAME = "sun"
IMAGE_DIRS = {"train": "SUNRGBD-train_images", "val": "SUNRGBD-test_images"}
LABEL_DIR = "sunrgbd_train_test_labels"
CLASSES = ("wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture",
           "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat", "clothes",
           "ceiling", "books", "fridge", "tv", "paper", "towel", "shower curtain", "box", "whiteboard", "person",
           "night stand", "toilet", "sink", "lamp", "bathtub", "bag")
CLASS_NAMES = CLASSES[1:]  # class 0 (wall) is the framework's background
CODEC = natural.LabelCodec.from_pairs({0: natural.IGNORE_LABEL, **{v: v - 1 for v in range(1, len(CLASSES) + 1)}},
                                      f"0 (unlabeled) and the classes 1..{len(CLASSES)}")


def _image_files(root: Path, split: str) -> list[Path]:
    folder = root / IMAGE_DIRS[split]
    if not folder.is_dir():
        raise DataError(f"{folder} is missing (a SUN RGB-D folder in ReCo's layout holds {IMAGE_DIRS['train']}/, "
                        f"{IMAGE_DIRS['val']}/ and {LABEL_DIR}/)")
    files = sorted(folder.glob("img-*.jpg"))
    if not files:
        raise DataError(f"{folder} holds no img-*.jpg images")
    return files


def samples(root: Path, data: ml_collections.ConfigDict, split: str) -> list[natural.Sample]:
    items = [natural.Sample(path.stem, path, root / LABEL_DIR / f"{path.stem}.png")
             for path in _image_files(root, split)]
    natural.check_pairs(items, lambda i: f"{root / IMAGE_DIRS[split]}")
    return items


LAYOUT = natural.Layout(
    samples=samples,
    train_count=lambda root, data: len(_image_files(root, "train")),
    where=lambda root, data, split: f"{root / IMAGE_DIRS[split]}",
    manual=f"the folder with {IMAGE_DIRS['train']}/, {IMAGE_DIRS['val']}/ and {LABEL_DIR}/ (ReCo's layout)")

SUN = natural.make_spec(
    NAME, "SUN RGB-D", LAYOUT, CODEC, CLASS_NAMES,
    fields={"labeled_images": 50, "resize": (384, 512)},
    description="SUN RGB-D (RGB only) in ReCo's layout, 37 classes, unlabeled pixels ignored; resized to 512 x 384, "
                "per-image mIoU")
