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
representation; the labeled stream's weak view: random scale 0.5-1.5, 321 x 321 crops padded with
the ignore label, horizontal flip, ImageNet normalisation (data/pipeline.py 'scale_crop_flip'); 10
labeled + 10 unlabeled images
a step, 40k steps of SGD (lr 2.5e-3, Nesterov momentum 0.9, weight decay 5e-4, poly 0.9); EMA
teacher 0.99, evaluated (ReCo tests its EMA model) on whole val images, each padded to 513 x 513
(ReCo's test size; one compiled shape, VOC images are at most 500 px) for mIoU; 256 anchors and
512 negatives per class, temperature 0.5, pseudo-labels weighted by the share above 0.97. Losses
sup + unsup + contrast at weight 1 each, as ReCo's sup + unsup + reco; no equivariance or
neighbour term (ReCo has neither). ARCO-SG with 16 strata (method presets after ':' as in
configs/acdc.py: method=arco_sag, arco_ns, supervised ...).

The views as ReCo's (build_data.py transform / batch_transform, train_semisup.py), set by
reco_views (config.augment, data.unlabeled_view):
- labeled: the weak view above, then on device the same ColorJitter as the strong view's (p=.8)
  and Gaussian blur (p=.5), the labels unchanged (augment.labeled_jitter_prob, labeled_blur_prob;
  ReCo flips after them on the host: they commute, so the order is immaterial);
- unlabeled, on the host: a random 321 x 321 crop (reflection-padded if smaller), no scaling, no
  flip (data.unlabeled_view='crop'; ReCo's unlabeled loader, scale (1, 1) and augmentation off);
- strong, on device: the teacher's pseudo-labels (argmax) and confidences (max prob) on that
  crop, then the random rescale of image, pseudo-labels and confidences together (one scale
  0.5-1.5 per image to int(321 s) px: image bilinear as PIL's, pseudo-labels and confidences
  nearest; padded at the bottom and right back to 321 px, the image by reflection, pseudo-labels
  with the ignore label and confidences 0, so padding is never a pseudo-label; a random 321 px
  crop when larger; augment.unlabeled_scale), then ClassMix by the rescaled pseudo-labels (half of
  the classes of image b pasted onto image b + 1; augment.mix='cutmix' for CutMix), then
  torchvision's ColorJitter on RGB (brightness, contrast, saturation 0.75-1.25, hue +-0.25, random
  order, p=.8), Gaussian blur (sigma 0.15-1.15, p=.5) and a horizontal flip (p=.5), no smooth warp.
The supervised term is CE alone (loss.supervised='ce'; 'ce_dice' adds Dice); the pseudo-label
term leaves the padding out of its CE and of its confident share, as ReCo's ignore index -1.

Done differently from ReCo, on purpose: the rescale works on float images (ReCo truncates the
batch to 8-bit PIL images and back); where the rescale padded, ClassMix sees no class (ReCo's
torch.unique counts its -1 as one, so it may paste padding, and the real classes it picks can be
one more or one fewer than half); PIL's
nearest source (i + .5) n_in / n_out is computed exactly (in doubles PIL can land just below an
integer; never for ReCo's odd 321 px crops, and Cityscapes does not rescale).

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
    # Recompute the student's passes on every platform (not only a single CPU device, the 'auto'
    # rule): XLA's compiled step is 8.2 GB instead of 13.9 GB at 10 + 10 (benchmarks/pascal_step.md),
    # within the 12 GB ReCo's GPUs have, for one more student forward a step. On a larger GPU,
    # --config.arco.remat_student=false trades that memory back for time.
    config.arco.remat_student = True
    reco_views(config, unlabeled_scale=(0.5, 1.5))
    return reco_recipe(config, config_string)


def reco_views(config, unlabeled_scale):
    """ReCo's three views of the natural-image configs beyond the strong one (set before
    reco_recipe, so a config string still overrides them): the labeled images' colour jitter
    (p=.8) and blur (p=.5) on device, the unlabeled stream's plain random crop on the host, and
    the random rescale of the unlabeled images with their pseudo-labels by ReCo's scale range of
    the dataset before mixing."""
    g = config.augment
    g.labeled_jitter_prob, g.labeled_blur_prob = 0.8, 0.5
    g.unlabeled_scale = unlabeled_scale
    config.data.unlabeled_view = "crop"


def reco_recipe(config, config_string: str | None = None):
    """The model, optimiser, schedule and ARCO settings the three natural-image configs share."""
    reco_settings(config)
    return reco_method(config, config_string)


def reco_settings(config):
    """ReCo's model, optimiser, schedule, sampler and strong-view settings (no method yet)."""
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
    return config


def reco_method(config, config_string: str | None = None, contrast_weight: float = 1.0):
    """ARCO-SG (or the config string's method) with ReCo's loss weights: sup + unsup + contrast at 1
    (contrast_weight for a network that does not start from ReCo's ImageNet backbone)."""
    methods.apply_method(config, "arco_sg")
    config = methods.apply_config_string(config, config_string)
    w = config.loss_weights
    w.sup = 1.0
    if config.method.startswith("arco_"):
        w.unsup, w.contrast, w.eqv, w.nn = 1.0, contrast_weight, 0.0, 0.0
    return config
