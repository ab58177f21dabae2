"""DeepLabv3+ on a torchvision ResNet (models/resnet.py, models/deeplab.py) as a model plug-in, and the
torchvision checkpoint converter (models/convert_torchvision.py): parameter counts of the full-size
networks (shape evaluation only), shapes, strides and dilations at output stride 8 and 16, the sparse
representation head against its dense map, building and validating from config, a synthetic
torchvision state dict converted and loaded, and gradients through segmenter and head.
Tiny shapes (2 x 33 x 33 x 3 images, ResNet-18 at width 1/8); each function is compiled once."""
import importlib.util
import math
import subprocess
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from arco_jax import models
from arco_jax.config import ConfigError, base_config, validate
from arco_jax.data import registry
from arco_jax.models import convert_torchvision as convert
from arco_jax.models.conv import Conv2d
from arco_jax.models.deeplab import DeepLabHead, DeepLabV3Plus
from arco_jax.models.heads import resize_bilinear_align_corners
from arco_jax.models.resnet import ResNet, layer_plan
from tests.tiny import REPO

SHAPE = (2, 33, 33, 3)  # 33 = 4 * 8 + 1: the stride-4 grid (9 x 9) samples every 4th pixel exactly
WIDTH = 0.125  # a ResNet-18 with 8, 16, 32, 64 planes
NUM_CLASSES = 3
REP_DIM = 32
# torchvision's resnetN(): parameters with the fc layer (512 or 2048 -> 1000, bias).
TORCHVISION_TOTALS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160, 152: 60_192_808}
BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}



def _no_data(config):
    raise AssertionError("these tests build their inputs themselves")


# A 3-class RGB image set that reads no data: what the registry and validate need.
RGB_DATASET = registry.DatasetSpec(
    name="deeplab_tests_rgb", fields=dict, validate=lambda config: None, open=_no_data,
    info=lambda config: registry.DatasetInfo(num_classes=NUM_CLASSES, class_names=("a", "b"), in_channels=3))
if RGB_DATASET.name not in registry.names():
    registry.register(RGB_DATASET)


def deeplab_config(depth=18, output_stride=16, width=WIDTH):
    c = base_config()
    registry.select(c, RGB_DATASET.name)
    c.data.patch_size = (32, 32)
    c.model.name = "deeplabv3plus"
    c.model.rep_dim = REP_DIM
    c.model.deeplabv3plus = ml_collections.ConfigDict({"depth": depth, "output_stride": output_stride,
                                                       "width": width})
    return c


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def resnet_parameters(depth: int, in_channels: int = 3) -> int:
    """torchvision's ResNet without fc, counted from its layer list: conv weights, BN weight + bias."""
    bottleneck, inplanes = depth >= 50, 64
    total = 64 * in_channels * 49 + 2 * 64  # conv1, bn1
    for layer, blocks in enumerate(BLOCKS[depth]):
        planes = 64 * 2 ** layer
        out = 4 * planes if bottleneck else planes
        for block in range(blocks):
            if bottleneck:
                total += inplanes * planes + planes * planes * 9 + planes * out + 2 * (2 * planes + out)
            else:
                total += inplanes * planes * 9 + planes * planes * 9 + 2 * 2 * planes
            if block == 0 and (layer > 0 or inplanes != out):
                total += inplanes * out + 2 * out  # downsample conv + BN
            inplanes = out
    return total


def deeplab_head_parameters(high: int, low: int, num_classes: int, c: int = 256) -> tuple[int, int]:
    """(ASPP, decoder) parameters of ReCo's DeepLabv3Plus on `high` / `low` backbone channels, with
    c channels in ASPP and the decoder (ReCo's 256)."""
    aspp = (high * c + 2 * c) + 3 * (high * c * 9 + 2 * c) + (high * c + 2 * c) + (5 * c * c + 2 * c)
    decoder = (low * 48 + 96) + 2 * ((48 + c) * c * 9 + 2 * c) + (c * num_classes + num_classes)
    return aspp, decoder


def images(seed=1, shape=SHAPE):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.fixture(scope="module")
def tiny():
    """The tiny segmenter built through the registry, its variables (one compiled init) and one
    compiled eval-mode apply that also returns the sown stem."""
    config = deeplab_config()
    model = models.build_segmenter(config.model, num_classes=NUM_CLASSES, in_channels=3)
    x = images()
    # rbg keys: threefry takes XLA:CPU seconds per parameter leaf to compile.
    variables = jax.jit(lambda key: model.init({"params": key}, x, train=False))(jax.random.key(0, impl="rbg"))
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))
    return model, variables, x, apply


# ----------------------------------------------------------------------------- full-size counts


def test_full_size_parameter_counts():
    for depth, total in TORCHVISION_TOTALS.items():
        final = 2048 if depth >= 50 else 512
        assert resnet_parameters(depth) == total - (final * 1000 + 1000), depth
        variables = jax.eval_shape(lambda d=depth: ResNet(d).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                                                  train=False))
        assert count(variables["params"]) == resnet_parameters(depth), depth
    assert resnet_parameters(101) == 42_500_160 and resnet_parameters(50) == 23_508_032

    for depth, high, low, total in ((18, 512, 64, 16_718_773), (50, 2048, 256, 40_462_773)):
        model = DeepLabV3Plus(num_classes=21, depth=depth)
        variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 65, 65, 3)), train=False))
        assert count(variables["params"]) == resnet_parameters(depth) + sum(
            deeplab_head_parameters(high, low, 21)) == total, depth
    model = DeepLabV3Plus(num_classes=21, depth=101)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 65, 65, 3)), train=False))
    aspp, decoder = deeplab_head_parameters(2048, 256, 21)
    assert (aspp, decoder) == (15_535_104, 1_419_637)
    assert count(variables["params"]["backbone"]) == 42_500_160
    assert count(variables["params"]) == 42_500_160 + aspp + decoder == 59_454_901
    # Running mean and variance of every BatchNorm: 105,344 in the ResNet-101, 8 x 256 + 48 in ASPP/decoder.
    assert count(variables["batch_stats"]["backbone"]) == 105_344
    assert count(variables["batch_stats"]) == 105_344 + 2 * (8 * 256 + 48)
    head = DeepLabHead(output_dim=256)
    features = (jnp.zeros((1, 5, 5, 256)), jnp.zeros((1, 17, 17, 256)), jnp.zeros((1, 65, 65, 0)))
    assert count(jax.eval_shape(head.init, jax.random.key(0), features)["params"]) == 256 * 256 + 256 == 65_792


def test_narrow_aspp_and_decoder_through_the_registry():
    """model.deeplabv3plus.channels narrows ASPP and the decoder (the demo's small net); the head
    follows it, and a count that is no whole number of channels is refused."""
    config = deeplab_config(width=0.25)
    config.model.deeplabv3plus.channels = 64
    config.model.rep_dim = 64
    model = models.build_segmenter(config.model, num_classes=5, in_channels=3)
    assert model.channels == 64
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 65, 65, 3)), train=False))
    assert count(variables["params"]["backbone"]) == count(jax.eval_shape(
        lambda: ResNet(18, width=0.25).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))["params"])
    assert count(variables["params"]) - count(variables["params"]["backbone"]) == sum(
        deeplab_head_parameters(128, 16, 5, c=64)) == 389_285
    (_, features) = jax.eval_shape(lambda: model.apply(
        jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), variables), jnp.zeros((1, 65, 65, 3)), train=False))
    assert features[0].shape[-1] == features[1].shape[-1] == 64
    head = models.build_head(config.model, num_classes=5, in_channels=3)
    assert (head.hidden_dim, head.output_dim) == (64, 64)
    assert count(jax.eval_shape(head.init, jax.random.key(0), features)["params"]) == 64 * 64 + 64
    for value in (0, 2.5, True):
        config.model.deeplabv3plus = ml_collections.ConfigDict({"depth": 18, "width": 0.25, "channels": value})
        with pytest.raises(ConfigError, match=r"config\.model\.deeplabv3plus\.channels: must be a positive whole"):
            validate(config)


# ----------------------------------------------------------------------------- shapes and dilations


@pytest.mark.parametrize("output_stride", [16, 8])
def test_shapes_strides_and_dtypes(tiny, output_stride):
    model, variables, x, _ = tiny
    config = deeplab_config(output_stride=output_stride)
    strides = models.feature_strides(config)
    assert strides == (output_stride, 4, 1) and models.input_multiple(config) == 1
    other = models.build_segmenter(config.model, num_classes=NUM_CLASSES, in_channels=3)
    # The same variables at either output stride (dilation changes no shape).
    assert jax.tree.map(jnp.shape, jax.eval_shape(lambda: other.init(jax.random.key(0), x, train=False))) == \
        jax.tree.map(jnp.shape, variables)
    logits, features = jax.eval_shape(lambda v: other.apply(v, x, train=False), variables)
    assert logits.shape == SHAPE[:3] + (NUM_CLASSES,) and logits.dtype == jnp.float32
    assert [f.shape[1:3] for f in features] == [(math.ceil(33 / s),) * 2 for s in strides]
    assert [f.shape[-1] for f in features] == [256, 256, 0]
    low, high = jax.eval_shape(lambda: ResNet(18, width=WIDTH).init_with_output(
        jax.random.key(0), x, train=False)[0])
    assert low.shape == (2, 9, 9, 8) and high.shape == (2, 2, 2, 64)  # stride 32 without dilation
    bottleneck = ResNet(50, width=WIDTH, replace_stride_with_dilation=(False, True, True))
    low, high = jax.eval_shape(lambda: bottleneck.init_with_output(jax.random.key(0), x, train=False)[0])
    assert low.shape == (2, 9, 9, 32) and high.shape == (2, 5, 5, 256)

    # bfloat16 compute: float32 parameters and logits, bfloat16 features.
    half = DeepLabV3Plus(num_classes=NUM_CLASSES, depth=18, width=WIDTH, output_stride=output_stride,
                         dtype=jnp.bfloat16)
    half_vars = jax.eval_shape(lambda: half.init(jax.random.key(0), x, train=False))
    assert {leaf.dtype for leaf in jax.tree.leaves(half_vars["params"])} == {jnp.dtype(jnp.float32)}
    half_logits, half_features = jax.eval_shape(lambda v: half.apply(v, x, train=False), half_vars)
    assert half_logits.dtype == jnp.float32 and {f.dtype for f in half_features} == {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(ValueError, match="in_channels=3"):
        jax.eval_shape(lambda v: other.apply(v, jnp.zeros((1, 33, 33, 1)), train=False), variables)


def convolutions(module, variables, x):
    """(stride, dilation, kernel size) of each convolution module, in execution order (every conv of
    the ResNet and DeepLab is a `Conv2d`: how it is lowered is tests/test_conv.py's business)."""
    found = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Conv2d) and context.method_name == "__call__":
            found.append((context.module.stride, context.module.dilation, context.module.kernel_size))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v: module.apply(v, x, train=False), variables)
    return found


@pytest.mark.parametrize("output_stride", [16, 8])
def test_dilation_placement(tiny, output_stride):
    """Every convolution's stride and dilation, from the traced program: torchvision's
    replace_stride_with_dilation in the backbone (the first block's strided conv keeps the old
    dilation, the rest take the new one), then the ASPP rates."""
    _, variables, x, _ = tiny
    model = models.build_segmenter(deeplab_config(output_stride=output_stride).model, NUM_CLASSES, 3)
    found = convolutions(model, variables, x)

    def basic_layer(stride, old, new):  # block 0: conv1, conv2, downsample; block 1: conv1, conv2
        return [(stride, old, 3), (1, new, 3), (stride, 1, 1), (1, new, 3), (1, new, 3)]

    dilated = {16: (False, False, True), 8: (False, True, True)}[output_stride]
    assert layer_plan(dilated) == (((1, 1, 1), (2, 1, 1), (2, 1, 1), (1, 1, 2)) if output_stride == 16 else
                                   ((1, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 4)))
    expected = [(2, 1, 7)] + [(1, 1, 3)] * 4 + basic_layer(2, 1, 1)
    expected += basic_layer(2, 1, 1) + basic_layer(1, 1, 2) if output_stride == 16 else \
        basic_layer(1, 1, 2) + basic_layer(1, 2, 4)
    rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
    expected += [(1, 1, 1)] + [(1, rate, 3) for rate in rates] + [(1, 1, 1)] * 2  # ASPP, pooling, project
    expected += [(1, 1, 1), (1, 1, 3), (1, 1, 1), (1, 1, 3)]  # low-level, classifier (3x3, 1x1), representation
    assert found == expected

    # Bottlenecks (v1.5: the stride on the 3x3 conv), output stride 8.
    resnet = ResNet(50, width=WIDTH, replace_stride_with_dilation=(False, True, True))
    resnet_vars = jax.eval_shape(lambda: resnet.init(jax.random.key(0), x, train=False))
    found = convolutions(resnet, resnet_vars, x)
    three = [(stride, dilation) for stride, dilation, size in found if size == 3]
    assert three == [(1, 1)] * 3 + [(2, 1)] + [(1, 1)] * 3 + [(1, 1)] + [(1, 2)] * 5 + [(1, 2)] + [(1, 4)] * 2
    assert [stride for stride, _, size in found if size == 1 and stride == 2] == [2]  # layer2's downsample only


# ----------------------------------------------------------------------------- representation head


@pytest.fixture(scope="module")
def head_setup():
    rng = np.random.default_rng(4)
    features = (jnp.asarray(rng.normal(size=(2, 3, 3, 256)), jnp.float32),
                jnp.asarray(np.maximum(rng.normal(size=(2, 9, 9, 256)), 0), jnp.float32),
                jnp.zeros((2, 33, 33, 0), jnp.float32))
    head = DeepLabHead(output_dim=REP_DIM)
    params = jax.jit(head.init)(jax.random.key(5, impl="rbg"), features)
    return head, params, features


def test_head_is_recos_last_layer_upsampled(head_setup):
    head, params, features = head_setup
    p = params["params"]["out"]
    stride4 = features[1] @ p["kernel"] + p["bias"]  # ReCo's representation map at stride 4
    dense = head.apply(params, features)
    assert dense.shape == (2, 33, 33, REP_DIM)
    np.testing.assert_allclose(dense, resize_bilinear_align_corners(stride4, (33, 33)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dense[:, ::4, ::4], stride4, rtol=1e-5, atol=1e-5)  # 33 px: exact grid points
    np.testing.assert_allclose(head.apply(params, features[1], method="output"), stride4, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="label grid"):
        head.apply(params, features[1], features[1], jnp.zeros(3, int), jnp.zeros(3, int), jnp.zeros(3, int),
                   method="fine_at_pixels")


def test_head_sparse_evaluation_equals_the_dense_map(head_setup):
    head, params, features = head_setup
    dense = head.apply(params, features)
    coarse = head.apply(params, features, method="coarse")
    assert coarse.shape == (2, 9, 9, 256)
    grid = features[-1]
    rng = np.random.default_rng(0)
    index = [np.concatenate([rng.integers(0, n, 58), [0, n - 1]]).reshape(3, 20) for n in (2, 33, 33)]
    index = [jnp.asarray(i) for i in index]  # any index shape (...), corners included
    at = head.apply(params, coarse, grid, *index, method="fine_at_pixels")
    assert at.shape == (3, 20, REP_DIM)
    np.testing.assert_allclose(at, dense[tuple(index)], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(head.apply(params, features, *index, method="at_pixels"), at, rtol=1e-6, atol=1e-6)

    # Region means: soft weights, binary class masks, and objective.pooled_embedding's cells.
    soft = rng.uniform(size=(2, 2, 33, 33))
    masks = rng.uniform(size=(2, 2, 33, 33)) > 0.6
    cells = (np.arange(33)[:, None] * 2 // 33) * 2 + np.arange(33)[None] * 2 // 33
    pooled = np.broadcast_to((cells[None] == np.arange(4)[:, None, None])[None], (2, 4, 33, 33))
    weights = jnp.asarray(np.concatenate([soft, masks, pooled], axis=1), jnp.float32)
    sums, totals = head.apply(params, coarse, grid, weights, method="region_sums")
    assert sums.shape == (2, 8, 256) and totals.shape == (2, 8)
    means = head.apply(params, sums / totals[..., None], method="output")
    expected = jnp.einsum("brhw,bhwc->brc", weights, dense) / jnp.sum(weights, axis=(2, 3))[..., None]
    np.testing.assert_allclose(means, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- registry and config


def test_registry_builds_and_validates_it(tiny):
    model, variables, x, apply = tiny
    config = deeplab_config()
    assert (model.depth, model.output_stride, model.width, model.num_classes) == (18, 16, WIDTH, NUM_CLASSES)
    head = models.build_head(config.model, num_classes=NUM_CLASSES, in_channels=3)
    assert isinstance(head, DeepLabHead) and head.output_dim == REP_DIM
    assert models.build_projector(config.model).dim == REP_DIM
    (_, features), _ = apply(variables, x)
    assert count(jax.eval_shape(head.init, jax.random.key(0), features)) == 256 * REP_DIM + REP_DIM
    assert "deeplabv3plus" in models.known_models() and models.check(config) == []
    validate(config)

    base = base_config()  # The base config's node: ReCo's ResNet-101 at output stride 16.
    base.model.name = "deeplabv3plus"
    built = models.build_segmenter(base.model, num_classes=21, in_channels=3)
    assert (built.depth, built.output_stride, built.width) == (101, 16, 1.0)
    del base.model["deeplabv3plus"]  # No node at all: the same defaults.
    assert models.build_segmenter(base.model, num_classes=21, in_channels=3).depth == 101

    bad = deeplab_config(depth=42, output_stride=32, width=0.1)
    assert [field for field, _ in models.check(bad)] == ["deeplabv3plus.depth", "deeplabv3plus.output_stride",
                                                         "deeplabv3plus.width"]
    with pytest.raises(ConfigError, match=r"^config\.model\.deeplabv3plus\.depth: must be one of 18, 34, 50, "
                                          r"101, 152 \(torchvision's ResNets\), got 42$"):
        validate(bad)
    for field, value, message in (("output_stride", 32, "must be 16"), ("width", 0.1, "64 \\* width a whole"),
                                  ("width", 0.0, "positive number"), ("depth", 20, "got 20$")):
        bad = deeplab_config()
        bad.model.deeplabv3plus[field] = value
        with pytest.raises(ConfigError, match=rf"config\.model\.deeplabv3plus\.{field}: .*{message}"):
            validate(bad)
        with pytest.raises(ValueError, match=rf"model\.deeplabv3plus\.{field}"):
            models.build_segmenter(bad.model, num_classes=NUM_CLASSES, in_channels=3)
    # What a ConfigDict would coerce (True -> 1.0 for a float field), from any attribute object.
    odd = types.SimpleNamespace(name="deeplabv3plus", deeplabv3plus=types.SimpleNamespace(
        depth="101", output_stride=True, width=True))
    assert [field for field, _ in models.check(odd)] == ["deeplabv3plus.depth", "deeplabv3plus.output_stride",
                                                         "deeplabv3plus.width"]


# ----------------------------------------------------------------------------- torchvision converter


def torchvision_resnet18_state(width=WIDTH, in_channels=3, seed=0) -> dict[str, np.ndarray]:
    """A state dict with torchvision resnet18()'s keys and shapes (at `width`), random values."""
    rng = np.random.default_rng(seed)
    stem = int(64 * width)
    state = {}

    def conv(name, out, inp, k):
        state[f"{name}.weight"] = rng.normal(0, math.sqrt(2 / (out * k * k)), (out, inp, k, k)).astype(np.float32)

    def bn(name, n):
        state[f"{name}.weight"] = rng.uniform(0.5, 1.5, n).astype(np.float32)
        state[f"{name}.bias"] = rng.normal(0, 0.1, n).astype(np.float32)
        state[f"{name}.running_mean"] = rng.normal(0, 0.1, n).astype(np.float32)
        state[f"{name}.running_var"] = rng.uniform(0.5, 2.0, n).astype(np.float32)
        state[f"{name}.num_batches_tracked"] = np.array(1000, np.int64)

    conv("conv1", stem, in_channels, 7)
    bn("bn1", stem)
    inplanes = stem
    for layer in range(1, 5):
        planes = stem * 2 ** (layer - 1)
        for block in range(2):
            name = f"layer{layer}.{block}"
            conv(f"{name}.conv1", planes, inplanes, 3)
            bn(f"{name}.bn1", planes)
            conv(f"{name}.conv2", planes, planes, 3)
            bn(f"{name}.bn2", planes)
            if block == 0 and layer > 1:
                conv(f"{name}.downsample.0", planes, inplanes, 1)
                bn(f"{name}.downsample.1", planes)
            inplanes = planes
    state["fc.weight"] = rng.normal(size=(1000, inplanes)).astype(np.float32)
    state["fc.bias"] = np.zeros(1000, np.float32)
    return state


def numpy_stem(x: np.ndarray, state: dict) -> np.ndarray:
    """conv1 (7x7, stride 2, padding 3, OIHW weights) - eval BatchNorm - ReLU - max-pool 3x3/2/1, by hand."""
    weight = state["conv1.weight"].astype(np.float64)
    padded = np.pad(x.astype(np.float64), ((0, 0), (3, 3), (3, 3), (0, 0)))
    size = (x.shape[1] + 6 - 7) // 2 + 1
    y = np.zeros((x.shape[0], size, size, weight.shape[0]))
    for i in range(7):
        for j in range(7):
            y += padded[:, i:i + 2 * size:2, j:j + 2 * size:2] @ weight[:, :, i, j].T
    y = (y - state["bn1.running_mean"]) / np.sqrt(state["bn1.running_var"] + 1e-5) * state["bn1.weight"] \
        + state["bn1.bias"]
    y = np.maximum(y, 0)
    padded = np.pad(y, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    pooled = (size - 1) // 2 + 1
    windows = [padded[:, i:i + 2 * pooled:2, j:j + 2 * pooled:2] for i in range(3) for j in range(3)]
    return np.max(windows, axis=0)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("convert")
    state = torchvision_resnet18_state()
    source, output = folder / "resnet18.npz", folder / "backbone.npz"
    np.savez(source, **state)
    written, ignored = convert.convert(str(source), 18, str(output))
    return state, source, output, written, ignored


def test_converter_maps_every_key_and_the_stem_matches_numpy(tiny, converted):
    model, variables, x, apply = tiny
    state, _, output, written, ignored = converted
    assert len(state) == 122  # torchvision resnet18: 20 convs, 20 BatchNorms x 5, fc x 2
    assert sorted(ignored) == sorted(["fc.weight", "fc.bias"] + [k for k in state if k.endswith("num_batches_tracked")])
    backbone = {"params": variables["params"]["backbone"], "batch_stats": variables["batch_stats"]["backbone"]}
    assert written == len(state) - len(ignored) == len(jax.tree.leaves(backbone)) == 100

    loaded, loaded_count = models.load_pretrained(variables, str(output))
    assert loaded_count == written
    np.testing.assert_array_equal(loaded["params"]["backbone"]["layer3"]["0"]["downsample"]["0"]["kernel"],
                                  state["layer3.0.downsample.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(loaded["batch_stats"]["backbone"]["layer4"]["1"]["bn2"]["var"],
                                  state["layer4.1.bn2.running_var"])
    for part in ("aspp", "low_level", "classifier", "classifier_out", "representation"):  # left at init
        for a, b in zip(jax.tree.leaves(loaded["params"][part]), jax.tree.leaves(variables["params"][part])):
            np.testing.assert_array_equal(a, b)

    (_, _), state_out = apply(jax.tree.map(jnp.asarray, loaded), x)
    stem = state_out["intermediates"]["backbone"]["stem"][0]
    assert stem.shape == (2, 9, 9, 8)
    np.testing.assert_allclose(stem, numpy_stem(np.asarray(x), state), rtol=1e-4, atol=1e-4)


def test_converter_refuses_what_does_not_fit(tmp_path, converted):
    state = converted[0]

    def refused(changed, match, depth=18):
        with pytest.raises(convert.ConversionError, match=match):
            convert.torchvision_to_flax(changed, depth, source="ckpt.pth")

    refused({**state, "layer1.0.conv4.weight": np.zeros((8, 8, 3, 3))},
            r"^ckpt\.pth: key 'layer1\.0\.conv4\.weight' is not a torchvision ResNet key")
    refused({**state, "layer1.2.conv1.weight": np.zeros((8, 8, 3, 3))},
            r"key 'layer1\.2\.conv1\.weight' names no layer of ResNet-18 at width 0\.125")
    refused({**state, "layer2.0.conv1.bias": np.zeros(16)}, r"'layer2\.0\.conv1\.bias' is not a torchvision")
    refused({k: v for k, v in state.items() if k != "layer4.1.bn2.running_var"},
            r"1 variable\(s\) of ResNet-18 at width 0\.125 have no key in the file, e\.g\. layer4\.1\.bn2\.running_var$")
    refused({**state, "layer2.0.conv1.weight": np.zeros((16, 4, 3, 3))},
            r"key 'layer2\.0\.conv1\.weight' has shape \(16, 4, 3, 3\), ResNet-18 at width 0\.125 needs \(16, 8, 3, 3\)")
    refused(state, r"have no key in the file, e\.g\. layer1\.2\.bn1\.bias", depth=34)
    refused(state, "--depth must be one of", depth=20)
    wrapped = tmp_path / "dataparallel.npz"
    np.savez(wrapped, **{f"module.{k}": v for k, v in state.items()})
    assert sorted(convert.read_state_dict(str(wrapped))) == sorted(state)
    with pytest.raises(convert.ConversionError, match=r"\.safetensors is not read"):
        convert.read_state_dict(str(tmp_path / "resnet18.safetensors"))
    if importlib.util.find_spec("torch") is None:
        pth = tmp_path / "resnet18.pth"
        pth.write_bytes(b"not read")
        with pytest.raises(convert.ConversionError, match=r"resnet18\.pth: reading a \.pth checkpoint needs "
                                                          r"PyTorch, which is not installed"):
            convert.read_state_dict(str(pth))


def test_converter_command_line(tmp_path, converted):
    _, source, output, written, _ = converted
    again = tmp_path / "again.npz"
    command = [sys.executable, "-m", "arco_jax.models.convert_torchvision", f"--input={source}", "--depth=18",
               f"--output={again}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"wrote {written} arrays" in done.stdout and "fc.bias, fc.weight and 20 num_batches_tracked" in done.stdout
    with np.load(output) as a, np.load(again) as b:
        assert sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)
    done = subprocess.run(command[:-2] + ["--depth=50", f"--output={again}"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith(f"error: {source}: key 'layer1.0.conv1.weight' has shape (8, 8, 3, 3), "
                                  f"ResNet-50 at width 0.125 needs (8, 8, 1, 1)")


# ----------------------------------------------------------------------------- gradients


def test_gradients_reach_every_part_through_the_sparse_head(tiny, head_setup):
    """Train-mode forward, CE on the full-size logits plus a loss on representations at sampled
    pixels and region means (the trainer's head methods): every parameter group gets a gradient
    and every BatchNorm's statistics move. (The full ARCO step: test_one_arco_step, marked slow.)"""
    model, variables, x, _ = tiny
    head = DeepLabHead(output_dim=REP_DIM)
    head_params = head_setup[1]
    labels = jnp.asarray(np.random.default_rng(2).integers(0, NUM_CLASSES, SHAPE[:3]))
    b, y, xx = (jnp.asarray(np.random.default_rng(3).integers(0, n, 16)) for n in SHAPE[:3])
    masks = jax.nn.one_hot(labels, NUM_CLASSES, axis=1)

    def loss(params):
        (logits, features), state = model.apply({"params": params["segmenter"],
                                                 "batch_stats": variables["batch_stats"]}, x, train=True,
                                                mutable=["batch_stats"])
        ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1))
        apply = lambda method, *args: head.apply({"params": params["head"]}, *args, method=method)  # noqa: E731
        coarse = apply("coarse", features)
        pixels = apply("fine_at_pixels", coarse, features[-1], b, y, xx)
        sums, totals = apply("region_sums", coarse, features[-1], masks)
        prototypes = apply("output", sums / jnp.maximum(totals, 1)[..., None])
        return ce + jnp.mean(pixels ** 2) + jnp.mean(prototypes ** 2), state["batch_stats"]

    params = {"segmenter": variables["params"], "head": head_params["params"]}
    (value, stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert np.isfinite(float(value))
    for part in ("backbone", "aspp", "low_level", "classifier", "classifier_out", "representation"):
        assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads["segmenter"][part])) > 0, part
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads["head"]))
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), stats, variables["batch_stats"])
    assert all(jax.tree.leaves(moved))


@pytest.mark.slow
def test_one_arco_step():
    """The trainer's ARCO step (every term on) with model.name='deeplabv3plus' on a tiny RGB set:
    about 45 s of compilation on a 2-core CPU, hence slow."""
    from arco_jax import state as state_lib  # pylint: disable=import-outside-toplevel
    from arco_jax.objective import Batch  # pylint: disable=import-outside-toplevel
    from arco_jax.step import make_train_step  # pylint: disable=import-outside-toplevel

    c = deeplab_config()
    c.data.batch_labeled = c.data.batch_unlabeled = 2
    a = c.arco
    a.num_anchors, a.num_negatives, a.bank_size, a.bank_size_background, a.bank_enqueue = 8, 4, 64, 128, 16
    a.nn_grid, a.nn_pool_size, a.nn_topk = 2, 4, 2
    c.train.steps = 20
    validate(c)
    nets, tx = state_lib.build_networks(c), state_lib.build_optimizer(c)
    state0 = jax.jit(lambda key: state_lib.create_train_state(c, nets, tx, key))(jax.random.key(0, impl="rbg"))
    rng = np.random.default_rng(0)
    batch = Batch(image_l=jnp.asarray(rng.random((2, 32, 32, 3)), jnp.float32),
                  label_l=jnp.asarray(rng.integers(0, NUM_CLASSES, (2, 32, 32)), jnp.int32),
                  image_u=jnp.asarray(rng.random((2, 32, 32, 3)), jnp.float32))
    state1, metrics = jax.jit(make_train_step(c, nets, tx))(state0, batch)
    assert int(state1.step) == 1 and int(state1.bad_step) == -1
    for term in ("sup", "contrast", "eqv", "nn"):
        assert np.isfinite(float(metrics[f"loss_{term}"])) and float(metrics[f"loss_{term}"]) > 0, term
    for part in ("segmenter", "head", "projector"):
        assert any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(state1.params[part]),
                                                         jax.tree.leaves(state0.params[part]))), part
