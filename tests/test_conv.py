"""models/conv.py: the ResNet's and DeepLab's convolution equals nn.Conv (values and gradients) at
every setting they use, and its CPU gradient inside a rematerialised loop holds only convolutions
in the canonical layout that XLA:CPU's library kernels take."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arco_jax.models.conv import Conv2d

# (kernel, stride, dilation, padding): the stem, 1x1 (shortcut, bottleneck, ASPP), 3x3 plain,
# strided and dilated (ResNet layers, ASPP rates), a 'VALID' 3x3.
SETTINGS = [(7, 2, 1, 3), (1, 1, 1, 0), (1, 2, 1, 0), (3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 2, 2), (3, 1, 6, 6),
            (3, 1, 1, 0)]


def flax_conv(kernel, stride, dilation, padding, features=5):
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((padding, padding),) * 2,
                   kernel_dilation=(dilation, dilation))


# Odd and even sizes where a stride meets the border (space-to-depth crops or pads the input).
CASES = [(*setting, (11, 12)) for setting in SETTINGS] + [(*s, (8, 9)) for s in SETTINGS if s[1] > 1]


@pytest.mark.parametrize("kernel,stride,dilation,padding,size", CASES)
def test_equals_flax_conv(kernel, stride, dilation, padding, size):
    x = jnp.asarray(np.random.default_rng(kernel + stride + dilation).normal(size=(2, *size, 3)), jnp.float32)
    ours = Conv2d(5, kernel, stride, dilation, padding)
    variables = ours.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
        jnp.shape, flax_conv(kernel, stride, dilation, padding).init(jax.random.key(0), x))

    def loss(module):
        return lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))

    y, want = ours.apply(variables, x), flax_conv(kernel, stride, dilation, padding).apply(variables, x)
    assert y.shape == want.shape
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    grads = jax.grad(loss(ours), argnums=(0, 1))(variables, x)
    want_grads = jax.grad(loss(flax_conv(kernel, stride, dilation, padding)), argnums=(0, 1))(variables, x)
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def loop_gradient_convolutions(module):
    """The convolutions of the compiled CPU gradient (parameters and input) of `module` applied in a
    rematerialised scan, as the student's passes run with arco.remat_student."""
    x = jnp.ones((2, 2, 12, 12, 3))
    variables = module.init(jax.random.key(0), x[0])

    def loss(v, x):
        def body(total, chunk):
            return total + jnp.sum(jax.checkpoint(module.apply)(v, chunk) ** 2), None
        return jax.lax.scan(body, 0.0, x)[0]

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(variables, x).compile().as_text()
    return [line for line in text.splitlines() if re.search(r"\sconvolution\(", line)]


def noncanonical(convolutions):
    return [c for c in convolutions
            if "dim_labels=b01f_01io->b01f" not in c or "lhs_dilate" in c or "rhs_reversal" in c]


@pytest.mark.parametrize("kernel,stride,dilation,padding", [(7, 2, 1, 3), (3, 2, 1, 1), (3, 1, 2, 2)])
def test_loop_gradients_are_canonical(kernel, stride, dilation, padding):
    found = loop_gradient_convolutions(Conv2d(4, kernel, stride, dilation, padding))
    assert len(found) == 3 and not noncanonical(found), found  # forward, d/dx, d/dkernel
    # nn.Conv's own gradient at the same setting is what the loop ran slowly (a check that can fail).
    assert noncanonical(loop_gradient_convolutions(flax_conv(kernel, stride, dilation, padding, features=4)))


def test_stride_and_dilation_together_is_refused():
    with pytest.raises(ValueError, match="stride 2, dilation 2"):
        Conv2d(4, 3, stride=2, dilation=2, padding=2).init(jax.random.key(0), jnp.ones((1, 9, 9, 3)))
