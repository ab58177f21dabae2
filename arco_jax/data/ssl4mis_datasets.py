"""ACDC and the built-in cardiac phantom as registered datasets (arco_jax.data.registry).

Both are short-axis cardiac stacks in the SSL4MIS processed layout (the phantom is generated
in it) with four classes, trained as 2-D slices and evaluated per volume; ACDC can also be
read from the TFDS folder that `arco_jax.data.tfds_acdc` prepares. "N labeled patients" is
the first K lines of train_slices.list (ssl4mis.labeled_slice_count).

Their config.data fields:
  labeled_patients    ACDC: 1, 3 or 7 (the published settings); phantom: any k >= 1
  one_patient_split   'whole' (32 slices: both frames) or 'reference' (the ARCO code's 23; ACDC)
  source              'h5' (SSL4MIS files) or 'tfds' (ACDC only)
  cache_dir, phantom  where the phantom is generated, and its size (phantom only; a data_dir
                      reads an already written phantom folder instead)
"""
from __future__ import annotations

import os

import ml_collections

from arco_jax.data import datasets, phantom, registry
from arco_jax.errors import ConfigError

CLASS_NAMES = ("RV", "Myo", "LV")
INFO = registry.DatasetInfo(num_classes=4, class_names=CLASS_NAMES, ignore_label=None, spatial_rank=2,
                            in_channels=1, has_spacing=True, eval_unit="volume")
ACDC_LABELED_PATIENTS = (1, 3, 7)
SOURCES = ("h5", "tfds")
ONE_PATIENT_SPLITS = ("whole", "reference")


def _fail(field: str, problem: str) -> None:
    raise ConfigError(f"config.data.{field}: {problem}")


class SliceVolumeDataset:
    """An SSL4MIS-layout (or TFDS-prepared) dataset opened for one run: the labeled set is
    the first K training slices, evaluation cases are the split's volumes."""

    def __init__(self, config: ml_collections.ConfigDict, data: datasets.SegmentationData):
        d = config.data
        self.data = data
        self.description = data.description
        self.num_classes = d.num_classes
        self.labeled_count = data.labeled_slice_count(d.dataset, d.labeled_patients, d.one_patient_split)
        self.labeled_description = f"{d.labeled_patients} labeled patients ({self.labeled_count} slices)"
        self.labeled_record = {"labeled_patients": d.labeled_patients, "labeled_slices": self.labeled_count}

    def __str__(self) -> str:
        return self.description

    def train_sources(self):
        return self.data.train_sources(self.labeled_count, self.num_classes)

    def cases(self, split: str) -> list[str]:
        return self.data.cases(split)

    def case(self, split: str, index: int) -> registry.Case:
        volume = self.data.volume(split, index, self.num_classes)
        return registry.Case(volume.case, volume.image, volume.label, volume.spacing)


def _validate_common(config: ml_collections.ConfigDict) -> None:
    d = config.data
    if d.one_patient_split not in ONE_PATIENT_SPLITS:
        _fail("one_patient_split", f"{d.one_patient_split!r} is not one of {', '.join(map(repr, ONE_PATIENT_SPLITS))}")
    if d.source not in SOURCES:
        _fail("source", f"{d.source!r} is not one of {', '.join(map(repr, SOURCES))}")


def validate_acdc(config: ml_collections.ConfigDict) -> None:
    d = config.data
    _validate_common(config)
    if not d.data_dir:
        _fail("data_dir", "is required for dataset 'acdc' (the folder with train_slices.list, or the TFDS "
              "folder with source 'tfds')")
    if str(d.data_dir).startswith(("gs://", "s3://")):
        _fail("data_dir", f"{d.data_dir!r} is in a bucket; the readers (h5py, ArrayRecord) need a local folder: "
              "copy the data to the machine's disk first (launch/tpu_vm.sh does), and keep the workdir in the bucket")
    if not os.path.isdir(d.data_dir):
        _fail("data_dir", f"{d.data_dir!r} is not a directory")
    if d.labeled_patients not in ACDC_LABELED_PATIENTS:
        _fail("labeled_patients", f"ACDC settings are 1, 3 or 7 patients, got {d.labeled_patients!r}")


def validate_phantom(config: ml_collections.ConfigDict) -> None:
    d = config.data
    _validate_common(config)
    if d.source == "tfds":
        _fail("source", "'tfds' is built for ACDC only; the 'phantom' dataset is read as 'h5'")
    if not (isinstance(d.labeled_patients, int) and d.labeled_patients >= 1):
        _fail("labeled_patients", f"must be an integer >= 1, got {d.labeled_patients!r}")
    if d.data_dir and not os.path.isdir(d.data_dir):
        _fail("data_dir", f"{d.data_dir!r} is not a directory (leave it empty to generate the phantom)")


def open_acdc(config: ml_collections.ConfigDict) -> SliceVolumeDataset:
    d = config.data
    data = datasets.TfdsData(d.data_dir) if d.source == "tfds" else datasets.Ssl4misData(d.data_dir, d.num_classes)
    return SliceVolumeDataset(config, data)


def open_phantom(config: ml_collections.ConfigDict) -> SliceVolumeDataset:
    """The phantom, generated into its cache on first use; with data.data_dir, a phantom
    folder already written (e.g. a copy given to `evaluate --data_dir`)."""
    d, p = config.data, config.data.phantom
    root = d.data_dir or phantom.ensure_phantom(d.cache_dir or None, splits=tuple(p.splits), image_size=p.image_size,
                                                slices=tuple(p.slices), seed=p.seed)
    return SliceVolumeDataset(config, datasets.Ssl4misData(root, d.num_classes))


def _acdc_fields() -> dict:
    return {"labeled_patients": 7, "one_patient_split": "whole", "source": "h5"}


def _phantom_fields() -> dict:
    defaults = phantom.PhantomConfig()
    return {**_acdc_fields(), "labeled_patients": 3,
            "cache_dir": "",  # '' -> $ARCO_JAX_CACHE or ~/.cache/arco_jax
            "phantom": {"splits": tuple(defaults.splits), "image_size": defaults.image_size,
                        "slices": tuple(defaults.slices), "seed": defaults.seed}}


ACDC = registry.DatasetSpec(
    name="acdc", fields=_acdc_fields, info=lambda config: INFO, validate=validate_acdc, open=open_acdc,
    description="ACDC cardiac cine MRI, SSL4MIS processed layout (or its TFDS form): 2-D slices, per-volume eval")
PHANTOM = registry.DatasetSpec(
    name="phantom", fields=_phantom_fields, info=lambda config: INFO, validate=validate_phantom, open=open_phantom,
    description="built-in synthetic cardiac phantom in the SSL4MIS layout (generated on first use)")
