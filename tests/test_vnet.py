"""The 3D VNet and its sparse representation head (models/vnet.py, models/heads3d.py) as model
plug-ins: shapes and strides, the reference's parameter count, channel-wise dropout, BatchNorm
statistics, the head's sparse evaluation against its dense map, and building from config.
Tiny volumes and narrow widths (n_filters=4); the full-size model is only shape-evaluated."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from arco_jax import models
from arco_jax.config import base_config
from arco_jax.models.heads3d import (
    FPNHead3D,
    resize_trilinear_align_corners,
    trilinear_upsampling_adjoint,
    vnet_level_dims,
)
from arco_jax.models import vnet
from arco_jax.models.vnet import UpConv2x2x2, VNet

NARROW = 4  # n_filters of the small models the tests run
SHAPE = (2, 16, 32, 16, 1)  # (B, D, H, W, C): unequal spatial sizes catch mixed-up axes
REFERENCE_VNET_PARAMS = 9_448_866  # vnetWithArgs.VNet(n_channels=1, n_classes=2, batchnorm), counted by hand
REFERENCE_HEAD_PARAMS = 128 ** 2 + 192 ** 2 + 224 ** 2 + 240 ** 2 + 256 * 16  # FeatureExtractor_3d(output_dim=16)


def vnet_config(n_filters=NARROW, dropout=True, rep_dim=16):
    c = base_config()
    c.model.name = "vnet"
    c.model.rep_dim = rep_dim
    c.model.vnet = ml_collections.ConfigDict({"n_filters": n_filters, "dropout": dropout})
    return c


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def narrow():
    """A narrow VNet built through the registry, its variables and a fixed input volume."""
    config = vnet_config()
    model = models.build_segmenter(config.model, num_classes=3, in_channels=1)
    images = jnp.asarray(np.random.default_rng(1).normal(size=SHAPE), jnp.float32)
    # One compile, with rbg keys: threefry takes XLA:CPU seconds per parameter leaf to compile.
    init = jax.jit(lambda key, x: model.init({"params": key}, x, train=False))
    variables = init(jax.random.key(0, impl="rbg"), images)
    return model, variables, images


def test_full_size_parameter_count_matches_the_reference():
    model = models.build_segmenter(vnet_config(n_filters=16).model, num_classes=2, in_channels=1)
    variables = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 16, 16, 16, 1)),
                                                  train=False))
    assert count(variables["params"]) == REFERENCE_VNET_PARAMS
    # Running mean and variance of each of the 29 BatchNorms (PyTorch buffers, not parameters).
    assert count(variables["batch_stats"]) == 2 * 16 * (1 + 2 * 3 + 4 * 4 + 8 * 4 + 16 * 4 + 8 * 4 + 4 * 4 + 2 * 3 + 2)
    head = FPNHead3D(output_dim=16)
    features = [jax.ShapeDtypeStruct((1, 16 // s, 16 // s, 16 // s, c), jnp.float32)
                for s, c in zip((8, 4, 2, 1), (128, 64, 32, 32))]
    head_params = jax.eval_shape(lambda f: head.init(jax.random.key(0), f), features)["params"]
    assert count(head_params) == REFERENCE_HEAD_PARAMS


def test_shapes_strides_and_dtypes(narrow):
    model, variables, images = narrow
    config = vnet_config()
    strides = models.feature_strides(config)
    assert strides == (8, 4, 2, 1) and models.input_multiple(config) == 16
    logits, features = model.apply(variables, images, train=False)
    assert logits.shape == SHAPE[:4] + (3,) and logits.dtype == jnp.float32
    assert [f.shape[1:4] for f in features] == [tuple(n // s for n in SHAPE[1:4]) for s in strides]
    assert [f.shape[-1] for f in features] == [8 * NARROW, 4 * NARROW, 2 * NARROW, 2 * NARROW]
    # bfloat16 compute: float32 params and logits, bfloat16 features (shape evaluation only).
    half = VNet(num_classes=3, n_filters=NARROW, dtype=jnp.bfloat16)
    half_vars = jax.eval_shape(lambda: half.init({"params": jax.random.key(0)}, images, train=False))
    assert {leaf.dtype for leaf in jax.tree.leaves(half_vars["params"])} == {jnp.dtype(jnp.float32)}
    half_logits, half_features = jax.eval_shape(lambda v: half.apply(v, images, train=False), half_vars)
    assert half_logits.dtype == jnp.float32 and {f.dtype for f in half_features} == {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(ValueError, match="divisible by 16"):
        model.apply(variables, jnp.zeros((1, 16, 24, 16, 1)), train=False)


def test_dropout_is_channel_wise_and_train_only_and_batch_norm_learns(narrow):
    model, variables, images = narrow

    def is_stage_or_dropout(module, _):
        return isinstance(module, nn.Dropout) or module.name in ("encoder4", "decoder4")

    def run(train, seed):
        (logits, features), state = model.apply(
            variables, images, train=train, rngs={"dropout": jax.random.key(seed, impl="rbg")},
            mutable=["batch_stats", "intermediates"], capture_intermediates=is_stage_or_dropout)
        return logits, features, state

    logits, features, state = run(True, 0)
    other_logits, _, _ = run(True, 1)
    eval_logits, _, eval_state = run(False, 0)
    assert not np.allclose(logits, other_logits)  # a different dropout key, different masks
    np.testing.assert_array_equal(eval_logits, model.apply(variables, images, train=False)[0])

    seen = state["intermediates"]
    for stage, dropout in (("encoder4", "Dropout_0"), ("decoder4", "Dropout_1")):
        before = np.asarray(seen[stage]["__call__"][0])
        after = np.asarray(seen[dropout]["__call__"][0])
        dropped = np.all(after == 0, axis=(1, 2, 3))  # (B, C): whole channels of one volume
        kept = np.all(np.isclose(after, 2 * before), axis=(1, 2, 3))
        assert np.all(dropped | kept) and dropped.any() and kept.any(), stage
        eval_seen = eval_state["intermediates"]
        np.testing.assert_array_equal(eval_seen[dropout]["__call__"][0], eval_seen[stage]["__call__"][0])
    # The head reads the last stage before its dropout.
    np.testing.assert_array_equal(features[-1][..., NARROW:], seen["decoder4"]["__call__"][0])

    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                           variables["batch_stats"], state["batch_stats"])
    assert all(jax.tree.leaves(changed))
    unchanged = jax.tree.map(lambda a, b: bool(np.all(np.asarray(a) == np.asarray(b))),
                             variables["batch_stats"], eval_state["batch_stats"])
    assert all(jax.tree.leaves(unchanged))


def test_up_convolution_equals_flax_conv_transpose():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 2, 3, 2, 5)), jnp.float32)
    ours = UpConv2x2x2(4, kernel_init=nn.initializers.normal(1.0), bias_init=nn.initializers.normal(1.0))
    params = ours.init(jax.random.key(3, impl="rbg"), x)
    flax_up = nn.ConvTranspose(4, (2, 2, 2), strides=(2, 2, 2), padding="VALID")
    np.testing.assert_allclose(ours.apply(params, x), flax_up.apply(params, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("planes", [True, False], ids=["cpu_planes", "native_3d"])
def test_both_convolution_lowerings_equal_flax_conv(monkeypatch, planes):
    """The 3x3x3 and 2x2x2 stride-2 layers: the CPU form (2-D planes, block matmul) and XLA's
    3-D convolution both compute nn.Conv's function and gradients with nn.Conv's parameters
    (the planes' gradients are written by hand for XLA:CPU: unet.conv3x3_same)."""
    monkeypatch.setattr(vnet, "planes_lowering", lambda: planes)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 4, 6, 8, 5)), jnp.float32)
    init = {"kernel_init": nn.initializers.normal(1.0), "bias_init": nn.initializers.normal(1.0)}
    for ours, flax_conv in ((vnet.Conv3x3x3(3, **init), nn.Conv(3, (3, 3, 3), padding=1)),
                            (vnet.Conv2x2x2Down(3, **init), nn.Conv(3, (2, 2, 2), strides=2, padding="VALID"))):
        params = ours.init(jax.random.key(7, impl="rbg"), x)
        assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, flax_conv.init(jax.random.key(7), x))
        np.testing.assert_allclose(ours.apply(params, x), flax_conv.apply(params, x), rtol=1e-4, atol=1e-4)
        weights = jnp.asarray(np.random.default_rng(8).normal(size=ours.apply(params, x).shape), jnp.float32)
        grads = [jax.grad(lambda p, x, m=module: jnp.sum(m.apply(p, x) * weights), argnums=(0, 1))(params, x)
                 for module in (ours, flax_conv)]
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), *grads)


def random_features(seed, level_dims, batch=2, size=(8, 16, 24)):
    """Random VNet-shaped maps for `level_dims` (coarsest first), the full-resolution ones concatenated."""
    rng = np.random.default_rng(seed)
    dims = tuple(level_dims[:3]) + (sum(level_dims[3:]),)
    shapes = [(batch,) + tuple(n // s for n in size) + (c,) for s, c in zip((8, 4, 2, 1), dims)]
    return [jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in shapes]


@pytest.fixture(scope="module")
def head_setup():
    level_dims = vnet_level_dims(NARROW)
    head = FPNHead3D(level_dims=level_dims, output_dim=16)
    features = random_features(4, level_dims)
    params = jax.jit(head.init)(jax.random.key(5, impl="rbg"), features)
    return head, params, features


def test_trilinear_resize_and_its_adjoint():
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(1, 2, 3, 4, 2)), jnp.float32)
    size = (5, 6, 7)
    coords = np.meshgrid(*[np.arange(o) * (i - 1) / (o - 1) for i, o in zip(x.shape[1:4], size)], indexing="ij")
    expected = jnp.stack([jax.scipy.ndimage.map_coordinates(x[0, ..., c], coords, order=1) for c in range(2)], -1)
    up = resize_trilinear_align_corners(x, size)
    np.testing.assert_allclose(up[0], expected, rtol=1e-5, atol=1e-6)
    w = jnp.asarray(rng.normal(size=(1,) + size + (3,)), jnp.float32)
    lhs = jnp.einsum("bzyxr,bzyxc->rc", w, up)
    rhs = jnp.einsum("bzyxr,bzyxc->rc", trilinear_upsampling_adjoint(w, x.shape[1:4]), x)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5, atol=1e-5)


def test_head_follows_the_reference_fusion(head_setup):
    """The dense map equals a literal transcription of FeatureExtractor_3d on five maps."""
    head, params, features = head_setup
    p = params["params"]
    dims = head.level_dims
    maps = features[:3] + [features[3][..., :dims[3]], features[3][..., dims[3]:]]
    x = maps[0]
    for level in range(4):
        x = x @ p[f"fuse{level}"]["kernel"] + x
        x = jnp.concatenate([resize_trilinear_align_corners(x, maps[level + 1].shape[1:4]), maps[level + 1]], -1)
    expected = x @ p["out"]["kernel"]
    np.testing.assert_allclose(head.apply(params, features), expected, rtol=1e-5, atol=1e-5)


def test_head_sparse_evaluation_equals_the_dense_map(head_setup):
    head, params, features = head_setup
    dense = head.apply(params, features)
    batch, depth, height, width, _ = features[-1].shape
    assert dense.shape == (batch, depth, height, width, 16)
    coarse = head.apply(params, features, method="coarse")
    assert coarse.shape == (batch, depth // 2, height // 2, width // 2, sum(head.level_dims[:3]))

    rng = np.random.default_rng(0)
    index = [rng.integers(0, n, 50) for n in (batch, depth, height, width)]
    index = [np.concatenate([i, [0, n - 1]]) for i, n in zip(index, (batch, depth, height, width))]  # corners too
    index = [jnp.asarray(i.reshape(2, 26)) for i in index]  # any index shape (...)
    at = head.apply(params, coarse, features[-1], *index, method="fine_at_pixels")
    assert at.shape == (2, 26, 16)
    np.testing.assert_allclose(at, dense[tuple(index)], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(head.apply(params, features, *index, method="at_pixels"), at, rtol=1e-6, atol=1e-6)

    # Region means: soft weights and binary masks, each region's weighted mean representation.
    soft = rng.uniform(size=(batch, 3, depth, height, width))
    masks = rng.uniform(size=(batch, 2, depth, height, width)) > 0.7
    weights = jnp.asarray(np.concatenate([soft, masks], axis=1), jnp.float32)
    sums, totals = head.apply(params, coarse, features[-1], weights, method="region_sums")
    assert sums.shape == (batch, 5, sum(head.level_dims)) and totals.shape == (batch, 5)
    means = head.apply(params, sums / totals[..., None], method="output")
    expected = jnp.einsum("bkzyx,bzyxc->bkc", weights, dense) / jnp.sum(weights, axis=(2, 3, 4))[..., None]
    np.testing.assert_allclose(means, expected, rtol=1e-5, atol=1e-5)


def test_registry_builds_the_vnet_and_its_head(narrow):
    model, variables, images = narrow
    config = vnet_config()
    head = models.build_head(config.model, num_classes=3, in_channels=1)
    assert tuple(head.level_dims) == vnet_level_dims(NARROW) and head.output_dim == 16
    _, features = model.apply(variables, images, train=False)
    head_params = jax.jit(head.init)(jax.random.key(10, impl="rbg"), features)
    assert head.apply(head_params, features).shape == SHAPE[:4] + (16,)
    assert models.build_projector(config.model).dim == 16

    # No model.vnet node: the reference's settings.
    defaults = vnet_config()
    del defaults.model["vnet"]
    built = models.build_segmenter(defaults.model, num_classes=2, in_channels=1)
    assert (built.n_filters, built.dropout, built.num_classes) == (16, True, 2)
    assert tuple(models.build_head(defaults.model, num_classes=2, in_channels=1).level_dims) == (128, 64, 32, 16, 16)
    assert models.check(defaults) == [] and models.check(config) == []
    assert "vnet" in models.known_models()

    bad = vnet_config(n_filters=0, dropout="yes")
    assert [field for field, _ in models.check(bad)] == ["vnet.n_filters", "vnet.dropout"]
    with pytest.raises(ValueError, match="model.vnet.n_filters"):
        models.build_segmenter(bad.model, num_classes=2, in_channels=1)
    off = models.build_segmenter(vnet_config(dropout=False).model, num_classes=3, in_channels=1)
    train_logits, _ = off.apply(variables, images, train=True, mutable=["batch_stats"])[0]
    again, _ = off.apply(variables, images, train=True, mutable=["batch_stats"])[0]
    np.testing.assert_array_equal(train_logits, again)  # no dropout, no rng needed
