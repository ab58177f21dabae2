"""The small heads of stage 1 (relational pretraining, ISD / MONA style).

Two embeddings per image, each compared with a queue of teacher embeddings:
  global: the segmenter's coarsest feature map (the UNet bottleneck, the VNet's 1/8 decoder
    map), average-pooled over the image or volume, then two linear layers to `global_dim` (the reference's 256 -> 256 -> 512 MLP);
  local: the segmenter's logits cut into windows (side `window`, stride window/2; squares of
    images, cubes of volumes), each average-pooled to grid x grid (x grid) cells, then two 1x1
    convolutions C -> 2C -> C per cell; the embedding of a window is its grid^r x C values.
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
    """(B, *spatial, C) -> (B, N, grid, ..., grid, C): every window of side `window` along each
    of the r spatial axes (stride window/2, row-major order) average-pooled to grid^r cells
    (the reference's windows of the 2-D logits, and its cubes of the 3-D ones).

    The map is pooled once into cells of side window/grid; windows then start every grid/2
    cells, so each is a static gather of whole cells (no per-window loop).
    """
    batch, *spatial, channels = maps.shape
    rank, cell = len(spatial), window // grid
    trimmed = maps[(slice(None), *(slice(0, size - size % cell) for size in spatial))]
    split = [batch] + [n for size in spatial for n in (size // cell, cell)] + [channels]
    cells = trimmed.reshape(split).mean(axis=tuple(2 + 2 * axis for axis in range(rank)))
    # Per axis, the cell index of each (window, offset in the window), broadcast to
    # (N_0, ..., N_{r-1}, grid, ..., grid) so that one gather picks every window.
    index = []
    for axis, size in enumerate(spatial):
        starts = window_starts(size, window)
        shape = [1] * (2 * rank)
        shape[axis], shape[rank + axis] = len(starts), grid
        index.append((starts[:, None] // cell + np.arange(grid)[None, :]).reshape(shape))
    picked = cells[(slice(None), *index)]  # (B, N_0, ..., N_{r-1}, grid, ..., grid, C)
    return picked.reshape(batch, -1, *(grid,) * rank, channels)


def num_windows(patch_size: tuple[int, ...], window: int) -> int:
    return int(np.prod([len(window_starts(size, window)) for size in patch_size]))
