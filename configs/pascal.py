"""ARCO on Pascal VOC 2012 with the SBD augmented labels (10582 train / 1449 val, 21 classes, 255
ignored), the ReCo / ARCO natural-image recipe (lorenmt/reco train_semisup.py, ARCO Table 7):

  python -m arco_jax.models.convert_torchvision --input=resnet101.pth --depth=101 --output=r101.npz
  python -m arco_jax.main --config=configs/pascal.py --workdir=runs/pascal_sg_60 \
      --config.data.data_dir=/path/to/pascal --config.data.labeled_images=60 \
      --config.model.init_from=r101.npz

data_dir holds JPEGImages/, SegmentationClassAug/, train_aug.txt and val.txt (arco_jax/data/voc.py).
The labeled images are the seeded class cover of train_aug.txt (data.labeled_seed, filled to
data.labeled_images: 60 / 200 / 600 in the paper) or the ids listed in data.labeled_split; the
run's results.json lists them. resnet101.pth is torchvision's ImageNet ResNet-101 state dict (ReCo
starts from it; nothing is downloaded here); without init_from the backbone starts from scratch.

Settings as ReCo: DeepLabv3+ on ResNet-101 at output stride 16 (ASPP 6/12/18), a 256-d
representation; random scale 0.5-1.5, 321 x 321 crops padded with the ignore label, horizontal
flip, ImageNet normalisation (data/pipeline.py 'scale_crop_flip'); 10 labeled + 10 unlabeled images
a step, 40k steps of SGD (lr 2.5e-3, Nesterov momentum 0.9, weight decay 5e-4, poly 0.9); EMA
teacher 0.99, evaluated (ReCo tests its EMA model) on whole val images, each padded to 513 x 513
(ReCo's test size; one compiled shape, VOC images are at most 500 px) for mIoU; 256 anchors and
512 negatives per class, temperature 0.5, pseudo-labels weighted by the share above 0.97. Losses
sup + unsup + contrast at weight 1 each, as ReCo's sup + unsup + reco; no equivariance or
neighbour term (ReCo has neither). ARCO-SG with 16 strata (method presets after ':' as in
configs/acdc.py: method=arco_sag, arco_ns, supervised ...).

The strong view as ReCo's (config.augment): ClassMix of the unlabeled images by the teacher's
pseudo-labels (half of the classes of image b pasted onto image b + 1; augment.mix='cutmix' for
CutMix), then torchvision's ColorJitter on RGB (brightness, contrast, saturation 0.75-1.25, hue
+-0.25, random order, p=.8), Gaussian blur (sigma 0.15-1.15, p=.5) and a horizontal flip (p=.5),
no smooth warp. The supervised term is CE alone (loss.supervised='ce'; 'ce_dice' adds Dice).

Not as ReCo (missing here): the colour jitter and blur of the labeled view (the data pipeline's
weak view has scale, crop and flip only), the random rescale (0.5-1.5) of the unlabeled images
and their pseudo-labels before mixing, and ReCo's unlabeled view without scaling or flipping
(both streams share the weak view here).

Published (ARCO Table 7, mIoU %, 60 / 200 / 600 labels): ARCO-SG 59.6 / 71.7 / 75.5; ReCo +
ClassMix 57.1 / 69.4 / 73.2; supervised 39.4 / 55.5 / 64.6.
"""
from arco_jax import methods
from arco_jax.config import base_config
from arco_jax.data import registry


def get_config(config_string: str | None = None):
    config = base_config()
    registry.select(config, "pascal")
    d = config.data
    d.patch_size = (321, 321)
    d.batch_labeled = d.batch_unlabeled = 10
    d.labeled_images = 60
    config.eval.pad_multiple = 513
    return reco_recipe(config, config_string)


def reco_recipe(config, config_string: str | None = None):
    """The model, optimiser, schedule and ARCO settings the three natural-image configs share."""
    m = config.model
    m.name = "deeplabv3plus"
    m.deeplabv3plus.depth, m.deeplabv3plus.output_stride, m.deeplabv3plus.width = 101, 16, 1.0
    m.rep_dim = 256
    o = config.optim
    o.learning_rate, o.momentum, o.nesterov, o.weight_decay, o.poly_power = 2.5e-3, 0.9, True, 5e-4, 0.9
    t = config.train
    t.steps, t.eval_every, t.checkpoint_every = 40000, 1000, 1000
    a = config.arco
    a.ema_decay, a.num_strata, a.num_anchors, a.num_negatives, a.temperature = 0.99, 16, 256, 512, 0.5
    a.confidence_threshold = 0.97
    config.eval.model = "teacher"
    config.loss.supervised = "ce"  # ReCo's compute_supervised_loss: CE with the ignore label, no Dice
    g = config.augment  # ReCo's strong view: ClassMix, then ColorJitter (p=.8), blur (p=.5), flip (p=.5)
    g.mix, g.jitter, g.jitter_prob, g.saturation, g.hue = "classmix", "colour", 0.8, 0.25, 0.25
    g.blur_prob, g.warp_prob, g.flip_prob = 0.5, 0.0, 0.5
    methods.apply_method(config, "arco_sg")
    config = methods.apply_config_string(config, config_string)
    w = config.loss_weights
    w.sup = 1.0
    if config.method.startswith("arco_"):
        w.unsup, w.contrast, w.eqv, w.nn = 1.0, 1.0, 0.0, 0.0
    return config
