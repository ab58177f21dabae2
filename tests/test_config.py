"""Config validation: every rule rejects its bad value with a message naming the field, the
shipped experiment files load and validate, and command-line overrides reach the config.

Nothing here imports jax or compiles anything; the whole file runs in about a second.
"""
from pathlib import Path

import re

import pytest
from absl import flags
from ml_collections import config_flags

from arco_jax import config as config_lib
from arco_jax.config import ConfigError, base_config, validate
from arco_jax.data import registry
from tests.tiny import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def phantom_config():
    """The base settings on the built-in phantom: valid as they are (no data dir needed)."""
    c = base_config()
    registry.select(c, "phantom")
    return c


def assert_rejected(c, field: str, device_count=None, mentions=()):
    with pytest.raises(ConfigError) as info:
        validate(c, device_count=device_count)
    message = str(info.value)
    assert message.startswith(f"config.{field}:"), message
    for text in mentions:
        assert text in message, message
    return message


def set_field(c, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = c
    for name in parents:
        node = node[name]
    node[leaf] = value


# ----------------------------------------------------------------------------- shipped configs

def test_base_config_validates_on_the_phantom():
    validate(phantom_config())
    validate(phantom_config(), device_count=4)


def test_demo_config_validates():
    c = load_config("demo")
    assert c.data.dataset == "phantom"
    validate(c)
    validate(c, device_count=2)


def test_acdc_config_needs_a_data_dir():
    c = load_config("acdc")
    assert c.data.data_dir == ""
    assert_rejected(c, "data.data_dir", mentions=("acdc",))


def test_acdc_config_rejects_a_data_dir_that_does_not_exist(tmp_path):
    c = load_config("acdc")
    c.data.data_dir = str(tmp_path / "nowhere")
    assert_rejected(c, "data.data_dir", mentions=(str(tmp_path / "nowhere"),))


def test_acdc_config_validates_with_a_data_dir(tmp_path):
    c = load_config("acdc")
    c.data.data_dir = str(tmp_path)
    validate(c)
    validate(c, device_count=2)


@pytest.mark.parametrize("count", [1, 3, 7])
def test_acdc_accepts_the_published_labeled_counts(tmp_path, count):
    c = load_config("acdc")
    c.data.data_dir = str(tmp_path)
    c.data.labeled_patients = count
    validate(c)


@pytest.mark.parametrize("count", [0, 2, 5, 14])
def test_acdc_rejects_other_labeled_counts(tmp_path, count):
    c = load_config("acdc")
    c.data.data_dir = str(tmp_path)
    c.data.labeled_patients = count
    assert_rejected(c, "data.labeled_patients", mentions=(str(count),))


def test_phantom_accepts_any_positive_labeled_count():
    c = phantom_config()
    c.data.labeled_patients = 5
    validate(c)


# ----------------------------------------------------------------------------- one test per rule

@pytest.mark.parametrize("field, value", [
    ("data.dataset", "kitti"),  # not registered (Cityscapes is)
    ("data.one_patient_split", "half"),
    ("arco.sampler", "stratified"),
    ("arco.strata", "grid"),
    ("eval.model", "ema"),
])
def test_unknown_choice_is_rejected(field, value):
    c = phantom_config()
    set_field(c, field, value)
    assert_rejected(c, field, mentions=(repr(value),))


@pytest.mark.parametrize("value", [0, -1])
def test_phantom_labeled_patients_must_be_positive(value):
    c = phantom_config()
    c.data.labeled_patients = value
    assert_rejected(c, "data.labeled_patients")


def test_num_classes_is_the_datasets_to_declare():
    c = phantom_config()
    c.data.num_classes = 1
    c.data.class_names = ()
    assert_rejected(c, "data.num_classes", mentions=("declares 4",))


@pytest.mark.parametrize("names", [("RV", "Myo"), ("RV", "Myo", "LV", "Aorta")])
def test_class_names_are_the_datasets_to_declare(names):
    c = phantom_config()
    c.data.class_names = names
    assert_rejected(c, "data.class_names", mentions=("('RV', 'Myo', 'LV')",))


@pytest.mark.parametrize("fields, problem", [
    (dict(num_classes=1, class_names=()), "at least 2 classes"),
    (dict(num_classes=4, class_names=("a", "b")), "names the 3 foreground classes, got 2"),
    (dict(num_classes=3, class_names=("a", "b"), ignore_label=2), "ignore_label 2 is a class"),
    (dict(num_classes=3, class_names=("a", "b"), spatial_rank=4), "spatial_rank must be 2 or 3"),
])
def test_dataset_metadata_must_be_consistent(fields, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        registry.DatasetInfo(**fields)


@pytest.mark.parametrize("patch", [(40, 40), (8, 8), (0, 0), (64, 64, 64), (64,)])
def test_patch_size_must_be_two_multiples_of_16(patch):
    c = phantom_config()
    c.data.patch_size = patch
    assert_rejected(c, "data.patch_size")


@pytest.mark.parametrize("patch", [(16, 16), (32, 32), (256, 256)])
def test_patch_size_multiples_of_16_pass(patch):
    c = phantom_config()
    c.data.patch_size = patch
    validate(c)


def test_patch_size_follows_the_models_input_multiple():
    """The UNet needs multiples of 16; DeepLabv3+ takes any size (ReCo's 321 px crops)."""
    c = phantom_config()
    c.data.patch_size = (321, 321)
    with pytest.raises(ConfigError, match=re.escape("data.patch_size: must be 2 multiples of 16 (model 'unet')")):
        validate(c)
    c.model.name, c.model.rep_dim = "deeplabv3plus", 256
    validate(c)
    c.data.patch_size = (321, 0)
    with pytest.raises(ConfigError, match=re.escape("data.patch_size: must be 2 positive integers")):
        validate(c)


@pytest.mark.parametrize("field, other", [("batch_labeled", "batch_unlabeled"),
                                          ("batch_unlabeled", "batch_labeled")])
def test_batch_takes_the_most_devices_it_divides_over(field, other):
    for devices, used in ((1, 1), (2, 2), (3, 3), (4, 3), (6, 6), (8, 6)):
        c = phantom_config()
        c.data[field], c.data[other] = 6, 12
        validate(c, device_count=devices)
        assert c.data.mesh_devices == used, devices
    c = phantom_config()
    c.data[field], c.data[other] = 6, 12
    c.data.mesh_devices = 4  # asked for explicitly: refused, naming the batch
    assert_rejected(c, f"data.{field}", device_count=8, mentions=("6", "4 devices"))


@pytest.mark.parametrize("field", ["batch_labeled", "batch_unlabeled"])
def test_batch_must_be_positive(field):
    c = phantom_config()
    c.data[field] = 0
    assert_rejected(c, f"data.{field}")


def test_cutmix_needs_two_unlabeled_images():
    c = phantom_config()
    c.data.batch_unlabeled = 1
    c.arco.nn_pool_size = 36
    assert_rejected(c, "data.batch_unlabeled", mentions=(">= 2",))


@pytest.mark.parametrize("value", [10, 15, -4, 0])
def test_num_strata_must_be_a_square(value):
    c = phantom_config()
    c.arco.num_strata = value
    assert_rejected(c, "arco.num_strata", mentions=(str(value),))


@pytest.mark.parametrize("value", [1, 4, 9, 25])
def test_square_num_strata_pass(value):
    c = phantom_config()
    c.arco.num_strata = value
    validate(c)


@pytest.mark.parametrize("field", ["num_anchors", "num_negatives", "bank_size", "bank_size_background",
                                   "bank_enqueue", "temperature", "nn_pool_size", "nn_topk", "nn_grid"])
def test_arco_sizes_must_be_positive(field):
    c = phantom_config()
    c.arco[field] = 0 if isinstance(c.arco[field], int) else 0.0
    assert_rejected(c, f"arco.{field}", mentions=("positive",))


@pytest.mark.parametrize("bank_field", ["bank_size", "bank_size_background"])
def test_bank_enqueue_cannot_exceed_a_bank(bank_field):
    c = phantom_config()
    c.arco.bank_enqueue = 1024
    c.arco[bank_field] = 1023
    assert_rejected(c, "arco.bank_enqueue", mentions=("1024", "1023"))
    c.arco[bank_field] = 1024  # exactly one bank per write is allowed
    validate(c)


def test_nn_pool_must_hold_one_unlabeled_batch():
    c = phantom_config()
    c.data.batch_unlabeled = 8
    c.arco.nn_pool_size = 6
    c.arco.nn_topk = 5
    assert_rejected(c, "arco.nn_pool_size", mentions=("6", "8"))
    c.arco.nn_pool_size = 8
    validate(c)


def test_nn_topk_cannot_exceed_the_pool():
    c = phantom_config()
    c.arco.nn_pool_size = 8
    c.arco.nn_topk = 9
    assert_rejected(c, "arco.nn_topk", mentions=("9", "8"))
    c.arco.nn_topk = 8
    validate(c)


@pytest.mark.parametrize("value", [0.0, 1.0, 1.5, -0.5])
def test_ema_decay_must_lie_strictly_between_0_and_1(value):
    c = phantom_config()
    c.arco.ema_decay = value
    assert_rejected(c, "arco.ema_decay", mentions=(str(value),))


@pytest.mark.parametrize("value", [-1.0, 50.5, 80.0])
def test_entropy_percentile_range(value):
    c = phantom_config()
    c.arco.entropy_percentile = value
    assert_rejected(c, "arco.entropy_percentile", mentions=(str(value),))


@pytest.mark.parametrize("value", [0.0, 50.0])
def test_entropy_percentile_bounds_are_allowed(value):
    c = phantom_config()
    c.arco.entropy_percentile = value
    validate(c)


@pytest.mark.parametrize("term", config_lib.LOSS_TERMS)
def test_loss_weights_cannot_be_negative(term):
    c = phantom_config()
    c.loss_weights[term] = -0.5
    assert_rejected(c, f"loss_weights.{term}", mentions=("-0.5",))


def test_loss_weight_must_be_a_number():
    c = phantom_config()
    c.loss_weights.unlock()
    del c.loss_weights["nn"]
    c.loss_weights.nn = "1.0"
    assert_rejected(c, "loss_weights.nn", mentions=("'1.0'",))


@pytest.mark.parametrize("term", ["unsup", "contrast", "eqv", "nn"])
def test_optional_loss_terms_can_be_switched_off(term):
    c = phantom_config()
    c.loss_weights[term] = 0.0
    validate(c)


def test_supervised_weight_must_be_positive():
    c = phantom_config()
    c.loss_weights.sup = 0.0
    assert_rejected(c, "loss_weights.sup", mentions=("> 0",))


def test_unknown_loss_term_is_rejected():
    c = phantom_config()
    c.loss_weights.consistancy = 1.0
    assert_rejected(c, "loss_weights", mentions=("consistancy",))


@pytest.mark.parametrize("value", [0.0, -0.01])
def test_learning_rate_must_be_positive(value):
    c = phantom_config()
    c.optim.learning_rate = value
    assert_rejected(c, "optim.learning_rate")


@pytest.mark.parametrize("field", ["steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"])
def test_train_counts_must_be_positive_integers(field):
    c = phantom_config()
    c.train[field] = 0
    assert_rejected(c, f"train.{field}", mentions=("positive integer",))


def test_config_error_is_a_value_error():
    """Callers that catch ValueError for bad input keep working."""
    assert issubclass(ConfigError, ValueError)


def test_unknown_empty_policy_is_rejected_before_training():
    c = phantom_config()
    c.eval.empty_policy = "ssl4mis_typo"
    assert_rejected(c, "eval.empty_policy", mentions=("'ssl4mis_typo'",))


# ----------------------------------------------------------------------------- command line

def parse_command_line(*overrides: str):
    """The config as main.py would receive it: a fresh flag set, so the global one is untouched."""
    argv = ["prog", f"--config={CONFIGS / 'demo.py'}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=flag_values,
                                    lock_config=True, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def test_command_line_overrides_reach_the_config():
    c = parse_command_line("--config.train.steps=7", "--config.arco.sampler=sag", "--config.method=arco_sag",
                           "--config.data.patch_size=(32,32)", "--config.loss_weights.nn=0.0")
    assert c.train.steps == 7
    assert c.arco.sampler == "sag"
    assert tuple(c.data.patch_size) == (32, 32)
    assert c.loss_weights.nn == 0.0
    assert c.data.dataset == "phantom"  # the rest is the file's
    validate(c)


def test_command_line_without_overrides_is_the_file():
    assert parse_command_line().to_dict() == load_config("demo").to_dict()


def test_command_line_rejects_a_misspelled_field():
    with pytest.raises(AttributeError, match="steps"):
        parse_command_line("--config.train.stepz=7")


def test_command_line_rejects_a_value_of_the_wrong_type():
    with pytest.raises(flags.IllegalFlagValueError, match="config.train.steps"):
        parse_command_line("--config.train.steps=2.5")


def test_command_line_value_goes_through_validation():
    c = parse_command_line("--config.arco.num_strata=10")
    assert_rejected(c, "arco.num_strata")
