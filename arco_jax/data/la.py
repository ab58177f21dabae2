"""The Left Atrium (LA, 2018 Atrial Segmentation Challenge) in the UA-MT processed layout, as a
registered dataset (arco_jax.data.registry): one foreground class, 3-D volumes, evaluated per
volume.

Layout under config.data.data_dir (the `data/` folder of yulequan/UA-MT):
  train.list, test.list                   case ids, one per line (80 and 20 in the release)
  2018LA_Seg_Training Set/<id>/mri_norm2.h5
      image  float32 (H, W, D), z-scored per volume, D (the slice axis) last, e.g. (183, 140, 88)
      label  uint8 (H, W, D), 0 background / 1 left atrium

Axes: this code base puts depth FIRST for 3-D data, (D, H, W). The reader transposes the h5's
(H, W, D) to (D, H, W) for training and evaluation alike, so the reference's 112 x 112 x 80
patch (H, W, D) is data.patch_size = (80, 112, 112) here, and the reference's rotations and
flips in its first two axes (the H, W plane) are the pipeline's in the last two. Training
samples are whole volumes of different sizes; the dataset's weak view is UA-MT's
('rot_flip_crop' in data/pipeline.py: in-plane rot90 and flip, then a random patch crop).

Splits, as UA-MT / ARCO (train_LA.py):
  labeled    the first `labeled_cases` (K) lines of train.list (the paper's settings: 1, 4, 8);
  val        the LAST `val_cases` (N) lines of train.list, held out, never trained on. The
             reference has none (N = 0, the default) and tests the last iteration; with N = 0
             the val split is empty;
  unlabeled  every other line of train.list: neither labeled nor val. The reference's
             TwoStreamBatchSampler draws the unlabeled stream from the indices after the
             labeled ones only, so the labeled cases are not in the unlabeled stream here either;
  test       test.list.
The unlabeled source keeps each volume's label because the pipeline's weak augmentation
transforms image and label together; the training streams drop it (make_source_streams:
unlabeled batches carry no label unless asked for diagnostics).

Two sources hold the same cases (config.data.source): 'h5', the UA-MT folder above, or 'tfds',
the array_record folder that `arco_jax.data.tfds_la` builds from it (volumes already depth first,
records in list order; read without TensorFlow). Only where the case ids and volumes come from
differs (H5Store, tfds_la.TfdsStore); the splits are made once, in LADataset, so both give the
same labeled, unlabeled, val and test cases.

Checks, each a one-line error naming the field or the file (ConfigError for config.data fields,
DataError for files), all before training starts:
  validate  source 'h5' or 'tfds'; data_dir given and a local directory; labeled_cases an integer
            in 1 .. len(train.list) - val_cases - 1 (one unlabeled case at least); val_cases >= 0.
            Reads train.list (a short text file), or the TFDS folder's metadata, and nothing else.
  open      h5: both lists present and non-empty, no case twice in a list nor in both; every
            listed case's folder and mri_norm2.h5 present, holding 3-D `image` and `label`
            datasets of one shape: read from the HDF5 metadata only, no voxel is read (about 100
            small opens). tfds: the prepared folder, its splits and case lists (JSON only).
  reading   the voxels are checked when a case is read (by the training sources or the
            evaluators): a numeric finite image, a label with values in {0, 1} only (tfds: when
            the records were built; reading checks that a record is the list line expected).
            Reading every volume at open time (about 9 MB each, gzip) would cost seconds to
            minutes per start for a check that reading does anyway.

Its config.data fields:
  labeled_cases   K, default 4
  val_cases       N, default 0
  source          'h5' (default) or 'tfds' (data_dir is then the TFDS data folder)
"""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import ml_collections
import numpy as np

from arco_jax.data import registry
from arco_jax.data.ssl4mis import DataError
from arco_jax.errors import ConfigError

NAME = "la"
TRAIN_LIST, TEST_LIST = "train.list", "test.list"
CASE_DIR = "2018LA_Seg_Training Set"
VOLUME_FILE = "mri_norm2.h5"
KEYS = ("image", "label")
CLASS_NAMES = ("left atrium",)
INFO = registry.DatasetInfo(num_classes=2, class_names=CLASS_NAMES, ignore_label=None, spatial_rank=3,
                            in_channels=1, has_spacing=False, eval_unit="volume", weak_augment="rot_flip_crop",
                            intensity="zscore", h5_axes="hwd")
SPLITS = ("val", "test")
SOURCES = ("h5", "tfds")
_MAX_SHOWN_VALUES = 5


def _fail(field: str, problem: str) -> None:
    raise ConfigError(f"config.data.{field}: {problem}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def read_list(path: Path) -> list[tuple[int, str]]:
    """(line number, case id) of each non-blank line of a list file, in file order."""
    if not path.is_file():
        raise DataError(f"list file {path} is missing (the UA-MT layout holds {TRAIN_LIST} and {TEST_LIST} "
                        f"next to '{CASE_DIR}')")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"list file {path} cannot be read ({err})") from err
    entries = [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not entries:
        raise DataError(f"list file {path} is empty")
    return entries


def volume_path(root: Path, case: str) -> Path:
    return root / CASE_DIR / case / VOLUME_FILE


def _check_metadata(root: Path, list_path: Path, number: int, case: str) -> None:
    """A listed case's folder, file and datasets (shapes from the HDF5 metadata; no voxel read)."""
    where = f"{list_path} line {number}: case {case!r}"
    folder = root / CASE_DIR / case
    if not folder.is_dir():
        raise DataError(f"{where}: folder {folder} is missing")
    path = folder / VOLUME_FILE
    if not path.is_file():
        raise DataError(f"{where}: {path} is missing")
    try:
        with h5py.File(path, "r") as f:
            shapes = {}
            for key in KEYS:
                if key not in f or not isinstance(f[key], h5py.Dataset):
                    raise DataError(f"{path}: dataset '{key}' is missing (found {sorted(f.keys())})")
                shapes[key] = f[key].shape
    except OSError as err:
        raise DataError(f"{path}: cannot be read as HDF5 ({err})") from err
    if len(shapes["image"]) != 3:
        raise DataError(f"{path}: 'image' must have 3 dims (H, W, D), has shape {shapes['image']}")
    if shapes["image"] != shapes["label"]:
        raise DataError(f"{path}: 'image' shape {shapes['image']} != 'label' shape {shapes['label']}")


def read_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 (D, H, W), label uint8 (D, H, W)) of one mri_norm2.h5, whose arrays are
    (H, W, D); the voxels are checked here (finite image, label in {0, 1}); errors name the file."""
    try:
        with h5py.File(path, "r") as f:
            arrays = {}
            for key in KEYS:
                if key not in f or not isinstance(f[key], h5py.Dataset):
                    raise DataError(f"{path}: dataset '{key}' is missing (found {sorted(f.keys())})")
                arrays[key] = f[key][()]
    except OSError as err:
        raise DataError(f"{path}: cannot be read as HDF5 ({err})") from err
    image, label = arrays["image"], arrays["label"]
    if image.ndim != 3:
        raise DataError(f"{path}: 'image' must have 3 dims (H, W, D), has shape {image.shape}")
    if image.shape != label.shape:
        raise DataError(f"{path}: 'image' shape {image.shape} != 'label' shape {label.shape}")
    if not np.issubdtype(image.dtype, np.number) or not np.issubdtype(label.dtype, np.number):
        raise DataError(f"{path}: 'image' ({image.dtype}) and 'label' ({label.dtype}) must be numeric")
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise DataError(f"{path}: 'image' has non-finite values (e.g. {image[~np.isfinite(image)][0]})")
    outside = (label != 0) & (label != 1)
    if outside.any():
        values = np.unique(label[outside])
        shown = ", ".join(str(v) for v in values[:_MAX_SHOWN_VALUES].tolist())
        more = f" and {len(values) - _MAX_SHOWN_VALUES} more" if len(values) > _MAX_SHOWN_VALUES else ""
        raise DataError(f"{path}: 'label' has values {shown}{more} outside {{0, 1}}")
    # (H, W, D) -> (D, H, W), contiguous for the pipeline and the evaluators.
    image = np.ascontiguousarray(np.transpose(image, (2, 0, 1)))
    label = np.ascontiguousarray(np.transpose(label, (2, 0, 1)).astype(np.uint8, copy=False))
    return image, label


class VolumeSource:
    """Random-access source of whole LA volumes (grain RandomAccessDataSource protocol).

    Item: dict(image (D, H, W) float32, label (D, H, W) int32, name str). Volumes differ in
    size; the pipeline's weak view crops each to data.patch_size. One h5 is opened per
    item, so the source pickles into Grain worker processes.
    """

    def __init__(self, root: str | os.PathLike, cases: list[str]):
        self._root = Path(root)
        self._cases = list(cases)

    @property
    def names(self) -> list[str]:
        return list(self._cases)

    def __len__(self) -> int:
        return len(self._cases)

    def __getitem__(self, index: int) -> dict:
        case = self._cases[index]
        image, label = read_volume(volume_path(self._root, case))
        return {"image": image, "label": label.astype(np.int32), "name": case}

    def __repr__(self) -> str:
        return f"VolumeSource({self._root / CASE_DIR}, {len(self)} volumes)"


def _pluralize(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def read_lists(root: Path) -> dict[str, list[tuple[int, str]]]:
    """train.list and test.list of a UA-MT folder: {list name: (line, case) entries}, checked for
    a case listed twice and for a test case that is also a training case."""
    lists = {}
    for list_name in (TRAIN_LIST, TEST_LIST):
        path = root / list_name
        entries = read_list(path)
        first_line: dict[str, int] = {}
        for number, case in entries:
            if case in first_line:
                raise DataError(f"{path} line {number}: case {case!r} is listed again (first at line "
                                f"{first_line[case]})")
            first_line[case] = number
        lists[list_name] = entries
    train_lines = {case: number for number, case in lists[TRAIN_LIST]}
    for number, case in lists[TEST_LIST]:
        if case in train_lines:
            raise DataError(f"{root / TEST_LIST} line {number}: case {case!r} is also in {root / TRAIN_LIST} "
                            f"(line {train_lines[case]}): test cases must not be trained on")
    return lists


class ListedCases:
    """A store's case ids per split ('train', 'test') in `_cases`, list order, as properties."""

    _cases: dict[str, list[str]]

    @property
    def train_cases(self) -> list[str]:
        return list(self._cases["train"])

    @property
    def test_cases(self) -> list[str]:
        return list(self._cases["test"])


class H5Store(ListedCases):
    """The cases of a UA-MT folder (lists read, every listed file's metadata checked): where an h5
    run's case ids and volumes come from. tfds_la.TfdsStore is the same for the TFDS form.

    A store has train_cases and test_cases (list order), train_where (the train list, for
    errors), kind (for the log), read(split, index) -> (image float32, label uint8), both
    (D, H, W), and source(split, positions) -> a Grain source of those volumes.
    """

    kind = "UA-MT layout"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        lists = read_lists(self.root)
        for list_name, entries in lists.items():
            for number, case in entries:
                _check_metadata(self.root, self.root / list_name, number, case)
        self._cases = {"train": [case for _, case in lists[TRAIN_LIST]],
                       "test": [case for _, case in lists[TEST_LIST]]}
        self.train_where = str(self.root / TRAIN_LIST)

    def read(self, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        return read_volume(volume_path(self.root, self._cases[split][index]))

    def source(self, split: str, positions: range) -> VolumeSource:
        return VolumeSource(self.root, [self._cases[split][i] for i in positions])


def open_store(config: ml_collections.ConfigDict):
    """The store config.data.source names (tensorflow_datasets is imported for 'tfds' only)."""
    d = config.data
    if d.source == "tfds":
        from arco_jax.data import tfds_la  # pylint: disable=import-outside-toplevel

        return tfds_la.TfdsStore(d.data_dir)
    return H5Store(d.data_dir)


class LADataset:
    """The LA cases opened for one run and split into labeled / unlabeled / val / test (here
    only, whichever store they come from).

    root: a UA-MT folder read as 'h5' (the built-in 3-D phantom passes its cache); default:
    config.data.data_dir in config.data.source's form."""

    def __init__(self, config: ml_collections.ConfigDict, root: str | os.PathLike | None = None):
        d = config.data
        if root is None:
            _check_fields(config)
            store = open_store(config)
        else:
            check_counts(config)
            store = H5Store(root)
        self.root = Path(d.data_dir if root is None else root)
        self.store = store
        train, test = store.train_cases, store.test_cases
        k, n = d.labeled_cases, d.val_cases
        _check_bounds(k, n, len(train), store.train_where)
        end = len(train) - n
        # (store split, positions) of each part: the one place the splits are made.
        self._parts = {"labeled": ("train", range(k)), "unlabeled": ("train", range(k, end)),
                       "val": ("train", range(end, len(train))), "test": ("test", range(len(test)))}
        self._names = {"train": train, "test": test}
        self.labeled_cases, self.unlabeled_cases = self._part_cases("labeled"), self._part_cases("unlabeled")
        self.labeled_count = k
        self.labeled_description = f"{_pluralize(k, 'labeled case')} (first {k} of {TRAIN_LIST})"
        self.labeled_record = {"labeled_cases": k, "labeled_case_ids": list(self.labeled_cases)}
        val = f", the last {n} held out for val" if n else ", no val split"
        self.description = (f"{self.root} (LA, {store.kind}: {len(train)} train cases{val}; "
                            f"{len(test)} test cases)")

    def __str__(self) -> str:
        return self.description

    def _part_cases(self, part: str) -> list[str]:
        store_split, positions = self._parts[part]
        return [self._names[store_split][i] for i in positions]

    def train_sources(self):
        return tuple(self.store.source(*self._parts[part]) for part in ("labeled", "unlabeled"))

    def cases(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self._part_cases(split)

    def case(self, split: str, index: int) -> registry.Case:
        case = self.cases(split)[index]
        store_split, positions = self._parts[split]
        image, label = self.store.read(store_split, positions[index])
        return registry.Case(case, image, label, spacing=None)


def _check_bounds(labeled: int, val: int, train_count: int, train_where: str | Path) -> None:
    most = train_count - val - 1
    if not 1 <= labeled <= most:
        _fail("labeled_cases", f"{labeled} is not in 1..{most}: {train_where} has {train_count} cases, "
              f"val_cases holds out {val} and at least one must stay unlabeled")


def check_counts(config: ml_collections.ConfigDict) -> None:
    """labeled_cases and val_cases are integers in range (their bound on train.list is checked
    when the list is read)."""
    d = config.data
    if not (_is_int(d.val_cases) and d.val_cases >= 0):
        _fail("val_cases", f"must be an integer >= 0 (0: no val split, as the reference), got {d.val_cases!r}")
    if not (_is_int(d.labeled_cases) and d.labeled_cases >= 1):
        _fail("labeled_cases", f"must be an integer >= 1 (the paper's settings: 1, 4, 8), got {d.labeled_cases!r}")


def _check_fields(config: ml_collections.ConfigDict) -> None:
    d = config.data
    if d.source not in SOURCES:
        _fail("source", f"{d.source!r} is not one of {', '.join(map(repr, SOURCES))}")
    tfds = d.source == "tfds"
    if not d.data_dir:
        what = ("the TFDS data folder given to `python -m arco_jax.data.tfds_la --data_dir`" if tfds else
                f"the UA-MT data/ folder with {TRAIN_LIST}, {TEST_LIST} and '{CASE_DIR}'")
        _fail("data_dir", f"is required for dataset {NAME!r} with source {d.source!r} ({what})")
    if str(d.data_dir).startswith(("gs://", "s3://")):
        reader = "ArrayRecord" if tfds else "h5py"
        _fail("data_dir", f"{d.data_dir!r} is in a bucket; {reader} needs a local folder here: copy the data to "
              "the machine's disk first")
    if not os.path.isdir(d.data_dir):
        _fail("data_dir", f"{d.data_dir!r} is missing or not a directory")
    check_counts(config)


def validate(config: ml_collections.ConfigDict) -> None:
    """The fields, and labeled_cases against the train split's length (train.list, or the TFDS
    folder's metadata, is read; no volume)."""
    _check_fields(config)
    d = config.data
    if d.source == "tfds":
        store = open_store(config)  # Reads JSON files only.
        count, where = len(store.train_cases), store.train_where
    else:
        where = Path(d.data_dir) / TRAIN_LIST
        count = len(read_list(where))
    _check_bounds(d.labeled_cases, d.val_cases, count, where)


def open_la(config: ml_collections.ConfigDict) -> LADataset:
    return LADataset(config)


def _fields() -> dict:
    return {"labeled_cases": 4, "val_cases": 0, "source": "h5"}


LA = registry.DatasetSpec(
    name=NAME, fields=_fields, info=lambda config: INFO, validate=validate, open=open_la,
    description="Left Atrium MRI (2018 challenge), UA-MT processed layout (or its TFDS form): 3-D volumes "
                "(D, H, W), per-volume eval")
