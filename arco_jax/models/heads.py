"""ARCO's pixel representation head (FPN-like fusion of the decoder maps) and its projector.

FPNHead fuses the segmenter's feature maps, coarsest first, as the reference does: at each
level `x = W x + x` (bias-free 1x1 conv with a residual add), bilinear upsampling with
align_corners=True to the next level's size, concatenation with that level's map; at the
finest level a last bias-free 1x1 conv (no residual) maps the concatenation (496 channels
for the UNet) to `output_dim`.

The head is split so the expensive stages can be skipped: `coarse` stops one level short of
full resolution and before that level's fusion, `fine` builds the dense map from there, and
`fine_at_pixels` evaluates it only at chosen pixels by gathering the 4 bilinear neighbours.
Everything after `coarse` is linear, so the two agree exactly at those pixels; contrastive
losses that use a few hundred pixels need not build a (B, H, W, 496) map, nor the dense
480-channel fusion at half resolution. For the same reason a region's mean representation is
`output` of the region's mean last-stage input (`region_sums`).

1x1 convolutions are `nn.Dense` on the channel axis (the same maths and parameter count),
which also lets `Projector` and `fine_at_pixels` work on (..., D) pixel vectors.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arco_jax.models.unet import uniform_fan_in

Dtype = Any
UNET_FEATURE_DIMS = (256, 128, 64, 32, 16)  # UNet decoder maps, coarsest first
UNET_REP_DIM = sum(UNET_FEATURE_DIMS)  # 496


def align_corners_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output index: the two source indices and the weight of the upper one.

    align_corners=True maps output i to source i * (in - 1) / (out - 1), so the first and last
    samples coincide with the input's corners. Static numpy, computed at trace time.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be positive, got in={in_size}, out={out_size}")
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    src = np.arange(out_size, dtype=np.float64) * scale
    lo = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (src - lo).astype(np.float32)
    return lo, hi, frac


def lerp_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
    """align_corners=True linear interpolation along one axis: two row gathers and a weighted sum."""
    if x.shape[axis] == out_size:
        return x
    lo, hi, frac = align_corners_taps(x.shape[axis], out_size)
    weight_shape = [1] * x.ndim
    weight_shape[axis] = out_size
    frac = jnp.asarray(frac, x.dtype).reshape(weight_shape)

    def rows(index: np.ndarray) -> jax.Array:
        return jnp.take(x, index, axis=axis, mode="clip", indices_are_sorted=True)

    return rows(lo) * (1 - frac) + rows(hi) * frac


def resize_bilinear_align_corners(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of NHWC `x` to `size` = (H, W), like PyTorch's align_corners=True.

    Separable: rows, then columns, each from two gathered neighbours with static indices.
    jax.image.resize cannot be used (half-pixel centres, i.e. align_corners=False). Gathers
    beat (out, in) interpolation matrices here: exact at any matmul precision (GPU/TPU default
    to TF32/bf16 passes) and about 10x faster forward on CPU at the head's sizes.
    """
    if x.ndim != 4:
        raise ValueError(f"resize expects NHWC (B, H, W, C), got shape {x.shape}")
    return lerp_axis(lerp_axis(x, 1, size[0]), 2, size[1])


def align_corners_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) matrix of the align_corners=True linear interpolation."""
    lo, hi, frac = align_corners_taps(in_size, out_size)
    matrix = np.zeros((out_size, in_size), np.float32)
    np.add.at(matrix, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(matrix, (np.arange(out_size), hi), frac)
    return matrix


def upsampling_adjoint(x: jax.Array, coarse_size: tuple[int, int]) -> jax.Array:
    """Adjoint (transpose) of `resize_bilinear_align_corners` from `coarse_size` to x's size.

    Moves per-pixel weights (B, H, W, R) of the fine grid onto the coarse grid so that
    sum(w * upsample(c)) == sum(upsampling_adjoint(w) * c). Uses small matrices at full float32
    precision rather than scatter-adds: deterministic on GPU, and XLA does not spend seconds
    constant-folding it when the weights are static (pooling cells).
    """
    rows = jnp.asarray(align_corners_matrix(coarse_size[0], x.shape[1]))
    cols = jnp.asarray(align_corners_matrix(coarse_size[1], x.shape[2]))
    highest = jax.lax.Precision.HIGHEST
    x = jnp.einsum("Yy,bYXr->byXr", rows, x.astype(jnp.float32), precision=highest)
    return jnp.einsum("Xx,byXr->byxr", cols, x, precision=highest)


def _bias_free_1x1(
    in_dim: int, out_dim: int, name: str, dtype: Dtype, param_dtype: Dtype, precision
) -> nn.Dense:
    return nn.Dense(
        out_dim,
        use_bias=False,
        kernel_init=uniform_fan_in(in_dim),
        dtype=dtype,
        param_dtype=param_dtype,
        precision=precision,
        name=name,
    )


class FPNHead(nn.Module):
    """The reference FeatureExtractor: decoder maps (coarsest first) -> (B, H, W, output_dim).

    Parameters for the UNet defaults: 256^2 + 384^2 + 448^2 + 480^2 + 496^2 = 890,112.
    """

    feature_dims: Sequence[int] = UNET_FEATURE_DIMS
    output_dim: int = UNET_REP_DIM
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: jax.lax.PrecisionLike = None

    def setup(self) -> None:
        if len(self.feature_dims) < 2:
            raise ValueError(f"FPNHead needs at least 2 feature levels, got {self.feature_dims}")
        widths = np.cumsum(self.feature_dims).tolist()  # channels after each concat
        self.fuse = [
            _bias_free_1x1(w, w, f"fuse{i}", self.dtype, self.param_dtype, self.precision)
            for i, w in enumerate(widths[:-1])
        ]
        self.out = _bias_free_1x1(
            widths[-1], self.output_dim, "out", self.dtype, self.param_dtype, self.precision
        )

    def _check(self, features: Sequence[jax.Array]) -> None:
        got = tuple(f.shape[-1] for f in features)
        if got != tuple(self.feature_dims):
            raise ValueError(
                f"FPNHead built for feature channels {tuple(self.feature_dims)} (coarsest "
                f"first), got maps with channels {got}, shapes {[f.shape for f in features]}"
            )

    def _fuse(self, level: int, x: jax.Array) -> jax.Array:
        return self.fuse[level](x) + x

    def coarse(self, features: Sequence[jax.Array]) -> jax.Array:
        """All levels but the finest, stopping before the last fusion: (B, H/2, W/2, 480) for
        the UNet, the concatenation that the second-finest 1x1 conv would fuse.

        That fusion (`W z + z`) is linear and is by far the head's largest dense cost (a
        480x480 matmul at H/2), so it is applied after interpolation, to sampled pixels or
        region means only (`fine_at_pixels`, `output`), or densely by `fine`.
        """
        self._check(features)
        z = features[0].astype(self.dtype)
        for level in range(1, len(features) - 1):
            nxt = features[level].astype(self.dtype)
            x = resize_bilinear_align_corners(self._fuse(level - 1, z), nxt.shape[1:3])
            z = jnp.concatenate([x, nxt], axis=-1)
        return z

    def _last_fuse(self, z: jax.Array) -> jax.Array:
        return self._fuse(len(self.feature_dims) - 2, z)

    def fine(self, coarse: jax.Array, finest: jax.Array) -> jax.Array:
        """Dense last stages: fuse `coarse`, upsample to the finest map's size, concat, 1x1 conv."""
        finest = finest.astype(self.dtype)
        x = resize_bilinear_align_corners(self._last_fuse(coarse), finest.shape[1:3])
        return self.out(jnp.concatenate([x, finest], axis=-1))

    def fine_at_pixels(
        self,
        coarse: jax.Array,
        finest: jax.Array,
        batch_idx: jax.Array,
        y: jax.Array,
        x: jax.Array,
    ) -> jax.Array:
        """The last stages only at pixels (batch_idx, y, x) of the finest grid: (..., output_dim).

        Index arrays share one shape (...). Equals `fine(coarse, finest)[batch_idx, y, x]`:
        interpolating and then fusing equals fusing and then interpolating (both linear).
        """
        finest = finest.astype(self.dtype)
        height, width = finest.shape[1:3]
        y_lo, y_hi, y_frac = (jnp.asarray(a) for a in align_corners_taps(coarse.shape[1], height))
        x_lo, x_hi, x_frac = (jnp.asarray(a) for a in align_corners_taps(coarse.shape[2], width))
        y0, y1, wy = y_lo[y], y_hi[y], y_frac[y].astype(self.dtype)[..., None]
        x0, x1, wx = x_lo[x], x_hi[x], x_frac[x].astype(self.dtype)[..., None]
        top = (1 - wx) * coarse[batch_idx, y0, x0] + wx * coarse[batch_idx, y0, x1]
        bottom = (1 - wx) * coarse[batch_idx, y1, x0] + wx * coarse[batch_idx, y1, x1]
        upsampled = self._last_fuse((1 - wy) * top + wy * bottom)
        return self.out(jnp.concatenate([upsampled, finest[batch_idx, y, x]], axis=-1))

    def region_sums(
        self, coarse: jax.Array, finest: jax.Array, weights: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Weighted sums of the last stage's input over regions, without the dense map.

        weights (B, R, H, W) on the finest grid -> (sums (B, R, D_in), totals (B, R)), in
        float32. As the last stage is linear, `output(sums / totals)` is the weighted mean
        representation of each region (class prototypes, pooling cells). The upsampled part
        is summed on the coarse grid, with the weights moved there by the upsampling's adjoint.
        """
        pixel_weights = jnp.moveaxis(weights.astype(jnp.float32), 1, -1)  # (B, H, W, R)
        coarse_weights = upsampling_adjoint(pixel_weights, coarse.shape[1:3])
        up_sums = jnp.einsum(
            "byxr,byxc->brc", coarse_weights, coarse.astype(jnp.float32), precision=self.precision
        )
        fine_sums = jnp.einsum(
            "byxr,byxc->brc", pixel_weights, finest.astype(jnp.float32), precision=self.precision
        )
        totals = jnp.sum(pixel_weights, axis=(1, 2))
        return jnp.concatenate([up_sums, fine_sums], axis=-1), totals

    def output(self, x: jax.Array) -> jax.Array:
        """The last stages on (..., D_in) pixel-level inputs such as region means: the pending
        fusion of the coarse part, then the last 1x1 conv."""
        split = sum(self.feature_dims[:-1])
        return self.out(jnp.concatenate([self._last_fuse(x[..., :split]), x[..., split:]], axis=-1))

    def at_pixels(
        self,
        features: Sequence[jax.Array],
        batch_idx: jax.Array,
        y: jax.Array,
        x: jax.Array,
    ) -> jax.Array:
        """Representations at pixels (batch_idx, y, x) without the full-resolution map."""
        return self.fine_at_pixels(self.coarse(features), features[-1], batch_idx, y, x)

    def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
        """Dense representation map (B, H, W, output_dim) at the finest map's resolution."""
        return self.fine(self.coarse(features), features[-1])


class Projector(nn.Module):
    """Two bias-free linear maps dim -> dim -> dim on the last axis (the reference's 1x1 convs).

    Works on maps (B, H, W, dim) and on sampled pixel vectors (N, dim) alike.
    Parameters for dim = 496: 2 * 496^2 = 492,032.
    """

    dim: int = UNET_REP_DIM
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: jax.lax.PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.dim:
            raise ValueError(f"Projector built for dim={self.dim}, got input shape {x.shape}")
        for layer in range(2):
            x = _bias_free_1x1(
                self.dim, self.dim, f"linear{layer}", self.dtype, self.param_dtype, self.precision
            )(x)
        return x
