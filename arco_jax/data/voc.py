"""Pascal VOC 2012 with the SBD augmented labels, as ReCo and ARCO train on it: a registered dataset
'pascal' (arco_jax.data.registry; shared reading in data/natural.py).

Layout under config.data.data_dir (VOCtrainval_11-May-2012's JPEGImages plus SegmentationClassAug,
with ReCo's two list files, dataset/pascal/ of lorenmt/reco):
  JPEGImages/<id>.jpg              RGB images
  SegmentationClassAug/<id>.png    labels, 0 background, 1..20 the classes, 255 ignored (borders
                                   and difficult regions), stored as palette or grayscale indices
  train_aug.txt                    the 10582 training ids, one per line (data.train_list)
  val.txt                          the 1449 validation ids (data.val_list)

Labeled subsets of the paper: 60 / 200 / 600 images (data.labeled_images), by the seeded class
cover or from data.labeled_split (natural.py). Its config.data fields, besides natural.py's common
ones: train_list, val_list (paths relative to data_dir, or absolute).
"""
from __future__ import annotations

from pathlib import Path

import ml_collections

from arco_jax.data import natural

NAME = "pascal"
IMAGE_DIR, LABEL_DIR = "JPEGImages", "SegmentationClassAug"
CLASS_NAMES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
CODEC = natural.identity_codec(len(CLASS_NAMES) + 1)
_LISTS = {"train": "train_list", "val": "val_list"}


def list_path(root: Path, data: ml_collections.ConfigDict, split: str) -> Path:
    path = Path(data[_LISTS[split]])
    return path if path.is_absolute() else root / path


def samples(root: Path, data: ml_collections.ConfigDict, split: str) -> list[natural.Sample]:
    return natural.listed_samples(list_path(root, data, split), lambda name: root / IMAGE_DIR / f"{name}.jpg",
                                  lambda name: root / LABEL_DIR / f"{name}.png")


LAYOUT = natural.Layout(
    samples=samples,
    train_count=lambda root, data: len(natural.read_list(list_path(root, data, "train"))),
    where=lambda root, data, split: f"list file {list_path(root, data, split)}",
    manual=f"the folder with {IMAGE_DIR}/, {LABEL_DIR}/, train_aug.txt and val.txt")

PASCAL = natural.make_spec(
    NAME, "Pascal VOC 2012 + SBD", LAYOUT, CODEC, CLASS_NAMES,
    fields={"labeled_images": 60, "train_list": "train_aug.txt", "val_list": "val.txt"},
    description="Pascal VOC 2012 with SBD augmented labels (train_aug 10582 / val 1449), 21 classes, 255 ignored; "
                "RGB images, per-image mIoU")
