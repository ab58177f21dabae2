"""ARCO on Cityscapes (fine: 2975 train / 500 val, the 19 train ids, the rest ignored), the ReCo /
ARCO natural-image recipe of configs/pascal.py with ReCo's Cityscapes settings:

  python -m arco_jax.main --config=configs/cityscapes.py --workdir=runs/cityscapes_sg_20 \
      --config.data.data_dir=/path/to/cityscapes --config.data.labeled_images=20 \
      --config.model.init_from=r101.npz

data_dir holds leftImg8bit/ and gtFine/ of the official download (arco_jax/data/cityscapes.py);
label ids are mapped to train ids when read. Labeled images: 20 / 50 / 150 in the paper, the
seeded class cover of the training images or data.labeled_split (ids '<city>/<stem>').

Differences from Pascal, as ReCo: images and labels resized to 1024 x 512 when read (data.resize;
mIoU is measured at that size, as ReCo's), 512 x 512 crops without random scaling (ReCo's scale
range is 1.0 here, so neither the labeled crops nor the unlabeled images and their pseudo-labels
are rescaled; --config.data.random_scale=True scales the labeled view by 0.5-1.5, and ReCo's rule,
one range for both, adds --config.augment.unlabeled_scale="(0.5, 1.5)"), 2 labeled + 2 unlabeled
images a step. Val images are predicted whole at 1024 x 512 (no sliding window). Class 0 is road,
which the framework treats as its background class (a larger memory bank, no equivariance term).
The views and what is done differently from ReCo: configs/pascal.py.

Published (ARCO Table 7, mIoU %, 20 / 50 / 150 labels): ARCO-SG 53.7 / 61.2 / 66.2; ReCo +
ClassMix 49.9 / 57.9 / 65.0; supervised 38.2 / 45.9 / 55.4.
"""
from arco_jax.config import base_config
from arco_jax.data import registry
from configs import pascal


def get_config(config_string: str | None = None):
    config = base_config()
    registry.select(config, "cityscapes")
    d = config.data
    d.patch_size = (512, 512)
    d.batch_labeled = d.batch_unlabeled = 2
    d.labeled_images = 20
    config.eval.pad_multiple = 1  # every image is 1024 x 512 after data.resize: one compiled shape
    pascal.reco_views(config, unlabeled_scale=(1.0, 1.0))  # ReCo's Cityscapes scale range
    return pascal.reco_recipe(config, config_string)
