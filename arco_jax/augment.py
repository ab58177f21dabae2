"""On-device augmentation: the strong view of the ARCO train step and the equivariance warps.

Everything here is a pure function of a `jax.random` key and arrays with static shapes, so it
runs inside the jitted train step on whatever device holds the batch (no host round trip, no
PIL). Every per-sample choice is drawn for the whole batch at once and applied by broadcasting.

Conventions
- images: (B, H, W, 1) float32 in [0, 1]; labels: (B, H, W) int32; confidences: (B, H, W).
- `resample` takes pixel coordinates (row, col); `warp_affine` takes 2x3 matrices in the
  normalised [-1, 1] (x, y) frame with corners at +-1 (PyTorch `affine_grid(...,
  align_corners=True)`), so one matrix warps maps of any resolution alike.

Strong view order (as in the reference train step): CutMix with the next image in the batch,
then per-sample brightness/contrast jitter (p=.5), then per-sample Gaussian blur (p=.5), then,
once per batch with p=.5, a small smooth diffeomorphic warp. Mixing comes first, so jitter,
blur and warp treat the pasted rectangle and its surroundings as one image.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.scipy import ndimage

Array = jax.Array

_BLUR_TAPS = 9  # covers +-3.5 sigma at the largest blur sigma, 1.15
_VELOCITY_SMOOTHING_TAPS = 7  # covers +-3 sigma at the velocity smoothing sigma, 1.0


def _check_rank(name: str, x: Array, rank: int, what: str) -> None:
    if x.ndim != rank:
        raise ValueError(f"augment.{name}: expected {what}, got shape {tuple(x.shape)}")


def _check_batch(name: str, images: Array, labels: Optional[Array],
                 confidences: Optional[Array]) -> None:
    _check_rank(name, images, 4, "images of shape (B, H, W, C)")
    for what, x in (("labels", labels), ("confidences", confidences)):
        if x is not None and tuple(x.shape) != tuple(images.shape[:3]):
            raise ValueError(f"augment.{name}: {what} shape {tuple(x.shape)} does not match "
                             f"images (B, H, W) = {tuple(images.shape[:3])}")


# ----------------------------------------------------------------------------- resampling

def resample(x: Array, coords: Array, *, order: int, cval: float = 0.0) -> Array:
    """Samples x (B, H, W, ...) at pixel coordinates coords (B, Ho, Wo, 2) = (row, col).

    order 1 is bilinear, order 0 nearest; a sample (or, for bilinear, each of its four corners)
    outside the image takes `cval`, which is PyTorch grid_sample's padding_mode='zeros' when
    cval=0. Built on jax.scipy.ndimage.map_coordinates: timed against a hand-written gather at
    256x256, batch 8, on CPU, the two were within a factor of two of each other (about 1-5 ms)
    and the library is the simpler to trust.
    """
    if order not in (0, 1):
        raise ValueError(f"augment.resample: order must be 0 (nearest) or 1 (bilinear), "
                         f"got {order}")
    _check_rank("resample", coords, 4, "coords of shape (B, Ho, Wo, 2)")
    if x.ndim < 3 or coords.shape[0] != x.shape[0] or coords.shape[-1] != 2:
        raise ValueError(f"augment.resample: x {tuple(x.shape)} must be (B, H, W, ...) and "
                         f"coords {tuple(coords.shape)} (B, Ho, Wo, 2) with the same B")
    batch, height, width = x.shape[:3]
    trailing = x.shape[3:]
    channels_last = x.reshape(batch, height, width, -1)

    def one_channel(image: Array, sample_coords: Array) -> Array:
        return ndimage.map_coordinates(image, [sample_coords[..., 0], sample_coords[..., 1]],
                                       order=order, mode="constant", cval=cval)

    per_sample = jax.vmap(one_channel, in_axes=(-1, None), out_axes=-1)
    out = jax.vmap(per_sample)(channels_last, coords)
    return out.reshape(coords.shape[:3] + trailing)


def _pixel_grid(height: int, width: int) -> Array:
    """(H, W, 2) float32 (row, col) coordinates of every pixel."""
    rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                              jnp.arange(width, dtype=jnp.float32), indexing="ij")
    return jnp.stack([rows, cols], axis=-1)


def _clip_to_image(coords: Array, height: int, width: int) -> Array:
    """Clamps (row, col) coordinates into the image: PyTorch's padding_mode='border'."""
    upper = jnp.array([height - 1, width - 1], coords.dtype)
    return jnp.clip(coords, 0.0, upper)


# ----------------------------------------------------------------------------- CutMix

def cutmix_mask(key: Array, batch_size: int, height: int, width: int) -> Array:
    """(B, H, W) bool, True inside each sample's rectangle of about half the image area.

    As the reference draws it: width an integer uniform in (W/2, W) (W itself excluded), height
    round(H*W/2 / width), the top-left corner uniform over the positions that fit.
    """
    if width < 3 or height < 2:
        raise ValueError(f"augment.cutmix_mask: image {height}x{width} is too small for a "
                         f"rectangle of half the area with width in (W/2, W)")
    width_key, col_key, row_key = jax.random.split(key, 3)
    box_w = jax.random.randint(width_key, (batch_size,), width // 2 + 1, width)
    box_h = jnp.round(height * width / 2 / box_w).astype(jnp.int32)
    col0 = jax.random.randint(col_key, (batch_size,), 0, width - box_w + 1)
    row0 = jax.random.randint(row_key, (batch_size,), 0, height - box_h + 1)
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    inside_rows = (rows >= row0[:, None, None]) & (rows < (row0 + box_h)[:, None, None])
    inside_cols = (cols >= col0[:, None, None]) & (cols < (col0 + box_w)[:, None, None])
    return inside_rows & inside_cols


def cutmix(key: Array, images: Array, labels: Array,
           confidences: Array) -> tuple[Array, Array, Array]:
    """Pastes a rectangle of image (b+1) % B into image b; labels and confidences alike.

    The reference keeps sample b outside the rectangle and takes the partner inside it; the
    rectangle is `cutmix_mask(key, B, H, W)`, so a caller can rebuild it from the same key.
    """
    _check_batch("cutmix", images, labels, confidences)
    batch, height, width = images.shape[:3]
    pasted = cutmix_mask(key, batch, height, width)

    def mix(x: Array) -> Array:
        partner = jnp.roll(x, -1, axis=0)  # partner[b] = x[(b + 1) % B]
        region = pasted.reshape(pasted.shape + (1,) * (x.ndim - 3))
        return jnp.where(region, partner, x)

    return mix(images), mix(labels), mix(confidences)


# ----------------------------------------------------------------------------- photometric

def _per_sample(values: Array, like: Array) -> Array:
    """Reshapes a (B,) vector to broadcast against `like` (B, ...)."""
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


def intensity_jitter(key: Array, images: Array, *, p: float = 0.5,
                     strength: tuple[float, float] = (0.75, 1.25)) -> Array:
    """Brightness then contrast jitter with factors uniform in `strength`, per sample with p.

    torchvision's ColorJitter on a grayscale image: brightness multiplies, contrast blends with
    the image mean, each result clipped to [0, 1] as PIL's 8-bit images are. Saturation and hue,
    also drawn by the reference, are no-ops on grayscale. The reference applies brightness and
    contrast in random order; the two commute up to the clipping, so the order here is fixed.
    """
    _check_rank("intensity_jitter", images, 4, "images of shape (B, H, W, C)")
    apply_key, brightness_key, contrast_key = jax.random.split(key, 3)
    batch = images.shape[0]
    apply = jax.random.bernoulli(apply_key, p, (batch,))
    low, high = strength
    brightness = jax.random.uniform(brightness_key, (batch,), minval=low, maxval=high)
    contrast = jax.random.uniform(contrast_key, (batch,), minval=low, maxval=high)

    brightened = jnp.clip(images * _per_sample(brightness, images), 0.0, 1.0)
    mean = jnp.mean(brightened, axis=(1, 2, 3), keepdims=True)
    contrasted = mean + _per_sample(contrast, images) * (brightened - mean)
    jittered = jnp.clip(contrasted, 0.0, 1.0)
    return jnp.where(_per_sample(apply, images), jittered, images)


def _gaussian_taps(sigma: Array, taps: int) -> Array:
    """(B, taps) normalised Gaussian weights, one row per sigma in the (B,) vector."""
    offsets = jnp.arange(taps, dtype=jnp.float32) - taps // 2
    weights = jnp.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    return weights / jnp.sum(weights, axis=1, keepdims=True)


def _filter_axis(x: Array, weights: Array, axis: int, pad_mode: str) -> Array:
    """Correlates x (B, H, W, C) along `axis` with per-sample odd-length weights (B, K)."""
    taps = weights.shape[1]
    half = taps // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (half, half)
    padded = jnp.pad(x, pad, mode=pad_mode)
    length = x.shape[axis]
    out = jnp.zeros_like(x)
    for tap in range(taps):  # a handful of static taps, each a whole-batch shifted view
        window = jax.lax.slice_in_dim(padded, tap, tap + length, axis=axis)
        out = out + _per_sample(weights[:, tap], x) * window
    return out


def _gaussian_filter(x: Array, sigma: Array, taps: int, pad_mode: str) -> Array:
    """Separable Gaussian filter over H and W of x (B, H, W, C) with a per-sample sigma."""
    weights = _gaussian_taps(sigma, taps)
    return _filter_axis(_filter_axis(x, weights, 1, pad_mode), weights, 2, pad_mode)


def gaussian_blur(key: Array, images: Array, *, p: float = 0.5,
                  sigma_range: tuple[float, float] = (0.15, 1.15)) -> Array:
    """Gaussian blur with sigma uniform in `sigma_range`, per sample with probability p.

    PIL's GaussianBlur(radius) is a Gaussian of standard deviation `radius` whose edges repeat
    the border pixels; here it is a 9-tap separable kernel with edge padding.
    """
    _check_rank("gaussian_blur", images, 4, "images of shape (B, H, W, C)")
    apply_key, sigma_key = jax.random.split(key)
    batch = images.shape[0]
    apply = jax.random.bernoulli(apply_key, p, (batch,))
    sigma = jax.random.uniform(sigma_key, (batch,), minval=sigma_range[0],
                               maxval=sigma_range[1])
    blurred = _gaussian_filter(images, sigma, _BLUR_TAPS, "edge")
    return jnp.where(_per_sample(apply, images), blurred, images)


# ----------------------------------------------------------------------------- smooth warp

def smooth_displacement(key: Array, batch_size: int, height: int, width: int, *,
                        magnitude: float = 1.5, grid_spacing: int = 8,
                        smoothing_sigma: float = 1.0, squaring_steps: int = 8) -> Array:
    """(B, H, W, 2) pixel displacement (row, col) of a random smooth diffeomorphism.

    The reference's random morphological warp: a velocity field uniform in [-1, 1] on a grid
    `grid_spacing` times coarser than the image, scaled to unit L2 norm per sample and then by
    `magnitude` (in the normalised [-1, 1] frame), Gaussian-smoothed (zero padding, so it fades
    at the border), bilinearly upsampled and integrated by scaling and squaring, which keeps
    the map invertible. At 256 px and the defaults the displacement is about a pixel.
    """
    coarse_h, coarse_w = max(height // grid_spacing, 1), max(width // grid_spacing, 1)
    velocity = jax.random.uniform(key, (batch_size, coarse_h, coarse_w, 2),
                                  minval=-1.0, maxval=1.0)
    norm = jnp.sqrt(jnp.sum(velocity ** 2, axis=(1, 2, 3), keepdims=True))
    velocity = magnitude * velocity / (norm + 1e-20)
    sigma = jnp.full((batch_size,), smoothing_sigma, jnp.float32)
    velocity = _gaussian_filter(velocity, sigma, _VELOCITY_SMOOTHING_TAPS, "constant")
    velocity = jax.image.resize(velocity, (batch_size, height, width, 2), method="linear")
    # normalised [-1, 1] units -> pixels, corners at +-1
    velocity = velocity * jnp.array([(height - 1) / 2, (width - 1) / 2], jnp.float32)

    grid = _pixel_grid(height, width)

    def square(_, displacement: Array) -> Array:
        # phi o phi with phi = id + u:  u(x) + u(x + u(x)), sampled with border clamping
        where = _clip_to_image(grid + displacement, height, width)
        return displacement + resample(displacement, where, order=1)

    return jax.lax.fori_loop(0, squaring_steps, square, velocity / 2.0 ** squaring_steps)


def smooth_warp(key: Array, images: Array, labels: Optional[Array] = None,
                confidences: Optional[Array] = None, *, p: float = 0.5,
                magnitude: float = 1.5, grid_spacing: int = 8
                ) -> tuple[Array, Optional[Array], Optional[Array]]:
    """With probability p (one draw for the whole batch) warps by `smooth_displacement`.

    Images are resampled bilinearly, labels and confidences by nearest neighbour, so each
    warped pixel keeps a (pseudo-label, confidence) pair that belongs together. Samples that
    fall outside repeat the border, as the reference's clamped sampling grid does. The reference
    warps the image only; pass labels/confidences to warp them too, or None to leave them.
    `grid_spacing` must be a static Python int.
    """
    _check_batch("smooth_warp", images, labels, confidences)
    decide_key, field_key = jax.random.split(key)
    batch, height, width = images.shape[:3]

    def warp(arrays: tuple[Array, Optional[Array], Optional[Array]]):
        imgs, labs, confs = arrays
        displacement = smooth_displacement(field_key, batch, height, width,
                                           magnitude=magnitude, grid_spacing=grid_spacing)
        where = _clip_to_image(_pixel_grid(height, width) + displacement, height, width)
        imgs = resample(imgs, where, order=1)
        labs = None if labs is None else resample(labs, where, order=0)
        confs = None if confs is None else resample(confs, where, order=0)
        return imgs, labs, confs

    apply = jax.random.bernoulli(decide_key, p)
    return jax.lax.cond(apply, warp, lambda arrays: arrays, (images, labels, confidences))


# ----------------------------------------------------------------------------- similarity warps

def random_similarity(key: Array, batch_size: int, *,
                      scale_range: tuple[float, float] = (0.8, 1.2),
                      max_rotation_deg: float = 60.0, max_translation: float = 0.1,
                      mirror: bool = True) -> Array:
    """(B, 2, 3) random similarity matrices for the equivariance loss, one per sample.

    The reference's RandTPS in 'affine' mode: each matrix maps an output point (x, y, 1) in the
    normalised frame to the point it samples; its scale is uniform in the inverse of
    `scale_range` (content zoomed by 0.8 to 1.2), rotation uniform in +-`max_rotation_deg`,
    translation uniform in +-`max_translation` per axis, and with probability 1/2 the sampled
    x is mirrored. The reference draws the mirror once per batch; here each sample draws its
    own. Its extra thin-plate jitter of the control points (sigma 0.01) is left out.
    """
    scale_key, angle_key, shift_key, mirror_key = jax.random.split(key, 4)
    scale = jax.random.uniform(scale_key, (batch_size,), minval=1.0 / scale_range[1],
                               maxval=1.0 / scale_range[0])
    angle = jnp.deg2rad(jax.random.uniform(angle_key, (batch_size,),
                                           minval=-max_rotation_deg, maxval=max_rotation_deg))
    shift = jax.random.uniform(shift_key, (batch_size, 2), minval=-max_translation,
                               maxval=max_translation)
    cos, sin = scale * jnp.cos(angle), scale * jnp.sin(angle)
    matrices = jnp.stack([jnp.stack([cos, -sin, shift[:, 0]], axis=-1),
                          jnp.stack([sin, cos, shift[:, 1]], axis=-1)], axis=1)
    if mirror:
        flip = jax.random.bernoulli(mirror_key, 0.5, (batch_size,))
        sign = jnp.where(flip, -1.0, 1.0)
        matrices = matrices.at[:, 0, :].multiply(sign[:, None])
    return matrices


def warp_affine(x: Array, matrices: Array, *, order: int, cval: float = 0.0) -> Array:
    """Warps x (B, H, W, ...) by per-sample (B, 2, 3) matrices in the normalised frame.

    Output pixel p samples x at matrices @ (p_x, p_y, 1); outside the image the value is
    `cval` (0: the reference's padding_mode='zeros'). order 1 bilinear for images, logits,
    probabilities and masks; order 0 nearest for integer labels.
    """
    if x.ndim < 3 or matrices.shape != (x.shape[0], 2, 3):
        raise ValueError(f"augment.warp_affine: x {tuple(x.shape)} must be (B, H, W, ...) and "
                         f"matrices {tuple(matrices.shape)} must be (B, 2, 3)")
    height, width = x.shape[1], x.shape[2]
    # pixel -> normalised: x = 2 col / (W - 1) - 1, y = 2 row / (H - 1) - 1 (corners at +-1)
    to_norm = jnp.array([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)], jnp.float32)
    pixels = _pixel_grid(height, width)[..., ::-1]  # (col, row) = (x, y) order
    points = pixels * to_norm - 1.0
    homogeneous = jnp.concatenate([points, jnp.ones((height, width, 1), jnp.float32)], -1)
    sampled = jnp.einsum("bij,hwj->bhwi", matrices.astype(jnp.float32), homogeneous)
    sampled_pixels = (sampled + 1.0) / to_norm
    return resample(x, sampled_pixels[..., ::-1], order=order, cval=cval)


# ----------------------------------------------------------------------------- strong view

def photometric_and_warp(key: Array, images: Array, labels: Array, confidences: Array, *,
                         warp_labels: bool, warp_prob: float = 0.5
                         ) -> tuple[Array, Array, Array]:
    """The strong view's steps after CutMix: intensity_jitter (p=.5 per sample) ->
    gaussian_blur (p=.5 per sample) -> smooth_warp (p=`warp_prob` per batch).

    With warp_labels=False the warp moves the image only, as the reference does, and the
    pseudo-labels no longer line up with it; True warps labels and confidences with the image.
    `warp_labels` must be static.
    """
    _check_batch("photometric_and_warp", images, labels, confidences)
    jitter_key, blur_key, warp_key = jax.random.split(key, 3)
    images = intensity_jitter(jitter_key, images)
    images = gaussian_blur(blur_key, images)
    if warp_labels:
        return smooth_warp(warp_key, images, labels, confidences, p=warp_prob)
    images, _, _ = smooth_warp(warp_key, images, p=warp_prob)
    return images, labels, confidences


def strong_augment(key: Array, images: Array, labels: Array, confidences: Array, *,
                   warp_labels: bool, warp_prob: float = 0.5
                   ) -> tuple[Array, Array, Array]:
    """The strong view of the unlabeled batch, in the reference's order: cutmix (partner
    (b+1) % B), then `photometric_and_warp`."""
    _check_batch("strong_augment", images, labels, confidences)
    mix_key, rest_key = jax.random.split(key)
    images, labels, confidences = cutmix(mix_key, images, labels, confidences)
    return photometric_and_warp(rest_key, images, labels, confidences,
                                warp_labels=warp_labels, warp_prob=warp_prob)


__all__ = [
    "cutmix",
    "cutmix_mask",
    "gaussian_blur",
    "intensity_jitter",
    "photometric_and_warp",
    "random_similarity",
    "resample",
    "smooth_displacement",
    "smooth_warp",
    "strong_augment",
    "warp_affine",
]
