"""A 2-D convolution (stride, dilation, PyTorch's symmetric padding) whose gradients XLA:CPU runs
through its convolution library inside loop bodies too: the ResNet's and DeepLab's convolutions.

Why: with `arco.remat_student` the student's passes run as a rematerialised `lax.scan`
(`objective.Forward.student_passes`). Inside that loop XLA:CPU leaves the transposed convolutions of
its default gradient in layouts its library kernels do not take and emits plain loop nests for
them; the UNet and VNet met this first (`unet.conv3x3_same`), and a DeepLab step on ResNet-101 took
over 12 minutes a call. Here every convolution becomes one that has fast gradients everywhere:
  - 1x1 (any stride): a strided slice and a matmul over channels;
  - k x k, stride 1, dilation d: a 'VALID' convolution of the padded input whose two gradients are
    themselves ordinary stride-1 convolutions in the canonical layout (`conv_valid`);
  - k x k, stride s > 1 (dilation 1): space-to-depth. The padded input's s x s phases are stacked
    on the channel axis and the kernel, zero-padded to a multiple of s, is rearranged to match, so
    the strided convolution is one stride-1 convolution of ceil(k / s) x ceil(k / s) (the stem's
    7x7 stride 2 becomes 4x4 on 12 channels; a 3x3 stride 2, 2x2 on 4 C).
Same parameters and, up to float rounding, the same result as `nn.Conv` with those settings; other
platforms keep XLA's own gradients (`jax.lax.platform_dependent`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
_NHWC = ("NHWC", "HWIO", "NHWC")


def _valid(x: jax.Array, kernel: jax.Array, dilation: int, strides: int = 1) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (strides, strides), "VALID", rhs_dilation=(dilation, dilation),
                                        dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_valid(x: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
    """Stride-1 'VALID' convolution, NHWC input, HWIO kernel, kernel dilation `dilation`."""
    return _valid(x, kernel, dilation)


def _conv_valid_forward(x, kernel, dilation):
    return _valid(x, kernel, dilation), (x, kernel)


def _conv_valid_backward(dilation, residuals, grad):
    x, kernel = residuals

    def canonical(x, kernel, grad):
        # d/dx: the output gradient, padded by the dilated kernel's reach, convolved with the
        # flipped kernel (input and output channels swapped).
        reach_h, reach_w = dilation * (kernel.shape[0] - 1), dilation * (kernel.shape[1] - 1)
        padded = jnp.pad(grad, ((0, 0), (reach_h, reach_h), (reach_w, reach_w), (0, 0)))
        grad_x = _valid(padded, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), dilation)
        # d/dkernel: the images with channels as batch, convolved with the output gradient as a
        # (H, W) window (batch as features), the window stepping by the dilation.
        grad_kernel = _valid(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(grad, (1, 2, 0, 3)), 1, dilation)
        return grad_x.astype(x.dtype), jnp.transpose(grad_kernel, (1, 2, 0, 3)).astype(kernel.dtype)

    def default(x, kernel, grad):
        return jax.vjp(lambda a, b: _valid(a, b, dilation), x, kernel)[1](grad)

    return jax.lax.platform_dependent(x, kernel, grad, cpu=canonical, default=default)


conv_valid.defvjp(_conv_valid_forward, _conv_valid_backward)


def _space_to_depth(x: jax.Array, kernel: jax.Array, stride: int) -> tuple[jax.Array, jax.Array]:
    """(phases of the padded input on the channel axis, the matching kernel) of a stride-`stride`
    'VALID' convolution: y[h, w] = sum_{m, n} x2[h + m, w + n] . k2[m, n]."""
    batch, height, width, channels = x.shape
    k_h, k_w, _, features = kernel.shape
    out_h, out_w = (height - k_h) // stride + 1, (width - k_w) // stride + 1
    taps_h, taps_w = -(-k_h // stride), -(-k_w // stride)
    rows, cols = stride * (out_h + taps_h - 1), stride * (out_w + taps_w - 1)
    # Rows past the last window are never read; missing ones only meet the kernel's zero padding.
    x = jnp.pad(x[:, :rows, :cols], ((0, 0), (0, max(rows - height, 0)), (0, max(cols - width, 0)), (0, 0)))
    x = x.reshape(batch, rows // stride, stride, cols // stride, stride, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, rows // stride, cols // stride, stride * stride * channels)
    kernel = jnp.pad(kernel, ((0, stride * taps_h - k_h), (0, stride * taps_w - k_w), (0, 0), (0, 0)))
    kernel = kernel.reshape(taps_h, stride, taps_w, stride, channels, features)
    kernel = kernel.transpose(0, 2, 1, 3, 4, 5).reshape(taps_h, taps_w, stride * stride * channels, features)
    return x, kernel


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, dilation: int = 1, padding: int = 0) -> jax.Array:
    """PyTorch's Conv2d (NHWC input, HWIO kernel, no bias): `padding` zeros on every side, then
    `stride` and `dilation`; output size floor((n + 2 p - d (k - 1) - 1) / s) + 1."""
    if stride > 1 and dilation > 1:
        raise ValueError(f"conv2d takes a stride or a dilation, not both (stride {stride}, dilation {dilation})")
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    if kernel.shape[:2] == (1, 1):
        return jnp.einsum("bhwc,co->bhwo", x[:, ::stride, ::stride], kernel[0, 0])
    if stride > 1:
        x, kernel = _space_to_depth(x, kernel, stride)
    return conv_valid(x, kernel, dilation)


class Conv2d(nn.Module):
    """`nn.Conv(features, (k, k), strides=stride, padding=padding, kernel_dilation=dilation)` with
    the same parameters ('kernel' (k, k, in, features), 'bias' (features,) if use_bias) and dtype
    promotion, computed by `conv2d`."""

    features: int
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    padding: int = 0
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv2d(x, kernel, self.stride, self.dilation, self.padding)
        return y if bias is None else y + bias

