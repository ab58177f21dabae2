"""ARCO on the Left Atrium (2018 Atrial Segmentation Challenge, the UA-MT processed set: 80
training and 20 test volumes), the reference's 3-D settings (train_arco_3d.py):

  python -m arco_jax.main --config=configs/la.py --workdir=runs/la_sag_4 \
      --config.data.data_dir=/path/to/UA-MT/data --config.data.labeled_cases=4

data_dir holds `2018LA_Seg_Training Set/<case>/mri_norm2.h5`, `train.list` and `test.list`;
the labeled set is the first labeled_cases lines of train.list (the paper: 1, 4, 8), the rest
of train.list is unlabeled, and the last state is tested on test.list by sliding windows (the
reference has no validation split; --config.data.val_cases=N holds out the last N training
cases for checkpoint selection).

Settings as the reference: VNet (16 filters) with its 16-d representation head; patches of
112 x 112 x 80 voxels, (80, 112, 112) here (depth first), from an in-plane rot90 + flip and a
random crop; batches of 4 labeled + 4 unlabeled volumes; 6000 iterations of SGD (lr 0.01,
Nesterov momentum 0.9, weight decay 1e-4, poly decay); EMA teacher 0.99; 256 anchors and 512
negatives per class, temperature 0.5; ARCO-SAG, the reference's 3-D default; CutMix of an
in-plane box of half the area over a slab of 10 slices; test windows (80, 112, 112) every
(4, 18, 18) voxels. No equivariance term: the reference computes it but adds it to the loss at
iteration 0 only (on the 3-D phantom, adding it at weight 1 cost 18 Dice points in 300 steps).
With two classes the reference's U2PL negative bank stays empty (its rank
rule needs 3 or more classes), so the negatives are the other class's bank (arco.negatives
'other_classes', as every config here). Stage 1 first, as the reference starts from a
pretrain_3D.py checkpoint: 6000 steps of relational pretraining (global latent of the 1/8
decoder map, 512-d; local cubes of the logits of side 20 every 10 voxels, 700 per patch as the
reference's, each pooled to 4 x 4 x 4 cells where the reference's adaptive pooling takes 8
overlapping ones; queue 36, temperatures 0.1), then 6000 of ARCO; --config.pretrain.steps=0
trains stage 2 from scratch.

Method presets come in a config string after ':' as for configs/acdc.py:

  --config=configs/la.py:method=supervised      (the labeled-only VNet)

Published (paper Table 9, Dice %): ARCO-SG 75.0 / 87.8 / 89.9 and ARCO-SAG 73.2 / 86.9 / 89.1 at
1 / 4 / 8 labeled cases; VNet labeled-only 40.0 / 52.6 / 82.7; all labels 91.5.
"""
import ml_collections

from arco_jax import methods
from arco_jax.config import base_config
from arco_jax.data import registry


def get_config(config_string: str | None = None):
    config = base_config()
    registry.select(config, "la")
    config.model.name = "vnet"
    config.model.vnet = ml_collections.ConfigDict({"n_filters": 16, "dropout": True})
    config.model.rep_dim = 16  # the reference's FeatureExtractor_3d(output_dim=16)
    d = config.data
    d.patch_size = (80, 112, 112)
    d.batch_labeled = d.batch_unlabeled = 4
    config.train.steps = 6000
    p = config.pretrain
    p.steps = 6000  # pretrain_3D.py: max_iterations 6000
    p.window, p.window_grid = 20, 4
    config.eval.window = (80, 112, 112)
    config.eval.stride = (4, 18, 18)
    # arco.remat_student auto: on for a single CPU device (9.7 GB compiled at 4 + 4 instead of
    # 22.5, benchmarks/la_step.md); set it true on an accelerator with less memory than that.
    methods.apply_method(config, "arco_sag")
    return without_equivariance(methods.apply_config_string(config, config_string))


def without_equivariance(config):
    """The reference's 3-D objective, 0.01 contrast + unsup + sup + nn, for the ARCO presets: it
    computes the equivariance loss but adds it to the total at iteration 0 only
    (train_arco_3d.py: `if iter_num / max_iterations > 0.0` drops it from the first update on).
    --config.loss_weights.eqv=1 turns it on."""
    if config.method.startswith("arco_"):
        config.loss_weights.eqv = 0.0
    return config
