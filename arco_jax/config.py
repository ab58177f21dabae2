"""The one place that defines every config field, its default and its validation.

Experiment files in `configs/` start from `base_config()` and override what differs; `validate`
runs before anything is compiled or read, so a typo or an impossible setting fails in a second
with a message that names the field, instead of minutes later inside a traced function.
"""
from __future__ import annotations

import math
import os

import ml_collections

from arco_jax import methods
from arco_jax.evaluation import EMPTY_POLICIES

SAMPLERS = ("uniform", "sg", "sag")
COMPUTE_DTYPES = ("float32", "bfloat16")
STRATA_LAYOUTS = ("index", "spatial")
DATASETS = ("phantom", "acdc")
DATA_SOURCES = ("h5", "tfds")
ONE_PATIENT_SPLITS = ("whole", "reference")
LOSS_TERMS = ("sup", "unsup", "contrast", "eqv", "nn", "consistency")
NEGATIVE_SOURCES = ("other_classes", "reference")
NN_GRADIENTS = ("active", "reference")


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and the problem."""


def base_config() -> ml_collections.ConfigDict:
    """ARCO stage 2 with the reference code's ACDC settings (ARCO.md)."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "acdc"  # 'acdc': SSL4MIS h5 layout in data_dir; 'phantom': built in.
    c.data.data_dir = ""  # Root of the SSL4MIS layout (source 'h5') or the TFDS folder (source 'tfds').
    c.data.source = "h5"  # ACDC as 'h5' (SSL4MIS files) or 'tfds' (built by arco_jax.data.tfds_acdc).
    c.data.cache_dir = ""  # Where the phantom is generated ('' -> $ARCO_JAX_CACHE or ~/.cache).
    c.data.num_classes = 4
    c.data.class_names = ("RV", "Myo", "LV")  # Foreground classes 1..num_classes-1.
    c.data.labeled_patients = 7
    c.data.one_patient_split = "whole"  # 1 patient: 'whole' (32 slices) or 'reference' (23).
    c.data.patch_size = (256, 256)
    c.data.batch_labeled = 4  # Global batch sizes (over all devices and hosts).
    c.data.batch_unlabeled = 4
    c.data.num_workers = 2  # Grain worker processes per host (0: read in the main process).
    c.data.phantom = ml_collections.ConfigDict()
    c.data.phantom.splits = (20, 4, 6)  # Patients in train, val, test (2 frames each).
    c.data.phantom.image_size = 64
    c.data.phantom.slices = (6, 10)  # Min and max short-axis slices per volume.
    c.data.phantom.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "unet"
    c.model.in_channels = 1
    c.model.features = (16, 32, 64, 128, 256)
    c.model.dropout_rates = (0.05, 0.1, 0.2, 0.3, 0.5)
    c.model.rep_dim = 496  # Sum of the UNet decoder widths, as the reference head.
    c.model.dtype = "float32"  # Compute dtype: 'bfloat16' on GPU/TPU; params and optimizer stay float32.

    # What runs: 'supervised', 'mean_teacher', 'arco_ns', 'arco_sg', 'arco_sag' or 'custom'
    # (arco_jax/methods.py); validate checks the loss weights and sampler against it.
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
    # Memory for time: run the student's passes (labeled, strong, equivariance) as one loop that
    # recomputes activations in the backward pass (Forward.student_passes). The equivariance
    # pass then normalises its labeled and unlabeled halves as separate batch-norm batches.
    c.arco.remat_student = False
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

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 0.01
    c.optim.momentum = 0.9
    c.optim.nesterov = True
    c.optim.weight_decay = 1e-4
    c.optim.poly_power = 0.9

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
    c.eval.empty_policy = "ssl4mis"
    c.eval.slice_batch_size = 16
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


def validate(c: ml_collections.ConfigDict, device_count: int | None = None) -> None:
    """Raise ConfigError on the first setting that cannot work; cheap, no data is read."""
    d, a = c.data, c.arco
    _choice(d.dataset, "data.dataset", DATASETS)
    _choice(d.source, "data.source", DATA_SOURCES)
    if d.source == "tfds" and d.dataset != "acdc":
        _fail("data.source", f"'tfds' is built for ACDC only; the {d.dataset!r} dataset is read as 'h5'")
    if d.dataset == "acdc":
        if not d.data_dir:
            _fail("data.data_dir", "is required for dataset 'acdc' (the folder with train_slices.list, or the "
                  "TFDS folder with source 'tfds')")
        if str(d.data_dir).startswith(("gs://", "s3://")):
            _fail("data.data_dir", f"{d.data_dir!r} is in a bucket; the readers (h5py, ArrayRecord) need a local "
                  "folder: copy the data to the machine's disk first (launch/tpu_vm.sh does), and keep the "
                  "workdir in the bucket")
        if not os.path.isdir(d.data_dir):
            _fail("data.data_dir", f"{d.data_dir!r} is not a directory")
        if d.labeled_patients not in (1, 3, 7):
            _fail("data.labeled_patients", f"ACDC settings are 1, 3 or 7 patients, got {d.labeled_patients!r}")
    elif not (isinstance(d.labeled_patients, int) and d.labeled_patients >= 1):
        _fail("data.labeled_patients", f"must be an integer >= 1, got {d.labeled_patients!r}")
    _choice(d.one_patient_split, "data.one_patient_split", ONE_PATIENT_SPLITS)
    if d.num_classes < 2:
        _fail("data.num_classes", f"needs at least 2 classes, got {d.num_classes}")
    if len(d.class_names) != d.num_classes - 1:
        _fail("data.class_names", f"names the {d.num_classes - 1} foreground classes, got {len(d.class_names)}")
    if len(d.patch_size) != 2 or min(d.patch_size) < 16 or any(s % 16 for s in d.patch_size):
        _fail("data.patch_size", f"must be two multiples of 16 (four 2x poolings), got {tuple(d.patch_size)}")
    if d.patch_size[0] != d.patch_size[1]:
        _fail("data.patch_size", f"must be square (rot90 augmentation), got {tuple(d.patch_size)}")
    for field in ("batch_labeled", "batch_unlabeled"):
        value = d[field]
        _positive(value, f"data.{field}")
        if device_count and value % device_count:
            _fail(f"data.{field}", f"{value} is not divisible by the {device_count} devices of the data mesh")
    if d.batch_unlabeled < 2:
        _fail("data.batch_unlabeled", "CutMix pairs each unlabeled image with the next one: needs >= 2")

    _choice(c.model.dtype, "model.dtype", COMPUTE_DTYPES)
    _choice(a.sampler, "arco.sampler", SAMPLERS)
    _choice(a.strata, "arco.strata", STRATA_LAYOUTS)
    root = math.isqrt(a.num_strata) if a.num_strata > 0 else 0
    if a.num_strata < 1 or root * root != a.num_strata:
        _fail("arco.num_strata", f"strata form a square grid (9, 16, 25, ...), got {a.num_strata}")
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
    _choice(a.remat_student, "arco.remat_student", (True, False))
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
    _choice(c.method, "method", methods.METHOD_NAMES)
    for field, problem in methods.method_conflicts(c) + methods.variant_conflicts(c):
        _fail(field, problem)

    _positive(c.optim.learning_rate, "optim.learning_rate")
    for field in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        value = c.train[field]
        if not (isinstance(value, int) and value > 0):
            _fail(f"train.{field}", f"must be a positive integer, got {value!r}")
    _validate_pretrain(c)
    _choice(c.eval.model, "eval.model", ("student", "teacher"))
    _choice(c.eval.empty_policy, "eval.empty_policy", tuple(EMPTY_POLICIES))


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
        _fail("pretrain.window", f"{p.window} px windows do not fit a {tuple(d.patch_size)} patch")
    if p.window_grid % 2 or p.window % p.window_grid:
        _fail("pretrain.window_grid", f"must be even and divide pretrain.window ({p.window}) so windows at a "
              f"stride of half a window start on whole cells, got {p.window_grid}")
