"""ARCO on MM-WHS (whole-heart CT or MR, seven structures), 2-D as the reference code trains
it, on the folder that `python -m arco_jax.data.convert_mmwhs` writes from the official release:

  python -m arco_jax.data.convert_mmwhs --raw_dir=/path/to/MM-WHS/ct_train --out_dir=/path/to/MMWHS_CT
  python -m arco_jax.main --config=configs/mmwhs.py --workdir=runs/mmwhs_sg_5 \
      --config.data.data_dir=/path/to/MMWHS_CT --config.data.labeled_cases=5

Splits: ARCO's 15 training / 5 test volumes (test.txt: the last 5 by number); the first
labeled_cases of a seeded order of the 15 are labeled (the paper: 1, 2, 5, 10 volumes; the
reference's slice counts are 38 / 76 / 191 / 382), the rest unlabeled. There is no validation
split, as in the reference: the last state is tested (--config.data.val_fraction=0.05 holds one
volume out for selection). Intensities by modality ('auto': CT clipped to the labeled volumes'
foreground 0.5-99.5 percentiles and scaled to [0, 1], MR z-scored per volume); slices
resampled in plane to the median spacing, then resized to 256 x 256. Eight classes: background,
Myo, LA, LV, RA, RV, AA, PA.

Method presets as configs/acdc.py: --config=configs/mmwhs.py:method=supervised.
Published (paper Table 6, average Dice % / ASD in its three labeled settings, smallest first):
ARCO-SG 87.3 / 5.79, 89.3 / 4.80, 89.4 / 4.80; MONA 82.2, 87.3, 87.6; UNet labeled-only 58.3, 72.3,
77.8.
"""
from configs import nifti_folder

LABELED_CASES = (1, 2, 5, 10)


def get_config(config_string: str | None = None):
    config = nifti_folder.get_config(config_string)
    d = config.data
    d.test_list = "test.txt"  # Written by convert_mmwhs into the folder.
    d.val_fraction = 0.0
    d.labeled_cases = 5
    return config
