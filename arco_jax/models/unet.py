"""The 2D UNet of SSL4MIS, the segmenter ARCO uses on ACDC, in Flax linen (NHWC).

Structure (as the reference's ARCO 2D model, which uses the transposed-convolution decoder):
  encoder: ConvBlock at full resolution, then four times max-pool 2x2 + ConvBlock;
           channels 16, 32, 64, 128, 256, dropout 0.05, 0.1, 0.2, 0.3, 0.5.
  decoder: four times 2x2 stride-2 transposed conv (to the skip's channel count),
           concat(skip, upsampled), ConvBlock without dropout; then a 3x3 conv to classes.
  ConvBlock: conv3x3 - BN - LeakyReLU(0.01) - Dropout - conv3x3 - BN - LeakyReLU(0.01).
All convolutions carry a bias. With 1 input channel and 4 classes: 1,944,324 parameters.

Initialisation follows PyTorch's defaults exactly, so training starts from the same weight
scale as the reference: every kernel and bias is drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
with PyTorch's fan_in (for a transposed conv PyTorch takes out_channels * k * k). BatchNorm
starts at scale 1, bias 0.

The 2x2 stride-2 transposed convolution is computed as one matmul and a depth-to-space reshape
(`UpConv2x2`), with the parameters and the result of `nn.ConvTranspose`: XLA:CPU runs the
weight gradient of a lax transposed convolution (a reversed, rhs-dilated convolution) as a
plain loop nest, which took over a third of a CPU train step (see benchmarks/unet_cpu_profile.md).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

LEAKY_SLOPE = 0.01  # torch.nn.LeakyReLU default
BN_MOMENTUM = 0.9  # torch momentum 0.1: running = 0.9 * running + 0.1 * batch
BN_EPSILON = 1e-5
NUM_LEVELS = 5


def uniform_fan_in(fan_in: int) -> Initializer:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for conv/linear weights and biases."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


_SAME_3X3 = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv3x3_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, **_SAME_3X3)


@jax.custom_vjp
def conv3x3_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 'same' convolution (NHWC images, HWIO kernel) whose gradients XLA:CPU runs fast
    anywhere, loop bodies included.

    Inside a loop (the rematerialised student passes, `objective.Forward.student_passes`)
    XLA:CPU leaves the transposed convolutions of the default gradient in layouts its
    library kernels do not take and emits plain loop nests for them: a scanned 128 px UNet
    step took 25 s instead of 1 s. Here both gradients are written as ordinary convolutions in
    the canonical layout: the input gradient convolves the output gradient with the flipped,
    transposed kernel; the kernel gradient convolves the images, channels as batch, with the
    output gradient as a (H, W) window. Other platforms keep XLA's own gradient.
    """
    return _conv3x3_same(x, kernel)


def _conv3x3_forward(x, kernel):
    return _conv3x3_same(x, kernel), (x, kernel)


def _conv3x3_backward(residuals, grad):
    x, kernel = residuals

    def canonical(x, kernel, grad):
        grad_x = _conv3x3_same(grad, jnp.flip(kernel, (0, 1)).swapaxes(2, 3))
        grad_kernel = _conv3x3_same(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(grad, (1, 2, 0, 3)))
        return grad_x, jnp.transpose(grad_kernel, (1, 2, 0, 3)).astype(kernel.dtype)

    def default(x, kernel, grad):
        return jax.vjp(_conv3x3_same, x, kernel)[1](grad)

    return jax.lax.platform_dependent(x, kernel, grad, cpu=canonical, default=default)


conv3x3_same.defvjp(_conv3x3_forward, _conv3x3_backward)


class Conv3x3(nn.Module):
    """3x3 'same' convolution with bias and PyTorch's default initialisation; the parameters
    ('kernel' (3, 3, in, out), 'bias' (out,)) and result of the matching `nn.Conv`."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1] * 9
        kernel = self.param("kernel", uniform_fan_in(fan_in), (3, 3, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", uniform_fan_in(fan_in), (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return conv3x3_same(x, kernel) + bias


class ConvBlock(nn.Module):
    """Two conv3x3-BN-LeakyReLU layers with dropout between them (rate 0 skips it)."""

    features: int
    dropout_rate: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        for layer in range(2):
            x = Conv3x3(self.features, self.dtype, self.param_dtype, name=f"conv{layer}")(x)
            x = batch_norm(train, self.dtype, self.param_dtype, f"bn{layer}")(x)
            x = nn.leaky_relu(x, LEAKY_SLOPE)
            if layer == 0 and self.dropout_rate > 0.0:
                x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        return x


def batch_norm(train: bool, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.BatchNorm:
    """PyTorch's BatchNorm (momentum 0.1, eps 1e-5, two-pass variance: robust when |mean| >> std),
    every architecture's (UNet, VNet, ResNet)."""
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                        use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name=name)


def conv_parameters(module: nn.Module, x: jax.Array, window: tuple[int, ...]):
    """(x, kernel (*window, in, module.features), bias) of a hand-lowered convolution, created
    and promoted as nn.Conv does (module has features, kernel_init, bias_init, dtype, param_dtype)."""
    kernel = module.param("kernel", module.kernel_init, (*window, x.shape[-1], module.features), module.param_dtype)
    bias = module.param("bias", module.bias_init, (module.features,), module.param_dtype)
    return nn.dtypes.promote_dtype(x, kernel, bias, dtype=module.dtype)


class UpConv2x2(nn.Module):
    """2x2 stride-2 'VALID' transposed convolution, the same function and parameters
    ('kernel' (2, 2, in, out), 'bias' (out,)) as `nn.ConvTranspose` with those settings.

    The stride equals the kernel size, so every output pixel gets exactly one kernel tap:
    out[b, 2i+u, 2j+v] = x[b, i, j] @ kernel[1-u, 1-v] + bias (lax.conv_transpose does not
    flip the kernel, hence the 1-u). As a matmul its forward and both gradients are dots,
    which XLA:CPU runs as GEMMs instead of the loop nest it emits for the conv's gradient.
    """

    features: int
    kernel_init: Initializer
    bias_init: Initializer
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias = conv_parameters(self, x, (2, 2))
        batch, height, width, _ = x.shape
        blocks = jnp.einsum("bhwi,uvio->bhuwvo", x, kernel[::-1, ::-1])
        return blocks.reshape(batch, 2 * height, 2 * width, self.features) + bias


class UpBlock(nn.Module):
    """2x2 stride-2 transposed conv of the coarse map, concat with the skip, ConvBlock."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, coarse: jax.Array, skip: jax.Array, *, train: bool) -> jax.Array:
        skip_channels = skip.shape[-1]
        fan_in = skip_channels * 4  # PyTorch's fan_in for ConvTranspose2d weights (in, out, 2, 2)
        up = UpConv2x2(
            skip_channels,
            kernel_init=uniform_fan_in(fan_in),
            bias_init=uniform_fan_in(fan_in),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="up",
        )(coarse)
        x = jnp.concatenate([skip, up], axis=-1)
        return ConvBlock(self.features, 0.0, self.dtype, self.param_dtype, name="block")(
            x, train=train
        )


class UNet(nn.Module):
    """SSL4MIS 2D UNet returning logits and the five decoder-level feature maps.

    `__call__(x, train=...)` takes NHWC images (H, W divisible by 16) and returns
    `(logits, features)`: logits (B, H, W, num_classes) in float32 (softmax and losses want
    full precision even when `dtype` is bfloat16), and features, in `dtype`, from coarsest to
    finest: the bottleneck (features[4] channels at H/16), then the output of each decoder
    stage (features[3] @ H/8, ..., features[0] @ H). These are the maps the ARCO
    representation head fuses. `train` switches dropout (needs the 'dropout' rng) and
    batch-statistics BatchNorm (needs mutable 'batch_stats').
    """

    num_classes: int = 4
    in_channels: int = 1
    features: Sequence[int] = (16, 32, 64, 128, 256)
    dropout_rates: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _check(self, x: jax.Array) -> None:
        if len(self.features) != NUM_LEVELS or len(self.dropout_rates) != NUM_LEVELS:
            raise ValueError(
                f"UNet needs {NUM_LEVELS} feature widths and {NUM_LEVELS} dropout rates, got "
                f"features={tuple(self.features)}, dropout_rates={tuple(self.dropout_rates)}"
            )
        if x.ndim != 4:
            raise ValueError(f"UNet expects NHWC images (B, H, W, C), got shape {x.shape}")
        _, height, width, channels = x.shape
        if channels != self.in_channels:
            raise ValueError(
                f"UNet was built for in_channels={self.in_channels}, got images with "
                f"{channels} channels (shape {x.shape})"
            )
        factor = 2 ** (NUM_LEVELS - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"UNet needs H and W divisible by {factor} (four 2x poolings), got {height}x{width}"
            )

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        self._check(x)
        x = x.astype(self.dtype)
        skips = []
        for level, (width, rate) in enumerate(zip(self.features, self.dropout_rates)):
            if level > 0:
                x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
            x = ConvBlock(width, rate, self.dtype, self.param_dtype, name=f"encoder{level}")(
                x, train=train
            )
            skips.append(x)

        decoder_maps = [x]
        for stage, level in enumerate(range(NUM_LEVELS - 2, -1, -1), start=1):
            x = UpBlock(self.features[level], self.dtype, self.param_dtype, name=f"decoder{stage}")(
                x, skips[level], train=train
            )
            decoder_maps.append(x)

        # The output conv in float32: with dtype bfloat16 the logits are not rounded to 8 bits of
        # mantissa (0.06 at a logit of 10) before softmax, thresholds and losses.
        logits = Conv3x3(self.num_classes, jnp.float32, self.param_dtype, name="out_conv")(x)
        return logits, tuple(decoder_maps)
