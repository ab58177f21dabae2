"""ARCO stage 2 on ACDC, the reference code's settings (ARCO.md).

Train on the SSL4MIS processed layout (train_slices.list, val.list, test.list, data/...):

  python -m arco_jax.main --config=configs/acdc.py --workdir=runs/acdc_sg_7 \
      --config.data.data_dir=/path/to/ACDC --config.data.labeled_patients=7

Variants from the command line: --config.arco.sampler=sag|uniform, --config.arco.strata=spatial,
--config.arco.num_strata=9|25, --config.data.labeled_patients=1|3. Published test Dice for
ARCO-SG is 85.5 / 88.7 / 89.4 % at 1 / 3 / 7 labeled patients (the paper's Table).
"""
from arco_jax.config import base_config


def get_config():
    config = base_config()
    config.data.dataset = "acdc"
    return config
