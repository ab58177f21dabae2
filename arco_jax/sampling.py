"""Pixel samplers for the contrastive loss: uniform, stratified (SG) and stratified antithetic (SAG).

ARCO's point is that *which* pixels enter the contrastive loss matters: drawing them uniformly
(ReCo, ARCO-NS) gives a noisy loss estimate, while splitting the candidates into G strata and
drawing from each in proportion to its size (SG), or in antithetic pairs reflected through the
stratum centre (SAG), lowers the variance of that estimate.

Candidates are a boolean mask of static shape; a sample is `n` int32 indices into the flattened
mask, drawn with replacement, plus a flag saying whether there was any candidate at all. Every
function here is a pure jnp program with static shapes, so it can be jitted and vmapped (for
instance over the classes: a stack of masks and a stack of keys).

Strata ("layouts"):
- 'index' (the reference code): the i-th candidate in raster order of the flattened mask takes
  the cell (i // edge, i % edge) of an edge x edge square, edge = round(sqrt(N)); the square is
  cut into a sqrt(G) x sqrt(G) grid of blocks whose last row and column absorb the remainder
  (and any rank beyond edge**2 falls into the last row of blocks).
- 'spatial' (the paper): the image plane (H, W) is cut into a sqrt(G) x sqrt(G) grid of cells,
  or, with spatial_rank=3, the volume (D, H, W) into a cbrt(G) x cbrt(G) x cbrt(G) grid (pixel i
  of an axis of size S lies in cell i * cut // S, on every axis alike); leading (batch)
  dimensions are pooled, so stratum g holds the class's pixels in cell g of every image or
  volume of the batch. 'index' ignores spatial_rank: it always cuts a square of ranks.

Allocation is proportional: stratum g gets floor(n N_g / N) slots, and the remaining R slots go
to R distinct strata chosen by systematic sampling with inclusion probability equal to the
fractional part of n N_g / N. Every stratum so gets its quota or one more, and the expected
number of slots is exactly n N_g / N, which keeps the sample mean an unbiased estimate of the
population mean. Slots are laid out contiguously per stratum (shuffle them if their order
matters downstream). With fewer candidates than strata every sampler falls back to uniform.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SAMPLERS = ("uniform", "sg", "sag")
LAYOUTS = ("index", "spatial")
SPATIAL_RANKS = (2, 3)  # images (..., H, W) and volumes (..., D, H, W)

# Proportional quotas are estimated in float32 and then corrected exactly with int32 arithmetic;
# the correction needs the estimate within one of the truth (n < 2**22) and products that wrap
# around int32 without losing the answer (mask size * strata < 2**31).
_MAX_SAMPLES = 2**22
_INT32_LIMIT = 2**31


class _Strata(NamedTuple):
    """How one layout groups the candidates.

    counts: (G,) candidates per stratum.
    rank_of: (stratum, rank within stratum) -> rank in the layout's candidate order.
    position_of: rank in that order -> index into the flattened mask.
    """

    counts: jax.Array
    rank_of: Callable[[jax.Array, jax.Array], jax.Array]
    position_of: Callable[[jax.Array], jax.Array]


def _searchsorted(sorted_values: jax.Array, queries: jax.Array) -> jax.Array:
    """jnp.searchsorted(side='right') as an unrolled binary search, with no loop: XLA:CPU runs
    collectives inside a loop body unordered with the program's other collectives, which can
    deadlock two devices of a mesh when a candidate mask is sharded. Same results."""
    return jnp.searchsorted(sorted_values, queries, side="right", method="scan_unrolled")


def _is_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def _check_rank(name: str, rank: int) -> None:
    if not _is_int(rank) or rank not in SPATIAL_RANKS:
        raise ValueError(f"{name} must be 2 (images, (..., H, W)) or 3 (volumes, (..., D, H, W)), got {rank!r}")


def _integer_root(value: int, rank: int) -> int:
    """floor(value ** (1 / rank)) in exact integer arithmetic (floats misround large cubes)."""
    if rank == 2:
        return math.isqrt(value)
    if value < 2:
        return value
    root = 1 << -(-value.bit_length() // rank)  # an upper bound: Newton then descends to the floor
    while True:
        better = ((rank - 1) * root + value // root ** (rank - 1)) // rank
        if better >= root:
            return root
        root = better


def _grid_rule(rank: int) -> str:
    if rank == 2:
        return "a perfect square >= 1 (e.g. 9, 16, 25): the strata form a sqrt(G) x sqrt(G) grid"
    return ("a perfect cube >= 1 (e.g. 8, 27, 64): the strata form a cbrt(G) x cbrt(G) x cbrt(G) grid "
            "over (D, H, W)")


def grid_cut(num_strata: int, rank: int = 2) -> int:
    """Side of the square (rank 2) or cubic (rank 3) grid of strata; num_strata must be its power."""
    _check_rank("rank", rank)
    if not _is_int(num_strata):
        raise ValueError(f"num_strata must be an int, got {num_strata!r}")
    cut = _integer_root(max(int(num_strata), 0), rank)
    if num_strata < 1 or cut**rank != num_strata:
        raise ValueError(f"num_strata must be {_grid_rule(rank)}; got {num_strata}")
    return cut


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _grid_rank(layout: str, spatial_rank: int) -> int:
    """Rank of the grid of strata: only 'spatial' follows the data; 'index' always cuts a square."""
    _check_rank("spatial_rank", spatial_rank)
    return int(spatial_rank) if layout == "spatial" else 2


def strata_rule(layout: str, spatial_rank: int = 2) -> str:
    """Which num_strata a layout accepts, as one line (for config validators' messages)."""
    _check_choice("layout", layout, LAYOUTS)
    return _grid_rule(_grid_rank(layout, spatial_rank))


def check_num_strata(num_strata: int, layout: str, spatial_rank: int = 2) -> int:
    """Raise ValueError unless num_strata suits the layout and rank; returns the grid's side."""
    _check_choice("layout", layout, LAYOUTS)
    return grid_cut(num_strata, _grid_rank(layout, spatial_rank))


def _spatial_shape_for(mask_shape: tuple[int, ...], layout: str, spatial_shape: tuple[int, ...] | None,
                       cut: int, rank: int) -> tuple[int, ...] | None:
    """The (..., H, W) or (..., D, H, W) shape the 'spatial' layout reads the flattened mask with."""
    if layout == "index":
        if spatial_shape is not None:
            raise ValueError(
                f"spatial_shape={spatial_shape} is only used by layout='spatial', got layout='index'")
        return None
    shape = tuple(mask_shape) if spatial_shape is None else tuple(int(s) for s in spatial_shape)
    axes = "(..., H, W)" if rank == 2 else "(..., D, H, W)"
    if len(shape) < rank:
        with_rank = "" if rank == 2 else f" with spatial_rank={rank}"
        raise ValueError(
            f"layout='spatial'{with_rank} needs a mask of shape {axes} or spatial_shape={axes}; "
            f"got mask shape {tuple(mask_shape)} and spatial_shape={spatial_shape}")
    if math.prod(shape) != math.prod(mask_shape):
        raise ValueError(
            f"spatial_shape {shape} holds {math.prod(shape)} pixels but the mask of shape "
            f"{tuple(mask_shape)} holds {math.prod(mask_shape)}")
    cell_axes = shape[-rank:]
    if cut > min(cell_axes):
        grid, extent = "x".join([str(cut)] * rank), "x".join(map(str, cell_axes))
        image = "an image of {} pixels" if rank == 2 else "a volume of {} voxels"
        raise ValueError(f"a {grid} grid of strata does not fit {image.format(extent)}")
    return shape


def _check_sizes(mask_size: int, n: int, num_strata: int) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= _MAX_SAMPLES:
        raise ValueError(f"n (samples to draw) must be an int in [1, {_MAX_SAMPLES}], got {n!r}")
    if mask_size < 1:
        raise ValueError("the candidate mask is empty (size 0); it needs a static size >= 1")
    if mask_size * num_strata >= _INT32_LIMIT:
        raise ValueError(
            f"mask size {mask_size} x num_strata {num_strata} must stay below 2**31 "
            f"(int32 quota arithmetic)")


def _round_sqrt(count: jax.Array) -> jax.Array:
    """round(sqrt(count)) exactly for int32 counts (float32 sqrt corrected by one step)."""
    edge = jnp.round(jnp.sqrt(count.astype(jnp.float32))).astype(jnp.int32)
    # round(sqrt(N)) = e  <=>  e(e-1) < N <= e(e+1) for integers N >= 0.
    edge = jnp.where(edge * (edge + 1) < count, edge + 1, edge)
    return jnp.where(edge * (edge - 1) >= count, edge - 1, edge)


class _IndexGrid(NamedTuple):
    """The reference's square of candidate ranks, cut into blocks (all dynamic int32)."""

    edge: jax.Array
    block: jax.Array
    cut: int

    @classmethod
    def for_count(cls, num_candidates: jax.Array, cut: int) -> _IndexGrid:
        # Clamped to 1 so that tiny counts (which fall back to uniform) never divide by zero.
        edge = jnp.maximum(_round_sqrt(num_candidates), 1)
        return cls(edge=edge, block=jnp.maximum(edge // cut, 1), cut=cut)

    def stratum_of_rank(self, rank: jax.Array) -> jax.Array:
        block_row = jnp.minimum((rank // self.edge) // self.block, self.cut - 1)
        block_col = jnp.minimum((rank % self.edge) // self.block, self.cut - 1)
        return block_row * self.cut + block_col

    def _corner_and_width(self, stratum: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        block_row, block_col = stratum // self.cut, stratum % self.cut
        first_col = block_col * self.block
        last_col_end = jnp.where(block_col == self.cut - 1, self.edge, first_col + self.block)
        width = jnp.maximum(jnp.minimum(last_col_end, self.edge) - first_col, 1)
        return block_row * self.block, first_col, width

    def rank_of(self, stratum: jax.Array, local_rank: jax.Array) -> jax.Array:
        # Inside a block the present ranks are a prefix of its raster order (only the tail of
        # the last square row can be missing), so the k-th one sits at row k // width.
        first_row, first_col, width = self._corner_and_width(stratum)
        return (first_row + local_rank // width) * self.edge + first_col + local_rank % width

    def counts(self, num_candidates: jax.Array) -> jax.Array:
        stratum = jnp.arange(self.cut * self.cut, dtype=jnp.int32)
        first_row, first_col, width = self._corner_and_width(stratum)
        block_row = stratum // self.cut
        big = jnp.iinfo(jnp.int32).max
        row_end = jnp.where(block_row == self.cut - 1, big, first_row + self.block)
        full_rows, partial_cols = num_candidates // self.edge, num_candidates % self.edge
        in_full_rows = width * jnp.clip(jnp.minimum(row_end, full_rows) - first_row, 0)
        has_partial_row = (first_row <= full_rows) & (full_rows < row_end)
        in_partial_row = jnp.where(has_partial_row, jnp.clip(partial_cols - first_col, 0, width), 0)
        return in_full_rows + in_partial_row


def _index_strata(candidate_cumsum: jax.Array, cut: int) -> _Strata:
    num_candidates = candidate_cumsum[-1]
    grid = _IndexGrid.for_count(num_candidates, cut)
    return _Strata(
        counts=grid.counts(num_candidates),
        rank_of=grid.rank_of,
        position_of=lambda rank: _searchsorted(candidate_cumsum, rank),
    )


@functools.lru_cache(maxsize=16)
def _spatial_cells(spatial_shape: tuple[int, ...], cut: int,
                   rank: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Static cell id of every flattened pixel, the cell-major order, and each cell's end in it.

    Cells are numbered in raster order of the grid over the last `rank` axes.
    """
    cell_grid = np.zeros((), np.int64)
    for size in spatial_shape[-rank:]:
        cell_grid = cell_grid[..., None] * cut + np.arange(size) * cut // size
    cells = np.broadcast_to(cell_grid.astype(np.int32), spatial_shape).reshape(-1)
    cell_major = np.argsort(cells, kind="stable").astype(np.int32)
    cell_ends = np.cumsum(np.bincount(cells, minlength=cut**rank)).astype(np.int32)
    for array in (cells, cell_major, cell_ends):
        array.flags.writeable = False
    return cells, cell_major, cell_ends


def _spatial_strata(flat_mask: jax.Array, cut: int, spatial_shape: tuple[int, ...], rank: int) -> _Strata:
    _, cell_major, cell_ends = _spatial_cells(spatial_shape, cut, rank)
    cumsum_cell_major = jnp.cumsum(flat_mask[cell_major], dtype=jnp.int32)
    candidates_before_end = cumsum_cell_major[cell_ends - 1]
    counts = jnp.diff(candidates_before_end, prepend=0)
    offsets = candidates_before_end - counts
    return _Strata(
        counts=counts,
        rank_of=lambda stratum, local_rank: offsets[stratum] + local_rank,
        position_of=lambda rank: jnp.asarray(cell_major)[
            _searchsorted(cumsum_cell_major, rank)],
    )


def stratum_ids(mask: jax.Array, num_strata: int = 16, layout: str = "index",
                spatial_shape: tuple[int, ...] | None = None, *, spatial_rank: int = 2) -> jax.Array:
    """Stratum of every pixel of the flattened mask, in [0, G); non-candidates get G.

    The same grouping `sample` uses (same arguments), exposed for tests and variance studies.
    """
    rank = _grid_rank(layout, spatial_rank)
    cut = grid_cut(num_strata, rank)
    _check_choice("layout", layout, LAYOUTS)
    mask = jnp.asarray(mask)
    shape = _spatial_shape_for(mask.shape, layout, spatial_shape, cut, rank)
    _check_sizes(mask.size, 1, num_strata)
    flat_mask = mask.reshape(-1).astype(bool)
    if layout == "index":
        candidate_cumsum = jnp.cumsum(flat_mask, dtype=jnp.int32)
        grid = _IndexGrid.for_count(candidate_cumsum[-1], cut)
        ids = grid.stratum_of_rank(candidate_cumsum - 1)
    else:
        ids = jnp.asarray(_spatial_cells(shape, cut, rank)[0])
    return jnp.where(flat_mask, ids, num_strata).astype(jnp.int32)


def _proportional_quotas(counts: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """floor(n N_g / N) and its remainder n N_g - quota N (so the fraction is remainder / N).

    Exact in int32: the float32 estimate is off by at most one, and the remainder check
    n N_g - q N lies in (-N, 2N), which int32 wrap-around arithmetic gets right.
    """
    total = jnp.maximum(jnp.sum(counts), 1)
    estimate = jnp.floor(jnp.float32(n) * counts.astype(jnp.float32) / total.astype(jnp.float32))
    quota = estimate.astype(jnp.int32)
    remainder = n * counts - quota * total
    too_big, too_small = remainder < 0, remainder >= total
    quota = quota - too_big + too_small
    remainder = remainder + total * too_big - total * too_small
    return quota, remainder


def _slots_per_stratum(key: jax.Array, counts: jax.Array, n: int) -> jax.Array:
    """Proportional allocation of n slots with randomized rounding (see the module docstring).

    The leftover R = n - sum(quota) < G slots go to the strata hit by the points U + jN,
    j < R, U uniform in [0, N), on the line where stratum g owns an interval of length
    remainder_g < N: each is hit at most once, with probability remainder_g / N.
    """
    num_strata = counts.shape[0]
    total = jnp.maximum(jnp.sum(counts), 1)
    quota, remainder = _proportional_quotas(counts, n)
    leftover = n - jnp.sum(quota)
    start = jax.random.randint(key, (), 0, total)
    points = start + jnp.arange(num_strata, dtype=jnp.int32) * total
    hit = _searchsorted(jnp.cumsum(remainder), points)
    used = jnp.arange(num_strata) < leftover
    extra = jnp.zeros(num_strata + 1, jnp.int32).at[jnp.where(used, hit, num_strata)].add(1)
    return quota + extra[:num_strata]


def _stratified_slots(key: jax.Array, counts: jax.Array, n: int,
                      antithetic: bool) -> tuple[jax.Array, jax.Array]:
    """Stratum and within-stratum rank of each of n slots, laid out contiguously per stratum.

    Antithetic: within a stratum, the second slot of each pair takes the reflected rank
    N_g - 1 - k of the first; an odd leftover slot draws on its own.
    """
    allocation_key, rank_key = jax.random.split(key)
    slots = _slots_per_stratum(allocation_key, counts, n)
    slot_ends = jnp.cumsum(slots)
    slot = jnp.arange(n, dtype=jnp.int32)
    stratum = _searchsorted(slot_ends, slot).astype(jnp.int32)
    stratum_size = jnp.maximum(counts[stratum], 1)
    local_rank = jax.random.randint(rank_key, (n,), 0, stratum_size)
    if antithetic:
        position_in_stratum = slot - (slot_ends - slots)[stratum]
        reflected_previous = stratum_size - 1 - jnp.roll(local_rank, 1)
        local_rank = jnp.where(position_in_stratum % 2 == 1, reflected_previous, local_rank)
    return stratum, local_rank


def sample(key: jax.Array, mask: jax.Array, n: int, *, method: str, num_strata: int = 16,
           layout: str = "index", spatial_shape: tuple[int, ...] | None = None,
           spatial_rank: int = 2) -> tuple[jax.Array, jax.Array]:
    """Draw n candidate pixels with replacement.

    Args:
      key: a jax.random key.
      mask: boolean candidates, any static shape (non-bool is read as mask != 0).
      n: number of samples (static).
      method: 'uniform' (ReCo / ARCO-NS), 'sg' (stratified) or 'sag' (stratified antithetic).
      num_strata: G, a perfect square, or a perfect cube for 'spatial' with spatial_rank=3
        (see `strata_rule`); checked but otherwise ignored by 'uniform'.
      layout: 'index' (strata over candidate ranks, as the reference code) or 'spatial'
        (a grid over the image plane or volume, as the paper).
      spatial_shape: (..., H, W), or (..., D, H, W) with spatial_rank=3, for the 'spatial'
        layout; defaults to mask.shape.
      spatial_rank: how many trailing axes the 'spatial' grid cuts: 2 (images) or 3 (volumes).
        Accepted and ignored by 'index', so one setting can describe the data for both layouts.

    Returns:
      indices: (n,) int32 into mask.reshape(-1), all candidates when valid, else all 0.
      valid: bool scalar, whether the mask had at least one candidate (callers drop the
        class otherwise).
    """
    _check_choice("method", method, SAMPLERS)
    _check_choice("layout", layout, LAYOUTS)
    rank = _grid_rank(layout, spatial_rank)
    cut = grid_cut(num_strata, rank)
    mask = jnp.asarray(mask)
    shape = _spatial_shape_for(mask.shape, layout, spatial_shape, cut, rank)
    _check_sizes(mask.size, n, num_strata)

    flat_mask = mask.reshape(-1).astype(bool)
    candidate_cumsum = jnp.cumsum(flat_mask, dtype=jnp.int32)
    num_candidates = candidate_cumsum[-1]
    uniform_key, strata_key = jax.random.split(key)
    uniform_rank = jax.random.randint(uniform_key, (n,), 0, jnp.maximum(num_candidates, 1))

    if method == "uniform":
        positions = _searchsorted(candidate_cumsum, uniform_rank)
    else:
        if layout == "index":
            strata = _index_strata(candidate_cumsum, cut)
        else:
            strata = _spatial_strata(flat_mask, cut, shape, rank)
        stratum, local_rank = _stratified_slots(
            strata_key, strata.counts, n, antithetic=method == "sag")
        # Any order of the candidates makes a uniform rank a uniform candidate, so the
        # fallback can share the layout's rank -> position map.
        rank = jnp.where(num_candidates >= num_strata,
                         strata.rank_of(stratum, local_rank), uniform_rank)
        positions = strata.position_of(rank)

    valid = num_candidates > 0
    return jnp.where(valid, positions, 0).astype(jnp.int32), valid
