"""One run of the phantom study (`python -m arco_jax.study`): the demo's phantom and method
presets, sized so that 5 methods x 3 label budgets x 3 seeds finish on a 2-core CPU in about
an hour (48 x 48 images, fewer steps, validation every quarter of the run).

  python -m arco_jax.main --config=configs/phantom_study.py:method=arco_sag --workdir=runs/one

The config string is configs/demo.py's (method=..., variant=...).
"""
from arco_jax import methods
from arco_jax.config import base_config

STEPS = 300


def get_config(config_string: str | None = None):
    config = base_config()
    config.data.dataset = "phantom"
    config.data.phantom.image_size = 48
    config.data.patch_size = (48, 48)
    config.data.labeled_patients = 3
    config.data.num_workers = 0
    config.arco.num_anchors = 64
    config.arco.num_negatives = 128
    config.arco.bank_size = 4096
    config.arco.bank_size_background = 4096
    config.arco.bank_enqueue = 256
    config.train.steps = STEPS
    config.train.log_every = 50
    config.train.eval_every = STEPS // 4
    config.train.checkpoint_every = STEPS
    config.train.keep_checkpoints = 1
    config.eval.slice_batch_size = 32
    return methods.apply_config_string(config, config_string)
