"""ARCO on LiTS (liver and liver-lesion CT), 2-D as the reference code trains it, on the folder
that `python -m arco_jax.data.convert_lits` writes from the official release:

  python -m arco_jax.data.convert_lits --raw_dir=/path/to/LiTS --out_dir=/path/to/LiTS_nnunet
  python -m arco_jax.main --config=configs/lits.py --workdir=runs/lits_sg_5 \
      --config.data.data_dir=/path/to/LiTS_nnunet --config.data.labeled_cases=5

Splits: ARCO's, test = test.txt (volumes 100 .. 130, the paper's cases 101-131); of the 100
training volumes, 7 (a seeded choice) are held out for validation and checkpoint selection, the
first labeled_cases of the seeded order are labeled (the paper: 1, 5, 10 cases, where the
reference's slice counts are 167 / 835 / 1668; ours are every slice of those cases, logged and
recorded in data.json) and the rest are unlabeled. Intensities: the HU window [-200, 250] scaled
to [0, 1]; slices resampled in plane to the cases' median spacing, then resized to 256 x 256 as
the ACDC setting. Three classes: background, liver, lesion; the test table has a row for each.

Method presets as configs/acdc.py: --config=configs/lits.py:method=supervised.
Published (paper Table 5, Dice % at 1 / 5 / 10 % labeled): ARCO-SG 65.5 / 68.4 / 70.1 (liver 92.5 /
93.7 / 94.1, lesion 38.4 / 43.0 / 46.1); MONA 62.2 / 66.6 / 68.3; UNet labeled-only 50.8 / 63.4 / 64.6.
"""
from configs import nifti_folder

LABELED_CASES = (1, 5, 10)


def get_config(config_string: str | None = None):
    config = nifti_folder.get_config(config_string)
    d = config.data
    d.test_list = "test.txt"  # Written by convert_lits into the folder.
    d.val_fraction = 0.05  # 7 of the 131 cases, from the training volumes.
    d.labeled_cases = 5
    d.normalization = ("ct",)
    d.ct_window = (-200.0, 250.0)
    return config
