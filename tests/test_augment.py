"""Tests for the on-device strong augmentation and the equivariance warps (tiny images)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage as scipy_ndimage

from arco_jax import augment

B, H, W = 4, 32, 40


def _batch(key=0, batch=B, height=H, width=W):
    k_img, k_lab, k_conf = jax.random.split(jax.random.PRNGKey(key), 3)
    images = jax.random.uniform(k_img, (batch, height, width, 1))
    labels = jax.random.randint(k_lab, (batch, height, width), 0, 4)
    confidences = jax.random.uniform(k_conf, (batch, height, width))
    return images, labels, confidences


_STRONG = {warp_labels: jax.jit(functools.partial(augment.strong_augment,
                                                 warp_labels=warp_labels, warp_prob=1.0))
           for warp_labels in (False, True)}


def _blob_labels(batch=B, height=H, width=W):
    """Concentric rings 0..3, so most pixels lie well inside a region."""
    rows, cols = np.mgrid[:height, :width]
    radius = np.hypot(rows - height / 2, cols - width / 2)
    rings = np.clip((radius / 5).astype(np.int32), 0, 3)
    return jnp.asarray(np.broadcast_to(rings, (batch, height, width)).copy())


# ----------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("warp_labels", [False, True])
def test_strong_augment_is_a_function_of_the_key(warp_labels):
    images, labels, confidences = _batch()
    run = _STRONG[warp_labels]
    first = run(jax.random.PRNGKey(7), images, labels, confidences)
    again = run(jax.random.PRNGKey(7), images, labels, confidences)
    other = run(jax.random.PRNGKey(8), images, labels, confidences)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])
    assert first[0].shape == images.shape and first[0].dtype == images.dtype
    assert first[1].shape == labels.shape and first[1].dtype == labels.dtype
    assert first[2].shape == confidences.shape


def test_strong_augment_without_label_warp_keeps_the_cutmix_labels():
    images, labels, confidences = _batch()
    key = jax.random.PRNGKey(3)
    out = _STRONG[False](key, images, labels, confidences)
    _, mixed_labels, mixed_conf = augment.cutmix(key, images, labels, confidences)  # CutMix takes the key itself
    np.testing.assert_array_equal(out[1], mixed_labels)
    np.testing.assert_array_equal(out[2], mixed_conf)
    assert bool(jnp.all(jnp.isfinite(out[0])))


# ----------------------------------------------------------------------------- cutmix

def test_cutmix_pastes_the_partner_rectangle_into_all_three_arrays():
    batch = 5
    index = jnp.arange(batch)
    # every pixel says which sample it came from, in all three arrays
    images = jnp.broadcast_to(index[:, None, None, None] * 1.0, (batch, H, W, 1))
    labels = jnp.broadcast_to(index[:, None, None], (batch, H, W)).astype(jnp.int32)
    confidences = jnp.broadcast_to(index[:, None, None] / 10.0, (batch, H, W))
    key = jax.random.PRNGKey(11)
    out_images, out_labels, out_conf = jax.jit(augment.cutmix)(key, images, labels,
                                                               confidences)
    pasted = np.asarray(augment.cutmix_mask(key, batch, H, W))
    expected = np.where(pasted, (np.arange(batch)[:, None, None] + 1) % batch,
                        np.arange(batch)[:, None, None])
    np.testing.assert_array_equal(out_images[..., 0], expected)
    np.testing.assert_array_equal(out_labels, expected)
    np.testing.assert_allclose(out_conf, expected / 10.0, rtol=1e-6)


@pytest.mark.parametrize("height,width", [(32, 40), (33, 31), (64, 64)])
def test_cutmix_mask_is_a_rectangle_of_half_the_area(height, width):
    masks = np.asarray(jax.jit(augment.cutmix_mask, static_argnums=(1, 2, 3))(
        jax.random.PRNGKey(5), 64, height, width))
    widths = []
    for mask in masks:
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        box_h, box_w = len(rows), len(cols)
        assert mask.sum() == box_h * box_w  # one solid rectangle
        assert rows[-1] - rows[0] + 1 == box_h and cols[-1] - cols[0] + 1 == box_w
        assert width / 2 < box_w < width
        assert abs(box_h * box_w - height * width / 2) <= box_w / 2
        widths.append(box_w)
    assert len(set(widths)) > 3  # widths and positions actually vary


# ----------------------------------------------------------------------------- intensity

def test_intensity_jitter_is_brightness_times_contrast_about_the_mean():
    # values in [0.2, 0.6] never reach the clip for factors in [0.75, 1.25]
    ramp = jnp.linspace(0.2, 0.6, H * W).reshape(1, H, W, 1)
    images = jnp.broadcast_to(ramp, (16, H, W, 1))
    out = jax.jit(functools.partial(augment.intensity_jitter, p=1.0))(
        jax.random.PRNGKey(2), images)
    for x, y in zip(np.asarray(images).reshape(16, -1), np.asarray(out).reshape(16, -1)):
        slope, intercept = np.polyfit(x, y, 1)
        np.testing.assert_allclose(y, slope * x + intercept, atol=1e-5)
        assert 0.75 ** 2 - 1e-4 <= slope <= 1.25 ** 2 + 1e-4
        assert 0.75 - 1e-4 <= y.mean() / x.mean() <= 1.25 + 1e-4  # contrast keeps the mean
    assert len({round(float(v), 4) for v in np.asarray(out).std(axis=(1, 2, 3))}) > 8


def test_intensity_jitter_applies_to_about_half_and_stays_in_range():
    images, _, _ = _batch(batch=200, height=8, width=8)
    out = jax.jit(augment.intensity_jitter)(jax.random.PRNGKey(4), images)
    changed = np.any(np.asarray(out) != np.asarray(images), axis=(1, 2, 3))
    assert 0.35 < changed.mean() < 0.65
    assert bool(jnp.all(jnp.isfinite(out))) and float(out.min()) >= 0 and float(out.max()) <= 1
    np.testing.assert_array_equal(
        jax.jit(functools.partial(augment.intensity_jitter, p=0.0))(
            jax.random.PRNGKey(4), images), images)


def test_intensity_jitter_of_z_scored_volumes_is_unclipped():
    """value_range=None (z-scored data): the same linear jitter, negative and large values kept,
    where the [0, 1] clip of min-max data would flatten most of a z-scored volume."""
    volumes = jax.random.normal(jax.random.PRNGKey(5), (8, 4, 6, 6, 1)) * 2.0
    key = jax.random.PRNGKey(6)
    unclipped = augment.intensity_jitter(key, volumes, p=1.0, value_range=None)
    clipped = augment.intensity_jitter(key, volumes, p=1.0)
    assert float(unclipped.min()) < -1 and float(unclipped.max()) > 2
    assert float(clipped.min()) >= 0 and float(clipped.max()) <= 1
    for x, y in zip(np.asarray(volumes).reshape(8, -1), np.asarray(unclipped).reshape(8, -1)):
        slope, intercept = np.polyfit(x, y, 1)
        np.testing.assert_allclose(y, slope * x + intercept, atol=1e-4)
        assert 0.75 ** 2 - 1e-4 <= slope <= 1.25 ** 2 + 1e-4


# ----------------------------------------------------------------------------- blur

@pytest.mark.parametrize("sigma", [0.15, 0.6, 1.15])
def test_gaussian_blur_matches_scipy_with_edge_padding(sigma):
    images, _, _ = _batch()
    blur = jax.jit(functools.partial(augment.gaussian_blur, p=1.0))
    ours = blur(jax.random.PRNGKey(0), images, sigma_range=(sigma, sigma))
    for b in range(B):
        reference = scipy_ndimage.gaussian_filter(
            np.asarray(images[b, ..., 0], np.float64), sigma, mode="nearest",
            truncate=4.0 / sigma)  # a radius of 4 pixels, as the 9-tap kernel
        np.testing.assert_allclose(ours[b, ..., 0], reference, atol=1e-5)


def test_gaussian_blur_keeps_constants_and_the_mean_and_smooths():
    blur = jax.jit(functools.partial(augment.gaussian_blur, p=1.0))
    constant = jnp.full((B, H, W, 1), 0.37)
    np.testing.assert_allclose(blur(jax.random.PRNGKey(0), constant), constant, atol=1e-6)
    images, _, _ = _batch()
    out = blur(jax.random.PRNGKey(1), images)
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), images.mean(axis=(1, 2, 3)),
                               atol=5e-3)
    assert bool(jnp.all(out.std(axis=(1, 2, 3)) < images.std(axis=(1, 2, 3))))
    assert bool(jnp.all(jnp.isfinite(out))) and float(out.min()) >= 0 and float(out.max()) <= 1


def test_gaussian_blur_applies_to_about_half():
    images, _, _ = _batch(batch=200, height=8, width=8)
    out = jax.jit(augment.gaussian_blur)(jax.random.PRNGKey(9), images)
    changed = np.any(np.asarray(out) != np.asarray(images), axis=(1, 2, 3))
    assert 0.35 < changed.mean() < 0.65


# ----------------------------------------------------------------------------- smooth warp

def test_smooth_warp_with_zero_magnitude_is_the_identity():
    images, labels, confidences = _batch()
    out = jax.jit(functools.partial(augment.smooth_warp, p=1.0, magnitude=0.0))(
        jax.random.PRNGKey(0), images, labels, confidences)
    np.testing.assert_allclose(out[0], images, atol=1e-6)
    np.testing.assert_array_equal(out[1], labels)
    np.testing.assert_array_equal(out[2], confidences)


def test_smooth_warp_with_p_zero_returns_its_inputs_and_passes_none_through():
    images, _, _ = _batch()
    out = jax.jit(functools.partial(augment.smooth_warp, p=0.0))(jax.random.PRNGKey(0), images)
    np.testing.assert_array_equal(out[0], images)
    assert out[1] is None and out[2] is None


def test_smooth_warp_moves_image_and_labels_together():
    labels = _blob_labels()
    one_hot = jax.nn.one_hot(labels, 4)  # labels as a 4-channel float image
    confidences = labels / 10.0
    warp = jax.jit(functools.partial(augment.smooth_warp, p=1.0, magnitude=4.0))
    key = jax.random.PRNGKey(21)
    warped_one_hot, warped_labels, warped_conf = warp(key, one_hot, labels, confidences)
    assert set(np.unique(warped_labels)) <= set(np.unique(labels))
    assert float(jnp.mean(warped_labels != labels)) > 0.02  # the warp did move things
    agreement = jnp.mean(jnp.argmax(warped_one_hot, -1) == warped_labels)
    assert float(agreement) > 0.97
    # nearest sampling keeps each confidence with its own label
    np.testing.assert_allclose(warped_conf, warped_labels / 10.0, rtol=1e-6)


def test_smooth_displacement_is_small_smooth_and_invertible():
    field = jax.jit(augment.smooth_displacement, static_argnums=(1, 2, 3),
                    static_argnames=("grid_spacing",))
    default = field(jax.random.PRNGKey(1), 2, 64, 64)
    assert 0.1 < float(jnp.sqrt(jnp.mean(default ** 2))) < 4.0  # a few pixels at most
    strong = np.asarray(field(jax.random.PRNGKey(1), 2, 64, 64, magnitude=8.0))
    d_row_d_row, d_row_d_col = np.gradient(strong[..., 0], axis=(1, 2))
    d_col_d_row, d_col_d_col = np.gradient(strong[..., 1], axis=(1, 2))
    jacobian = (1 + d_row_d_row) * (1 + d_col_d_col) - d_row_d_col * d_col_d_row
    assert np.abs(strong).max() > 2.0  # large enough for folding to be possible
    assert jacobian.min() > 0  # scaling and squaring keeps the map invertible


# ----------------------------------------------------------------------------- affine warps

def _identity(batch=B):
    return jnp.broadcast_to(jnp.array([[1.0, 0, 0], [0, 1, 0]]), (batch, 2, 3))


def test_warp_affine_identity_mirror_and_rotation():
    images, labels, _ = _batch(height=H, width=H)
    warp_bilinear = jax.jit(functools.partial(augment.warp_affine, order=1))
    warp_nearest = jax.jit(functools.partial(augment.warp_affine, order=0))
    np.testing.assert_allclose(warp_bilinear(images, _identity()), images, atol=1e-5)
    np.testing.assert_array_equal(warp_nearest(labels, _identity()), labels)

    mirror = jnp.broadcast_to(jnp.array([[-1.0, 0, 0], [0, 1, 0]]), (B, 2, 3))
    mirrored = warp_bilinear(images, mirror)
    np.testing.assert_allclose(mirrored, images[:, :, ::-1], atol=1e-5)
    np.testing.assert_allclose(warp_bilinear(mirrored, mirror), images, atol=1e-5)
    np.testing.assert_array_equal(warp_nearest(warp_nearest(labels, mirror), mirror), labels)

    quarter_turn = jnp.broadcast_to(jnp.array([[0.0, -1, 0], [1, 0, 0]]), (B, 2, 3))
    np.testing.assert_allclose(warp_bilinear(images, quarter_turn),
                               np.rot90(np.asarray(images), axes=(1, 2)), atol=1e-5)


def test_warp_affine_pads_outside_with_cval():
    images = jnp.ones((B, H, W, 3))
    zoom_out = jnp.broadcast_to(jnp.array([[2.0, 0, 0], [0, 2, 0]]), (B, 2, 3))
    out = np.asarray(augment.warp_affine(images, zoom_out, order=1))
    rows, cols = np.mgrid[:H, :W]
    x, y = 2 * (2 * cols / (W - 1) - 1), 2 * (2 * rows / (H - 1) - 1)
    well_outside = (np.abs(x) > 1.2) | (np.abs(y) > 1.2)
    well_inside = (np.abs(x) < 0.9) & (np.abs(y) < 0.9)
    assert np.all(out[:, well_outside] == 0) and np.allclose(out[:, well_inside], 1)
    labels = jnp.ones((B, H, W), jnp.int32)
    warped = np.asarray(augment.warp_affine(labels, zoom_out, order=0, cval=-1))
    assert np.all(warped[:, well_outside] == -1) and np.all(warped[:, well_inside] == 1)


def test_resample_bilinear_blends_corners_with_zero_outside():
    x = jnp.arange(12.0).reshape(1, 3, 4)
    coords = jnp.array([[[[0.5, 0.5], [1.0, 2.0], [-0.5, 0.0], [1.0, 3.25]]]])
    out = augment.resample(x, coords, order=1)
    np.testing.assert_allclose(out[0, 0], [(0 + 1 + 4 + 5) / 4, 6.0, 0.5 * 0, 0.75 * 7],
                               atol=1e-6)


def test_random_similarity_draws_scaled_rotations_with_mirrors():
    matrices = np.asarray(jax.jit(augment.random_similarity, static_argnums=1)(
        jax.random.PRNGKey(0), 256))
    linear = matrices[:, :, :2]
    det = np.linalg.det(linear)
    scale = np.sqrt(np.abs(det))
    assert np.all(scale >= 1 / 1.2 - 1e-5) and np.all(scale <= 1 / 0.8 + 1e-5)
    # a scaled rotation (or its mirror): orthogonal columns of equal length
    np.testing.assert_allclose(np.einsum("bij,bik->bjk", linear, linear),
                               scale[:, None, None] ** 2 * np.eye(2), atol=1e-5)
    assert 0.3 < np.mean(det < 0) < 0.7
    assert np.all(np.abs(matrices[:, :, 2]) <= 0.1 + 1e-6)
    angles = np.degrees(np.arctan2(linear[:, 1, 0], linear[:, 1, 1]))
    assert np.all(np.abs(angles) <= 60 + 1e-3) and np.abs(angles).max() > 45
    unmirrored = augment.random_similarity(jax.random.PRNGKey(0), 64, mirror=False)
    assert np.all(np.linalg.det(np.asarray(unmirrored)[:, :, :2]) > 0)


# ----------------------------------------------------------------------------- bad input

def test_mismatched_shapes_are_reported():
    images, labels, confidences = _batch()
    with pytest.raises(ValueError, match="labels shape"):
        augment.cutmix(jax.random.PRNGKey(0), images, labels[:, :-1], confidences)
    with pytest.raises(ValueError, match="images of shape"):
        augment.gaussian_blur(jax.random.PRNGKey(0), images[..., 0])
    with pytest.raises(ValueError, match="matrices"):
        augment.warp_affine(images, jnp.zeros((B, 3, 3)), order=1)
    with pytest.raises(ValueError, match="order"):
        augment.resample(images, jnp.zeros((B, H, W, 2)), order=3)


# ----------------------------------------------------------------------------- 3-D volumes, channels, shapes

D3, H3, W3 = 6, 10, 12


def _volume(key=0, batch=2, channels=2):
    k_img, k_lab, k_conf = jax.random.split(jax.random.PRNGKey(key), 3)
    images = jax.random.uniform(k_img, (batch, D3, H3, W3, channels))
    labels = jax.random.randint(k_lab, (batch, D3, H3, W3), 0, 4)
    confidences = jax.random.uniform(k_conf, (batch, D3, H3, W3))
    return images, labels, confidences


def _in_plane(planar):
    """(B, 3, 4) matrices that apply the (B, 2, 3) `planar` to every depth slice."""
    batch = planar.shape[0]
    top = jnp.concatenate([planar[:, :, :2], jnp.zeros((batch, 2, 1)), planar[:, :, 2:]], axis=2)
    return jnp.concatenate([top, jnp.broadcast_to(jnp.array([[[0.0, 0, 1, 0]]]), (batch, 1, 4))], 1)


@jax.jit
def _warp_both_orders(images, labels, matrices):
    """(images linear, images nearest, labels nearest with cval -1): one compile per test."""
    return (augment.warp_affine(images, matrices, order=1), augment.warp_affine(images, matrices, order=0),
            augment.warp_affine(labels, matrices, order=0, cval=-1))


def test_warp_affine_3d_identity_returns_the_input():
    images, labels, _ = _volume()
    linear, nearest, nearest_labels = _warp_both_orders(images, labels, jnp.broadcast_to(jnp.eye(3, 4), (2, 3, 4)))
    np.testing.assert_allclose(linear, images, atol=1e-5)
    np.testing.assert_array_equal(nearest, images)
    np.testing.assert_array_equal(nearest_labels, labels)


def test_warp_affine_3d_integer_translation_is_a_shift():
    images, labels, _ = _volume()
    shift = (1, -2, 3)  # (depth, row, col) voxels: output[p] = input[p + shift], outside -> cval
    matrix = np.eye(3, 4, dtype=np.float32)
    for row, (voxels, size) in enumerate(zip(shift[::-1], (W3, H3, D3))):  # rows are x, y, z
        matrix[row, 3] = 2 * voxels / (size - 1)
    matrices = jnp.broadcast_to(jnp.asarray(matrix), (2, 3, 4))

    def shifted(x, fill):
        expected = np.full_like(np.asarray(x), fill)
        source = tuple(slice(max(s, 0), n + min(s, 0)) for s, n in zip(shift, (D3, H3, W3)))
        target = tuple(slice(max(-s, 0), n - max(s, 0)) for s, n in zip(shift, (D3, H3, W3)))
        expected[(slice(None),) + target] = np.asarray(x)[(slice(None),) + source]
        return expected

    linear, nearest, nearest_labels = _warp_both_orders(images, labels, matrices)
    np.testing.assert_array_equal(nearest_labels, shifted(labels, -1))
    np.testing.assert_array_equal(nearest, shifted(images, 0))
    np.testing.assert_allclose(linear, shifted(images, 0), atol=1e-5)


def test_warp_affine_3d_in_plane_rotation_is_the_2d_warp_of_every_slice():
    images, labels, _ = _volume(channels=3)
    planar = augment.random_similarity(jax.random.PRNGKey(3), 2)
    volumetric = _in_plane(planar)
    per_slice = functools.partial(jax.vmap, in_axes=1, out_axes=1)

    @jax.jit
    def volume_and_slices(images, labels):
        return (augment.warp_affine(images, volumetric, order=1), augment.warp_affine(labels, volumetric, order=0),
                per_slice(lambda s: augment.warp_affine(s, planar, order=1))(images),
                per_slice(lambda s: augment.warp_affine(s, planar, order=0))(labels))

    warped_images, warped_labels, slice_images, slice_labels = volume_and_slices(images, labels)
    np.testing.assert_allclose(warped_images, slice_images, atol=1e-5)
    np.testing.assert_array_equal(warped_labels, slice_labels)


def test_random_similarity_3d_is_the_2d_similarity_in_plane_with_an_isotropic_scale():
    key = jax.random.PRNGKey(0)
    planar = np.asarray(augment.random_similarity(key, 64))
    volumetric = np.asarray(augment.random_similarity(key, 64, spatial_rank=3))
    assert volumetric.shape == (64, 3, 4)
    np.testing.assert_array_equal(volumetric[:, :2, [0, 1, 3]], planar)  # same key, same plane
    assert np.all(volumetric[:, :2, 2] == 0) and np.all(volumetric[:, 2, :2] == 0)  # no tilt
    np.testing.assert_allclose(volumetric[:, 2, 2], np.sqrt(np.abs(np.linalg.det(planar[:, :, :2]))),
                               rtol=1e-5)
    depth_shift = volumetric[:, 2, 3]
    assert np.all(np.abs(depth_shift) <= 0.1 + 1e-6) and depth_shift.std() > 0.03


@pytest.mark.parametrize("shape", [(D3, H3, W3), (5, 7, 9), (2, 3, 3), (80, 16, 16)])
def test_cutmix_mask_3d_is_the_reference_slab(shape):
    """The reference's generate_cutout_mask_3d: the 2-D box of half the plane over a slab of
    round(D/8) slices (10 of 80) starting in [0, D - 2 slab]."""
    depth, height, width = shape
    masks = np.asarray(jax.jit(augment.cutmix_mask, static_argnums=(1, 2, 3, 4))(
        jax.random.PRNGKey(5), 64, *shape))
    assert masks.shape == (64,) + shape
    slab = augment.cutmix_slab(depth)
    assert slab == {80: 10, 2: 1, 5: 1}.get(depth, slab)
    sides = []
    for mask in masks:
        extents = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
                   for axis in range(3)]
        box_d, box_h, box_w = (len(e) for e in extents)
        assert mask.sum() == box_d * box_h * box_w  # one solid box
        assert all(e[-1] - e[0] + 1 == len(e) for e in extents)
        assert width / 2 < box_w < width and box_h == round(height * width / 2 / box_w) and box_d == slab
        assert 0 <= extents[0][0] <= depth - 2 * slab
        sides.append((box_h, box_w, extents[0][0], extents[1][0], extents[2][0]))
    if shape != (2, 3, 3):
        assert len(set(sides)) > 8  # sizes and positions actually vary
    if depth == 80:
        assert {s[2] for s in sides} <= set(range(61)) and max(s[2] for s in sides) > 40


def test_cutmix_3d_pastes_the_partner_box_into_all_three_arrays():
    batch = 3
    index = jnp.arange(batch)
    images = jnp.broadcast_to(index[:, None, None, None, None] * 1.0, (batch, D3, H3, W3, 2))
    labels = jnp.broadcast_to(index[:, None, None, None], (batch, D3, H3, W3)).astype(jnp.int32)
    confidences = labels / 10.0
    key = jax.random.PRNGKey(11)
    out_images, out_labels, out_conf = jax.jit(augment.cutmix)(key, images, labels, confidences)
    pasted = np.asarray(augment.cutmix_mask(key, batch, D3, H3, W3))
    owner = np.arange(batch)[:, None, None, None]
    expected = np.where(pasted, (owner + 1) % batch, owner)
    assert 0 < pasted.mean() < 1
    np.testing.assert_array_equal(out_images, np.repeat(expected[..., None], 2, axis=-1))
    np.testing.assert_array_equal(out_labels, expected)
    np.testing.assert_allclose(out_conf, expected / 10.0, rtol=1e-6)


_BLUR_ALWAYS = jax.jit(functools.partial(augment.gaussian_blur, p=1.0))  # sigma_range traced: one compile


@pytest.mark.parametrize("sigma", [0.3, 1.15])
def test_gaussian_blur_3d_is_separable_over_depth_height_width(sigma):
    images, _, _ = _volume(channels=3)
    ours = np.asarray(_BLUR_ALWAYS(jax.random.PRNGKey(0), images, sigma_range=(sigma, sigma)))
    for b in range(images.shape[0]):
        for c in range(images.shape[-1]):
            reference = scipy_ndimage.gaussian_filter(  # sequential 1-D filters along D, H, W
                np.asarray(images[b, ..., c], np.float64), sigma, mode="nearest", truncate=4.0 / sigma)
            np.testing.assert_allclose(ours[b, ..., c], reference, atol=1e-5)
    constant = jnp.full(images.shape, 0.37)
    np.testing.assert_allclose(_BLUR_ALWAYS(jax.random.PRNGKey(1), constant, sigma_range=(sigma, sigma)), constant,
                               atol=1e-6)


def test_intensity_jitter_3d_scales_all_channels_of_a_sample_alike():
    ramp = jnp.linspace(0.2, 0.6, D3 * H3 * W3 * 3).reshape(1, D3, H3, W3, 3)
    images = jnp.broadcast_to(ramp, (8,) + ramp.shape[1:])
    out = augment.intensity_jitter(jax.random.PRNGKey(2), images, p=1.0)
    for x, y in zip(np.asarray(images).reshape(8, -1), np.asarray(out).reshape(8, -1)):
        slope, intercept = np.polyfit(x, y, 1)
        np.testing.assert_allclose(y, slope * x + intercept, atol=1e-5)


def test_smooth_displacement_3d_is_a_small_invertible_three_component_field():
    field = jax.jit(augment.smooth_displacement, static_argnums=(1, 2, 3, 4),
                    static_argnames=("grid_spacing",))
    field = np.asarray(field(jax.random.PRNGKey(1), 2, 8, 16, 16, magnitude=6.0, grid_spacing=(2, 4, 4)))
    assert field.shape == (2, 8, 16, 16, 3) and np.abs(field).max() > 1.0
    assert all(np.abs(field[..., axis]).max() > 0.2 for axis in range(3))  # depth moves too
    gradient = np.stack([np.stack(np.gradient(field[..., i], axis=(1, 2, 3)), -1) for i in range(3)], -2)
    assert np.linalg.det(np.eye(3) + gradient).min() > 0
    images, labels, confidences = _volume()
    out = jax.jit(functools.partial(augment.smooth_warp, p=1.0, magnitude=0.0))(
        jax.random.PRNGKey(0), images, labels, confidences)
    np.testing.assert_allclose(out[0], images, atol=1e-6)
    np.testing.assert_array_equal(out[1], labels)


@pytest.mark.parametrize("spatial", [(10, 14), (D3, H3, W3)])
def test_every_channel_gets_the_same_geometry(spatial):
    images = jax.random.uniform(jax.random.PRNGKey(4), (2,) + spatial + (3,))
    matrices = augment.random_similarity(jax.random.PRNGKey(5), 2, spatial_rank=len(spatial))
    transforms = {
        "affine": lambda x: augment.warp_affine(x, matrices, order=1),
        "smooth": lambda x: augment.smooth_warp(jax.random.PRNGKey(6), x, p=1.0, magnitude=4.0)[0],
    }
    for name, transform in transforms.items():
        channel_alone = jax.vmap(lambda channel: transform(channel[..., None])[..., 0], in_axes=-1, out_axes=-1)
        together, apart = jax.jit(lambda x: (transform(x), channel_alone(x)))(images)
        assert not np.allclose(together, images, atol=1e-3), name
        np.testing.assert_allclose(together, apart, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("shape", [(2, 10, 26, 1), (2, 23, 9, 3)])
def test_photometric_and_warp_on_non_square_images(shape):
    batch, height, width, channels = shape
    images = jax.random.uniform(jax.random.PRNGKey(0), shape)
    labels = _blob_labels(batch, height, width)
    confidences = labels / 10.0
    key = jax.random.PRNGKey(1)
    both = jax.jit(lambda *args: [augment.photometric_and_warp(*args, warp_labels=warp_labels, warp_prob=1.0)
                                  for warp_labels in (True, False)])
    moved, kept = both(key, images, labels, confidences)
    assert moved[0].shape == shape and moved[1].shape == labels.shape and moved[1].dtype == labels.dtype
    np.testing.assert_array_equal(moved[0], kept[0])  # the image path does not depend on the labels
    np.testing.assert_array_equal(kept[1], labels)
    assert float(jnp.mean(moved[1] != labels)) > 0.01  # the warp moved the labels ...
    np.testing.assert_allclose(moved[2], moved[1] / 10.0, rtol=1e-6)  # ... with their confidences
    assert float(moved[0].min()) >= 0 and float(moved[0].max()) <= 1


@pytest.mark.parametrize("warp_labels", [False, True])
def test_strong_augment_3d_is_a_function_of_the_key_and_keeps_pairs(warp_labels):
    images, labels, _ = _volume()
    confidences = labels / 10.0
    run = _STRONG[warp_labels]
    first = run(jax.random.PRNGKey(7), images, labels, confidences)
    again = run(jax.random.PRNGKey(7), images, labels, confidences)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert first[0].shape == images.shape and first[1].shape == labels.shape
    assert first[1].dtype == labels.dtype and bool(jnp.all(jnp.isfinite(first[0])))
    np.testing.assert_allclose(first[2], first[1] / 10.0, rtol=1e-6)
    assert not np.array_equal(first[0], images)


def test_bad_ranks_raise_and_name_the_argument():
    key = jax.random.PRNGKey(0)
    volume, labels, confidences = _volume()
    images_message = r"images of shape \(B, H, W, C\) or \(B, D, H, W, C\)"
    with pytest.raises(ValueError, match=images_message):
        augment.intensity_jitter(key, volume[..., 0, 0])
    with pytest.raises(ValueError, match=images_message):
        augment.gaussian_blur(key, volume[None])
    with pytest.raises(ValueError, match=r"labels shape .* \(B, D, H, W\)"):
        augment.strong_augment(key, volume, labels[:, 0], confidences, warp_labels=False)
    with pytest.raises(ValueError, match="confidences shape"):
        augment.cutmix(key, volume, labels, confidences[..., :-1])
    with pytest.raises(ValueError, match="spatial_shape"):
        augment.cutmix_mask(key, 2, 10)
    with pytest.raises(ValueError, match="too small"):
        augment.cutmix_mask(key, 2, 1, 10, 10)
    with pytest.raises(ValueError, match="spatial_shape"):
        augment.smooth_displacement(key, 2, 4, 5, 6, 7)
    with pytest.raises(ValueError, match="grid_spacing"):
        augment.smooth_displacement(key, 2, 4, 5, 6, grid_spacing=(2, 2))
    with pytest.raises(ValueError, match="spatial_rank"):
        augment.random_similarity(key, 2, spatial_rank=4)
    with pytest.raises(ValueError, match="matrices"):
        augment.warp_affine(labels[:, 0, 0], jnp.zeros((2, 3, 4)), order=1)
    with pytest.raises(ValueError, match="coords"):
        augment.resample(volume, jnp.zeros((2, D3, H3, W3, 2)), order=1)
