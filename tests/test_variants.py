"""Method and variant presets: what each switch changes (and what it leaves alone), how the
presets and config strings set and check them, the reference code's bank on hand-made cases,
the Mean Teacher consistency against a hand computation, and one jitted train step per method.

Compiling a train step dominates this file's time: the unit checks run eagerly on tiny shapes,
and one step is compiled per method (arco_sg, the default, in tests/test_step.py; arco_sag under
the paper variant only with -m slow).
"""
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from arco_jax import config as config_lib
from arco_jax import consistency, losses, memory, methods, objective
from arco_jax import state as state_lib
from arco_jax.config import ConfigError, validate
from arco_jax.objective import Batch, Forward, head_inputs
from arco_jax.methods import mean_teacher
from arco_jax.step import make_train_step
from arco_jax.data import registry

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
NUM_CLASSES = 4
SIZE = 16
BATCH = 2


def tiny_config() -> ml_collections.ConfigDict:
    c = config_lib.base_config()
    registry.select(c, "phantom")
    c.data.patch_size = (SIZE, SIZE)
    c.data.batch_labeled = BATCH
    c.data.batch_unlabeled = BATCH
    c.model.unet.features = (4, 8, 8, 16, 16)
    c.model.rep_dim = 16
    a = c.arco
    a.num_anchors = 8
    a.num_negatives = 4
    a.bank_size = 32
    a.bank_size_background = 64
    a.bank_enqueue = 8
    a.nn_grid = 2
    a.nn_pool_size = 4
    a.nn_topk = 2
    a.confidence_threshold = 0.0
    c.train.steps = 20
    validate(c)
    return c


def make_batch(seed: int = 1) -> Batch:
    rng = np.random.default_rng(seed)
    images = rng.random((2, BATCH, SIZE, SIZE, 1)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, (BATCH, SIZE, SIZE)).astype(np.int32)
    return Batch(image_l=jnp.asarray(images[0]), label_l=jnp.asarray(labels), image_u=jnp.asarray(images[1]))


@pytest.fixture(scope="module")
def model():
    """Networks, optimizer and an initial ARCO state of the tiny config (network shapes do not
    depend on the method or variant, so every case shares them)."""
    config = tiny_config()
    nets = state_lib.build_networks(config)
    tx = state_lib.build_optimizer(config)
    # rbg keys: the semantics of the default threefry, several times faster to compile on CPU.
    state = jax.jit(lambda k: state_lib.create_train_state(config, nets, tx, k))(key(0))
    return nets, tx, state


def key(seed: int) -> jax.Array:
    return jax.random.key(seed, impl="rbg")


def with_settings(**dotted) -> ml_collections.ConfigDict:
    c = tiny_config()
    for field, value in dotted.items():
        methods.set_field(c, field.replace("__", "."), value)
    return c


# ----------------------------------------------------------------------------- presets

def flat(config: ml_collections.ConfigDict) -> dict:
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, ml_collections.ConfigDict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value
    walk(config, "")
    return out


def acdc_base():
    """The base settings with a dataset that has every switch a variant sets."""
    c = config_lib.base_config()
    registry.select(c, "acdc")
    return c


@pytest.mark.parametrize("name", methods.VARIANT_NAMES)
def test_variant_preset_sets_exactly_its_switches(name):
    before = flat(acdc_base())
    after = flat(methods.apply_variant(acdc_base(), name))
    changed = {k for k in after if after[k] != before[k]}
    preset = methods.VARIANTS.get(name, {})
    assert changed <= set(preset) | {"arco.variant"}
    assert after["arco.variant"] == name
    for field, value in preset.items():
        assert after[field] == value, field


def test_variant_presets_cover_the_same_switches_with_different_values():
    paper, code = methods.VARIANTS["paper"], methods.VARIANTS["code"]
    assert set(paper) == set(code) == {"arco.strata", "arco.negatives", "arco.nn_gradient",
                                       "arco.warp_pseudo_labels", "data.one_patient_split"}
    assert all(paper[k] != code[k] for k in paper)


@pytest.mark.parametrize("name", methods.METHOD_NAMES)
def test_method_preset_sets_exactly_its_fields(name):
    before = flat(config_lib.base_config())
    after = flat(methods.apply_method(config_lib.base_config(), name))
    changed = {k for k in after if after[k] != before[k]}
    preset = methods.METHODS.get(name, {})
    assert changed <= set(preset) | {"method"}
    assert after["method"] == name
    for field, value in preset.items():
        assert after[field] == value, field


def test_default_is_arco_sg_under_the_custom_variant():
    c = config_lib.base_config()
    assert c.method == "arco_sg" and c.arco.variant == "custom"
    # The default equals the arco_sg preset: naming it changes nothing.
    assert flat(methods.apply_method(config_lib.base_config(), "arco_sg")) == flat(c)


def test_baseline_presets_switch_off_every_arco_term():
    for name in ("supervised", "mean_teacher"):
        w = methods.apply_method(config_lib.base_config(), name).loss_weights
        assert w.unsup == w.contrast == w.eqv == w.nn == 0.0
    assert methods.apply_method(config_lib.base_config(), "supervised").loss_weights.consistency == 0.0
    assert methods.apply_method(config_lib.base_config(), "mean_teacher").loss_weights.consistency == 0.1


# ----------------------------------------------------------------------------- validation

def phantom(**dotted):
    c = config_lib.base_config()
    registry.select(c, "phantom")
    for field, value in dotted.items():
        methods.set_field(c, field, value)
    return c


def rejected(c, field: str, *mentions: str) -> str:
    with pytest.raises(ConfigError) as info:
        validate(c)
    message = str(info.value)
    assert message.startswith(f"config.{field}:"), message
    for text in mentions:
        assert text in message, message
    return message


@pytest.mark.parametrize("name", ["paper", "code"])
@pytest.mark.parametrize("field", sorted(methods.VARIANTS["paper"]))
def test_a_switch_that_contradicts_the_named_variant_is_rejected(name, field):
    c = methods.apply_variant(phantom(), name)
    validate(c)
    other = methods.VARIANTS["code" if name == "paper" else "paper"][field]
    methods.set_field(c, field, other)
    rejected(c, field, repr(other), f"variant {name!r}", repr(methods.VARIANTS[name][field]), "custom")
    c.arco.variant = "custom"
    validate(c)


@pytest.mark.parametrize("method, field, value, mention", [
    ("supervised", "loss_weights.unsup", 1.0, "no unsup term"),
    ("supervised", "loss_weights.consistency", 0.1, "no consistency term"),
    ("mean_teacher", "loss_weights.consistency", 0.0, "needs a consistency term"),
    ("mean_teacher", "loss_weights.contrast", 0.01, "no contrast term"),
    ("arco_sg", "arco.sampler", "sag", "sets 'sg'"),
    ("arco_ns", "loss_weights.consistency", 0.1, "no consistency term"),
])
def test_a_setting_that_contradicts_the_named_method_is_rejected(method, field, value, mention):
    c = methods.apply_method(phantom(), method)
    validate(c)
    methods.set_field(c, field, value)
    rejected(c, field, mention, f"method {method!r}")
    c.method = "custom"
    validate(c)


def test_method_weights_stay_tunable_and_zero_is_an_ablation():
    c = methods.apply_method(phantom(), "arco_sag")
    c.loss_weights.contrast = 0.1
    c.loss_weights.nn = 0.0
    validate(c)


@pytest.mark.parametrize("field, value", [("arco.variant", "reviewer"), ("method", "fixmatch"),
                                          ("arco.negatives", "all"), ("arco.nn_gradient", "none"),
                                          ("arco.consistency_delay", 1.0), ("arco.consistency_rampup", -1.0)])
def test_unknown_names_and_bad_schedule_values_are_rejected(field, value):
    rejected(phantom(**{field: value}), field, repr(value))


# ----------------------------------------------------------------------------- config strings

def command_line(*argv: str):
    argv = ["prog", *argv]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=flag_values,
                                    lock_config=True, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


@pytest.mark.parametrize("name", ["demo", "acdc"])
def test_config_string_applies_both_presets(name):
    c = command_line(f"--config={CONFIGS / name}.py: variant=code , method=arco_sag")
    assert c.method == "arco_sag" and c.arco.sampler == "sag"
    assert c.arco.variant == "code"
    for field, value in methods.VARIANTS["code"].items():
        assert methods.get_field(c, field) == value
    if name == "demo":
        validate(c)


def test_config_string_is_optional():
    assert command_line(f"--config={CONFIGS / 'demo.py'}").to_dict() == command_line(
        f"--config={CONFIGS / 'demo.py'}:").to_dict()


def test_naming_a_variant_on_the_command_line_alone_is_not_silently_ignored():
    c = command_line(f"--config={CONFIGS / 'demo.py'}", "--config.arco.variant=code")
    rejected(c, "arco.negatives", "'reference'", "variant 'code'")


@pytest.mark.parametrize("text, bad", [
    ("variant", "'variant'"), ("variant=", "'variant='"), ("=code", "'=code'"),
    ("varient=code", "'varient'"), ("variant=cod", "'cod'"), ("method=arco_sg,,variant=code", "''"),
    ("method=arco_sg,method=arco_ns", "given twice"),
])
def test_config_string_errors_name_the_bad_token(text, bad):
    with pytest.raises(ValueError) as info:
        methods.parse_config_string(text)
    assert bad in str(info.value) and text in str(info.value)
    with pytest.raises(flags.IllegalFlagValueError) as info:  # absl's wrapper of the ValueError
        command_line(f"--config={CONFIGS / 'demo.py'}:{text}")
    assert bad in str(info.value)


# ----------------------------------------------------------------------------- the reference bank

def hand_case(num_classes: int):
    """Batch of 1 labeled + 1 unlabeled row of 4 pixels (H=1): labels, teacher probs, high mask."""
    labels = np.array([[[0, 1, 2, 3]], [[2, 2, 1, 0]]], np.int32)
    probs = np.full((2, 1, 4, num_classes), 0.0, np.float32)
    probs[0, 0] = np.eye(num_classes)[[1, 2, 3 % num_classes, 0]] * 0.5 + 0.5 / num_classes  # any
    if num_classes == 4:
        probs[1, 0] = [[0.4, 0.3, 0.05, 0.25],  # label 2, ranked last, uncertain -> bank 2
                       [0.1, 0.2, 0.3, 0.4],  # label 2 ranked second -> no
                       [0.5, 0.01, 0.3, 0.19],  # label 1 ranked last but certain (not high) -> no
                       [0.1, 0.2, 0.3, 0.4]]  # label 0 ranked last, uncertain -> bank 0
    else:
        probs[1, 0] = [[0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]]
    high = np.array([[[True] * 4], [[True, True, False, True]]])
    return jnp.asarray(labels), jnp.asarray(probs), jnp.asarray(high)


def test_class_ranks_is_a_stable_descending_sort():
    probs = jnp.asarray([[0.1, 0.4, 0.4, 0.1], [0.7, 0.1, 0.05, 0.15]])
    np.testing.assert_array_equal(np.asarray(objective.class_ranks(probs)).T, [[2, 0, 1, 3], [0, 2, 3, 1]])


def test_reference_bank_masks_keep_only_unlabeled_pixels_ranked_low():
    labels, probs, high = hand_case(4)
    mask = np.asarray(objective.bank_candidates(labels, probs, high, 1, "reference"))
    expected = np.zeros((4, 2, 1, 4), bool)
    expected[2, 1, 0, 0] = expected[0, 1, 0, 3] = True
    np.testing.assert_array_equal(mask, expected)  # labeled row: always empty


def test_reference_bank_masks_are_empty_with_three_classes():
    labels, probs, high = hand_case(3)
    labels = jnp.minimum(labels, 2)
    assert not np.any(np.asarray(objective.bank_candidates(labels, probs, high, 1, "reference")))
    # The ReCo-style bank takes every uncertain pixel of its class, labeled ones included.
    other = np.asarray(objective.bank_candidates(labels, probs, high, 1, "other_classes"))
    np.testing.assert_array_equal(other, (np.asarray(labels)[None] == np.arange(3)[:, None, None, None])
                                  & np.asarray(high)[None])


def test_reference_negatives_are_the_own_bank_plus_its_zero_row():
    bank = memory.init_class_bank((3, 4), dim=2)
    np.testing.assert_array_equal(bank.filled_and_zero_row, [[1, 0, 0, 0], [1, 0, 0, 0]])
    bank = memory.push_class_bank(bank, jnp.ones((2, 3, 2)), jnp.array([3, 1]))  # counts
    np.testing.assert_array_equal(bank.count, [3, 1])
    np.testing.assert_array_equal(bank.filled_and_zero_row, [[1, 1, 1, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(bank.keys[1, 1], [0, 0])  # the zero row really is zero


def test_reference_bank_update_pushes_each_candidate_once(model):
    nets, _, state = model
    config = with_settings(arco__negatives="reference")
    fwd = Forward(config, nets, state.params, state.teacher, state.batch_stats)
    images = jnp.asarray(np.random.default_rng(0).random((2, SIZE, SIZE, 1)), jnp.float32)
    _, features = fwd.teacher_net(images, key(1))
    teacher = head_inputs(fwd, "teacher", features)
    labels = np.zeros((2, SIZE, SIZE), np.int32)
    probs = np.tile(np.float32([0.7, 0.1, 0.1, 0.1]), (2, SIZE, SIZE, 1))  # class 0 on top: no candidate
    high = np.ones((2, SIZE, SIZE), bool)
    labels[:, :1, :4], probs[:, :1, :4], high[:, :1, :4] = hand_case(4)
    push = objective.update_bank(key(2), fwd, teacher, jnp.asarray(labels), jnp.asarray(probs),
                                 jnp.asarray(high), num_labeled=1)
    bank = memory.push_class_bank(state.methods["arco"].bank, push.keys, push.written)
    np.testing.assert_array_equal(bank.count, [1, 0, 1, 0])
    expected = fwd.head("teacher", "fine_at_pixels", *teacher, jnp.array([1, 1]), jnp.array([0, 0]),
                        jnp.array([3, 0]))
    np.testing.assert_allclose(bank.keys[0, 0], losses.l2_normalize(expected[0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bank.keys[2, 0], losses.l2_normalize(expected[1]), rtol=1e-5, atol=1e-6)


def one_reliable_pixel_per_class():
    """(images, labels, low, pixels, probs): one reliable pixel of each class in a 2-image batch."""
    images = jnp.asarray(np.random.default_rng(3).random((2, SIZE, SIZE, 1)), jnp.float32)
    labels = np.zeros((2, SIZE, SIZE), np.int32)
    low = np.zeros((2, SIZE, SIZE), bool)
    pixels = [(0, 2, 3), (0, 9, 9), (1, 4, 12), (1, 13, 1)]
    for c, (b, y, x) in enumerate(pixels):
        labels[b, y, x], low[b, y, x] = c, True
    probs = jnp.asarray(np.eye(NUM_CLASSES, dtype=np.float32)[labels] * 0.6 + 0.1)
    return images, labels, low, pixels, probs


def test_reference_negatives_degenerate_to_a_zero_vector_on_an_empty_bank(model):
    """One reliable pixel per class: every anchor is that pixel, the positive is its teacher
    representation, and with the reference's bank every negative logit is cos(a, 0) = 0, so
    each class term is log(exp(s/tau) + m) - s/tau. The ReCo-style bank, empty, has no term."""
    nets, _, state = model
    images, labels, low, pixels, probs = one_reliable_pixel_per_class()
    contrast_key = key(4)
    config = with_settings(arco__negatives="reference")
    fwd = Forward(config, nets, state.params, state.teacher, state.batch_stats)
    _, s_features = fwd.student(images, key(5))
    _, t_features = fwd.teacher_net(images, key(6))
    student, teacher = head_inputs(fwd, "student", s_features), head_inputs(fwd, "teacher", t_features)
    results = {}
    for negatives in ("reference", "other_classes"):
        fwd.config = with_settings(arco__negatives=negatives)
        results[negatives] = objective.per_class_contrast(contrast_key, fwd, student, teacher, jnp.asarray(labels),
                                                          probs, jnp.asarray(low), state.methods["arco"].bank)
    b, y, x = (jnp.array(v) for v in zip(*pixels))
    anchors = losses.l2_normalize(fwd.project(fwd.head("student", "fine_at_pixels", *student, b, y, x)))
    positives = losses.l2_normalize(fwd.head("teacher", "fine_at_pixels", *teacher, b, y, x))
    s = np.sum(np.asarray(anchors) * np.asarray(positives), axis=1) / config.arco.temperature
    expected = np.log(np.exp(s) + config.arco.num_negatives) - s
    per_class, counted, present = results["reference"]
    np.testing.assert_allclose(per_class, expected, rtol=1e-4)
    assert np.all(counted) and np.all(present)
    assert not np.any(results["other_classes"][1])  # no negatives: no class counted


def test_unprojected_anchors_are_the_heads_representations(model):
    """arco.project_anchors off: the class term of the one-pixel case above is computed from the
    student head's representation itself, in the teacher's space, and differs from the
    projected one."""
    nets, _, state = model
    images, labels, low, pixels, probs = one_reliable_pixel_per_class()
    results = {}
    for project in (True, False):
        config = with_settings(arco__negatives="reference", arco__project_anchors=project)
        fwd = Forward(config, nets, state.params, state.teacher, state.batch_stats)
        _, s_features = fwd.student(images, key(5))
        _, t_features = fwd.teacher_net(images, key(6))
        student, teacher = head_inputs(fwd, "student", s_features), head_inputs(fwd, "teacher", t_features)
        results[project] = objective.per_class_contrast(key(4), fwd, student, teacher, jnp.asarray(labels), probs,
                                                        jnp.asarray(low), state.methods["arco"].bank)[0]
    b, y, x = (jnp.array(v) for v in zip(*pixels))
    anchors = losses.l2_normalize(fwd.head("student", "fine_at_pixels", *student, b, y, x))
    positives = losses.l2_normalize(fwd.head("teacher", "fine_at_pixels", *teacher, b, y, x))
    s = np.sum(np.asarray(anchors) * np.asarray(positives), axis=1) / config.arco.temperature
    np.testing.assert_allclose(results[False], np.log(np.exp(s) + config.arco.num_negatives) - s, rtol=1e-4)
    assert np.max(np.abs(np.asarray(results[True]) - np.asarray(results[False]))) > 1e-3


# ----------------------------------------------------------------------------- L_nn gradient

def loss_and_grads(config, state, nets, batch):
    fn = jax.value_and_grad(lambda p: objective.arco_loss(p, state, batch, key(7),
                                                          jnp.float32(0.3), config, nets), has_aux=True)
    (loss, (terms, *_)), grads = fn(state.params)
    return loss, terms, grads


@pytest.mark.slow  # three more compiled losses with gradients (about 50 s); a 'code'-variant switch
def test_reference_nn_gradient_reports_the_same_value_and_trains_nothing(model):
    nets, _, state = model
    batch = make_batch(2)
    only = dict(loss_weights__unsup=0.0, loss_weights__contrast=0.0, loss_weights__eqv=0.0)
    active = loss_and_grads(with_settings(**only), state, nets, batch)
    reference = loss_and_grads(with_settings(arco__nn_gradient="reference", **only), state, nets, batch)
    supervised = loss_and_grads(with_settings(loss_weights__nn=0.0, **only), state, nets, batch)
    assert float(reference[1]["nn"]) == float(active[1]["nn"]) > 0
    assert float(reference[0]) == float(active[0])
    for ref, sup in zip(jax.tree.leaves(reference[2]), jax.tree.leaves(supervised[2])):
        np.testing.assert_allclose(ref, sup, rtol=1e-5, atol=1e-7)
    assert float(optax_norm(active[2]["projector"])) > 0 and float(optax_norm(reference[2]["projector"])) == 0


def optax_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------- Mean Teacher

def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_softmax_mse_matches_a_hand_computation():
    rng = np.random.default_rng(8)
    s, t = rng.normal(size=(2, 3, 3, 4)), rng.normal(size=(2, 3, 3, 4))
    expected = np.mean((softmax(s) - softmax(t)) ** 2)
    np.testing.assert_allclose(losses.softmax_mse(jnp.asarray(s), jnp.asarray(t)), expected, rtol=1e-5)


def test_consistency_weight_is_the_ssl4mis_ramp():
    """SSL4MIS: 0 for 1000 of 30000 iterations, then 0.1 exp(-5 (1 - (t // 150) / 200)^2)."""
    config = methods.apply_method(config_lib.base_config(), "mean_teacher")
    total = 30000
    for t in (0, 999, 1000, 7500, 15000, 29999, 30000):
        ours = float(consistency.consistency_weight(config, jnp.float32(t / total)))
        if t < 1000:
            assert ours == 0.0
            continue
        np.testing.assert_allclose(ours, 0.1 * math.exp(-5 * (1 - t / total) ** 2), rtol=1e-5)
        ssl4mis = 0.1 * math.exp(-5 * (1 - (t // 150) / 200) ** 2)
        np.testing.assert_allclose(ours, ssl4mis, rtol=0.04)  # SSL4MIS steps every 150 iterations
    assert float(losses.sigmoid_rampup(0.3, 0.0)) == 1.0
    config.arco.consistency_rampup = 0.5
    assert float(consistency.consistency_weight(config, jnp.float32(0.5))) == pytest.approx(0.1)


def test_consistency_term_matches_a_hand_computation(model):
    nets, _, state = model
    config = with_settings(arco__consistency_noise=0.0, arco__teacher_train_mode=False)
    image_u = make_batch(3).image_u
    student_logits = jax.random.normal(key(9), (BATCH, SIZE, SIZE, NUM_CLASSES))
    teacher_logits, _ = nets.segmenter.apply(
        {"params": state.teacher["params"]["segmenter"], "batch_stats": state.teacher["batch_stats"]},
        image_u, train=False)
    expected = np.mean((softmax(np.asarray(student_logits, np.float64))
                        - softmax(np.asarray(teacher_logits, np.float64))) ** 2)
    ours, stats = consistency.consistency_term(key(10), config, nets, state.teacher, student_logits, image_u)
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    # An eval-mode teacher reads its running statistics and moves none.
    jax.tree.map(np.testing.assert_array_equal, stats, state.teacher["batch_stats"])


def test_mean_teacher_loss_is_sup_plus_ramped_consistency_and_nothing_else(model):
    nets, _, state = model
    config = methods.apply_method(tiny_config(), "mean_teacher")
    validate(config)
    progress = jnp.float32(0.5)
    loss, out = mean_teacher.mean_teacher_loss(state.params, state, make_batch(4), key(11), progress, config, nets)
    terms, update, metrics = out.terms, out.update, out.metrics
    # The reference's teacher runs in train mode: its pass moved its running statistics.
    assert config.arco.teacher_train_mode and out.teacher_batch_stats is not None
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(out.teacher_batch_stats),
                                                     jax.tree.leaves(state.teacher["batch_stats"])))
    weight = float(consistency.consistency_weight(config, progress))
    assert weight > 0 and float(metrics["consistency_weight"]) == pytest.approx(weight)
    assert float(terms["consistency"]) > 0
    np.testing.assert_allclose(loss, 0.5 * terms["sup"] + weight * terms["consistency"], rtol=1e-6)
    assert set(terms) == {"sup", "consistency"} and update is None


# ----------------------------------------------------------------------------- one step per method

@pytest.mark.parametrize("method, variant", [
    ("supervised", "custom"), ("mean_teacher", "custom"), ("arco_ns", "code"),
    # The paper variant only switches between paths the default step (test_step.py) and the
    # samplers' tests already compile; its full step is one more large compile.
    pytest.param("arco_sag", "paper", marks=pytest.mark.slow)])
def test_each_method_preset_runs_a_jitted_train_step(model, method, variant):
    nets, tx, arco_state = model
    config = methods.apply_config_string(tiny_config(), f"method={method},variant={variant}")
    validate(config)
    # The method's own state without another init compile: the ARCO state's shared parts, the
    # method's own part (none for the baselines) and its own failure flags.
    own = {k: v for k, v in arco_state.methods.items() if k == methods.stage_methods(config)[2].name}
    state = arco_state.replace(methods=own, bad_terms=jnp.zeros((len(state_lib.term_names(config)),), bool))
    step = jax.jit(make_train_step(config, nets, tx))
    new, metrics = step(state, make_batch(5))
    metrics = {k: float(v) for k, v in metrics.items()}
    assert int(new.step) == 1 and int(new.bad_step) == -1, metrics
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    old, trained = jax.tree.leaves(state.params["segmenter"]), jax.tree.leaves(new.params["segmenter"])
    assert any(not np.allclose(a, b) for a, b in zip(trained, old))
    arco = method.startswith("arco")
    # Each method reports its own terms; only ARCO owns banks and a pool.
    reported = {name[5:] for name in metrics if name.startswith("loss_")}
    assert reported == {"supervised": {"sup"}, "mean_teacher": {"sup", "consistency"}}.get(
        method, {"sup", "unsup", "contrast", "eqv", "nn", "consistency"}), reported
    for term in ("unsup", "contrast", "eqv", "nn"):
        assert (metrics.get(f"loss_{term}", 0.0) != 0.0) == arco, term
    assert metrics["loss_consistency"] > 0.0 if method == "mean_teacher" else metrics.get("loss_consistency") in (0.0, None)
    assert set(new.methods) == ({"arco"} if arco else set())
    if method == "mean_teacher":  # step 0 lies in the ramp's delay: the total is the supervised term
        assert metrics["consistency_weight"] == 0.0
        assert metrics["loss"] == pytest.approx(0.5 * metrics["loss_sup"], rel=1e-6)
    # SSL4MIS's EMA warm-up (Mean Teacher only): decay min(1 - 1/(t + 1), 0.99) makes step 0's
    # teacher the student and step 1's the mean of the old teacher and the new student; ARCO's
    # teacher keeps 0.99 of the old one from the first step.
    leaves_t = [np.asarray(x) for x in jax.tree.leaves(new.teacher["params"]["segmenter"])]
    leaves_s = [np.asarray(x) for x in jax.tree.leaves(new.params["segmenter"])]
    if method == "mean_teacher":
        assert config.arco.ema_warmup
        for t, s in zip(leaves_t, leaves_s):
            np.testing.assert_array_equal(t, s)
        newer, _ = step(new, make_batch(6))
        halfway = [0.5 * t + 0.5 * np.asarray(s) for t, s in zip(leaves_t, jax.tree.leaves(newer.params["segmenter"]))]
        for got, want in zip(jax.tree.leaves(newer.teacher["params"]["segmenter"]), halfway):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    else:
        assert not config.arco.ema_warmup
        assert any(not np.allclose(t, s) for t, s in zip(leaves_t, leaves_s))


def test_a_variant_leaves_data_switches_to_datasets_that_have_them():
    c = config_lib.base_config()  # no dataset: no data.one_patient_split
    methods.apply_variant(c, "code")
    assert c.arco.strata == "index" and "one_patient_split" not in c.data
    assert methods.variant_conflicts(c) == []
