"""DeepLabv3+ as ReCo (lorenmt/reco, network/deeplabv3) and ARCO's natural-image setting use it,
in Flax linen (NHWC), with its 256-d representation head evaluated sparsely like heads.FPNHead.

Segmenter (`DeepLabV3Plus`), on a torchvision ResNet (models/resnet.py, name 'backbone'):
  ASPP on the final map: a 1x1 conv, three 3x3 convs dilated 6/12/18 at output stride 16
  (12/24/36 at 8) and the image-pooling branch (global mean, 1x1 conv), 256 channels each,
  each with BN and ReLU; concatenated (1280) and projected by a 1x1 conv - BN - ReLU to 256
  (ReCo's ASPP has no dropout);
  decoder: the stride-4 low-level map (layer1) reduced to 48 channels (1x1 conv - BN - ReLU),
  the ASPP map upsampled to it (bilinear, align_corners=True), concatenated (304 channels);
  classifier: 3x3 conv 256 - BN - ReLU - 1x1 conv (bias) to the classes, at stride 4, then
  upsampled bilinearly (align_corners=True) to the input size, as ReCo's training upsamples
  its predictions; representation: a second 3x3 conv 256 - BN - ReLU on the same concatenation
  (ReCo's `representation` up to its last layer, which is the head below).
Only the last 1x1 convs carry a bias. Decoder and ASPP initialisation: PyTorch's default
(U(+-1/sqrt(fan_in)), as models/unet.py); the backbone's is torchvision's.

`__call__(x, train=...)` -> (logits (B, H, W, num_classes) float32, features), features coarsest
first: the ASPP output (256 @ output stride), the representation's hidden map (256 @ 4) and the
label grid, a (B, H, W, 0) array holding no data. The trainer samples representation pixels and
builds region weights on the label grid and hands the head's fine stage the last feature map
only (objective.HeadInputs), so that map tells the head the input size, which a stride-4 map
cannot (33 and 36 px both give 9 rows).

Head (`DeepLabHead`): ReCo's last representation layer, a 1x1 conv (bias) 256 -> output_dim on
the hidden map, so the stride-4 representation map is R = W h + b. The representation of an
input pixel is R upsampled bilinearly (align_corners=True) to the input size, as the logits.
Everything in the head is linear and bilinear weights sum to 1, so `fine_at_pixels` blends the
4 hidden neighbours of each chosen pixel and applies the conv to those vectors only (exactly
the dense map there), and a region's mean representation is `output` of the region's mean
hidden vector, summed on the stride-4 grid with the weights moved there by the upsampling's
adjoint (heads.upsampling_adjoint). No representation map at input resolution is built.
The BatchNorm of the representation branch lives in the segmenter because the trainer gives
the head parameters only ('params'; no 'batch_stats').

Parameters, at 3 input channels, width 1 and 21 classes: ResNet-101 42,500,160 + ASPP
15,535,104 + decoder 1,419,637 = 59,454,901 (ResNet-50: 40,462,773; ResNet-18, whose ASPP takes
512 channels: 16,718,773); the head with output_dim 256: 65,792. `channels` narrows ASPP and the
decoder (256: ReCo's; the built-in demo's small net, configs/natural_demo.py, uses 64).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from arco_jax.models.conv import Conv2d
from arco_jax.models.heads import align_corners_taps, resize_bilinear_align_corners, upsampling_adjoint
from arco_jax.models.resnet import ResNet, dilation_for_output_stride
from arco_jax.models.unet import batch_norm, uniform_fan_in

Dtype = Any

ASPP_CHANNELS = 256
LOW_LEVEL_CHANNELS = 48
DECODER_CHANNELS = 256  # the classifier's and the representation's 3x3 convs
REP_DIM = 256  # ReCo's output_dim
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}
OUTPUT_STRIDES = tuple(sorted(ASPP_RATES))
LOW_LEVEL_STRIDE = 4


def feature_strides(output_stride: int) -> tuple[int, int, int]:
    """Nominal strides of the features DeepLabV3Plus returns: ASPP, representation map, label grid."""
    return output_stride, LOW_LEVEL_STRIDE, 1


class ConvBNReLU(nn.Module):
    """A bias-free k x k conv ('same', dilated) - BN - ReLU with PyTorch's default initialisation."""

    features: int
    kernel: int = 1
    dilation: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        pad = self.dilation * (self.kernel - 1) // 2
        x = Conv2d(self.features, self.kernel, 1, self.dilation, pad, use_bias=False,
                   kernel_init=uniform_fan_in(x.shape[-1] * self.kernel ** 2), dtype=self.dtype,
                   param_dtype=self.param_dtype, name="conv")(x)
        return nn.relu(batch_norm(train, self.dtype, self.param_dtype, "bn")(x))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3 and image pooling, then a 1x1 projection."""

    rates: Sequence[int] = ASPP_RATES[16]
    channels: int = ASPP_CHANNELS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        args = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        branches = [ConvBNReLU(self.channels, 1, **args, name="branch0")(x, train=train)]
        for index, rate in enumerate(self.rates, start=1):
            branches.append(ConvBNReLU(self.channels, 3, rate, **args, name=f"branch{index}")(x, train=train))
        mean = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        pooled = ConvBNReLU(self.channels, 1, **args, name="pooling")(mean, train=train)
        branches.append(jnp.broadcast_to(pooled, x.shape[:3] + (self.channels,)))  # upsampling a 1x1 map
        return ConvBNReLU(self.channels, 1, **args, name="project")(jnp.concatenate(branches, -1), train=train)


class DeepLabV3Plus(nn.Module):
    """ReCo's DeepLabv3+ on a torchvision ResNet: (logits at input size, (ASPP, hidden rep map, grid)).

    Takes NHWC images of any size; `train` switches batch-statistics BatchNorm (needs mutable
    'batch_stats'; nothing uses the 'dropout' rng). The module docstring gives the structure.
    """

    num_classes: int = 21
    in_channels: int = 3
    depth: int = 101
    output_stride: int = 16
    width: float = 1.0
    channels: int = ASPP_CHANNELS  # ASPP's and the decoder's 3x3 convs (256: ReCo's)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _check(self, x: jax.Array) -> None:
        if self.output_stride not in ASPP_RATES:
            raise ValueError(f"DeepLabV3Plus output_stride must be 8 or 16, got {self.output_stride!r}")
        if x.ndim != 4:
            raise ValueError(f"DeepLabV3Plus expects NHWC images (B, H, W, C), got shape {x.shape}")
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"DeepLabV3Plus was built for in_channels={self.in_channels}, got images with "
                             f"{x.shape[-1]} channels (shape {x.shape})")

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        self._check(x)
        args = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        low, high = ResNet(self.depth, dilation_for_output_stride(self.output_stride), self.width, **args,
                           name="backbone")(x, train=train)
        aspp = ASPP(ASPP_RATES[self.output_stride], self.channels, **args, name="aspp")(high, train=train)
        low = ConvBNReLU(LOW_LEVEL_CHANNELS, 1, **args, name="low_level")(low, train=train)
        z = jnp.concatenate([low, resize_bilinear_align_corners(aspp, low.shape[1:3])], axis=-1)
        hidden = ConvBNReLU(self.channels, 3, **args, name="classifier")(z, train=train)
        # The output conv in float32 (as the UNet's): logits are not rounded to bfloat16.
        logits = Conv2d(self.num_classes, 1, kernel_init=uniform_fan_in(self.channels),
                        bias_init=uniform_fan_in(self.channels), **{**args, "dtype": jnp.float32},
                        name="classifier_out")(hidden)
        representation = ConvBNReLU(self.channels, 3, **args, name="representation")(z, train=train)
        logits = resize_bilinear_align_corners(logits, x.shape[1:3])
        grid = jnp.zeros(x.shape[:3] + (0,), self.dtype)
        return logits, (aspp, representation, grid)


def _bilinear_at(coarse: jax.Array, size: tuple[int, int], batch_idx: jax.Array, y: jax.Array,
                 x: jax.Array) -> jax.Array:
    """`resize_bilinear_align_corners(coarse, size)[batch_idx, y, x]` from the 4 coarse neighbours only."""
    y_lo, y_hi, y_frac = (jnp.asarray(a) for a in align_corners_taps(coarse.shape[1], size[0]))
    x_lo, x_hi, x_frac = (jnp.asarray(a) for a in align_corners_taps(coarse.shape[2], size[1]))
    y0, y1, wy = y_lo[y], y_hi[y], y_frac[y].astype(coarse.dtype)[..., None]
    x0, x1, wx = x_lo[x], x_hi[x], x_frac[x].astype(coarse.dtype)[..., None]
    top = (1 - wx) * coarse[batch_idx, y0, x0] + wx * coarse[batch_idx, y0, x1]
    bottom = (1 - wx) * coarse[batch_idx, y1, x0] + wx * coarse[batch_idx, y1, x1]
    return (1 - wy) * top + wy * bottom


class DeepLabHead(nn.Module):
    """ReCo's last representation layer (1x1 conv with bias, hidden_dim -> output_dim), upsampled to
    the label grid; the methods of heads.FPNHead, on DeepLabV3Plus's features.

    `coarse` is the hidden map itself (B, ceil(H/4), ceil(W/4), 256); `finest`, the trainer's
    last feature map, is the (B, H, W, 0) label grid. Parameters: 256 output_dim + output_dim
    (65,792 at 256).
    """

    hidden_dim: int = DECODER_CHANNELS
    output_dim: int = REP_DIM
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: jax.lax.PrecisionLike = None

    def setup(self) -> None:
        self.out = nn.Dense(self.output_dim, kernel_init=uniform_fan_in(self.hidden_dim),
                            bias_init=uniform_fan_in(self.hidden_dim), dtype=self.dtype,
                            param_dtype=self.param_dtype, precision=self.precision, name="out")

    def _grid(self, finest: jax.Array) -> tuple[int, int]:
        if finest.ndim != 4 or finest.shape[-1] != 0:
            raise ValueError(f"DeepLabHead takes the label grid, a (B, H, W, 0) map, as its finest map "
                             f"(DeepLabV3Plus's last feature), got shape {finest.shape}")
        return finest.shape[1:3]

    def coarse(self, features: Sequence[jax.Array]) -> jax.Array:
        """The representation's hidden map at stride 4: everything after it is linear."""
        shapes = [f.shape for f in features]
        if len(features) != 3 or features[1].ndim != 4 or features[1].shape[-1] != self.hidden_dim:
            raise ValueError(f"DeepLabHead takes DeepLabV3Plus's features (ASPP, {self.hidden_dim}-channel "
                             f"representation map, label grid), got shapes {shapes}")
        self._grid(features[2])
        return features[1].astype(self.dtype)

    def fine(self, coarse: jax.Array, finest: jax.Array) -> jax.Array:
        """Dense representations on the label grid: (B, H, W, output_dim)."""
        return resize_bilinear_align_corners(self.out(coarse), self._grid(finest))

    def fine_at_pixels(self, coarse: jax.Array, finest: jax.Array, batch_idx: jax.Array, y: jax.Array,
                       x: jax.Array) -> jax.Array:
        """Representations only at label-grid pixels (batch_idx, y, x), index arrays of one shape
        (...): (..., output_dim), equal to `fine(coarse, finest)[batch_idx, y, x]`."""
        return self.out(_bilinear_at(coarse, self._grid(finest), batch_idx, y, x))

    def region_sums(self, coarse: jax.Array, finest: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
        """weights (B, R, H, W) on the label grid -> (sums (B, R, hidden_dim), totals (B, R)),
        float32: `output(sums / totals)` is each region's weighted mean representation."""
        if tuple(weights.shape[2:]) != tuple(self._grid(finest)):
            raise ValueError(f"region weights {weights.shape} are not on the label grid {finest.shape[1:3]}")
        pixel_weights = jnp.moveaxis(weights.astype(jnp.float32), 1, -1)  # (B, H, W, R)
        coarse_weights = upsampling_adjoint(pixel_weights, coarse.shape[1:3])
        sums = jnp.einsum("byxr,byxc->brc", coarse_weights, coarse.astype(jnp.float32), precision=self.precision)
        return sums, jnp.sum(pixel_weights, axis=(1, 2))

    def output(self, x: jax.Array) -> jax.Array:
        """The head on (..., hidden_dim) vectors such as region means (or the hidden map itself:
        ReCo's stride-4 representation map)."""
        return self.out(x)

    def at_pixels(self, features: Sequence[jax.Array], batch_idx: jax.Array, y: jax.Array,
                  x: jax.Array) -> jax.Array:
        """Representations at label-grid pixels (batch_idx, y, x) without a dense map."""
        return self.fine_at_pixels(self.coarse(features), features[-1], batch_idx, y, x)

    def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
        """Dense representation map (B, H, W, output_dim) on the label grid."""
        return self.fine(self.coarse(features), features[-1])
