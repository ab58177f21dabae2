"""One run of the phantom study (`python -m arco_jax.study`): configs/demo.py (the same
phantom, method presets and ARCO sizes) made small enough that 5 methods x 3 label budgets x
3 seeds finish on a 2-core CPU in about an hour: 48 x 48 images, 300 steps, no stage 1,
validation every quarter of the run.

  python -m arco_jax.main --config=configs/phantom_study.py:method=arco_sag --workdir=runs/one

The config string is configs/demo.py's (method=..., variant=...).
"""
from arco_jax.config import base_config
from configs import demo

STEPS = 300


def get_config(config_string: str | None = None):
    config = demo.get_config(config_string)
    config.data.phantom.image_size = 48
    config.data.patch_size = (48, 48)
    config.pretrain = base_config().pretrain  # No stage 1 (and its defaults, not the demo's windows).
    config.train.steps = STEPS
    config.train.eval_every = STEPS // 4
    config.train.checkpoint_every = STEPS
    config.train.keep_checkpoints = 1
    return config
