"""The tiny training setting several tests share: configs/demo.py shrunk to seconds (3/1/1
phantom patients of 32 px, 2+2 batches, small banks, no stage 1)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load_config(name: str, config_string: str | None = None):
    """configs/<name>.py's get_config(config_string), as `--config=configs/<name>.py:<string>`."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(config_string)


def demo_config():
    return load_config("demo")


def narrow_model(c) -> None:
    """A (4, 8, 8, 16, 16) UNet with a 16-d representation: cheap to compile."""
    c.model.unet.features = (4, 8, 8, 16, 16)
    c.model.rep_dim = 16


def tiny_arco(c) -> None:
    """ARCO's sampling and banks shrunk to a few rows (8 anchors, 4 negatives, banks of 64)."""
    a = c.arco
    a.num_anchors, a.num_negatives = 8, 4
    a.bank_size = a.bank_size_background = 64
    a.bank_enqueue, a.nn_pool_size, a.nn_topk, a.nn_grid = 16, 4, 2, 2


def tiny_config(cache_dir: Path, steps: int = 2, every: int = 2, narrow: bool = False):
    """`every`: log, validate and checkpoint period. `narrow`: a (4, 8, 8, 16, 16) UNet with a
    16-d representation, for tests that need many compilations."""
    c = demo_config()
    c.pretrain.steps = 0  # stage 1 has its own tests (test_pretrain.py)
    d = c.data
    d.cache_dir = str(cache_dir)
    d.phantom.splits = (3, 1, 1)
    d.phantom.image_size = 32
    d.phantom.slices = (3, 4)
    d.patch_size = (32, 32)
    d.labeled_patients = 1
    d.batch_labeled = d.batch_unlabeled = 2
    if narrow:
        narrow_model(c)
    tiny_arco(c)
    t = c.train
    t.steps = steps
    t.log_every = t.eval_every = t.checkpoint_every = every
    c.eval.slice_batch_size = 8
    return c
