"""Grain input pipelines: weakly augmented labeled and unlabeled training streams.

Each stream is a grain MapDataset chain

  source -> shuffle(seed) -> repeat() -> random_map(weak_augment) -> [shard::count]
         -> batch(per-process batch) -> to_iter_dataset -> mp_prefetch(workers)

Why this order:
- shuffle before repeat reshuffles every epoch (grain mixes the epoch into the seed);
- the augmentation RNG is grain's, keyed by (seed, global element index), so an element's
  augmentation does not depend on workers, processes or where a run was resumed;
- sharding after shuffle/augment hands process p the global elements p, p + n, p + 2n, ...:
  every process reads only its own slices, the union of the per-process batches of step t
  is the global batch t of a one-process run, and even a tiny labeled set (23 slices) is
  covered in full every epoch by all processes together.
The iterator state is grain's (a small JSON-able dict), so `get_state`/`set_state` or
`grain.checkpoint.CheckpointSave/Restore` resume the exact stream.

Grain worker processes read absl flags; outside `absl.app.run` (tests, notebooks) the flags
are unparsed, so workers > 0 marks them parsed first.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterator

import grain
import numpy as np
from scipy import ndimage

from arco_jax.data import ssl4mis
from arco_jax.data.ssl4mis import iterate_volumes  # noqa: F401  (the eval-side helper)

ROTATE_FLIP_PROBABILITY = 0.5
ROTATE_PROBABILITY = 0.5  # of the remaining half
MAX_ROTATION_DEGREES = 20


def resize_nearest(array: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resize of the leading len(size) axes as SSL4MIS does (scipy zoom,
    order 0), for image and label; trailing axes (channels) are kept."""
    spatial = array.shape[:len(size)]
    if spatial == tuple(size):
        return array
    factors = tuple(t / s for t, s in zip(size, spatial)) + (1,) * (array.ndim - len(size))
    return ndimage.zoom(array, factors, order=0)


def weak_augment(image: np.ndarray, label: np.ndarray, patch_size: tuple[int, ...],
                 rng: np.random.Generator, fill_label: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The reference's per-sample weak augmentation, with the same transform on both arrays.

    image (*spatial, C) and label (*spatial) with len(patch_size) spatial axes (2, or 3 with
    depth first). Resize to patch_size (nearest, image and label, first, as the reference);
    then with p=.5 rot90 in the last two spatial axes (the image plane) by a random k and a
    flip along a random one of them; otherwise with p=.5 an in-plane rotation by an integer
    angle in [-20, 20) degrees (nearest; corners 0 in the image, `fill_label` in the label);
    otherwise nothing. A non-square plane is turned by 0 or 180 degrees only, so its shape holds.
    """
    rank = len(patch_size)
    plane = (rank - 2, rank - 1)
    image, label = resize_nearest(image, patch_size), resize_nearest(label, patch_size)
    if rng.random() < ROTATE_FLIP_PROBABILITY:
        k, axis = int(rng.integers(4)), int(rng.integers(2))
        if patch_size[-1] != patch_size[-2]:
            k &= ~1
        image = np.flip(np.rot90(image, k, axes=plane), plane[axis])
        label = np.flip(np.rot90(label, k, axes=plane), plane[axis])
    elif rng.random() < ROTATE_PROBABILITY:
        angle = int(rng.integers(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES))
        image = ndimage.rotate(image, angle, axes=plane[::-1], order=0, reshape=False)
        label = ndimage.rotate(label, angle, axes=plane[::-1], order=0, reshape=False, cval=fill_label)
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def rot_flip_crop(image: np.ndarray, label: np.ndarray, patch_size: tuple[int, ...],
                  rng: np.random.Generator, fill_label: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """UA-MT's training view of an LA volume (RandomRotFlip, then RandomCrop), the same transform
    on both arrays: image (*spatial, C) and label (*spatial), depth first.

    rot90 in the image plane (the last two spatial axes) by a random k in 0..3 and a flip along a
    random one of its two axes; then a random crop to patch_size. A sample not larger than the
    patch in some axis is first padded on both sides of every axis by max((patch - size) // 2 + 3,
    0) (zeros in the image, `fill_label` in the label), as the reference, so a crop always fits;
    a crop starts at a uniform integer in [0, size - patch) (the reference's randint, which never
    takes the last position).
    """
    rank = len(patch_size)
    plane = (rank - 2, rank - 1)
    k, axis = int(rng.integers(4)), int(rng.integers(2))
    image = np.flip(np.rot90(image, k, axes=plane), plane[axis])
    label = np.flip(np.rot90(label, k, axes=plane), plane[axis])
    if any(s <= p for s, p in zip(label.shape, patch_size)):
        pads = [max((p - s) // 2 + 3, 0) for s, p in zip(label.shape, patch_size)]
        image = np.pad(image, [(q, q) for q in pads] + [(0, 0)] * (image.ndim - rank))
        label = np.pad(label, [(q, q) for q in pads], constant_values=fill_label)
    starts = [int(rng.integers(0, s - p)) for s, p in zip(label.shape, patch_size)]
    window = tuple(slice(a, a + p) for a, p in zip(starts, patch_size))
    return np.ascontiguousarray(image[window]), np.ascontiguousarray(label[window])


NATURAL_SCALE_RANGE = (0.5, 1.5)  # ReCo's random scale of Pascal VOC and SUN RGB-D
FLIP_PROBABILITY = 0.5


def scale_crop_flip(image: np.ndarray, label: np.ndarray, patch_size: tuple[int, ...], rng: np.random.Generator,
                    fill_label: int = 0, scale_range: tuple[float, float] = NATURAL_SCALE_RANGE,
                    flip_prob: float = FLIP_PROBABILITY) -> tuple[np.ndarray, np.ndarray]:
    """ReCo's training view of a natural image, the same transform on both arrays: image RGB uint8
    (H, W, 3) as the natural-image sources give it, label (H, W) with values 0..255.

    Scale by s ~ U(scale_range) to int(H s) x int(W s) (image bilinear, label nearest); pad at the
    bottom and right to at least patch_size (the image by reflection, as ReCo; the label with
    `fill_label`, the ignore label, so padding is never trained on); crop patch_size at a uniform
    position; flip horizontally with p = `flip_prob` (.5; 0 draws nothing); then normalise the image
    with ImageNet's mean and std (float32), which is what the network was pretrained on.
    """
    from arco_jax.data import natural  # pylint: disable=import-outside-toplevel  (PIL, only for RGB data)

    if len(patch_size) != 2 or image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"scale_crop_flip takes RGB uint8 images (H, W, 3) and a 2-D patch, got {image.dtype} "
                         f"{image.shape} and patch {tuple(patch_size)}")
    height, width = label.shape
    scale = float(rng.uniform(*scale_range))
    size = (max(int(height * scale), 1), max(int(width * scale), 1))
    if size != (height, width):
        image, label = natural.resize_pair(image, label.astype(np.uint8), size)
    pads = [max(p - s, 0) for p, s in zip(patch_size, label.shape)]
    if any(pads):
        image = np.pad(image, [(0, pads[0]), (0, pads[1]), (0, 0)], mode="reflect")
        label = np.pad(label, [(0, pads[0]), (0, pads[1])], constant_values=fill_label)
    top, left = (int(rng.integers(0, s - p + 1)) for s, p in zip(label.shape, patch_size))
    image = image[top:top + patch_size[0], left:left + patch_size[1]]
    label = label[top:top + patch_size[0], left:left + patch_size[1]]
    if flip_prob > 0 and rng.random() < flip_prob:
        image, label = image[:, ::-1], label[:, ::-1]
    return natural.normalize_rgb(np.ascontiguousarray(image)), np.ascontiguousarray(label)


WEAK_AUGMENTATIONS = {"resize_rotate": weak_augment, "rot_flip_crop": rot_flip_crop,
                      "scale_crop_flip": scale_crop_flip,
                      "crop_flip": functools.partial(scale_crop_flip, scale_range=(1.0, 1.0)),  # Cityscapes (ReCo)
                      # ReCo's unlabeled images (BuildDataLoader.build: scale (1.0, 1.0), augmentation=False):
                      # reflection padding to the patch and a random crop, no scaling, no flip.
                      "crop": functools.partial(scale_crop_flip, scale_range=(1.0, 1.0), flip_prob=0.0)}
NATURAL_VIEWS = ("scale_crop_flip", "crop_flip", "crop")  # RGB uint8 in, ImageNet-normalised out


def _augment_element(element: dict, rng: np.random.Generator, *, patch_size: tuple[int, ...],
                     keep_label: bool, fill_label: int, augmentation: str = "resize_rotate") -> dict:
    image = element["image"]
    if image.ndim == len(patch_size):  # A single-channel image without its channel axis.
        image = image[..., None]
    image, label = WEAK_AUGMENTATIONS[augmentation](image, element["label"], patch_size, rng, fill_label)
    out = {"image": image.astype(np.float32)}
    if keep_label:
        out["label"] = label.astype(np.int32)
    return out


def stream_seeds(seed: int, stream: int) -> tuple[int, int]:
    """Independent (shuffle, augment) seeds of one stream, derived from the run seed."""
    shuffle_seed, augment_seed = np.random.SeedSequence([seed, stream]).generate_state(2)
    return int(shuffle_seed), int(augment_seed)


def _ensure_absl_flags_parsed() -> None:
    from absl import flags  # pylint: disable=import-outside-toplevel

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_stream(source: grain.sources.RandomAccessDataSource, *, global_batch_size: int,
                patch_size: tuple[int, ...], seed: int, stream: int = 0,
                shard: grain.sharding.ShardOptions | None = None, worker_count: int = 0,
                read_threads: int = 2, prefetch_buffer: int = 4,
                keep_label: bool = True, fill_label: int = 0,
                augmentation: str = "resize_rotate") -> grain.IterDataset:
    """An infinite stream of per-process batches from one source of images (or volumes).

    Yields dict(image (b, *patch_size, C) float32[, label (b, *patch_size) int32]) with
    b = global_batch_size / shard.shard_count. `fill_label`: the label of pixels a rotation
    or padding brings in (the dataset's ignore label if it has one). `augmentation`: the weak
    view, a key of WEAK_AUGMENTATIONS (the dataset's DatasetInfo.weak_augment).
    """
    if augmentation not in WEAK_AUGMENTATIONS:
        raise ValueError(f"augmentation {augmentation!r} is not one of {', '.join(WEAK_AUGMENTATIONS)}")
    shard = shard if shard is not None else grain.sharding.ShardByJaxProcess()
    if global_batch_size % shard.shard_count:
        raise ValueError(f"global batch {global_batch_size} is not divisible by "
                         f"{shard.shard_count} processes")
    if len(patch_size) not in (2, 3):
        raise ValueError(f"patch_size must have 2 or 3 axes, got {patch_size}")
    if worker_count < 0:
        raise ValueError(f"worker_count must be >= 0, got {worker_count}")
    shuffle_seed, augment_seed = stream_seeds(seed, stream)
    augment = functools.partial(_augment_element, patch_size=tuple(patch_size),
                                keep_label=keep_label, fill_label=fill_label, augmentation=augmentation)
    ds = (grain.MapDataset.source(source)
          .shuffle(seed=shuffle_seed)
          .repeat()
          .random_map(augment, seed=augment_seed))
    ds = ds[shard.shard_index::shard.shard_count]
    ds = ds.batch(global_batch_size // shard.shard_count, drop_remainder=True)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=prefetch_buffer))
    if worker_count > 0:
        _ensure_absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return ds


class TrainStreams:
    """The labeled and unlabeled training streams of one process, with one joint state.

    next(streams) -> (labeled batch, unlabeled batch). `labeled` and `unlabeled` are grain
    DatasetIterators (each checkpointable with grain.checkpoint.CheckpointSave/Restore);
    get_state/set_state cover both at once.
    """

    def __init__(self, labeled: grain.IterDataset, unlabeled: grain.IterDataset):
        self.labeled = iter(labeled)
        self.unlabeled = iter(unlabeled)

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        return self

    def __next__(self) -> tuple[dict, dict]:
        return next(self.labeled), next(self.unlabeled)

    def get_state(self) -> dict[str, Any]:
        return {"labeled": self.labeled.get_state(), "unlabeled": self.unlabeled.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self.labeled.set_state(state["labeled"])
        self.unlabeled.set_state(state["unlabeled"])

    def close(self) -> None:
        for it in (self.labeled, self.unlabeled):
            close = getattr(it, "close", None)
            if close is not None:
                close()


def make_source_streams(labeled_source, unlabeled_source, *, labeled_batch_size: int,
                        unlabeled_batch_size: int, patch_size: tuple[int, ...], seed: int,
                        shard: grain.sharding.ShardOptions | None = None, worker_count: int = 0,
                        unlabeled_with_labels: bool = False, fill_label: int = 0,
                        augmentation: str = "resize_rotate", unlabeled_augmentation: str | None = None
                        ) -> TrainStreams:
    """Labeled and unlabeled streams over two random-access sources of slices (any of
    `arco_jax.data.datasets`). Batch sizes are global (over all processes); each process gets
    its share. The streams use independent seeds derived from `seed`. Unlabeled batches carry
    no label unless `unlabeled_with_labels` (for diagnostics only). The unlabeled stream's view
    is `unlabeled_augmentation` (None: `augmentation`, both streams alike)."""
    common = dict(patch_size=patch_size, seed=seed, shard=shard, worker_count=worker_count, fill_label=fill_label)
    labeled = make_stream(labeled_source, global_batch_size=labeled_batch_size, stream=0, augmentation=augmentation,
                          **common)
    unlabeled = make_stream(unlabeled_source, global_batch_size=unlabeled_batch_size, stream=1,
                            keep_label=unlabeled_with_labels, augmentation=unlabeled_augmentation or augmentation,
                            **common)
    return TrainStreams(labeled, unlabeled)


def make_train_streams(root: str | os.PathLike, *, num_labeled_slices: int, num_classes: int = 4,
                       **kwargs) -> TrainStreams:
    """`make_source_streams` over an SSL4MIS folder: the labeled set is the first
    num_labeled_slices lines of train_slices.list, the rest is unlabeled."""
    labeled_names, unlabeled_names = ssl4mis.split_labeled(root, num_labeled_slices)
    return make_source_streams(ssl4mis.SliceSource(root, labeled_names, num_classes),
                               ssl4mis.SliceSource(root, unlabeled_names, num_classes), **kwargs)
