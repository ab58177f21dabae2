"""Datasets as plug-ins: a name in `config.data.dataset` -> a `DatasetSpec`.

The trainer, the evaluators and the config checks never name a dataset. They read what a
dataset declares about itself (`DatasetInfo`: classes, ignore label, spatial rank, channels,
spacing) and use what it opens (`OpenDataset`: the labeled and unlabeled training sources and
the evaluation cases of each split, read one at a time).

Adding a dataset is a new module with a `DatasetSpec` and one `register(...)` call (or an
entry in `_BUILTIN` for the ones shipped here); nothing else changes:

    SPEC = registry.DatasetSpec(
        name="mine",
        fields=lambda: {"labeled_images": 10},       # its own config.data fields, with defaults
        info=lambda config: registry.DatasetInfo(num_classes=3, class_names=("a", "b"), ...),
        validate=check_my_fields,                     # raise ConfigError naming the field
        open=lambda config: MyOpenDataset(config))
    registry.register(SPEC)

A config file picks a dataset with `registry.select(config, "mine")`, which sets
`config.data.dataset`, adds the dataset's fields and records its metadata in the config
(`data.num_classes`, `data.class_names`, `data.ignore_label`, `data.spatial_rank`,
`data.in_channels`) so that every module downstream reads one resolved config; `resolve`
checks (or, for a dataset whose metadata lives in its folder, fills) them again at run time.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Iterator, Protocol

import ml_collections
import numpy as np

from arco_jax.errors import ConfigError

# Metadata fields a resolved config carries under config.data (declared by the dataset).
METADATA_FIELDS = ("num_classes", "class_names", "ignore_label", "spatial_rank", "in_channels")
EVAL_UNITS = ("volume", "image")
# How a new scan is normalised before it is predicted (predict.normalize): per volume, or
# 'dataset': by the dataset's own preprocessing (the NIfTI folder's plan); 'imagenet': RGB / 255,
# then ImageNet's mean and std per channel (the natural-image datasets, data/natural.py).
INTENSITIES = ("minmax", "zscore", "dataset", "imagenet")
DEPTH_FIRST = "dhw"  # the axis order of 3-D arrays in this code base: (D, H, W)
DATA_RECORD = "data.json"  # In a workdir: the run's OpenDataset.labeled_record (labeled cases, plan).


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a dataset declares about itself; the trainer reads nothing else about it.

    class_names: the foreground classes 1 .. num_classes-1 (class 0 is background).
    ignore_label: a label value that is no class (e.g. 255 for Pascal VOC), left out of every
      loss, sampler, bank and metric; None when every pixel is labeled.
    spatial_rank: 2 (training samples are images or slices) or 3 (volume patches).
    in_channels: channels of an input image (last axis).
    has_spacing: evaluation cases may carry a voxel spacing in mm.
    eval_unit: 'volume' (a stack of slices or a 3-D volume per case) or 'image'.
    weak_augment: the per-sample training view (data/pipeline.py WEAK_AUGMENTATIONS):
      'resize_rotate' (SSL4MIS 2-D: resize to the patch, rot90/flip or a small rotation) or
      'rot_flip_crop' (UA-MT's LA volumes: in-plane rot90 and flip, then a random crop),
      'scale_crop_flip' (ReCo's natural images: random scale 0.5-1.5, crop with ignore-label
      padding, horizontal flip, ImageNet normalisation), 'crop_flip' (the same at scale 1) or
      'crop' (scale 1, no flip).
    intensity: how the dataset's volumes were normalised, so how a new scan is before it is
      predicted: 'minmax' (per volume to [0, 1], as the SSL4MIS conversions stored them) or
      'zscore' (per volume (x - mean) / std, as UA-MT's mri_norm2.h5).
    h5_axes: the axis order of the `image` array in the dataset's h5 volume files, the letters
      d (slices), h and w: 'dhw' (SSL4MIS, stored depth first) or 'hwd' (UA-MT's mri_norm2.h5,
      read transposed to (D, H, W)). An h5 scan given to predict for a run on the dataset is
      read in this order and its labels are written back in it.
    colours: display colours (R, G, B) of classes 0, 1, ... in label PNGs and overlays
      (predict_images); a class past them, or every class when empty, takes VOC's colour map.
    """

    num_classes: int
    class_names: tuple[str, ...]
    ignore_label: int | None = None
    spatial_rank: int = 2
    in_channels: int = 1
    has_spacing: bool = False
    eval_unit: str = "volume"
    weak_augment: str = "resize_rotate"
    intensity: str = "minmax"
    h5_axes: str = DEPTH_FIRST
    colours: tuple[tuple[int, int, int], ...] = ()

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError(f"a dataset needs at least 2 classes, got {self.num_classes}")
        if len(self.class_names) != self.num_classes - 1:
            raise ValueError(f"class_names names the {self.num_classes - 1} foreground classes, "
                             f"got {len(self.class_names)}")
        if self.ignore_label is not None and 0 <= self.ignore_label < self.num_classes:
            raise ValueError(f"ignore_label {self.ignore_label} is a class of 0..{self.num_classes - 1}")
        if self.spatial_rank not in (2, 3):
            raise ValueError(f"spatial_rank must be 2 or 3, got {self.spatial_rank}")
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if self.eval_unit not in EVAL_UNITS:
            raise ValueError(f"eval_unit must be one of {EVAL_UNITS}, got {self.eval_unit!r}")
        from arco_jax.data import pipeline  # pylint: disable=import-outside-toplevel  (pipeline imports grain)

        if self.weak_augment not in pipeline.WEAK_AUGMENTATIONS:
            raise ValueError(f"weak_augment must be one of {tuple(pipeline.WEAK_AUGMENTATIONS)}, "
                             f"got {self.weak_augment!r}")
        if self.intensity not in INTENSITIES:
            raise ValueError(f"intensity must be one of {INTENSITIES}, got {self.intensity!r}")
        if not (isinstance(self.h5_axes, str) and sorted(self.h5_axes) == sorted(DEPTH_FIRST)):
            raise ValueError(f"h5_axes must order the letters of {DEPTH_FIRST!r} (e.g. 'dhw', 'hwd'), "
                             f"got {self.h5_axes!r}")
        if len(self.colours) > self.num_classes:
            raise ValueError(f"colours: {len(self.colours)} for {self.num_classes} classes")
        for index, colour in enumerate(self.colours):
            if len(colour) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in colour):
                raise ValueError(f"colours[{index}] must be three integers in 0..255 (R, G, B), got {colour!r}")


@dataclasses.dataclass(frozen=True)
class Case:
    """One evaluation case: image (*spatial[, C]) float32, label (*spatial) integer, and the
    voxel spacing in mm (in the array's axis order) when the data records it."""

    case: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, ...] | None = None


class OpenDataset(Protocol):
    """What `DatasetSpec.open` returns; everything the job reads from a dataset."""

    description: str  # Where the data is, for the log.
    labeled_count: int  # Labeled training samples.
    labeled_description: str  # The labeled set in the dataset's own words ("3 labeled patients (68 slices)").
    labeled_record: dict  # The same for results.json, e.g. {"labeled_patients": 3, "labeled_slices": 68}.

    def train_sources(self) -> tuple[Any, Any]:
        """(labeled, unlabeled) Grain random-access sources; items are dicts with 'image'
        (*spatial) or (*spatial, C) float32 and 'label' (*spatial) integer."""

    def cases(self, split: str) -> list[str]:
        """The evaluation cases of a split ('val' or 'test'), in a fixed order."""

    def case(self, split: str, index: int) -> Case:
        """Case `index` of `cases(split)`, read from disk when asked for."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its config fields, metadata, checks and reader."""

    name: str
    fields: Callable[[], dict]  # Its own config.data fields and their defaults (nested dicts allowed).
    info: Callable[[ml_collections.ConfigDict], DatasetInfo]
    validate: Callable[[ml_collections.ConfigDict], None]
    open: Callable[[ml_collections.ConfigDict], OpenDataset]
    description: str = ""
    # For DatasetInfo.intensity 'dataset': prepare_scan(plan, channel files) -> PreparedScan, how
    # `predict` turns a new scan into what the network was trained on (the plan is the run's
    # data.json 'preprocessing' record, written by the trainer from OpenDataset.labeled_record).
    prepare_scan: Callable[[dict, list], "PreparedScan"] | None = None


@dataclasses.dataclass(frozen=True)
class PreparedScan:
    """A new scan as a dataset's plan prepares it: volume (D, H, W, C) float32 as the network was
    trained on; to_input_grid(labels (D, H, W), or values (D, H, W, K)) -> the same on the first
    channel file's own voxel grid, in its array order; reference: that file's loaded image (its affine and header are the
    prediction's); display: channel 0 of `volume` before normalisation, in [0, 1], for overlays."""

    volume: np.ndarray
    to_input_grid: Callable[[np.ndarray], np.ndarray]
    reference: Any
    display: np.ndarray


# Datasets shipped with arco_jax, imported when first asked for ("module:attribute").
_BUILTIN = {
    "acdc": "arco_jax.data.ssl4mis_datasets:ACDC",
    "cityscapes": "arco_jax.data.cityscapes:CITYSCAPES",
    "la": "arco_jax.data.la:LA",
    "la_phantom": "arco_jax.data.la_phantom:LA_PHANTOM",
    "nifti_folder": "arco_jax.data.nifti_folder:NIFTI_FOLDER",
    "pascal": "arco_jax.data.voc:PASCAL",
    "phantom": "arco_jax.data.ssl4mis_datasets:PHANTOM",
    "scenes": "arco_jax.data.scenes:SCENES",
    "sun": "arco_jax.data.sun:SUN",
}
_REGISTERED: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec, *, replace: bool = False) -> DatasetSpec:
    """Make `spec` selectable as config.data.dataset = spec.name."""
    if not replace and (spec.name in _REGISTERED or spec.name in _BUILTIN):
        raise ValueError(f"a dataset named {spec.name!r} is already registered")
    _REGISTERED[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _REGISTERED.pop(name, None)


def names() -> tuple[str, ...]:
    return tuple(sorted(set(_BUILTIN) | set(_REGISTERED)))


def get(name: str) -> DatasetSpec:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        raise ConfigError(f"config.data.dataset: {name!r} is not a registered dataset; known: {', '.join(names())}")
    module, attribute = _BUILTIN[name].split(":")
    spec = getattr(importlib.import_module(module), attribute)
    _REGISTERED[name] = spec
    return spec


def _merge(node: ml_collections.ConfigDict, defaults: dict) -> None:
    for key, value in defaults.items():
        if isinstance(value, dict):
            if key not in node:
                node[key] = ml_collections.ConfigDict()
            _merge(node[key], value)
        elif key not in node or node[key] is None:
            node[key] = value


def select(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """Use dataset `name`: set config.data.dataset, add its fields (their defaults; fields
    already set are kept) and record its metadata. Returns config."""
    spec = get(name)
    with config.unlocked():
        config.data.dataset = name
        _merge(config.data, spec.fields())
    return resolve(config, strict=False)


def resolve(config: ml_collections.ConfigDict, *, strict: bool = True) -> ml_collections.ConfigDict:
    """Record the dataset's metadata in config.data (fields left None are filled; a field set
    to something else is refused). `strict=False` skips datasets whose metadata needs their
    folder (the config file runs before --config.data.data_dir is applied). Returns config."""
    d = config.data
    spec = get(d.dataset)
    try:
        info = spec.info(config)
    except ConfigError:
        if strict:
            raise
        return config
    with config.unlocked():
        for field in METADATA_FIELDS:
            declared = getattr(info, field)
            value = d.get(field, None)
            if value is None or value == declared:
                d[field] = declared
            elif not (isinstance(value, (list, tuple)) and tuple(value) == tuple(declared)):
                raise ConfigError(f"config.data.{field}: {value!r}, but dataset {d.dataset!r} declares "
                                  f"{declared!r} (it is the dataset's to say: leave the field unset)")
    return config


def info(config: ml_collections.ConfigDict) -> DatasetInfo:
    return get(config.data.dataset).info(config)


def validate(config: ml_collections.ConfigDict) -> None:
    """The dataset's own checks of its fields (cheap: no data is read)."""
    spec = get(config.data.dataset)
    missing = [key for key in spec.fields() if key not in config.data]
    if missing:
        raise ConfigError(f"config.data.{missing[0]}: missing for dataset {spec.name!r}; a config file picks a "
                          f"dataset with arco_jax.data.registry.select(config, {spec.name!r}), which adds its "
                          "fields")
    spec.validate(config)


def open_dataset(config: ml_collections.ConfigDict) -> OpenDataset:
    return get(config.data.dataset).open(config)


def iterate_cases(data: OpenDataset, split: str, indices=None) -> Iterator[Case]:
    """The cases of a split in order (or those at `indices`), one at a time."""
    for index in indices if indices is not None else range(len(data.cases(split))):
        yield data.case(split, index)
