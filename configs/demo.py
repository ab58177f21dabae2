"""ARCO on the built-in cardiac phantom: small images, a few minutes on a 2-core CPU.

  python -m arco_jax.main --config=configs/demo.py --workdir=runs/demo

The phantom is generated on first use into a cache directory (nothing is downloaded).
Presets as in configs/acdc.py, e.g. ARCO-SAG as the paper describes it, or the Mean Teacher
baseline:

  python -m arco_jax.main --config=configs/demo.py:method=arco_sag,variant=paper --workdir=runs/demo_sag
  python -m arco_jax.main --config=configs/demo.py:method=mean_teacher --workdir=runs/demo_mt

  config string := '' | setting (',' setting)*     setting := key '=' value
  method  = supervised | mean_teacher | arco_ns | arco_sg | arco_sag | custom   (default arco_sg)
  variant = paper | code | custom                                               (default custom)
"""
from arco_jax import methods
from arco_jax.config import base_config
from arco_jax.data import registry


def get_config(config_string: str | None = None):
    config = base_config()
    registry.select(config, "phantom")
    config.data.labeled_patients = 3
    config.data.patch_size = (64, 64)
    config.data.num_workers = 0
    config.arco.remat_student = False  # 64 px passes fit anywhere: no recomputation (and the published numbers)
    config.arco.num_anchors = 64
    config.arco.num_negatives = 128
    config.arco.bank_size = 4096
    config.arco.bank_size_background = 4096
    config.arco.bank_enqueue = 256
    config.pretrain.steps = 200  # Stage 1 (relational pretraining), then 700 steps of stage 2.
    config.pretrain.window = 32  # 64 px patches: 3 x 3 windows.
    config.pretrain.window_grid = 8
    config.train.steps = 700
    config.train.log_every = 50
    config.train.eval_every = 200
    config.train.checkpoint_every = 200
    config.eval.slice_batch_size = 32
    return methods.apply_config_string(config, config_string)
