"""Cityscapes (fine annotations) as ReCo and ARCO train on it: a registered dataset 'cityscapes'
(arco_jax.data.registry; shared reading in data/natural.py).

Layout under config.data.data_dir (the official leftImg8bit_trainvaltest.zip and
gtFine_trainvaltest.zip, unzipped side by side):
  leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png        RGB images, 2048 x 1024
  gtFine/{train,val}/<city>/<stem>_gtFine_labelIds.png         label ids 0..33 (grayscale)
Image ids are '<city>/<stem>' (e.g. 'aachen/aachen_000000_000019'), in sorted order: 2975 train,
500 val. Label ids become the 19 train ids of the official table (cityscapesScripts labels.py:
road 7 -> 0, ..., bicycle 33 -> 18); every other id (void, ground, parking, rail track, guard rail,
bridge, tunnel, pole group, caravan, trailer ...) becomes 255, ignored.

As ReCo's preprocessing, images are resized to 1024 x 512 (bilinear) and labels likewise (nearest)
when read (data.resize = (512, 1024); () keeps 2048 x 1024), and mIoU is measured at that size.
ReCo trains Cityscapes without random scaling (its scale range is (1.0, 1.0)): data.random_scale
is False here, so the weak view is a 512 x 512 crop and a flip; True scales by 0.5..1.5 first.
Class 0 is road: the framework's "background" (class 0) is this class here.

Labeled subsets of the paper: 20 / 50 / 150 images (data.labeled_images), by the seeded class cover
or from data.labeled_split (natural.py), ids as above.
"""
from __future__ import annotations

from pathlib import Path

import ml_collections

from arco_jax.data import natural
from arco_jax.data.ssl4mis import DataError

NAME = "cityscapes"
IMAGE_DIR, LABEL_DIR = "leftImg8bit", "gtFine"
IMAGE_SUFFIX, LABEL_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png"
# (label id, name) of the 19 evaluated classes, in train-id order (cityscapesScripts labels.py).
TRAIN_CLASSES = ((7, "road"), (8, "sidewalk"), (11, "building"), (12, "wall"), (13, "fence"), (17, "pole"),
                 (19, "traffic light"), (20, "traffic sign"), (21, "vegetation"), (22, "terrain"), (23, "sky"),
                 (24, "person"), (25, "rider"), (26, "car"), (27, "truck"), (28, "bus"), (31, "train"),
                 (32, "motorcycle"), (33, "bicycle"))
MAX_LABEL_ID = 33
CLASS_NAMES = tuple(name for _, name in TRAIN_CLASSES[1:])  # class 0 (road) is the framework's background
_TO_TRAIN = {label_id: train_id for train_id, (label_id, _) in enumerate(TRAIN_CLASSES)}
CODEC = natural.LabelCodec.from_pairs(
    {**{i: _TO_TRAIN.get(i, natural.IGNORE_LABEL) for i in range(MAX_LABEL_ID + 1)},
     natural.IGNORE_LABEL: natural.IGNORE_LABEL},
    f"label ids 0..{MAX_LABEL_ID} (and {natural.IGNORE_LABEL})")


def _image_files(root: Path, split: str) -> list[Path]:
    folder = root / IMAGE_DIR / split
    if not folder.is_dir():
        raise DataError(f"{folder} is missing (a Cityscapes folder holds {IMAGE_DIR}/{{train,val}}/<city>/ and "
                        f"{LABEL_DIR}/{{train,val}}/<city>/)")
    files = sorted(folder.glob(f"*/*{IMAGE_SUFFIX}"))
    if not files:
        raise DataError(f"{folder} holds no <city>/*{IMAGE_SUFFIX} images")
    return files


def samples(root: Path, data: ml_collections.ConfigDict, split: str) -> list[natural.Sample]:
    items = []
    for path in _image_files(root, split):
        city, stem = path.parent.name, path.name[:-len(IMAGE_SUFFIX)]
        items.append(natural.Sample(f"{city}/{stem}", path, root / LABEL_DIR / split / city / f"{stem}{LABEL_SUFFIX}"))
    natural.check_pairs(items, lambda i: f"{root / IMAGE_DIR / split}")
    return items


LAYOUT = natural.Layout(
    samples=samples,
    train_count=lambda root, data: len(_image_files(root, "train")),
    where=lambda root, data, split: f"{root / IMAGE_DIR / split}",
    manual=f"the folder with {IMAGE_DIR}/ and {LABEL_DIR}/ of the official Cityscapes download")

# Cityscapes' colours of the 19 train ids (cityscapesScripts labels.py), in train-id order: its
# label PNGs and overlays (predict_images) look as every Cityscapes tool shows them.
COLOURS = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
           (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
           (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
           (0, 80, 100), (0, 0, 230), (119, 11, 32))

CITYSCAPES = natural.make_spec(
    NAME, "Cityscapes", LAYOUT, CODEC, CLASS_NAMES,
    fields={"labeled_images": 20, "resize": (512, 1024), "random_scale": False},
    description="Cityscapes fine (train 2975 / val 500), label ids mapped to the 19 train ids, the rest 255; RGB "
                "resized to 1024 x 512, per-image mIoU",
    colours=COLOURS)
