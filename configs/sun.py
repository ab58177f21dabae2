"""ARCO on SUN RGB-D (RGB only, 37 classes, unlabeled pixels ignored) in ReCo's layout, the ReCo /
ARCO natural-image recipe of configs/pascal.py with ReCo's SUN settings:

  python -m arco_jax.main --config=configs/sun.py --workdir=runs/sun_sg_50 \
      --config.data.data_dir=/path/to/sun --config.data.labeled_images=50 \
      --config.model.init_from=r101.npz

data_dir holds SUNRGBD-train_images/, SUNRGBD-test_images/ and sunrgbd_train_test_labels/ as
ReCo's sun_preprocess.py leaves them (arco_jax/data/sun.py); the test images are the val split.
Labeled images: 50 / 150 / 500 in the paper, the seeded class cover or data.labeled_split.

Differences from Pascal, as ReCo: images resized to 512 x 384 when read (data.resize; ReCo's
preprocessed folder already is), 5 labeled + 5 unlabeled images a step, random scale 0.5-1.5 and
321 x 321 crops, and the random rescale 0.5-1.5 of the unlabeled images with their pseudo-labels;
val images predicted whole at 512 x 384. Class 0 is wall, which the framework treats as its
background class. The views and what is done differently from ReCo: configs/pascal.py.

Published (ARCO Table 7, mIoU %, 50 / 150 / 500 labels): ARCO-SG 37.7 / 41.0 / 46.4; ReCo +
ClassMix 30.5 / 40.4 / 44.6; supervised 20.0 / 29.2 / 38.9.
"""
from arco_jax.config import base_config
from arco_jax.data import registry
from configs import pascal


def get_config(config_string: str | None = None):
    config = base_config()
    registry.select(config, "sun")
    d = config.data
    d.patch_size = (321, 321)
    d.batch_labeled = d.batch_unlabeled = 5
    d.labeled_images = 50
    config.eval.pad_multiple = 1  # every image is 512 x 384 after data.resize: one compiled shape
    pascal.reco_views(config, unlabeled_scale=(0.5, 1.5))
    return pascal.reco_recipe(config, config_string)
