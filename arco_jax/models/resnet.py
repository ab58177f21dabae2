"""torchvision's ResNet-18/34/50/101/152 in Flax linen, channels last (B, H, W, C): the backbone
of DeepLabv3+ (models/deeplab.py). No average pool and no fc layer: `ResNet.__call__` returns
the stride-4 map (layer1's output) and the final one (layer4's).

Structure, as torchvision.models.resnet (v1.5):
  stem: conv 7x7 stride 2 padding 3 - BN - ReLU - max-pool 3x3 stride 2 padding 1 (64 w channels);
  layer1..layer4 of `blocks` residual blocks with 64 w, 128 w, 256 w, 512 w planes; layer1
  keeps the stride, each other layer's first block halves it;
  BasicBlock (18, 34): conv3x3 (stride) - BN - ReLU - conv3x3 - BN, + shortcut, ReLU;
  Bottleneck (50, 101, 152): conv1x1 - BN - ReLU - conv3x3 (stride) - BN - ReLU - conv1x1 to
  4 x planes - BN, + shortcut, ReLU (the stride on the 3x3 conv: v1.5);
  shortcut: the identity, or `downsample` = conv1x1 (stride) - BN where the stride or the
  channel count changes.
No convolution has a bias. w is the width multiplier (1.0: torchvision's; 64 w must be a whole
number). BatchNorm: eps 1e-5, torchvision's momentum 0.1 (flax momentum 0.9), two-pass variance;
its running variance takes the biased batch variance where PyTorch's takes the unbiased one.

`replace_stride_with_dilation` (layer2, layer3, layer4), as torchvision: a replaced stride
becomes a dilation of that layer's 3x3 convolutions, so the output stride is 32 / 2^k
(`dilation_for_output_stride`: 16 dilates layer4, 8 layer3 and layer4). In a dilated layer the
first block's 3x3 conv that would have been strided keeps the dilation before the layer and
every other 3x3 conv takes the new one (torchvision's `previous_dilation`). torchvision refuses
dilation in BasicBlock; here it follows the same rule (conv1 of the first block, the strided
one, keeps the old dilation; all other 3x3 convs take the new one), so ResNet-18/34 give
output stride 16 or 8 too. Spatial sizes follow PyTorch's arithmetic: each stride-2 stage maps
n to ceil(n / 2), so a map of nominal stride s has ceil(H / s) rows (33 px: 17, 9, 5, 3).

Parameter names mirror torchvision's state-dict keys ('layer3/22/conv2/kernel' for
'layer3.22.conv2.weight', 'downsample/0', 'downsample/1'), so a torchvision checkpoint converts
key by key (models/convert_torchvision.py). Parameters without fc (torchvision's totals less
the fc layer's; 'batch_stats' not counted), at 3 input channels and width 1:
  ResNet-18 11,176,512; ResNet-34 21,284,672; ResNet-50 23,508,032; ResNet-101 42,500,160;
  ResNet-152 58,143,808.

Initialisation as torchvision: every conv kernel from N(0, 2 / fan_out) (kaiming_normal_,
mode='fan_out'), BatchNorm scale 1 and bias 0 (no zero_init_residual).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from arco_jax.models.conv import Conv2d
from arco_jax.models.unet import batch_norm

Dtype = Any

# depth -> (block kind, blocks per layer): torchvision's resnet18 ... resnet152.
LAYERS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
DEPTHS = tuple(LAYERS)
STEM_CHANNELS = 64  # conv1's channels at width 1; layer i has 64 * 2^i planes
EXPANSION = {"basic": 1, "bottleneck": 4}
DILATIONS = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def dilation_for_output_stride(output_stride: int) -> tuple[bool, bool, bool]:
    """torchvision's `replace_stride_with_dilation` (layer2, layer3, layer4) for an output stride."""
    if output_stride not in DILATIONS:
        raise ValueError(f"ResNet output stride must be one of {sorted(DILATIONS)}, got {output_stride!r}")
    return DILATIONS[output_stride]


def width_problem(width: Any) -> str | None:
    """Why `width` cannot be a width multiplier (64 * width a positive whole number), or None."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0:
        return f"must be a positive number (1.0: torchvision's widths), got {width!r}"
    if abs(STEM_CHANNELS * width - round(STEM_CHANNELS * width)) > 1e-9:
        return f"must make 64 * width a whole number of channels (e.g. 1.0, 0.5, 0.125), got {width!r}"
    return None


def stem_channels(width: float) -> int:
    problem = width_problem(width)
    if problem:
        raise ValueError(f"ResNet width {problem}")
    return int(round(STEM_CHANNELS * width))


def output_channels(depth: int, width: float = 1.0) -> tuple[int, int]:
    """Channels of (layer1's output, layer4's output): (64, 512) for ResNet-18, (256, 2048) for 50."""
    kind, _ = LAYERS[depth]
    planes = stem_channels(width)
    return planes * EXPANSION[kind], 8 * planes * EXPANSION[kind]


def layer_plan(replace_stride_with_dilation=(False, False, False)) -> tuple[tuple[int, int, int], ...]:
    """(stride, dilation of the first block's strided conv, dilation of every other 3x3 conv) of
    layer1..layer4: torchvision's `_make_layer` bookkeeping (`previous_dilation`, `self.dilation`)."""
    if len(tuple(replace_stride_with_dilation)) != 3:
        raise ValueError(f"replace_stride_with_dilation needs 3 flags (layer2..4), got {replace_stride_with_dilation}")
    plan, dilation = [(1, 1, 1)], 1
    for dilate in replace_stride_with_dilation:
        previous = dilation
        if dilate:
            dilation *= 2
        plan.append((1 if dilate else 2, previous, dilation))
    return tuple(plan)


def _conv(features: int, kernel: int, stride: int, dilation: int, name: str, dtype: Dtype,
          param_dtype: Dtype) -> Conv2d:
    """A bias-free conv with PyTorch's symmetric padding (dilation * (kernel - 1) / 2 per side);
    `Conv2d` is nn.Conv's parameters and result with gradients XLA:CPU runs fast in loops."""
    pad = dilation * (kernel - 1) // 2
    return Conv2d(features, kernel, stride, dilation, pad, use_bias=False, kernel_init=KAIMING_FAN_OUT,
                  dtype=dtype, param_dtype=param_dtype, name=name)


class Downsample(nn.Module):
    """torchvision's `downsample` shortcut: conv1x1 (stride) named '0', BatchNorm named '1'."""

    features: int
    stride: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = _conv(self.features, 1, self.stride, 1, "0", self.dtype, self.param_dtype)(x)
        return batch_norm(train, self.dtype, self.param_dtype, "1")(x)


class BasicBlock(nn.Module):
    """conv3x3 (stride, dilations[0]) - BN - ReLU - conv3x3 (dilations[1]) - BN, + shortcut, ReLU."""

    planes: int
    stride: int = 1
    dilations: tuple[int, int] = (1, 1)
    downsample: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        args = (self.dtype, self.param_dtype)
        y = _conv(self.planes, 3, self.stride, self.dilations[0], "conv1", *args)(x)
        y = nn.relu(batch_norm(train, *args, "bn1")(y))
        y = _conv(self.planes, 3, 1, self.dilations[1], "conv2", *args)(y)
        y = batch_norm(train, *args, "bn2")(y)
        if self.downsample:
            x = Downsample(self.planes, self.stride, *args, name="downsample")(x, train=train)
        return nn.relu(y + x)


class Bottleneck(nn.Module):
    """conv1x1 - BN - ReLU - conv3x3 (stride, dilation) - BN - ReLU - conv1x1 (4 planes) - BN,
    + shortcut, ReLU (torchvision v1.5: the stride on the 3x3 conv)."""

    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        args = (self.dtype, self.param_dtype)
        out = self.planes * EXPANSION["bottleneck"]
        y = nn.relu(batch_norm(train, *args, "bn1")(_conv(self.planes, 1, 1, 1, "conv1", *args)(x)))
        y = _conv(self.planes, 3, self.stride, self.dilation, "conv2", *args)(y)
        y = nn.relu(batch_norm(train, *args, "bn2")(y))
        y = batch_norm(train, *args, "bn3")(_conv(out, 1, 1, 1, "conv3", *args)(y))
        if self.downsample:
            x = Downsample(out, self.stride, *args, name="downsample")(x, train=train)
        return nn.relu(y + x)


class ResLayer(nn.Module):
    """torchvision's `layerN`: `blocks` blocks named '0', '1', ...; the first carries the stride
    (or, dilated, the old dilation) and the shortcut conv where shape or stride changes."""

    kind: str
    planes: int
    blocks: int
    stride: int
    first_dilation: int
    dilation: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        args = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        for index in range(self.blocks):
            first = index == 0
            stride = self.stride if first else 1
            downsample = first and (stride != 1 or x.shape[-1] != self.planes * EXPANSION[self.kind])
            if self.kind == "basic":
                dilations = (self.first_dilation if first else self.dilation, self.dilation)
                x = BasicBlock(self.planes, stride, dilations, downsample, **args, name=str(index))(x, train=train)
            else:
                dilation = self.first_dilation if first else self.dilation
                x = Bottleneck(self.planes, stride, dilation, downsample, **args, name=str(index))(x, train=train)
        return x


class ResNet(nn.Module):
    """torchvision's ResNet without avgpool and fc: NHWC images -> (layer1 map @ stride 4, final map).

    `__call__(x, train=...)` returns (B, ceil(H/4), ceil(W/4), 64 w e) and the layer4 map
    (8 x as many channels) at stride 32 / 2^(dilated layers), e = 1 (Basic) or 4 (Bottleneck).
    `train` switches batch-statistics BatchNorm (needs mutable 'batch_stats'). The stem's output
    (after the max-pool) is sown as 'intermediates'/'stem' when that collection is mutable.
    """

    depth: int = 50
    replace_stride_with_dilation: tuple[bool, bool, bool] = (False, False, False)
    width: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
        if self.depth not in LAYERS:
            raise ValueError(f"ResNet depth must be one of {', '.join(map(str, DEPTHS))}, got {self.depth!r}")
        if x.ndim != 4:
            raise ValueError(f"ResNet expects NHWC images (B, H, W, C), got shape {x.shape}")
        kind, blocks = LAYERS[self.depth]
        stem = stem_channels(self.width)
        args = (self.dtype, self.param_dtype)
        x = _conv(stem, 7, 2, 1, "conv1", *args)(x.astype(self.dtype))
        x = nn.relu(batch_norm(train, *args, "bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        self.sow("intermediates", "stem", x)
        low = None
        for index, ((stride, first_dilation, dilation), count) in enumerate(
                zip(layer_plan(self.replace_stride_with_dilation), blocks)):
            x = ResLayer(kind, stem * 2 ** index, count, stride, first_dilation, dilation, *args,
                         name=f"layer{index + 1}")(x, train=train)
            if index == 0:
                low = x
        return low, x
