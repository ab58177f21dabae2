"""UNet, FPN representation head, projector and the model registry."""
import types

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from arco_jax.models import build_head, build_projector, build_segmenter, known_models
from arco_jax.models.heads import (
    FPNHead,
    Projector,
    resize_bilinear_align_corners,
    upsampling_adjoint,
)
from arco_jax.models.unet import Conv3x3, UNet, UpConv2x2

FEATURE_DIMS = (256, 128, 64, 32, 16)


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def unet_and_vars():
    model = UNet()
    init = jax.jit(lambda key, x: model.init(key, x, train=False))  # one compile, not op-by-op
    # The rbg PRNG compiles several times faster on CPU than threefry for ~40 param leaves.
    return model, init(jax.random.key(0, impl="rbg"), jnp.zeros((1, 32, 32, 1)))


def random_features(seed: int, batch: int, size: int, dims=FEATURE_DIMS):
    """Decoder-like maps, coarsest first: dims[i] channels at size / 2^(4 - i)."""
    rng = np.random.default_rng(seed)
    sizes = [size // 2 ** (len(dims) - 1 - i) for i in range(len(dims))]
    return tuple(
        jnp.asarray(rng.normal(size=(batch, s, s, d)), jnp.float32) for s, d in zip(sizes, dims)
    )


def test_unet_parameter_count_matches_reference(unet_and_vars):
    _, variables = unet_and_vars
    assert count(variables["params"]) == 1_944_324


def test_unet_init_uses_pytorch_default_bounds(unet_and_vars):
    params = unet_and_vars[1]["params"]
    cases = [  # (parameter, PyTorch fan_in); a transposed conv's fan_in is out_channels * k * k
        (params["encoder1"]["conv0"]["kernel"], 16 * 9),
        (params["encoder1"]["conv0"]["bias"], 16 * 9),
        (params["decoder1"]["up"]["kernel"], 128 * 4),
        (params["out_conv"]["kernel"], 16 * 9),
    ]
    for value, fan_in in cases:
        bound = 1 / np.sqrt(fan_in)
        assert 0.8 * bound < np.abs(value).max() <= bound
    assert np.all(params["encoder0"]["bn0"]["scale"] == 1)


@pytest.mark.parametrize("size", [32, 64])
def test_unet_logits_and_feature_shapes(unet_and_vars, size):
    model, variables = unet_and_vars
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    logits, features = apply(variables, jnp.ones((2, size, size, 1)))
    assert logits.shape == (2, size, size, 4) and logits.dtype == jnp.float32
    expected = [(2, size // 2**k, size // 2**k, c) for k, c in zip((4, 3, 2, 1, 0), FEATURE_DIMS)]
    assert [f.shape for f in features] == expected


def test_unet_train_mode_needs_dropout_rng_and_updates_batch_stats(unet_and_vars):
    model, variables = unet_and_vars
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 1))
    with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
        model.apply(variables, x, train=True, mutable=["batch_stats"])

    def run(seed):
        rngs = {"dropout": jax.random.key(seed, impl="rbg")}
        return model.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])

    (logits_a, _), updates = run(2)
    (logits_b, _), _ = run(3)
    assert not np.allclose(logits_a, logits_b)  # dropout active
    old = variables["batch_stats"]["encoder0"]["bn0"]["mean"]
    new = updates["batch_stats"]["encoder0"]["bn0"]["mean"]
    assert np.all(old == 0) and not np.allclose(new, old)


def test_unet_eval_mode_is_deterministic(unet_and_vars):
    model, variables = unet_and_vars
    x = jax.random.normal(jax.random.key(4), (2, 32, 32, 1))
    first, _ = model.apply(variables, x, train=False)
    second, _ = model.apply(variables, x, train=False)
    np.testing.assert_array_equal(first, second)


def test_unet_rejects_bad_inputs(unet_and_vars):
    model, variables = unet_and_vars
    with pytest.raises(ValueError, match="divisible by 16"):
        model.apply(variables, jnp.zeros((1, 40, 40, 1)), train=False)
    with pytest.raises(ValueError, match="in_channels=1"):
        model.apply(variables, jnp.zeros((1, 32, 32, 3)), train=False)


def test_unet_bfloat16_compute_keeps_float32_params(unet_and_vars):
    _, variables = unet_and_vars
    model = UNet(dtype=jnp.bfloat16)
    x = jnp.ones((1, 16, 16, 1))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    assert {p.dtype for p in jax.tree.leaves(shapes["params"])} == {jnp.dtype(jnp.float32)}
    logits, features = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    assert logits.dtype == jnp.float32 and features[-1].dtype == jnp.bfloat16


def test_upconv_matches_flax_conv_transpose_values_and_gradients():
    """The matmul form of the 2x2 stride-2 up-convolution is nn.ConvTranspose's function,
    with its parameter names and shapes (checkpoints keep loading)."""
    init = jax.nn.initializers.normal(1.0)
    common = dict(kernel_init=init, bias_init=init)
    ours = UpConv2x2(5, **common)
    flax_conv = nn.ConvTranspose(5, kernel_size=(2, 2), strides=(2, 2), padding="VALID", **common)
    x = jax.random.normal(jax.random.key(20), (2, 3, 4, 6))
    variables = ours.init(jax.random.key(21), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, flax_conv.init(jax.random.key(21), x))
    np.testing.assert_allclose(ours.apply(variables, x), flax_conv.apply(variables, x), rtol=1e-5, atol=1e-5)

    cotangent = jax.random.normal(jax.random.key(22), (2, 6, 8, 5))

    def grads(module):
        loss = lambda v, x: jnp.sum(module.apply(v, x) * cotangent)
        return jax.grad(loss, argnums=(0, 1))(variables, x)

    for got, want in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(flax_conv))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("in_loop", [False, True])
def test_conv3x3_matches_flax_conv_values_and_gradients(in_loop):
    """Conv3x3 (its own gradients, written for XLA:CPU) is nn.Conv's 3x3 'same' convolution,
    with its parameter names and shapes, also inside a scanned loop body where it is needed."""
    init = jax.nn.initializers.normal(1.0)
    ours = Conv3x3(5)
    flax_conv = nn.Conv(5, kernel_size=(3, 3), padding=((1, 1), (1, 1)), kernel_init=init, bias_init=init)
    x = jax.random.normal(jax.random.key(30), (2, 2, 7, 6, 3))
    variables = flax_conv.init(jax.random.key(31), x[0])
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(31), x[0])) == jax.tree.map(jnp.shape, variables)
    cotangent = jax.random.normal(jax.random.key(32), (2, 2, 7, 6, 5))

    def grads(module):
        def apply(v, x):
            if in_loop:
                return jax.lax.scan(lambda carry, xi: (carry, module.apply(v, xi)), 0.0, x)[1]
            return jnp.stack([module.apply(v, xi) for xi in x])
        loss = lambda v, x: jnp.sum(apply(v, x) * cotangent)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables, x)

    for got, want in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(flax_conv))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def numpy_align_corners_resize(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Loop reference of PyTorch bilinear, align_corners=True, on one (H, W) channel."""
    in_h, in_w = x.shape
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        sy = i * (in_h - 1) / (out_h - 1) if out_h > 1 else 0.0
        y0 = min(int(np.floor(sy)), in_h - 1)
        y1, wy = min(y0 + 1, in_h - 1), sy - y0
        for j in range(out_w):
            sx = j * (in_w - 1) / (out_w - 1) if out_w > 1 else 0.0
            x0 = min(int(np.floor(sx)), in_w - 1)
            x1, wx = min(x0 + 1, in_w - 1), sx - x0
            out[i, j] = (
                (1 - wy) * ((1 - wx) * x[y0, x0] + wx * x[y0, x1])
                + wy * ((1 - wx) * x[y1, x0] + wx * x[y1, x1])
            )
    return out


@pytest.mark.parametrize("in_hw,out_hw", [((4, 5), (8, 10)), ((3, 7), (11, 4)), ((1, 4), (3, 9))])
def test_align_corners_resize_matches_loop_reference(in_hw, out_hw):
    x = np.random.default_rng(0).normal(size=(2, *in_hw, 3)).astype(np.float32)
    got = np.asarray(resize_bilinear_align_corners(jnp.asarray(x), out_hw))
    assert got.shape == (2, *out_hw, 3)
    for b in range(2):
        for c in range(3):
            want = numpy_align_corners_resize(x[b, :, :, c], *out_hw)
            np.testing.assert_allclose(got[b, :, :, c], want, rtol=1e-5, atol=1e-6)
    for r, q in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        np.testing.assert_allclose(got[:, r, q], x[:, r, q], rtol=1e-6)


def test_upsampling_adjoint_is_the_transpose_of_resize():
    rng = np.random.default_rng(12)
    coarse = jnp.asarray(rng.normal(size=(2, 5, 7, 3)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(2, 9, 13, 3)), jnp.float32)
    lhs = jnp.sum(weights * resize_bilinear_align_corners(coarse, (9, 13)))
    rhs = jnp.sum(upsampling_adjoint(weights, (5, 7)) * coarse)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5)


def test_resize_to_same_size_is_identity():
    x = jax.random.normal(jax.random.key(3), (1, 5, 6, 2))
    np.testing.assert_array_equal(resize_bilinear_align_corners(x, (5, 6)), x)


@pytest.fixture(scope="module")
def head_and_vars():
    head = FPNHead()
    features = random_features(5, batch=2, size=32)
    variables = jax.jit(head.init)(jax.random.key(6), features)
    return head, variables, features


def test_fpn_head_parameter_count_and_dense_output(head_and_vars):
    head, variables, features = head_and_vars
    assert count(variables["params"]) == 256**2 + 384**2 + 448**2 + 480**2 + 496**2 == 890_112
    dense = head.apply(variables, features)
    assert dense.shape == (2, 32, 32, 496)
    assert head.apply(variables, features, method=FPNHead.coarse).shape == (2, 16, 16, 480)


def test_fpn_head_at_pixels_equals_dense(head_and_vars):
    head, variables, features = head_and_vars
    dense = head.apply(variables, features)
    rng = np.random.default_rng(7)
    b, y, x = rng.integers(0, 2, 50), rng.integers(0, 32, 50), rng.integers(0, 32, 50)
    b[:4], y[:4], x[:4] = [0, 1, 0, 1], [0, 31, 31, 0], [0, 31, 0, 31]  # corners too
    at_pixels = jax.jit(lambda v, f, *idx: head.apply(v, f, *idx, method="at_pixels"))
    sparse = at_pixels(variables, features, b, y, x)  # traced indices, as inside a train step
    assert sparse.shape == (50, 496)
    np.testing.assert_allclose(sparse, dense[b, y, x], rtol=1e-5, atol=1e-5)


def test_fpn_head_region_means_equal_dense_means(head_and_vars):
    head, variables, features = head_and_vars
    dense = head.apply(variables, features)  # (2, 32, 32, 496)
    rng = np.random.default_rng(11)
    weights = jnp.asarray(rng.random((2, 3, 32, 32)) < 0.3, jnp.float32)  # 3 regions per image
    coarse = head.apply(variables, features, method="coarse")
    sums, totals = head.apply(variables, coarse, features[-1], weights, method="region_sums")
    assert sums.shape == (2, 3, 496) and totals.shape == (2, 3)
    means = head.apply(variables, sums / totals[..., None], method="output")
    want = jnp.einsum("brhw,bhwc->brc", weights, dense) / totals[..., None]
    np.testing.assert_allclose(means, want, rtol=1e-4, atol=1e-5)


def test_fpn_head_rejects_wrong_feature_channels(head_and_vars):
    head, variables, _ = head_and_vars
    bad = random_features(8, 1, 32, dims=(256, 128, 64, 32, 8))
    with pytest.raises(ValueError, match="feature channels"):
        head.apply(variables, bad)


def test_projector_on_maps_and_pixel_vectors():
    projector = Projector()
    maps = jax.random.normal(jax.random.key(9), (1, 4, 4, 496))
    variables = projector.init(jax.random.key(10), maps)
    assert count(variables["params"]) == 2 * 496**2 == 492_032
    dense = projector.apply(variables, maps)
    pixels = projector.apply(variables, maps.reshape(-1, 496))
    np.testing.assert_allclose(pixels, dense.reshape(-1, 496), rtol=1e-5, atol=1e-5)


def test_registry_builds_unet_from_configdict_and_plain_objects():
    config = ml_collections.ConfigDict(
        dict(name="unet", rep_dim=128,
             unet=dict(features=(16, 32, 64, 128, 256), dropout_rates=(0.05, 0.1, 0.2, 0.3, 0.5)))
    )
    model = build_segmenter(config, num_classes=3, in_channels=2)
    assert isinstance(model, UNet) and model.num_classes == 3 and model.in_channels == 2
    head = build_head(config, num_classes=3, in_channels=2)
    assert head.feature_dims == FEATURE_DIMS and head.output_dim == 128
    assert build_projector(config).dim == 128
    plain = types.SimpleNamespace(name="unet")
    assert build_head(plain, num_classes=4, in_channels=1).output_dim == 496


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match="known names: unet"):
        build_segmenter(types.SimpleNamespace(name="vnet3d"), num_classes=2, in_channels=1)
    with pytest.raises(ValueError, match="'name'"):
        build_segmenter(types.SimpleNamespace(), num_classes=2, in_channels=1)
    with pytest.raises(ValueError, match="model.unet.features"):
        build_segmenter(types.SimpleNamespace(name="unet", unet=types.SimpleNamespace(features=(4, 8))),
                        num_classes=2, in_channels=1)
    assert "unet" in known_models()
