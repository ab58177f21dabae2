"""Tests for the uniform / SG / SAG pixel samplers."""
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arco_jax import sampling

STRATIFIED = ("sg", "sag")


SHAPE = (2, 16, 16)  # one mask shape, sample size and draw count for (almost) every
N = 48               # test, so that each sampler compiles once
NUM_DRAWS = 2000


@functools.lru_cache(maxsize=None)
def _draws_fn(n: int, method: str, layout: str, num_strata: int, spatial_rank: int | None = None):
    """jit(vmap over keys) of one sampler: many independent draws in a single call.

    spatial_rank=None leaves the keyword out, so the default call stays the one under test.
    """
    rank_kwargs = {} if spatial_rank is None else {"spatial_rank": spatial_rank}

    def draw(key, mask):
        return sampling.sample(key, mask, n, method=method, num_strata=num_strata, layout=layout,
                               **rank_kwargs)
    return jax.jit(jax.vmap(draw, in_axes=(0, None)))


def draws(mask, method, layout="index", n=N, seed=0, num_strata=16, spatial_rank=None):
    """(NUM_DRAWS, n) indices and (NUM_DRAWS,) valid flags."""
    keys = jax.random.split(jax.random.key(seed), NUM_DRAWS)
    indices, valid = _draws_fn(n, method, layout, num_strata, spatial_rank)(keys, jnp.asarray(mask))
    return np.asarray(indices), np.asarray(valid)


def slot_counts(ids: np.ndarray, indices: np.ndarray, num_strata: int = 16) -> np.ndarray:
    """(draws, strata) number of slots each draw gave each stratum."""
    return (ids[indices][..., None] == np.arange(num_strata)).sum(axis=1)


def random_mask(shape, density, seed):
    return np.random.default_rng(seed).random(shape) < density


def local_ranks(ids: np.ndarray, num_strata: int) -> np.ndarray:
    """Rank of each candidate among the candidates of its stratum, in flattened order."""
    ranks = np.full(ids.shape, -1)
    for g in range(num_strata):
        members = np.flatnonzero(ids == g)
        ranks[members] = np.arange(members.size)
    return ranks


def stratum_runs(slot_strata: np.ndarray):
    """(stratum, first slot, length) of each run; checks the runs are one per stratum."""
    change = np.flatnonzero(np.diff(slot_strata)) + 1
    starts = np.concatenate([[0], change])
    lengths = np.diff(np.concatenate([starts, [slot_strata.size]]))
    assert len(set(slot_strata[starts])) == starts.size, "slots not contiguous per stratum"
    return zip(slot_strata[starts], starts, lengths)


def reference_blocks(num_candidates: int, cut: int) -> np.ndarray:
    """Stratum of each candidate rank, built the way the reference slices its square."""
    edge = round(math.sqrt(num_candidates))
    block = edge // cut
    rows = max(edge, -(-num_candidates // edge))
    labels = np.empty((rows, edge), np.int64)
    for i in range(cut):
        row_slice = slice(i * block, None if i == cut - 1 else (i + 1) * block)
        for j in range(cut):
            col_slice = slice(j * block, None if j == cut - 1 else (j + 1) * block)
            labels[row_slice, col_slice] = i * cut + j
    return labels.reshape(-1)[:num_candidates]


@pytest.mark.parametrize("num_candidates", [16, 30, 43, 57, 4096, 5233])
def test_index_strata_are_the_reference_blocks(num_candidates):
    mask = np.zeros(6000, bool)
    mask[np.random.default_rng(num_candidates).choice(6000, num_candidates, replace=False)] = True
    ids = np.asarray(sampling.stratum_ids(mask, 16, "index"))
    assert np.all(ids[~mask] == 16)
    np.testing.assert_array_equal(ids[mask], reference_blocks(num_candidates, 4))


def test_spatial_strata_are_image_grid_cells():
    mask = random_mask((2, 12, 20), 0.6, seed=1)
    ids = np.asarray(sampling.stratum_ids(mask, 9, "spatial")).reshape(mask.shape)
    y, x = np.meshgrid(np.arange(12), np.arange(20), indexing="ij")
    cell = (y * 3 // 12) * 3 + x * 3 // 20
    np.testing.assert_array_equal(ids, np.where(mask, cell[None], 9))


def first_image_full() -> np.ndarray:
    """256 candidates: ranks equal positions, a 16x16 square cut into 16 blocks of 4x4."""
    mask = np.zeros(SHAPE, bool)
    mask[0] = True
    return mask


@pytest.mark.parametrize("method", STRATIFIED)
def test_equal_strata_get_equal_quotas(method):
    mask = first_image_full()
    ids = np.asarray(sampling.stratum_ids(mask))
    np.testing.assert_array_equal(slot_counts(ids, draws(mask, method)[0]), N // 16)
    per_stratum = slot_counts(ids, draws(mask, method, n=41)[0])
    assert set(per_stratum.ravel()) == {2, 3}
    np.testing.assert_array_equal(per_stratum.sum(axis=1), 41)


@pytest.mark.parametrize("layout,density", [
    ("index", 0.06),  # about 30 candidates: a 5x5 square of ranks plus a partial row
    ("index", 0.5),
    ("spatial", None),
])
def test_quotas_are_proportional_to_stratum_sizes(layout, density):
    if density is None:  # dense top-left corner, sparse elsewhere: very unequal cells
        mask = random_mask(SHAPE, 0.15, seed=2)
        mask[:, :7, :7] = True
    else:
        mask = random_mask(SHAPE, density, seed=3)
    ids = np.asarray(sampling.stratum_ids(mask, 16, layout))
    sizes = np.bincount(ids[mask.reshape(-1)], minlength=16)
    floor = N * sizes // sizes.sum()
    fraction = N * sizes / sizes.sum() - floor
    for method in STRATIFIED:
        extra = slot_counts(ids, draws(mask, method, layout)[0]) - floor
        assert set(extra.ravel()) <= {0, 1}
        # The leftover slots land in stratum g with probability frac(n N_g / N).
        np.testing.assert_allclose(extra.mean(axis=0), fraction, atol=0.05)


@pytest.mark.parametrize("layout", sampling.LAYOUTS)
def test_sag_pairs_are_reflections_within_a_stratum(layout):
    mask = random_mask(SHAPE, 0.7, seed=4)
    ids = np.asarray(sampling.stratum_ids(mask, 16, layout))
    ranks = local_ranks(ids, 16)
    sizes = np.bincount(ids[mask.reshape(-1)], minlength=16)
    odd_runs = 0
    for row in draws(mask, "sag", layout)[0][:50]:
        for g, start, length in stratum_runs(ids[row]):
            first, second = row[start:start + length - 1:2], row[start + 1:start + length:2]
            np.testing.assert_array_equal(ranks[first] + ranks[second], sizes[g] - 1)
            odd_runs += length % 2
    assert odd_runs > 0  # the unpaired leftover slot was exercised


def test_sag_index_reflection_is_the_reference_one_on_a_full_square():
    mask = first_image_full()
    ids = np.asarray(sampling.stratum_ids(mask))
    for row in draws(mask, "sag")[0][:50]:
        for g, start, length in stratum_runs(ids[row]):
            first, second = row[start:start + length - 1:2], row[start + 1:start + length:2]
            corner = (g // 4) * 4 * 16 + (g % 4) * 4
            twice_centre = corner + corner + 3 * 16 + 3  # first + last rank of the 4x4 block
            np.testing.assert_array_equal(first + second, twice_centre)


@pytest.mark.parametrize("layout", sampling.LAYOUTS)
@pytest.mark.parametrize("method", sampling.SAMPLERS)
def test_sample_mean_is_unbiased(method, layout):
    mask = random_mask(SHAPE, 0.6, seed=5)
    y, x = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    noise = np.random.default_rng(6).normal(size=SHAPE)
    values = (np.broadcast_to(np.sin(y / 3.0) + x / 4.0, SHAPE) + 0.3 * noise).reshape(-1)
    population_mean = values[mask.reshape(-1)].mean()
    indices, valid = draws(mask, method, layout, seed=7)
    assert valid.all()
    sample_means = values[indices].mean(axis=1)
    standard_error = sample_means.std() / np.sqrt(sample_means.size)
    assert abs(sample_means.mean() - population_mean) < 4 * standard_error


@pytest.mark.parametrize("layout", sampling.LAYOUTS)
def test_stratification_lowers_variance_on_spatial_structure(layout):
    mask = first_image_full()  # index blocks and spatial cells coincide on one full image
    y, x = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    values = np.broadcast_to(y + 0.5 * x, SHAPE).reshape(-1).astype(float)
    variance = {method: values[draws(mask, method, layout, seed=8)[0]].mean(axis=1).var()
                for method in sampling.SAMPLERS}
    assert variance["sg"] < 0.2 * variance["uniform"]
    assert variance["sag"] < 0.2 * variance["uniform"]


@pytest.mark.parametrize("layout", sampling.LAYOUTS)
@pytest.mark.parametrize("method", sampling.SAMPLERS)
def test_empty_mask_is_invalid_with_zero_indices(method, layout):
    indices, valid = draws(np.zeros(SHAPE, bool), method, layout)
    assert indices.dtype == np.int32 and indices.shape == (NUM_DRAWS, N)
    assert not valid.any()
    np.testing.assert_array_equal(indices, 0)


@pytest.mark.parametrize("layout", sampling.LAYOUTS)
@pytest.mark.parametrize("method", STRATIFIED)
def test_fewer_candidates_than_strata_falls_back_to_uniform(method, layout):
    mask = np.zeros(SHAPE, bool)
    chosen = [3, 40, 77, 300, 511]
    mask.reshape(-1)[chosen] = True
    indices, valid = draws(mask, method, layout)
    assert valid.all()
    np.testing.assert_allclose(np.bincount(indices.ravel(), minlength=512)[chosen] / indices.size,
                               0.2, atol=0.01)


@pytest.mark.parametrize("method", sampling.SAMPLERS)
def test_single_candidate_is_always_drawn(method):
    mask = np.zeros(SHAPE, bool)
    mask[1, 5, 2] = True
    for layout in sampling.LAYOUTS:
        indices, valid = draws(mask, method, layout)
        assert valid.all()
        np.testing.assert_array_equal(indices, 256 + 5 * 16 + 2)


@pytest.mark.parametrize("layout", sampling.LAYOUTS)
@pytest.mark.parametrize("method", sampling.SAMPLERS)
def test_indices_always_point_at_candidates(method, layout):
    for seed, density in enumerate([0.02, 0.1, 0.3, 0.9, 1.0]):
        mask = random_mask(SHAPE, density, seed=10 + seed)
        indices, valid = draws(mask, method, layout, seed=seed)
        assert valid.all()
        assert mask.reshape(-1)[indices].all()


def test_jit_and_vmap_over_classes():
    masks = jnp.asarray(np.stack([random_mask((2, 8, 8), 0.5, seed=20),
                                  np.zeros((2, 8, 8), bool),
                                  random_mask((2, 8, 8), 0.05, seed=21)]))
    keys = jax.random.split(jax.random.key(3), 3)
    per_class = jax.jit(functools.partial(sampling.sample, n=24, method="sag", num_strata=9,
                                          layout="spatial"))
    indices, valid = jax.jit(jax.vmap(per_class))(keys, masks)
    assert indices.shape == (3, 24) and valid.tolist() == [True, False, True]
    for c in range(3):
        expected, _ = per_class(keys[c], masks[c])
        np.testing.assert_array_equal(indices[c], expected)
        assert masks[c].reshape(-1)[expected].all() == bool(valid[c])


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="random"), "method"),
    (dict(method="sg", layout="grid"), "layout"),
    (dict(method="sg", num_strata=15), "perfect square"),
    (dict(method="sg", num_strata=0), "perfect square"),
    (dict(method="sg", layout="spatial", spatial_shape=(3, 8)), "holds"),
    (dict(method="sg", spatial_shape=(2, 8, 8)), "only used by layout='spatial'"),
    (dict(method="sg", layout="spatial", num_strata=100), "does not fit"),
    (dict(method="uniform", n=0), "n \\(samples"),
])
def test_bad_arguments_raise(kwargs, message):
    kwargs = {"n": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        sampling.sample(jax.random.key(0), jnp.ones((2, 8, 8), bool), **kwargs)


# --- 3-D volumes: layout='spatial' with spatial_rank=3 -------------------------------------------

VOLUME = (2, 5, 7, 9)  # batch x D x H x W, every axis a different size so the cells are uneven


def reference_volume_cells(shape, cut: int) -> np.ndarray:
    """Cell of every voxel of a (D, H, W) volume: floor(i * cut / size) per axis, raster-numbered."""
    d, h, w = np.meshgrid(*(np.arange(size) for size in shape), indexing="ij")
    per_axis = [np.floor(i * cut / size).astype(int) for i, size in zip((d, h, w), shape)]
    return (per_axis[0] * cut + per_axis[1]) * cut + per_axis[2]


@pytest.mark.parametrize("num_strata", [8, 27])
def test_volume_strata_are_volume_grid_cells(num_strata):
    mask = random_mask(VOLUME, 0.6, seed=30)
    cut = round(num_strata ** (1 / 3))
    expected = np.where(mask, reference_volume_cells(VOLUME[1:], cut)[None], num_strata)
    ids = np.asarray(sampling.stratum_ids(mask, num_strata, "spatial", spatial_rank=3))
    np.testing.assert_array_equal(ids.reshape(VOLUME), expected)
    from_flat = sampling.stratum_ids(mask.reshape(-1), num_strata, "spatial", spatial_shape=VOLUME, spatial_rank=3)
    np.testing.assert_array_equal(from_flat, ids)


def uneven_volume_mask() -> np.ndarray:
    """Dense front-top-left corner, sparse elsewhere: 8 cells of very different sizes."""
    mask = random_mask(VOLUME, 0.15, seed=31)
    mask[:, :3, :4, :4] = True
    return mask


@pytest.mark.parametrize("method", STRATIFIED)
def test_volume_quotas_are_proportional_and_draw_candidates(method):
    mask = uneven_volume_mask()
    ids = np.asarray(sampling.stratum_ids(mask, 8, "spatial", spatial_rank=3))
    sizes = np.bincount(ids[mask.reshape(-1)], minlength=8)
    share = N * sizes / sizes.sum()
    indices, valid = draws(mask, method, "spatial", num_strata=8, spatial_rank=3)
    assert valid.all() and mask.reshape(-1)[indices].all()
    per_stratum = slot_counts(ids, indices, 8)
    assert np.all(per_stratum >= np.floor(share)) and np.all(per_stratum <= np.ceil(share))
    np.testing.assert_allclose((per_stratum - np.floor(share)).mean(axis=0), share - np.floor(share), atol=0.05)
    if method == "sag":
        ranks = local_ranks(ids, 8)
        for row in indices[:50]:
            for g, start, length in stratum_runs(ids[row]):
                first, second = row[start:start + length - 1:2], row[start + 1:start + length:2]
                np.testing.assert_array_equal(ranks[first] + ranks[second], sizes[g] - 1)


@pytest.mark.parametrize("method", STRATIFIED)
def test_volume_sparse_masks(method):
    empty_indices, empty_valid = draws(np.zeros(VOLUME, bool), method, "spatial", num_strata=8, spatial_rank=3)
    assert not empty_valid.any() and not empty_indices.any()
    few = np.zeros(VOLUME, bool)
    few.reshape(-1)[[5, 100, 333]] = True  # fewer candidates than strata: uniform fallback
    indices, valid = draws(few, method, "spatial", num_strata=8, spatial_rank=3)
    assert valid.all() and few.reshape(-1)[indices].all()
    np.testing.assert_allclose(np.bincount(indices.ravel())[[5, 100, 333]] / indices.size, 1 / 3, atol=0.01)


def test_jit_and_vmap_over_classes_in_3d():
    shape = (2, 4, 6, 6)
    masks = jnp.asarray(np.stack([random_mask(shape, 0.5, seed=32), np.zeros(shape, bool),
                                  random_mask(shape, 0.05, seed=33)]))
    keys = jax.random.split(jax.random.key(4), 3)
    per_class = jax.jit(functools.partial(sampling.sample, n=24, method="sg", num_strata=8,
                                          layout="spatial", spatial_rank=3))
    indices, valid = jax.jit(jax.vmap(per_class))(keys, masks)
    assert indices.shape == (3, 24) and valid.tolist() == [True, False, True]
    for c in range(3):
        expected, _ = per_class(keys[c], masks[c])
        np.testing.assert_array_equal(indices[c], expected)
        assert masks[c].reshape(-1)[expected].all() == bool(valid[c])


@pytest.mark.parametrize("layout", sampling.LAYOUTS)
@pytest.mark.parametrize("method", sampling.SAMPLERS)
def test_explicit_rank_2_is_the_default(method, layout):
    mask = random_mask(SHAPE, 0.4, seed=34)
    default, explicit = draws(mask, method, layout, seed=9), draws(mask, method, layout, seed=9, spatial_rank=2)
    np.testing.assert_array_equal(default[0], explicit[0])
    np.testing.assert_array_equal(sampling.stratum_ids(mask, 16, layout),
                                  sampling.stratum_ids(mask, 16, layout, spatial_rank=2))


def test_index_layout_ignores_spatial_rank():
    mask = random_mask(SHAPE, 0.5, seed=35)  # 16 strata, not a cube: 'index' still cuts a square
    np.testing.assert_array_equal(sampling.stratum_ids(mask, 16, "index", spatial_rank=3),
                                  sampling.stratum_ids(mask, 16, "index"))
    np.testing.assert_array_equal(draws(mask, "sag", seed=5, spatial_rank=3)[0], draws(mask, "sag", seed=5)[0])


def test_grid_cut_and_strata_rules():
    assert [sampling.grid_cut(g) for g in (1, 9, 16)] == [1, 3, 4]
    assert [sampling.grid_cut(g, rank=3) for g in (1, 8, 27, 64)] == [1, 2, 3, 4]
    assert sampling.grid_cut((10**12) ** 3, rank=3) == 10**12
    for bad in (16, 9, 26, (10**12) ** 3 + 1):
        with pytest.raises(ValueError, match="perfect cube"):
            sampling.grid_cut(bad, rank=3)
    with pytest.raises(ValueError, match="rank must be 2"):
        sampling.grid_cut(16, rank=4)
    square = sampling.strata_rule("index")
    assert "square" in square and square == sampling.strata_rule("index", 3) == sampling.strata_rule("spatial", 2)
    assert "cube" in sampling.strata_rule("spatial", 3)
    assert sampling.check_num_strata(16, "index", 3) == 4 and sampling.check_num_strata(27, "spatial", 3) == 3
    with pytest.raises(ValueError, match=f"must be {re.escape(sampling.strata_rule('spatial', 3))}; got 16"):
        sampling.check_num_strata(16, "spatial", 3)
    with pytest.raises(ValueError, match="layout"):
        sampling.check_num_strata(16, "grid", 2)
    with pytest.raises(ValueError, match="spatial_rank must be 2"):
        sampling.check_num_strata(16, "index", 1)


@pytest.mark.parametrize("shape,kwargs,message", [
    (VOLUME, dict(num_strata=16), "perfect cube .*got 16"),
    (VOLUME, dict(num_strata=9), "perfect cube .*got 9"),
    ((2, 2, 8, 8), dict(num_strata=27), "3x3x3 grid of strata does not fit a volume of 2x8x8 voxels"),
    ((8, 8), dict(num_strata=8), "needs a mask of shape \\(\\.\\.\\., D, H, W\\)"),
    (VOLUME, dict(num_strata=8, spatial_shape=(3, 5, 7, 9)), "holds"),
    (VOLUME, dict(num_strata=8, spatial_rank=4), "spatial_rank must be 2"),
    (VOLUME, dict(num_strata=8, spatial_rank=True), "spatial_rank must be 2"),
])
def test_bad_volume_arguments_raise(shape, kwargs, message):
    kwargs = {"layout": "spatial", "spatial_rank": 3, **kwargs}
    for call in (lambda: sampling.sample(jax.random.key(0), jnp.ones(shape, bool), 4, method="sg", **kwargs),
                 lambda: sampling.stratum_ids(jnp.ones(shape, bool), **kwargs)):
        with pytest.raises(ValueError, match=message):
            call()
