"""The 3D VNet that ARCO uses on volumes (LA), in Flax linen, channels last (B, D, H, W, C).

Structure (as the reference's `networks/vnetWithArgs.py` built with normalization='batchnorm',
has_dropout=True); n = n_filters = 16:
  encoder: stages of 1, 2, 3, 3, 3 conv3x3x3-BN-ReLU layers with n, 2n, 4n, 8n, 16n channels,
           each but the last followed by a 2x2x2 stride-2 conv-BN-ReLU that doubles the
           channels; channel-wise dropout (p=0.5) on the bottleneck.
  decoder: four times a 2x2x2 stride-2 transposed conv-BN-ReLU that halves the channels, plus
           the encoder stage of that resolution (an additive skip, not a concatenation), then
           stages of 3, 3, 2, 1 conv layers; channel-wise dropout on the last stage's output;
           a 1x1x1 conv to the classes.
The stages are plain (the reference's ConvBlock), not residual. All convolutions carry a bias.

Parameters with 1 input channel, 2 classes and n = 16: 9,448,866, the same as the reference
(counted from its layer list: conv weights and biases, BatchNorm weights and biases; running
statistics are PyTorch buffers there and the 'batch_stats' collection here).

The spatial axes are the three before the channels; nothing depends on which one is "depth",
but each must be a multiple of 16 (four 2x poolings).

Features returned (coarsest first), the maps the reference hands its 3D head:
  up(x5) + x4 (8n @ 1/8), up(x6) + x3 (4n @ 1/4), up(x7) + x2 (2n @ 1/2), and the two
  full-resolution maps up(x8) + x1 and the last stage's output x9 (before its dropout), both
  n channels @ 1/1, concatenated into one 2n-channel map. They are one array because the
  representation head's fine stage needs both at every sampled voxel and the trainer hands
  that stage the last feature map only (objective.HeadInputs); heads3d splits it again.

On XLA:CPU a 3-D convolution runs several times slower than 2-D convolutions of the same
work (a 3x3x3 layer at 2 x 32 x 48 x 48 x 16: 0.20 s forward, 0.70 s with its gradients, against
0.034 s and 0.16 s as 2-D convolutions on a 2-core CPU). So on the CPU backend the 3x3x3 layers
run as one 2-D convolution per depth plane with the three neighbouring planes stacked as
channels (Conv3x3x3), and the 2x2x2 stride-2 layers as a matmul over 2x2x2 blocks (DownConv);
elsewhere they are XLA's own 3-D convolutions. Both forms hold the same parameters and compute
the same function (to float rounding), so a checkpoint moves between CPU and accelerators.

Initialisation follows PyTorch's defaults as models/unet.py does (U(+-1/sqrt(fan_in)), with
PyTorch's fan_in for the transposed convs, out_channels * 8).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from arco_jax.models.unet import Initializer, batch_norm, conv3x3_same, conv_parameters, uniform_fan_in

Dtype = Any

ENCODER_STAGES = (1, 2, 3, 3, 3)  # conv layers per encoder stage, finest first
DECODER_STAGES = (3, 3, 2, 1)  # conv layers per decoder stage, coarsest first
NUM_DOWNSAMPLINGS = len(ENCODER_STAGES) - 1
DROPOUT_RATE = 0.5  # the reference's nn.Dropout3d(p=0.5)
VNET_FEATURE_STRIDES = (8, 4, 2, 1)


def planes_lowering() -> bool:
    """Whether 3-D convolutions run as 2-D ones (the CPU backend; see the module docstring)."""
    return jax.default_backend() == "cpu"


def conv3x3x3_as_planes(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The 'same' 3x3x3 convolution of x (B, D, H, W, C) with kernel (3, 3, 3, C, O) as one 2-D
    convolution of the B * D planes, each with its two depth neighbours stacked as channels."""
    batch, depth, height, width, channels = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
    stacked = jnp.concatenate([padded[:, tap:tap + depth] for tap in range(3)], axis=-1)
    planes_kernel = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(3, 3, 3 * channels, kernel.shape[-1])
    y = conv3x3_same(stacked.reshape(batch * depth, height, width, 3 * channels), planes_kernel)
    return y.reshape(batch, depth, height, width, kernel.shape[-1])


class Conv3x3x3(nn.Module):
    """'same' 3x3x3 convolution with bias: `nn.Conv(features, (3, 3, 3), padding=1)`'s
    parameters ('kernel' (3, 3, 3, in, out), 'bias') and function, lowered per backend."""

    features: int
    kernel_init: Initializer
    bias_init: Initializer
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias = conv_parameters(self, x, (3, 3, 3))
        if planes_lowering():
            y = conv3x3x3_as_planes(x, kernel)
        else:
            y = lax.conv_general_dilated(x, kernel, (1, 1, 1), ((1, 1),) * 3,
                                         dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        return y + bias


class ConvStage(nn.Module):
    """`layers` times conv3x3x3 ('same', bias) - BN - ReLU."""

    features: int
    layers: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        for layer in range(self.layers):
            fan_in = x.shape[-1] * 27
            x = Conv3x3x3(self.features, kernel_init=uniform_fan_in(fan_in), bias_init=uniform_fan_in(fan_in),
                          dtype=self.dtype, param_dtype=self.param_dtype, name=f"conv{layer}")(x)
            x = batch_norm(train, self.dtype, self.param_dtype, f"bn{layer}")(x)
            x = nn.relu(x)
        return x


class Conv2x2x2Down(nn.Module):
    """2x2x2 stride-2 'VALID' convolution with bias: `nn.Conv(features, (2, 2, 2), strides=2,
    padding='VALID')`'s parameters and function; on the CPU backend a matmul over the 2x2x2
    blocks (each output voxel reads one block; sizes are even here)."""

    features: int
    kernel_init: Initializer
    bias_init: Initializer
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias = conv_parameters(self, x, (2, 2, 2))
        if planes_lowering():
            batch, depth, height, width, channels = x.shape
            blocks = x.reshape(batch, depth // 2, 2, height // 2, 2, width // 2, 2, channels)
            y = jnp.einsum("bdphqwri,pqrio->bdhwo", blocks, kernel)
        else:
            y = lax.conv_general_dilated(x, kernel, (2, 2, 2), "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        return y + bias


class DownConv(nn.Module):
    """2x2x2 stride-2 conv (bias) - BN - ReLU: halves each spatial size."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        fan_in = x.shape[-1] * 8
        x = Conv2x2x2Down(self.features, kernel_init=uniform_fan_in(fan_in), bias_init=uniform_fan_in(fan_in),
                          dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
        return nn.relu(batch_norm(train, self.dtype, self.param_dtype, "bn")(x))


class UpConv2x2x2(nn.Module):
    """2x2x2 stride-2 'VALID' transposed convolution with the parameters ('kernel'
    (2, 2, 2, in, out), 'bias' (out,)) and the result of `nn.ConvTranspose` at those settings.

    Stride equals kernel size, so each output voxel gets one kernel tap:
    out[2i+u, 2j+v, 2k+w] = x[i, j, k] @ kernel[1-u, 1-v, 1-w] + bias (lax.conv_transpose does
    not flip the kernel). One matmul and a reshape: its gradients are GEMMs on every backend
    (see unet.UpConv2x2 for why that matters on XLA:CPU).
    """

    features: int
    kernel_init: Initializer
    bias_init: Initializer
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias = conv_parameters(self, x, (2, 2, 2))
        batch, depth, height, width, _ = x.shape
        blocks = jnp.einsum("bdhwi,uvtio->bduhvwto", x, kernel[::-1, ::-1, ::-1])
        return blocks.reshape(batch, 2 * depth, 2 * height, 2 * width, self.features) + bias


class UpDeconv(nn.Module):
    """2x2x2 stride-2 transposed conv (bias) - BN - ReLU: doubles each spatial size."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        fan_in = self.features * 8  # PyTorch's fan_in for ConvTranspose3d weights (in, out, 2, 2, 2)
        x = UpConv2x2x2(self.features, kernel_init=uniform_fan_in(fan_in), bias_init=uniform_fan_in(fan_in),
                        dtype=self.dtype, param_dtype=self.param_dtype, name="up")(x)
        return nn.relu(batch_norm(train, self.dtype, self.param_dtype, "bn")(x))


class VNet(nn.Module):
    """The reference VNet returning logits and the decoder maps its 3D representation head fuses.

    `__call__(x, train=...)` takes (B, D, H, W, in_channels) volumes, each spatial size a
    multiple of 16, and returns `(logits, features)`: logits (B, D, H, W, num_classes) in
    float32, and features, in `dtype`, coarsest first: 8n @ 1/8, 4n @ 1/4, 2n @ 1/2 and 2n @ 1/1
    (the module docstring says which maps). `train` switches channel-wise dropout (needs the
    'dropout' rng) and batch-statistics BatchNorm (needs mutable 'batch_stats').
    """

    num_classes: int = 2
    in_channels: int = 1
    n_filters: int = 16
    dropout: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _check(self, x: jax.Array) -> None:
        if x.ndim != 5:
            raise ValueError(f"VNet expects volumes (B, D, H, W, C), got shape {x.shape}")
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"VNet was built for in_channels={self.in_channels}, got volumes with "
                             f"{x.shape[-1]} channels (shape {x.shape})")
        factor = 2 ** NUM_DOWNSAMPLINGS
        if any(size % factor for size in x.shape[1:4]):
            raise ValueError(f"VNet needs every spatial size divisible by {factor} (four 2x "
                             f"downsamplings), got {x.shape[1:4]}")

    def _channel_dropout(self, x: jax.Array, train: bool) -> jax.Array:
        """nn.Dropout3d: whole channels of a volume zeroed together, the rest scaled by 2."""
        if not self.dropout:
            return x
        return nn.Dropout(DROPOUT_RATE, broadcast_dims=(1, 2, 3))(x, deterministic=not train)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        self._check(x)
        x = x.astype(self.dtype)
        conv_args = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        skips = []
        for level, layers in enumerate(ENCODER_STAGES):
            if level > 0:
                x = DownConv(self.n_filters * 2 ** level, **conv_args, name=f"down{level}")(x, train=train)
            x = ConvStage(self.n_filters * 2 ** level, layers, **conv_args, name=f"encoder{level}")(x, train=train)
            skips.append(x)
        x = self._channel_dropout(x, train)

        decoder_maps = []
        for stage, layers in enumerate(DECODER_STAGES, start=1):
            level = NUM_DOWNSAMPLINGS - stage
            x = UpDeconv(self.n_filters * 2 ** level, **conv_args, name=f"up{stage}")(x, train=train)
            x = x + skips[level]
            decoder_maps.append(x)
            x = ConvStage(self.n_filters * 2 ** level, layers, **conv_args, name=f"decoder{stage}")(x, train=train)
        # The head reads the last stage before its dropout, as the reference's feature list does.
        features = tuple(decoder_maps[:-1]) + (jnp.concatenate([decoder_maps[-1], x], axis=-1),)
        x = self._channel_dropout(x, train)
        # The output conv in float32 (as the UNet's): logits are not rounded to bfloat16.
        logits = nn.Conv(self.num_classes, (1, 1, 1), kernel_init=uniform_fan_in(self.n_filters),
                         bias_init=uniform_fan_in(self.n_filters), name="out_conv",
                         **{**conv_args, "dtype": jnp.float32})(x)
        return logits, features
