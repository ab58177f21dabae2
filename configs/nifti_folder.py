"""ARCO on any NIfTI dataset folder in nnU-Net's layout (dataset.json, imagesTr/, labelsTr/):

  python -m arco_jax.main --config=configs/nifti_folder.py --workdir=runs/mine \
      --config.data.data_dir=/path/to/Dataset001_Mine

Classes, channels and the ignore label come from dataset.json; nothing else is required. The
defaults: 4 labeled cases (the first of a seeded order), 10 % of the cases for validation and
20 % for test, each channel normalised by its modality ('CT': clipped to the labeled cases'
foreground 0.5-99.5 percentiles and scaled to [0, 1]; otherwise a per-volume z-score), cases
resampled to their median spacing when they differ (arco_jax/data/nifti_folder.py documents
every field: labeled_list, val_list, test_list, ct_window, target_spacing, ...).

Two modes, chosen in the config string after ':' (with the method presets of configs/acdc.py):

  --config=configs/nifti_folder.py                    2-D: slices through the UNet, the ACDC
                                                      settings (256 x 256 patches, 4 + 4)
  --config=configs/nifti_folder.py:mode=3d            3-D: patches through the VNet, the Left
                                                      Atrium settings ((80, 112, 112), 4 + 4)
  --config=configs/nifti_folder.py:mode=3d,method=supervised

Evaluation is per volume, on the preprocessed grid (Dice, Jaccard, HD95 and ASD per class; the
2-D mode slice by slice, the 3-D mode by sliding windows), and selects the checkpoint on val.
"""
import ml_collections

from arco_jax import methods
from arco_jax.config import base_config
from arco_jax.data import registry

MODES = ("2d", "3d")


def split_mode(config_string: str | None) -> tuple[str, str]:
    """('2d' or '3d', the rest of the config string for the method presets)."""
    mode, rest = "2d", []
    for setting in (config_string or "").split(","):
        key, _, value = setting.partition("=")
        if key.strip() == "mode":
            mode = value.strip()
            if mode not in MODES:
                raise ValueError(f"config string: mode={mode!r} is not one of {', '.join(MODES)}")
        elif setting.strip():
            rest.append(setting)
    return mode, ",".join(rest)


def get_config(config_string: str | None = None):
    mode, rest = split_mode(config_string)
    config = base_config()
    registry.select(config, "nifti_folder")
    config.data.mode = mode
    if mode == "3d":
        config.model.name = "vnet"
        config.model.vnet = ml_collections.ConfigDict({"n_filters": 16, "dropout": True})
        config.model.rep_dim = 16
        config.data.patch_size = (80, 112, 112)
        config.data.batch_labeled = config.data.batch_unlabeled = 4
        config.train.steps = 6000
        config.pretrain.steps = 0
        config.eval.window = (80, 112, 112)
        config.eval.stride = (4, 18, 18)
        config.arco.remat_student = True
        methods.apply_method(config, "arco_sag")
        config = methods.apply_config_string(config, rest)
        if config.method.startswith("arco_"):
            config.loss_weights.eqv = 0.0  # As configs/la.py: the reference's 3-D objective.
        return config
    config.pretrain.steps = 0
    return methods.apply_config_string(config, rest)
