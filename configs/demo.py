"""ARCO on the built-in cardiac phantom: small images, a few minutes on a 2-core CPU.

  python -m arco_jax.main --config=configs/demo.py --workdir=runs/demo

The phantom is generated on first use into a cache directory (nothing is downloaded).
"""
from arco_jax.config import base_config


def get_config():
    config = base_config()
    config.data.dataset = "phantom"
    config.data.labeled_patients = 3
    config.data.patch_size = (64, 64)
    config.data.num_workers = 0
    config.arco.num_anchors = 64
    config.arco.num_negatives = 128
    config.arco.bank_size = 4096
    config.arco.bank_size_background = 4096
    config.arco.bank_enqueue = 256
    config.train.steps = 800
    config.train.log_every = 50
    config.train.eval_every = 200
    config.train.checkpoint_every = 200
    config.eval.slice_batch_size = 32
    return config
