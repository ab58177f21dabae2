"""ARCO's voxel representation head for the VNet (the reference's FeatureExtractor_3d), evaluated
sparsely like heads.FPNHead.

The reference fuses its five decoder maps (8n @ 1/8, 4n @ 1/4, 2n @ 1/2, n @ 1/1, n @ 1/1),
coarsest first: at each level `x = W x + x` (bias-free 1x1x1 conv with a residual add),
trilinear upsampling with align_corners=True to the next level's size (the identity between
the two full-resolution levels), concatenation with that level's map; a last bias-free 1x1x1
conv (no residual) maps the concatenation (16 n = 256 channels) to `output_dim` (16 there).
There is no nonlinearity anywhere: the whole head is linear in the maps.

Sparse split, as FPNHead: `coarse` stops at the last level coarser than full resolution, before
that level's fusion: (B, D/2, H/2, W/2, 14 n), 224 channels for the VNet. Everything after it
(that fusion, the trilinear upsampling, the full-resolution fusions and the last conv) is
linear, so fusing after interpolating equals interpolating after fusing: `fine_at_pixels`
interpolates `coarse` at each chosen voxel from its 8 neighbours and runs the remaining
stages on those vectors only, with the same result as the dense map there. No full-resolution
volume of more than the segmenter's own channels is built. For the same reason a region's mean
representation is `output` of the region's mean stage input (`region_sums`): the coarse part
is summed on the coarse grid, with the weights moved there by the upsampling's adjoint.

The full-resolution levels arrive as one map, concatenated (vnet.VNet returns them so), since
the trainer hands the fine stage the last feature map only; `finest_levels` says how many
reference levels it holds.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arco_jax.models.heads import align_corners_matrix, align_corners_taps, lerp_axis
from arco_jax.models.unet import uniform_fan_in

Dtype = Any
VNET_LEVEL_DIMS = (128, 64, 32, 16, 16)  # the reference's fea_dim: its five decoder maps, coarsest first
VNET_REP_DIM = 16  # the reference's FeatureExtractor_3d(output_dim=16)


def vnet_level_dims(n_filters: int) -> tuple[int, ...]:
    """The reference head's level widths for a VNet with `n_filters` base filters."""
    return (8 * n_filters, 4 * n_filters, 2 * n_filters, n_filters, n_filters)


def resize_trilinear_align_corners(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """Trilinear resize of (B, D, H, W, C) `x` to `size` = (D, H, W), like PyTorch's
    align_corners=True; separable, one axis at a time (see heads.resize_bilinear_align_corners
    for why gathers rather than jax.image.resize or interpolation matrices)."""
    if x.ndim != 5:
        raise ValueError(f"trilinear resize expects (B, D, H, W, C), got shape {x.shape}")
    for axis, out_size in enumerate(size, start=1):
        x = lerp_axis(x, axis, out_size)
    return x


def trilinear_upsampling_adjoint(x: jax.Array, coarse_size: Sequence[int]) -> jax.Array:
    """Adjoint of `resize_trilinear_align_corners` from `coarse_size` to x's size: moves
    per-voxel weights (B, D, H, W, R) of the fine grid onto the coarse grid, so that
    sum(w * upsample(c)) == sum(adjoint(w) * c). Small matrices at full float32 precision,
    as heads.upsampling_adjoint."""
    highest = jax.lax.Precision.HIGHEST
    x = x.astype(jnp.float32)
    x = jnp.einsum("Zz,bZYXr->bzYXr", jnp.asarray(align_corners_matrix(coarse_size[0], x.shape[1])), x,
                   precision=highest)
    x = jnp.einsum("Yy,bzYXr->bzyXr", jnp.asarray(align_corners_matrix(coarse_size[1], x.shape[2])), x,
                   precision=highest)
    return jnp.einsum("Xx,bzyXr->bzyxr", jnp.asarray(align_corners_matrix(coarse_size[2], x.shape[3])), x,
                      precision=highest)


def _bias_free_1x1(in_dim: int, out_dim: int, name: str, dtype: Dtype, param_dtype: Dtype, precision) -> nn.Dense:
    return nn.Dense(out_dim, use_bias=False, kernel_init=uniform_fan_in(in_dim), dtype=dtype,
                    param_dtype=param_dtype, precision=precision, name=name)


class FPNHead3D(nn.Module):
    """The reference FeatureExtractor_3d: VNet features (coarsest first) -> (B, D, H, W, output_dim).

    level_dims: the reference's per-level widths; the last `finest_levels` of them share the
    full-resolution grid and come concatenated as the last feature map. Parameters for the
    VNet defaults and output_dim 16: 128^2 + 192^2 + 224^2 + 240^2 + 256 * 16 = 165,120.
    """

    level_dims: Sequence[int] = VNET_LEVEL_DIMS
    finest_levels: int = 2
    output_dim: int = VNET_REP_DIM
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: jax.lax.PrecisionLike = None

    def setup(self) -> None:
        if not 1 <= self.finest_levels < len(self.level_dims):
            raise ValueError(f"FPNHead3D needs 1 <= finest_levels < {len(self.level_dims)} levels, got "
                             f"finest_levels={self.finest_levels}, level_dims={tuple(self.level_dims)}")
        widths = np.cumsum(self.level_dims).tolist()  # channels after each concat
        self.fuse = [_bias_free_1x1(w, w, f"fuse{i}", self.dtype, self.param_dtype, self.precision)
                     for i, w in enumerate(widths[:-1])]
        self.out = _bias_free_1x1(widths[-1], self.output_dim, "out", self.dtype, self.param_dtype, self.precision)

    @property
    def _num_coarse(self) -> int:
        return len(self.level_dims) - self.finest_levels

    @property
    def feature_dims(self) -> tuple[int, ...]:
        """Channels of the feature maps it takes: the coarse levels, then the full-resolution ones together."""
        dims = tuple(self.level_dims)
        return dims[:self._num_coarse] + (sum(dims[self._num_coarse:]),)

    def _check(self, features: Sequence[jax.Array]) -> None:
        got = tuple(f.shape[-1] for f in features)
        if got != self.feature_dims or any(f.ndim != 5 for f in features):
            raise ValueError(f"FPNHead3D built for (B, D, H, W, C) feature maps with channels {self.feature_dims} "
                             f"(coarsest first), got shapes {[f.shape for f in features]}")

    def _fuse(self, level: int, x: jax.Array) -> jax.Array:
        return self.fuse[level](x) + x

    def coarse(self, features: Sequence[jax.Array]) -> jax.Array:
        """The coarse levels, stopping before the last one's fusion: (B, D/2, H/2, W/2, 224) for
        the VNet. That fusion and all that follows is linear, so it is left to the sampled
        voxels or region means (`fine_at_pixels`, `output`), or to the dense `fine`."""
        self._check(features)
        z = features[0].astype(self.dtype)
        for level in range(1, self._num_coarse):
            nxt = features[level].astype(self.dtype)
            z = jnp.concatenate([resize_trilinear_align_corners(self._fuse(level - 1, z), nxt.shape[1:4]), nxt],
                                axis=-1)
        return z

    def _finish(self, upsampled: jax.Array, finest: jax.Array) -> jax.Array:
        """From the fused, upsampled coarse part at full resolution: concat each full-resolution
        level in turn, fusing all but the last concatenation, then the last 1x1 conv."""
        x, start = upsampled, 0
        for level in range(self._num_coarse, len(self.level_dims)):
            x = jnp.concatenate([x, finest[..., start:start + self.level_dims[level]]], axis=-1)
            start += self.level_dims[level]
            x = self._fuse(level, x) if level < len(self.level_dims) - 1 else self.out(x)
        return x

    def _coarse_fuse(self, z: jax.Array) -> jax.Array:
        return self._fuse(self._num_coarse - 1, z)

    def fine(self, coarse: jax.Array, finest: jax.Array) -> jax.Array:
        """The dense remaining stages: (B, D, H, W, output_dim)."""
        finest = finest.astype(self.dtype)
        upsampled = resize_trilinear_align_corners(self._coarse_fuse(coarse), finest.shape[1:4])
        return self._finish(upsampled, finest)

    def fine_at_pixels(self, coarse: jax.Array, finest: jax.Array, batch_idx: jax.Array, z: jax.Array,
                       y: jax.Array, x: jax.Array) -> jax.Array:
        """The remaining stages only at voxels (batch_idx, z, y, x) of the finest grid: (..., output_dim).

        Index arrays share one shape (...). Equals `fine(coarse, finest)[batch_idx, z, y, x]`:
        the voxel's 8 coarse neighbours are blended with the trilinear weights, then fused.
        """
        finest = finest.astype(self.dtype)
        taps = [align_corners_taps(coarse.shape[axis], finest.shape[axis]) for axis in (1, 2, 3)]
        corners = []  # per axis: ((index, weight) of the lower neighbour, (index, weight) of the upper)
        for (lo, hi, frac), index in zip(taps, (z, y, x)):
            weight = jnp.asarray(frac)[index].astype(self.dtype)[..., None]
            corners.append(((jnp.asarray(lo)[index], 1 - weight), (jnp.asarray(hi)[index], weight)))
        blended = 0
        for (z_at, wz), (y_at, wy), (x_at, wx) in itertools.product(*corners):
            blended = blended + (wz * wy * wx) * coarse[batch_idx, z_at, y_at, x_at]
        return self._finish(self._coarse_fuse(blended), finest[batch_idx, z, y, x])

    def region_sums(self, coarse: jax.Array, finest: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Weighted sums of the remaining stages' input over regions, without the dense map.

        weights (B, K, D, H, W) on the finest grid -> (sums (B, K, D_in), totals (B, K)), in
        float32; `output(sums / totals)` is each region's weighted mean representation.
        """
        voxel_weights = jnp.moveaxis(weights.astype(jnp.float32), 1, -1)  # (B, D, H, W, K)
        coarse_weights = trilinear_upsampling_adjoint(voxel_weights, coarse.shape[1:4])
        up_sums = jnp.einsum("bzyxk,bzyxc->bkc", coarse_weights, coarse.astype(jnp.float32), precision=self.precision)
        fine_sums = jnp.einsum("bzyxk,bzyxc->bkc", voxel_weights, finest.astype(jnp.float32),
                               precision=self.precision)
        totals = jnp.sum(voxel_weights, axis=(1, 2, 3))
        return jnp.concatenate([up_sums, fine_sums], axis=-1), totals

    def output(self, x: jax.Array) -> jax.Array:
        """The remaining stages on (..., D_in) voxel-level inputs such as region means."""
        split = sum(self.level_dims[:self._num_coarse])
        return self._finish(self._coarse_fuse(x[..., :split]), x[..., split:])

    def at_pixels(self, features: Sequence[jax.Array], batch_idx: jax.Array, z: jax.Array, y: jax.Array,
                  x: jax.Array) -> jax.Array:
        """Representations at voxels (batch_idx, z, y, x) without the full-resolution map."""
        return self.fine_at_pixels(self.coarse(features), features[-1], batch_idx, z, y, x)

    def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
        """Dense representation map (B, D, H, W, output_dim) at the finest map's resolution."""
        return self.fine(self.coarse(features), features[-1])
