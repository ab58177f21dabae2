"""ARCO on ACDC, the reference code's settings (ARCO.md): stage 1 (relational pretraining,
30k steps) then stage 2 (30k steps) in one command; --config.pretrain.steps=0 skips stage 1.
The baselines (method=supervised, mean_teacher) have no stage 1.

Train on the SSL4MIS processed layout (train_slices.list, val.list, test.list, data/...):

  python -m arco_jax.main --config=configs/acdc.py --workdir=runs/acdc_sg_7 \
      --config.data.data_dir=/path/to/ACDC --config.data.labeled_patients=7

Method and variant presets (arco_jax/methods/presets.py) come in a config string after ':':

  --config=configs/acdc.py:method=arco_sag,variant=code

  config string := '' | setting (',' setting)*     setting := key '=' value
  method  = supervised | mean_teacher | arco_ns | arco_sg | arco_sag | custom   (default arco_sg)
  variant = paper | code | custom                                               (default custom)

Each key may appear once; spaces around tokens are ignored; an unknown key or value fails with
the offending token named. 'paper' and 'code' fix every switch on which the paper and the
reference code differ (arco.strata, arco.negatives, arco.nn_gradient, arco.warp_pseudo_labels,
data.one_patient_split); overriding one of them afterwards (--config.arco.strata=...) is
rejected unless the variant is 'custom'. Likewise a method fixes which loss terms may run and,
for ARCO, the sampler; weights stay tunable (0 = an ablation). Other settings:
--config.arco.num_strata=9|25, --config.data.labeled_patients=1|3. Published test Dice for
ARCO-SG is 85.5 / 88.7 / 89.4 % at 1 / 3 / 7 labeled patients (the paper's Table); the
baselines UNet (labeled only) 40.3 / 51.7 / 79.5 and Mean Teacher 42.9 / 58.3 / 80.1.
"""
from arco_jax import methods
from arco_jax.config import base_config
from arco_jax.data import registry


def get_config(config_string: str | None = None):
    config = base_config()
    registry.select(config, "acdc")
    config.pretrain.steps = 30000
    # arco.remat_student is left to auto (None): on for a single CPU device, where the 256 px
    # stage-2 step then fits in 4 GB (3.4 GiB; 5.3 without) for 17% more time (8.1 s; 6.9
    # without), off on GPUs and TPUs. The global batch 4 + 4 runs on the most devices it divides
    # over (data.mesh_devices auto: 4 of 8 chips).
    return methods.apply_config_string(config, config_string)
