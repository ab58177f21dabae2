"""The small heads of stage 1 (relational pretraining, ISD / MONA style).

Two embeddings per image, each compared with a queue of teacher embeddings:
  global: the segmenter's coarsest feature map (the UNet bottleneck), average-pooled over the
    image, then two linear layers to `global_dim` (the reference's 256 -> 256 -> 512 MLP);
  local: the segmenter's logits cut into windows (side `window`, stride window/2), each window
    average-pooled to grid x grid cells, then two 1x1 convolutions C -> 2C -> C per cell; the
    embedding of a window is its grid x grid x C values.
The student passes each embedding through one more pair of linear layers (the predictor);
the teacher has no predictor. As in the reference, the pairs have no nonlinearity between
their layers. Initialisation is PyTorch's default (U(+-1/sqrt(fan_in)) for weights and
biases), the scale the reference starts from.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arco_jax.models.unet import uniform_fan_in

Dtype = Any


class LinearPair(nn.Module):
    """Two linear layers with bias on the last axis (1x1 convolutions on a map); `hidden`
    None keeps the input width."""

    hidden: int | None
    out: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for index, width in enumerate((self.hidden or x.shape[-1], self.out)):
            fan_in = x.shape[-1]
            x = nn.Dense(width, kernel_init=uniform_fan_in(fan_in), bias_init=uniform_fan_in(fan_in),
                         dtype=self.dtype, param_dtype=jnp.float32, name=f"linear{index}")(x)
        return x


def window_starts(size: int, window: int) -> np.ndarray:
    """Top-left offsets of the windows along one axis: 0, window/2, ... while a window fits
    (the edge strip a window would overhang is left out, as in the reference)."""
    return np.arange(0, size - window + 1, window // 2)


def pooled_windows(maps: jax.Array, window: int, grid: int) -> jax.Array:
    """(B, H, W, C) -> (B, N, grid, grid, C): every window of side `window` (stride window/2,
    row-major order) average-pooled to grid x grid cells.

    The map is pooled once into cells of side window/grid; windows then start every grid/2
    cells, so each is a static gather of whole cells (no per-window loop).
    """
    batch, height, width, channels = maps.shape
    cell = window // grid
    cells = maps[:, :height - height % cell, :width - width % cell]
    cells = cells.reshape(batch, height // cell, cell, width // cell, cell, channels).mean(axis=(2, 4))
    rows = window_starts(height, window)[:, None] // cell + np.arange(grid)[None, :]  # (Ny, grid)
    cols = window_starts(width, window)[:, None] // cell + np.arange(grid)[None, :]  # (Nx, grid)
    picked = cells[:, rows[:, None, :, None], cols[None, :, None, :]]  # (B, Ny, Nx, grid, grid, C)
    return picked.reshape(batch, rows.shape[0] * cols.shape[0], grid, grid, channels)


def num_windows(patch_size: tuple[int, int], window: int) -> int:
    return len(window_starts(patch_size[0], window)) * len(window_starts(patch_size[1], window))
