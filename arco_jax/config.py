"""The one place that defines every config field, its default and its validation.

Experiment files in `configs/` start from `base_config()` and override what differs; `validate`
runs before anything is compiled or read, so a typo or an impossible setting fails in a second
with a message that names the field, instead of minutes later inside a traced function.
"""
from __future__ import annotations

import json
import re

import ml_collections

from arco_jax import evaluators, methods
from arco_jax.data import registry
from arco_jax.errors import ConfigError
from arco_jax.evaluation import EMPTY_POLICIES

SAMPLERS = ("uniform", "sg", "sag")
COMPUTE_DTYPES = ("float32", "bfloat16")
STRATA_LAYOUTS = ("index", "spatial")
LOSS_TERMS = ("sup", "unsup", "contrast", "eqv", "nn", "consistency")
NEGATIVE_SOURCES = ("other_classes", "reference")
NN_GRADIENTS = ("active", "reference")
MIXES = ("cutmix", "classmix")  # augment.MIXES
JITTERS = ("intensity", "colour")
SUPERVISED_LOSSES = ("ce_dice", "ce")  # losses.SUPERVISED_LOSSES

__all__ = ["ConfigError", "base_config", "data_mesh_size", "resolve_for_devices", "validate", "upgrade_record"]


def base_config() -> ml_collections.ConfigDict:
    """ARCO stage 2 with the reference code's ACDC settings (ARCO.md)."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    # Which registered dataset (arco_jax/data/registry.py); a config file picks it with
    # registry.select(config, name), which adds that dataset's own fields to config.data.
    c.data.dataset = ""
    c.data.data_dir = ""  # The dataset's folder (what it holds is the dataset's to say).
    # Declared by the dataset, recorded here by registry.select / registry.resolve; leave unset.
    c.data.num_classes = ml_collections.config_dict.placeholder(int)
    c.data.class_names = ml_collections.config_dict.placeholder(tuple)  # Foreground classes 1..C-1.
    c.data.ignore_label = ml_collections.config_dict.placeholder(int)  # None: every pixel is labeled.
    c.data.spatial_rank = ml_collections.config_dict.placeholder(int)  # 2: images/slices, 3: volumes.
    c.data.in_channels = ml_collections.config_dict.placeholder(int)
    c.data.patch_size = (256, 256)
    c.data.batch_labeled = 4  # Global batch sizes (over all devices and hosts): the experiment.
    c.data.batch_unlabeled = 4
    # Devices in the data mesh. None (auto): the most devices that split both batches evenly,
    # the same number on every host (data_mesh_size); configs/acdc.py's 4 + 4 runs on 4 of a
    # v5litepod-8's 8 chips. Resolved when the run starts and recorded in config.json.
    c.data.mesh_devices = ml_collections.config_dict.placeholder(int)
    c.data.num_workers = 2  # Grain worker processes per host (0: read in the main process).
    # The unlabeled stream's host view, a key of data/pipeline.py WEAK_AUGMENTATIONS of the same
    # kind as the dataset's own; '': the dataset's weak view, as the labeled stream's ('crop': ReCo's
    # unlabeled natural images, a random crop without scaling or flipping).
    c.data.unlabeled_view = ""

    c.model = ml_collections.ConfigDict()
    c.model.name = "unet"
    c.model.rep_dim = 496  # Sum of the UNet decoder widths, as the reference head.
    c.model.dtype = "float32"  # Compute dtype: 'bfloat16' on GPU/TPU; params and optimizer stay float32.
    # Pretrained segmenter for a fresh run (student and teacher): an .npz of '/'-joined variable
    # paths, 'params/encoder0/...', 'batch_stats/...' (models.save_variables_npz writes one).
    c.model.init_from = ""
    # Each architecture's own settings live under model.<name> (arco_jax/models: plug-ins).
    c.model.unet = ml_collections.ConfigDict()
    c.model.unet.features = (16, 32, 64, 128, 256)
    c.model.unet.dropout_rates = (0.05, 0.1, 0.2, 0.3, 0.5)
    # DeepLabv3+ as ReCo / ARCO use it (model.name = 'deeplabv3plus', models/deeplab.py): a torchvision
    # ResNet of this depth (18, 34, 50, 101, 152), output stride 16 (ASPP rates 6/12/18) or 8
    # (12/24/36), the ResNet's widths times `width` (1.0: torchvision's, so its checkpoints convert;
    # ASPP and decoder keep `channels`, 256 as ReCo's). Its representation is ReCo's with model.rep_dim = 256.
    c.model.deeplabv3plus = ml_collections.ConfigDict()
    c.model.deeplabv3plus.depth = 101
    c.model.deeplabv3plus.output_stride = 16
    c.model.deeplabv3plus.width = 1.0
    c.model.deeplabv3plus.channels = 256

    # What runs: 'supervised', 'mean_teacher', 'arco_ns', 'arco_sg', 'arco_sag' or 'custom'
    # (arco_jax/methods/presets.py); validate checks the loss weights and sampler against it.
    c.method = "arco_sg"

    c.arco = ml_collections.ConfigDict()
    # Where the paper and the reference code differ: 'paper' and 'code' fix every switch marked
    # (variant) below and data.one_patient_split; 'custom' lets each be set (methods.VARIANTS).
    c.arco.variant = "custom"
    c.arco.sampler = "sg"  # 'uniform' (ARCO-NS / MONA), 'sg', 'sag'.
    c.arco.strata = "index"  # (variant) 'index': over the candidate list (code); 'spatial': image grid (paper).
    # (variant) Negatives of class c: 'other_classes': bank entries of the other classes (ReCo,
    # the paper); 'reference': the code's U2PL-style bank of class c, which stays almost empty.
    c.arco.negatives = "other_classes"
    c.arco.num_strata = 16
    c.arco.num_anchors = 256
    c.arco.num_negatives = 512
    c.arco.temperature = 0.5
    # (ablation) True: anchors pass the student's projector (paper and code). False: they are the
    # head's own representations, in the space of the teacher's positive and negatives, so the
    # term can only fall if the head separates the classes (with the projector it can align the
    # anchors to the prototypes and leave the teacher's geometry as it is).
    c.arco.project_anchors = True
    c.arco.bank_size = 30000
    c.arco.bank_size_background = 50000
    c.arco.bank_enqueue = 1024  # Teacher pixels pushed into each class bank per step.
    c.arco.anchor_prob_threshold = 0.3  # Teacher prob of the anchor's class must exceed this.
    c.arco.entropy_percentile = 20.0  # alpha_0: reliable pixels below alpha_t = alpha_0 (1 - t/T).
    c.arco.confidence_threshold = 0.97  # Pseudo-label weight: fraction of pixels above this.
    c.arco.eqv_confidence_threshold = 0.7
    c.arco.eqv_scale = (0.8, 1.2)
    c.arco.nn_pool_size = 36
    c.arco.nn_topk = 5
    c.arco.nn_grid = 4  # L_nn compares representations average-pooled to a grid x grid map.
    c.arco.nn_gradient = "active"  # (variant) 'active': L_nn trains the student; 'reference': value only.
    c.arco.ema_decay = 0.99
    # SSL4MIS's Mean Teacher warm-up: at stage-2 step t the teacher's decay is
    # min(1 - 1/(t + 1), ema_decay), so it starts as the mean of the students so far instead of
    # holding on to the initial student (weight 0.99^t). On in the mean_teacher preset.
    c.arco.ema_warmup = False
    # Memory for time: run the student's passes (labeled, strong, equivariance) as one loop that
    # recomputes activations in the backward pass (Forward.student_passes). The equivariance
    # pass then normalises its labeled and unlabeled halves as separate batch-norm batches.
    # None (auto): on for a single CPU device only (resolve_for_devices), where host memory is
    # what runs out; recorded in config.json as resolved.
    c.arco.remat_student = ml_collections.config_dict.placeholder(bool)
    c.arco.teacher_train_mode = True  # Reference: teacher with dropout and batch-stat BN.
    c.arco.warp_pseudo_labels = True  # (variant) Warp pseudo-labels with the strong view (the code does not).
    # Mean Teacher consistency (loss_weights.consistency): weight w exp(-5 (1 - t / (rampup T))^2)
    # from t = delay T on, 0 before; the teacher sees the unlabeled image plus Gaussian noise
    # of this std clipped at 2 std (SSL4MIS: ramp over the whole run, 1000 of 30000 steps off).
    c.arco.consistency_rampup = 1.0
    c.arco.consistency_delay = 1000 / 30000
    c.arco.consistency_noise = 0.1

    c.loss_weights = ml_collections.ConfigDict()
    c.loss_weights.sup = 1.0
    c.loss_weights.unsup = 1.0
    c.loss_weights.contrast = 0.01
    c.loss_weights.eqv = 1.0
    c.loss_weights.nn = 1.0
    c.loss_weights.consistency = 0.0  # Mean Teacher softmax MSE (the 'mean_teacher' method).
    c.loss = ml_collections.ConfigDict()
    c.loss.supervised = "ce_dice"  # 'ce_dice': CE + Dice (the reference); 'ce': CE alone (ReCo).

    # The strong view of the unlabeled images (augment.strong_augment; ARCO's unlabeled terms).
    # Defaults: the reference's (CutMix, brightness/contrast p=.5, blur p=.5, warp p=.5 per batch).
    c.augment = ml_collections.ConfigDict()
    c.augment.mix = "cutmix"  # 'cutmix': a box of half the image; 'classmix': half the teacher's classes (ReCo).
    # 'intensity': brightness and contrast of every channel alike; 'colour': RGB brightness, contrast,
    # saturation and hue in random order (torchvision's ColorJitter, ReCo's; 3-channel datasets).
    c.augment.jitter = "intensity"
    c.augment.jitter_prob = 0.5  # Per sample (ReCo: 0.8).
    c.augment.saturation = 0.0  # 'colour': factors uniform in [1 - s, 1 + s] (ReCo: 0.25).
    c.augment.hue = 0.0  # 'colour': shifts uniform in [-h, h] of the hue circle, h <= 0.5 (ReCo: 0.25).
    c.augment.blur_prob = 0.5  # Gaussian blur, per sample.
    c.augment.warp_prob = 0.5  # Smooth warp, per batch (ReCo has none: 0).
    c.augment.flip_prob = 0.0  # Horizontal flip of image, pseudo-labels and confidences, per sample (ReCo: 0.5).
    # Before mixing, rescale each unlabeled image with its pseudo-labels and confidences by a factor
    # uniform in this range, then crop or pad back to the patch (padding: no class, confidence 0);
    # (1.0, 1.0) does nothing (ReCo: its scale range, (0.5, 1.5) on Pascal and SUN RGB-D).
    c.augment.unlabeled_scale = (1.0, 1.0)
    # The labeled images' jitter (augment.jitter's kind and ranges) and blur, per sample, labels
    # unchanged, for every stage-2 method (ReCo's labeled view: 0.8 and 0.5; 0: off).
    c.augment.labeled_jitter_prob = 0.0
    c.augment.labeled_blur_prob = 0.0

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 0.01
    c.optim.momentum = 0.9
    c.optim.nesterov = True
    c.optim.weight_decay = 1e-4
    c.optim.poly_power = 0.9
    # Per-group learning-rate multipliers, 'REGEX=MULTIPLIER' strings matched against whole parameter
    # paths ('segmenter/encoder0/...', 'head/...', 'projector/...'), first match wins, unmatched 1.0:
    # e.g. ('segmenter/encoder.*=0.1',). Stage 1 (pretrain) uses one rate.
    c.optim.lr_multipliers = ()

    # Stage 1, relational pretraining (ISD / MONA style), run before stage 2 in the same job:
    # global steps [0, pretrain.steps) are stage 1, [pretrain.steps, + train.steps) stage 2.
    # Stage 2 starts its student and teacher from the stage-1 student, with a fresh optimizer.
    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.steps = 0  # 0 skips stage 1 (the reference runs 30000).
    c.pretrain.learning_rate = 0.01
    c.pretrain.momentum = 0.9
    c.pretrain.nesterov = False  # The reference's stage 1 uses plain momentum.
    c.pretrain.weight_decay = 1e-4
    c.pretrain.poly_power = 0.9
    c.pretrain.ema_decay = 0.99
    c.pretrain.queue_size = 36  # Teacher embeddings the similarity distributions range over.
    c.pretrain.student_temperature = 0.1
    c.pretrain.teacher_temperature = 0.1
    c.pretrain.global_dim = 512  # Pooled bottleneck -> MLP -> this many dimensions.
    c.pretrain.window = 64  # Local embedding: windows of the logits, stride window/2 ...
    c.pretrain.window_grid = 8  # ... each average-pooled to grid x grid cells.
    c.pretrain.global_weight = 1.0
    c.pretrain.local_weight = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.steps = 30000
    c.train.log_every = 50
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 2

    c.eval = ml_collections.ConfigDict()
    # Evaluator (arco_jax/evaluators): 'auto' takes the dataset's kind ('volume_slices' for
    # volumes of 2-D samples, 'sliding_window' for 3-D ones, 'miou' for images). Checkpoints are
    # selected on val by select_metric ('auto': the evaluator's own, Dice or mIoU).
    c.eval.type = "auto"
    c.eval.select_metric = "auto"
    c.eval.pad_multiple = 16  # 'miou': images are padded to a multiple of the network's stride.
    c.eval.empty_policy = "ssl4mis"
    c.eval.slice_batch_size = 16
    # 'sliding_window' (3-D volumes, the reference's test_3D.py), (D, H, W) depth first: windows of
    # eval.window (() = data.patch_size) every eval.stride voxels (() = the reference's LA strides
    # scaled to the window: (4, 18, 18) for (80, 112, 112)), predicted window_batch_size at a time;
    # largest_component keeps the largest connected foreground component (reference: off).
    c.eval.window = ()
    c.eval.stride = ()
    c.eval.window_batch_size = 4
    c.eval.largest_component = False
    c.eval.model = "student"  # Which network is evaluated: 'student' or 'teacher'.
    return c


def _fail(field: str, problem: str) -> None:
    raise ConfigError(f"config.{field}: {problem}")


def _choice(value, field: str, options) -> None:
    if value not in options:
        _fail(field, f"{value!r} is not one of {', '.join(map(repr, options))}")


def _positive(value, field: str) -> None:
    if not (isinstance(value, (int, float)) and value > 0):
        _fail(field, f"must be a positive number, got {value!r}")


BATCH_FIELDS = ("batch_labeled", "batch_unlabeled")
# Fields left to the hardware when None (auto): resolve_for_devices fills them when a run starts.
RESOLVED_FIELDS = ("data.mesh_devices", "arco.remat_student")


def data_mesh_size(batch_sizes: dict[str, int], device_count: int, process_count: int = 1,
                   requested: int | None = None) -> int:
    """How many devices the data mesh uses for these global batch sizes ({field: size}).

    The global batch is the experiment (the learning rate and the batch-norm batches are tuned
    for it), so it is never rescaled to the hardware: `requested` (data.mesh_devices) when
    given, else the most devices that split every batch evenly with the same number of
    devices on every host (each host feeds its own rows). 4 + 4 on 8 chips: 4 of them; on 16
    chips over 4 hosts: one chip per host. A pure function of the counts, so a launcher can
    check a config against an accelerator before creating it. ConfigError names the field.
    """
    if not (isinstance(device_count, int) and isinstance(process_count, int) and 0 < process_count <= device_count
            and device_count % process_count == 0):
        raise ConfigError(f"{device_count} devices over {process_count} hosts: expected the same number of devices "
                          "on every host")
    for field, size in batch_sizes.items():
        _positive(size, f"data.{field}")
        if size % process_count:
            _fail(f"data.{field}", f"{size} rows cannot be split evenly over the {process_count} hosts of this run "
                  f"(each host feeds its own rows): use a multiple of {process_count}")
    if requested is None:
        per_host = device_count // process_count
        return max(process_count * m for m in range(1, per_host + 1)
                   if all(size % (process_count * m) == 0 for size in batch_sizes.values()))
    if not (isinstance(requested, int) and not isinstance(requested, bool) and requested > 0):
        _fail("data.mesh_devices", f"must be a positive integer or None (auto), got {requested!r}")
    if requested > device_count:
        _fail("data.mesh_devices", f"{requested} devices asked for, this run has {device_count}")
    if requested % process_count:
        _fail("data.mesh_devices", f"{requested} devices cannot be taken equally from the {process_count} hosts")
    for field, size in batch_sizes.items():
        if size % requested:
            _fail(f"data.{field}", f"{size} is not divisible by the {requested} devices of the data mesh "
                  "(data.mesh_devices)")
    return requested


def resolve_for_devices(c: ml_collections.ConfigDict, device_count: int, process_count: int = 1,
                        platform: str = "cpu") -> None:
    """Fill the fields left to the hardware (RESOLVED_FIELDS, None: auto) for `device_count`
    devices over `process_count` hosts on `platform` ('cpu', 'gpu', 'tpu'); set ones are checked.

    data.mesh_devices: data_mesh_size. arco.remat_student: on for a single CPU device only: it
    trades about 17 % more step time (and the equivariance pass's batch-norm batch) for host
    memory, which is what a CPU runs out of; on several CPU devices XLA unrolls the loop and
    it saves nothing, and a GPU or TPU holds the 256 px step without it. The resolved values
    are recorded in config.json, so resuming on other hardware shows up as a config change.
    """
    d, a = c.data, c.arco
    d.mesh_devices = data_mesh_size({f: d[f] for f in BATCH_FIELDS}, device_count, process_count, d.mesh_devices)
    if a.remat_student is None:
        a.remat_student = platform == "cpu" and d.mesh_devices == 1


def fill_unrecorded(stored: dict, given: dict) -> dict:
    """A stored config.json from before a RESOLVED_FIELDS field was recorded (None there) takes
    the given run's value: such a run used every device with batches that divided by them,
    which is what auto resolves to on the same hardware."""
    stored = json.loads(json.dumps(stored))
    for dotted in RESOLVED_FIELDS:
        section, field = dotted.split(".")
        if stored.get(section, {}).get(field) is None and given.get(section, {}).get(field) is not None:
            stored.setdefault(section, {})[field] = given[section][field]
    return stored


def validate(c: ml_collections.ConfigDict, device_count: int | None = None, *, process_count: int = 1,
             platform: str | None = None, check_data: bool = True) -> None:
    """Raise ConfigError on the first setting that cannot work; cheap, no data is read.

    With `device_count` (all devices of all `process_count` hosts) the fields left to the
    hardware are resolved for it (resolve_for_devices; `platform` None: JAX's default backend).
    `check_data=False` leaves out the dataset's check of its folder (a launcher checking a
    config on a machine without the data)."""
    d, a = c.data, c.arco
    if not d.dataset:
        _fail("data.dataset", f"no dataset chosen; known: {', '.join(registry.names())} (a config file picks one "
              "with arco_jax.data.registry.select(config, name))")
    registry.get(d.dataset)
    if check_data:
        registry.validate(c)
    registry.resolve(c)
    rank = d.spatial_rank
    batches = {field: d[field] for field in BATCH_FIELDS}
    for field, value in batches.items():
        _positive(value, f"data.{field}")
    if device_count:
        if platform is None:
            import jax  # pylint: disable=import-outside-toplevel

            platform = jax.default_backend()
        resolve_for_devices(c, device_count, process_count, platform)
    elif d.mesh_devices is not None:
        data_mesh_size(batches, d.mesh_devices, 1, d.mesh_devices)
    if d.batch_unlabeled < 2:
        _fail("data.batch_unlabeled", f"{c.augment.mix} pairs each unlabeled image with the next one: needs >= 2")

    from arco_jax import models  # pylint: disable=import-outside-toplevel  (flax: only when validating)

    for field, problem in models.check(c.model) + models.check_rank(c.model, d.spatial_rank):
        _fail(f"model.{field}", problem)
    # What the patch must be a multiple of is the architecture's (UNet, VNet: 16, four 2x poolings;
    # DeepLabv3+: any size, as ReCo's 321 px crops).
    multiple = models.input_multiple(c)
    patch = tuple(d.patch_size)
    if len(patch) != rank or not all(isinstance(n, int) and n >= multiple and n % multiple == 0 for n in patch):
        why = f"multiples of {multiple} (model '{c.model.name}')" if multiple > 1 else "positive integers"
        _fail("data.patch_size", f"must be {rank} {why} for this {rank}-D dataset, got {patch}")
    if not isinstance(c.model.init_from, str):
        _fail("model.init_from", f"must be a path to an .npz file or '', got {c.model.init_from!r}")
    _choice(c.model.dtype, "model.dtype", COMPUTE_DTYPES)
    _choice(a.sampler, "arco.sampler", SAMPLERS)
    _choice(a.strata, "arco.strata", STRATA_LAYOUTS)
    from arco_jax import sampling  # pylint: disable=import-outside-toplevel  (jax: only when validating)

    try:
        sampling.check_num_strata(a.num_strata, a.strata, d.spatial_rank)
    except ValueError as error:
        _fail("arco.num_strata", str(error))
    for field in ("num_anchors", "num_negatives", "bank_size", "bank_size_background", "bank_enqueue",
                  "temperature", "nn_pool_size", "nn_topk", "nn_grid"):
        _positive(a[field], f"arco.{field}")
    if a.bank_enqueue > min(a.bank_size, a.bank_size_background):
        _fail("arco.bank_enqueue", f"{a.bank_enqueue} rows per step overflow a bank of "
              f"{min(a.bank_size, a.bank_size_background)} in one write")
    if d.batch_unlabeled > a.nn_pool_size:
        _fail("arco.nn_pool_size", f"{a.nn_pool_size} rows cannot take a batch of {d.batch_unlabeled} embeddings")
    if a.nn_topk > a.nn_pool_size:
        _fail("arco.nn_topk", f"{a.nn_topk} neighbours from a pool of {a.nn_pool_size}")
    if not 0.0 < a.ema_decay < 1.0:
        _fail("arco.ema_decay", f"must lie in (0, 1), got {a.ema_decay}")
    if not 0.0 <= a.entropy_percentile <= 50.0:
        _fail("arco.entropy_percentile", f"must lie in [0, 50], got {a.entropy_percentile}")
    _choice(a.variant, "arco.variant", methods.VARIANT_NAMES)
    _choice(a.negatives, "arco.negatives", NEGATIVE_SOURCES)
    _choice(a.nn_gradient, "arco.nn_gradient", NN_GRADIENTS)
    _choice(a.warp_pseudo_labels, "arco.warp_pseudo_labels", (True, False))
    _choice(a.project_anchors, "arco.project_anchors", (True, False))
    _choice(a.remat_student, "arco.remat_student", (True, False, None))
    for field in ("consistency_rampup", "consistency_noise"):
        if not (isinstance(a[field], (int, float)) and a[field] >= 0):
            _fail(f"arco.{field}", f"must be a number >= 0, got {a[field]!r}")
    if not (isinstance(a.consistency_delay, (int, float)) and 0.0 <= a.consistency_delay < 1.0):
        _fail("arco.consistency_delay", f"is a fraction of train.steps in [0, 1), got {a.consistency_delay!r}")

    for term in LOSS_TERMS:
        w = c.loss_weights[term]
        if not isinstance(w, (int, float)) or w < 0:
            _fail(f"loss_weights.{term}", f"must be a number >= 0, got {w!r}")
    if c.loss_weights.sup <= 0:
        _fail("loss_weights.sup", "the supervised term is what makes this segmentation: must be > 0")
    extra = set(c.loss_weights.keys()) - set(LOSS_TERMS)
    if extra:
        _fail("loss_weights", f"unknown terms {sorted(extra)}; known: {', '.join(LOSS_TERMS)}")
    _choice(c.loss.supervised, "loss.supervised", SUPERVISED_LOSSES)
    _validate_augment(c)
    _validate_unlabeled_view(c)
    _choice(c.method, "method", methods.method_names())
    for field, problem in methods.method_conflicts(c) + methods.variant_conflicts(c):
        _fail(field, problem)

    _positive(c.optim.learning_rate, "optim.learning_rate")
    if not isinstance(c.optim.lr_multipliers, (tuple, list)):
        _fail("optim.lr_multipliers", f"must be a tuple of 'REGEX=MULTIPLIER' strings, got {c.optim.lr_multipliers!r}")
    try:
        parse_lr_multipliers(c.optim.lr_multipliers)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    for field in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        value = c.train[field]
        if not (isinstance(value, int) and value > 0):
            _fail(f"train.{field}", f"must be a positive integer, got {value!r}")
    _validate_pretrain(c)
    _choice(c.eval.model, "eval.model", ("student", "teacher"))
    evaluators.validate(c)
    _choice(c.eval.empty_policy, "eval.empty_policy", tuple(EMPTY_POLICIES))


def _validate_augment(c: ml_collections.ConfigDict) -> None:
    g = c.augment
    _choice(g.mix, "augment.mix", MIXES)
    _choice(g.jitter, "augment.jitter", JITTERS)
    for field in ("jitter_prob", "blur_prob", "warp_prob", "flip_prob", "labeled_jitter_prob", "labeled_blur_prob"):
        if not (isinstance(g[field], (int, float)) and 0.0 <= g[field] <= 1.0):
            _fail(f"augment.{field}", f"is a probability in [0, 1], got {g[field]!r}")
    for field, high in (("saturation", 1.0), ("hue", 0.5)):
        if not (isinstance(g[field], (int, float)) and 0.0 <= g[field] <= high):
            _fail(f"augment.{field}", f"must lie in [0, {high}], got {g[field]!r}")
        if g[field] and g.jitter != "colour":
            _fail(f"augment.{field}", f"{g[field]} is drawn by the 'colour' jitter only (augment.jitter is "
                  f"{g.jitter!r})")
    scale = g.unlabeled_scale
    if not (isinstance(scale, (tuple, list)) and len(scale) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scale)
            and 0.0 < scale[0] <= scale[1]):
        _fail("augment.unlabeled_scale", f"must be (low, high) with 0 < low <= high ((1.0, 1.0): off), got {scale!r}")
    if g.jitter == "colour":
        intensity = registry.info(c).intensity
        if c.data.in_channels != 3 or intensity not in ("imagenet", "minmax"):
            _fail("augment.jitter", f"'colour' needs RGB images (3 channels, in [0, 1] or ImageNet-normalised); "
                  f"dataset {c.data.dataset!r} has {c.data.in_channels} channel(s), intensity {intensity!r}")


def _validate_unlabeled_view(c: ml_collections.ConfigDict) -> None:
    from arco_jax.data import pipeline  # pylint: disable=import-outside-toplevel  (grain: only when validating)

    view, own = c.data.unlabeled_view, registry.info(c).weak_augment
    if view == "":
        return
    _choice(view, "data.unlabeled_view", ("",) + tuple(pipeline.WEAK_AUGMENTATIONS))
    fits = pipeline.NATURAL_VIEWS if own in pipeline.NATURAL_VIEWS else (own,)
    if view not in fits:
        _fail("data.unlabeled_view", f"{view!r} is not a view of what dataset {c.data.dataset!r} gives (its weak "
              f"view is {own!r}; {', '.join(map(repr, fits))} fit)")


def _validate_pretrain(c: ml_collections.ConfigDict) -> None:
    p, d = c.pretrain, c.data
    if not (isinstance(p.steps, int) and p.steps >= 0):
        _fail("pretrain.steps", f"must be an integer >= 0 (0 skips stage 1), got {p.steps!r}")
    for field in ("learning_rate", "queue_size", "student_temperature", "teacher_temperature", "global_dim",
                  "window", "window_grid"):
        _positive(p[field], f"pretrain.{field}")
    for field in ("global_weight", "local_weight", "weight_decay", "momentum"):
        if not (isinstance(p[field], (int, float)) and p[field] >= 0):
            _fail(f"pretrain.{field}", f"must be a number >= 0, got {p[field]!r}")
    if not 0.0 < p.ema_decay < 1.0:
        _fail("pretrain.ema_decay", f"must lie in (0, 1), got {p.ema_decay}")
    if p.steps == 0:
        return  # Stage 1 is skipped: its sizes need not fit the data.
    batch = d.batch_labeled + d.batch_unlabeled
    if batch > p.queue_size:
        _fail("pretrain.queue_size", f"{p.queue_size} rows cannot take a batch of {batch} teacher embeddings "
              "(stage 1 uses data.batch_labeled + data.batch_unlabeled)")
    if p.window > min(d.patch_size):
        _fail("pretrain.window", f"windows of {p.window} pixels a side do not fit a {tuple(d.patch_size)} patch")
    if p.window_grid % 2 or p.window % p.window_grid:
        _fail("pretrain.window_grid", f"must be even and divide pretrain.window ({p.window}) so windows at a "
              f"stride of half a window start on whole cells, got {p.window_grid}")


def parse_lr_multipliers(entries) -> list[tuple[re.Pattern, float]]:
    """config.optim.lr_multipliers, a tuple of 'REGEX=MULTIPLIER' strings, as (pattern, multiplier)
    pairs; ValueError names the entry that does not parse."""
    groups = []
    for entry in entries:
        pattern, sep, value = str(entry).rpartition("=")
        try:
            multiplier = float(value)
            if not sep or multiplier < 0:
                raise ValueError
            groups.append((re.compile(pattern), multiplier))
        except (ValueError, re.error) as error:
            raise ValueError(f"config.optim.lr_multipliers: {entry!r} is not 'REGEX=MULTIPLIER' with a valid "
                             f"regular expression and a multiplier >= 0 ({error or 'bad multiplier'})") from None
    return groups


def upgrade_record(record: dict) -> dict:
    """A stored config.json of an earlier layout in today's layout, so old workdirs resume and
    evaluate: the input channels moved from model.in_channels to the dataset's metadata
    (data.in_channels); the ignore label, spatial rank and evaluator fields were added (every
    earlier run was 2-D with no ignore label, evaluated per volume by Dice); the UNet's features and
    dropout_rates moved from model.* to model.unet.* (each model's settings under its name)."""
    record = json.loads(json.dumps(record))
    data, model = record.setdefault("data", {}), record.setdefault("model", {})
    if "in_channels" in model:
        data.setdefault("in_channels", model.pop("in_channels"))
    for field in ("features", "dropout_rates"):
        if field in model:
            model.setdefault("unet", {}).setdefault(field, model.pop(field))
    data.setdefault("ignore_label", None)
    data.setdefault("spatial_rank", 2)
    evaluation = record.setdefault("eval", {})
    # The sliding-window fields came later; their defaults are today's (no earlier run was 3-D).
    for field, value in (("type", "auto"), ("select_metric", "auto"), ("pad_multiple", 16), ("window", []),
                         ("stride", []), ("window_batch_size", 4), ("largest_component", False)):
        evaluation.setdefault(field, value)
    return record


def _overlay(node: ml_collections.ConfigDict, values: dict) -> None:
    for key, value in values.items():
        if isinstance(value, dict) and key in node and isinstance(node[key], ml_collections.ConfigDict):
            _overlay(node[key], value)
        else:
            node[key] = tuple(value) if isinstance(value, list) else value


def from_record(record: dict) -> ml_collections.ConfigDict:
    """The config a stored config.json describes: upgraded (upgrade_record), on top of today's
    defaults for its dataset, so a field added since the run was started has its default."""
    record = upgrade_record(record)
    config = base_config()
    dataset = record.get("data", {}).get("dataset")
    if dataset:
        try:
            registry.select(config, dataset)
        except ConfigError:  # A dataset this installation does not know: the record alone.
            pass
    with config.unlocked():
        _overlay(config, record)
    return ml_collections.ConfigDict(config.to_dict())
