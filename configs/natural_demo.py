"""ARCO on the built-in natural-image scenes: DeepLabv3+ from scratch, minutes on a 2-core CPU.

  python -m arco_jax.main --config=configs/natural_demo.py --workdir=runs/natural_demo
  python -m arco_jax.main --config=configs/natural_demo.py:method=supervised --workdir=runs/natural_demo_sup

The scenes (arco_jax/data/scenes.py: five shape-and-surface classes on textured backgrounds,
occlusion, scale change, a 255 ignore band along every boundary; 240 train and 48 val images of
96 x 96) are generated on first use into a cache directory (nothing is downloaded). The recipe is
the Pascal config's (configs/pascal.py: ReCo's views, ClassMix, colour jitter, CE, the EMA
teacher evaluated by whole-image mIoU, ARCO-SG with 16 strata) at toy size: a ResNet-18 at a
quarter of torchvision's widths with 64-channel ASPP and decoder, no pretrained weights, 80 px
crops, 20 labeled images (the seeded class cover of every class, filled up) and 8 labeled + 8
unlabeled images a step, 1600 steps, SGD at a learning rate for training from scratch, and
smaller sampler and bank sizes. Two departures from the recipe, measured in results/natural_demo:
a hue jitter of 0.05 (ReCo's 0.25 swaps the classes' typical hues) and a contrastive weight of
0.1 (ReCo's 1 outweighs the other terms of a network from scratch). ARCO-SG 32.8 against
labeled-only 31.4 mIoU (val-selected), 8 and 3 minutes on a 2-core CPU. Presets after ':'
as in configs/acdc.py (method=arco_sag, arco_ns, mean_teacher, supervised ...).
"""
from arco_jax.config import base_config
from arco_jax.data import registry
from configs import pascal


def get_config(config_string: str | None = None):
    config = base_config()
    registry.select(config, "scenes")
    d = config.data
    d.patch_size = (80, 80)
    d.batch_labeled = d.batch_unlabeled = 8
    d.labeled_images = 20
    d.num_workers = 0  # 96 px PNGs: reading in the main process is cheaper than worker processes
    config.eval.pad_multiple = 1  # every image is 96 x 96: one compiled shape
    # A network from scratch: ReCo's contrastive weight of 1 outweighs the other terms.
    config = small_recipe(config, config_string, contrast_weight=0.1)
    # Each scene class has a typical hue (scenes.CLASS_HUES, 0.2 apart): ReCo's hue jitter of
    # +-0.25, made for photographs, would turn one class's colour into another's.
    config.augment.hue = 0.05
    return config


def small_recipe(config, config_string: str | None = None, contrast_weight: float = 1.0):
    """The Pascal recipe at toy size on whichever natural-image dataset config.data selected (the
    scenes here; a test overfits a VOC photograph with it)."""
    pascal.reco_views(config, unlabeled_scale=(0.5, 1.5))
    pascal.reco_settings(config)
    m = config.model
    m.deeplabv3plus.depth, m.deeplabv3plus.width, m.deeplabv3plus.channels = 18, 0.25, 64
    m.rep_dim = 64
    config.arco.remat_student = False  # small passes fit anywhere
    config.optim.learning_rate = 0.1  # from scratch, not ReCo's 2.5e-3 for an ImageNet backbone
    t = config.train
    t.steps, t.log_every, t.eval_every, t.checkpoint_every = 1600, 100, 400, 400
    a = config.arco
    a.num_anchors, a.num_negatives = 64, 128
    a.bank_size = a.bank_size_background = 4096
    a.bank_enqueue = 256
    return pascal.reco_method(config, config_string, contrast_weight)
