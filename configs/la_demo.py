"""ARCO in 3-D on the built-in atrium phantom: VNet, sliding windows, a few minutes on a 2-core CPU.

  python -m arco_jax.main --config=configs/la_demo.py --workdir=runs/la_demo
  python -m arco_jax.main --config=configs/la_demo.py:method=supervised --workdir=runs/la_demo_sup

The phantom ('la_phantom', data/la_phantom.py: an LA-like blood pool with appendage and veins
beside a ventricle and an aorta of the same intensity, in texture, bias field and Rician
noise) is generated on first use in the UA-MT layout, 16 train and 4 test volumes of
40 x 64 x 64 voxels; 4 are labeled, as the paper's middle LA setting. Settings follow
configs/la.py (VNet with the 16-d head, a rot90 / flip / crop weak view,
SGD 0.01 Nesterov, ARCO-SAG without the equivariance term, the reference's 3-D CutMix,
sliding-window testing of the last state) at a smaller scale: 48 x 48 x 32 patches (D first
here: (32, 48, 48)), a VNet of 8 base filters, 2 + 2 volumes per step, 500 steps of stage 2 only,
64 anchors and 128 negatives, and windows of the patch size every (4, 12, 12) voxels (12 per
volume).

Method presets as configs/la.py, after ':' (supervised | mean_teacher | arco_ns | arco_sg |
arco_sag | custom).
"""
import ml_collections

from arco_jax import methods
from arco_jax.config import base_config
from arco_jax.data import registry


def get_config(config_string: str | None = None):
    config = base_config()
    registry.select(config, "la_phantom")
    config.data.labeled_cases = 4
    config.data.patch_size = (32, 48, 48)
    config.data.batch_labeled = config.data.batch_unlabeled = 2
    config.data.num_workers = 0
    config.arco.remat_student = False  # small patches fit anywhere: no recomputation
    config.model.name = "vnet"
    config.model.vnet = ml_collections.ConfigDict({"n_filters": 8, "dropout": True})
    config.model.rep_dim = 16
    a = config.arco
    a.num_anchors, a.num_negatives = 64, 128
    a.bank_size = a.bank_size_background = 4096
    a.bank_enqueue = 256
    a.nn_pool_size = 16
    config.pretrain.steps = 0
    config.train.steps = 500
    config.train.log_every = 50
    config.train.checkpoint_every = 200
    config.eval.window = (32, 48, 48)
    config.eval.stride = (4, 12, 12)
    methods.apply_method(config, "arco_sag")
    config = methods.apply_config_string(config, config_string)
    if config.method.startswith("arco_"):  # as configs/la.py: the reference's 3-D objective has no L_eqv
        config.loss_weights.eqv = 0.0
    return config
