"""On-device augmentation: the strong view of the ARCO train step and the equivariance warps.

Everything here is a pure function of a `jax.random` key and arrays with static shapes, so it
runs inside the jitted train step on whatever device holds the batch (no host round trip, no
PIL). Every per-sample choice is drawn for the whole batch at once and applied by broadcasting.

Conventions
- Spatial rank r = 2 or 3, read from the arrays: images (B, H, W, C) or (B, D, H, W, C) float32
  in [0, 1], any C and any (non-square) spatial shape; labels (B, H, W) / (B, D, H, W) int32;
  confidences shaped like labels. Functions that get no array take the spatial shape
  (`cutmix_mask`, `smooth_displacement`) or `spatial_rank` (`random_similarity`).
- `resample` takes voxel coordinates in axis order ((row, col) or (depth, row, col));
  `warp_affine` takes (B, r, r + 1) matrices in the normalised [-1, 1] frame (x, y[, z]) =
  (col, row[, depth]) with corners at +-1 (PyTorch `affine_grid(..., align_corners=True)`, 4-D
  or 5-D), so one matrix warps maps of any resolution alike.
- The 2-D path draws exactly the keys it always drew: same key, same result, bit for bit.

3-D choices (a volume is a stack of slices, often thick ones, so depth is never rotated into)
- cutmix_mask: one box of about half the volume with every side between half and all of its
  axis: width as in 2-D, then height over the rows that still fit, depth rounds the remainder.
- gaussian_blur: one sigma, in voxels, along D, H and W (separable).
- smooth_displacement: a (B, D, H, W, 3) field; `grid_spacing` may be given per axis.
- random_similarity: (B, 3, 4) = the 2-D similarity in the (H, W) plane (rotation about the
  depth axis, mirror of x), the same scale along depth and a depth shift drawn by the same rule.

Strong view order (as in the reference train step): CutMix with the next image in the batch,
then per-sample brightness/contrast jitter (p=.5), then per-sample Gaussian blur (p=.5), then,
once per batch with p=.5, a small smooth diffeomorphic warp. Mixing comes first, so jitter,
blur and warp treat the pasted box and its surroundings as one image. ReCo's natural-image
view (config.augment) starts with a random rescale of image, pseudo-labels and confidences
(random_rescale), swaps in ClassMix for CutMix, the RGB colour jitter (brightness, contrast,
saturation, hue in random order, p=.8) for the intensity jitter, no warp, and a per-sample
horizontal flip at the end; its labeled images get the jitter and blur too
(labeled_photometric).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax.scipy import ndimage

Array = jax.Array

_BLUR_TAPS = 9  # covers +-3.5 sigma at the largest blur sigma, 1.15
_VELOCITY_SMOOTHING_TAPS = 7  # covers +-3 sigma at the velocity smoothing sigma, 1.0
_IMAGE_SHAPES = "(B, H, W, C) or (B, D, H, W, C)"
_MAP_SHAPES = {2: "(B, H, W)", 3: "(B, D, H, W)"}


def _image_spatial_rank(name: str, images: Array) -> int:
    """The spatial rank r of images (B, *spatial, C); a clear error for any other rank."""
    if images.ndim not in (4, 5):
        raise ValueError(f"augment.{name}: expected images of shape {_IMAGE_SHAPES}, "
                         f"got shape {tuple(images.shape)}")
    return images.ndim - 2


def _check_batch(name: str, images: Array, labels: Optional[Array],
                 confidences: Optional[Array]) -> int:
    """Checks labels/confidences are (B, *spatial) of the images; returns the spatial rank."""
    rank = _image_spatial_rank(name, images)
    expected = tuple(images.shape[:-1])
    for what, x in (("labels", labels), ("confidences", confidences)):
        if x is not None and tuple(x.shape) != expected:
            raise ValueError(f"augment.{name}: {what} shape {tuple(x.shape)} does not match "
                             f"images {_MAP_SHAPES[rank]} = {expected}")
    return rank


def _check_spatial_shape(name: str, spatial_shape: Sequence[int]) -> tuple[int, ...]:
    if len(spatial_shape) not in (2, 3):
        raise ValueError(f"augment.{name}: spatial_shape must be (H, W) or (D, H, W), "
                         f"got {tuple(spatial_shape)}")
    return tuple(int(size) for size in spatial_shape)


# ----------------------------------------------------------------------------- resampling

def resample(x: Array, coords: Array, *, order: int, cval: float = 0.0) -> Array:
    """Samples x (B, *spatial, ...) at voxel coordinates coords (B, *out_spatial, r).

    r = coords.shape[-1] is 2 ((row, col) into x (B, H, W, ...)) or 3 ((depth, row, col) into
    x (B, D, H, W, ...)); trailing axes of x are carried along, each sampled alike. order 1 is
    (bi/tri)linear, order 0 nearest; a sample (or, for linear, each of its corners) outside the
    image takes `cval`, which is PyTorch grid_sample's padding_mode='zeros' when cval=0. Built
    on jax.scipy.ndimage.map_coordinates: timed against a hand-written gather at 256x256,
    batch 8, on CPU, the two were within a factor of two of each other (about 1-5 ms) and the
    library is the simpler to trust.
    """
    if order not in (0, 1):
        raise ValueError(f"augment.resample: order must be 0 (nearest) or 1 (linear), "
                         f"got {order}")
    rank = coords.shape[-1] if coords.ndim else 0
    if rank not in (2, 3) or coords.ndim != rank + 2:
        raise ValueError(f"augment.resample: expected coords of shape (B, Ho, Wo, 2) or "
                         f"(B, Do, Ho, Wo, 3), got shape {tuple(coords.shape)}")
    if x.ndim < rank + 1 or x.shape[0] != coords.shape[0]:
        x_shape = "(B, H, W, ...)" if rank == 2 else "(B, D, H, W, ...)"
        raise ValueError(f"augment.resample: x {tuple(x.shape)} must be {x_shape} to go with coords "
                         f"{tuple(coords.shape)}, with the same B")
    trailing = x.shape[rank + 1:]
    channels_last = x.reshape(x.shape[:rank + 1] + (-1,))

    def one_channel(image: Array, sample_coords: Array) -> Array:
        return ndimage.map_coordinates(image, [sample_coords[..., axis] for axis in range(rank)],
                                       order=order, mode="constant", cval=cval)

    per_sample = jax.vmap(one_channel, in_axes=(-1, None), out_axes=-1)
    out = jax.vmap(per_sample)(channels_last, coords)
    return out.reshape(coords.shape[:-1] + trailing)


def _pixel_grid(spatial_shape: tuple[int, ...]) -> Array:
    """(*spatial, r) float32 coordinates of every voxel, in axis order."""
    axes = [jnp.arange(size, dtype=jnp.float32) for size in spatial_shape]
    return jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1)


def _clip_to_image(coords: Array, spatial_shape: tuple[int, ...]) -> Array:
    """Clamps voxel coordinates into the image: PyTorch's padding_mode='border'."""
    upper = jnp.array([size - 1 for size in spatial_shape], coords.dtype)
    return jnp.clip(coords, 0.0, upper)


# ----------------------------------------------------------------------------- CutMix

def _box_mask(starts: Sequence[Array], sizes: Sequence[Array],
              spatial_shape: tuple[int, ...]) -> Array:
    """(B, *spatial) bool, True inside each sample's box [start, start + size) on every axis."""
    rank = len(spatial_shape)
    inside = None
    for axis, (start, size, length) in enumerate(zip(starts, sizes, spatial_shape)):
        index_shape = [1] * (rank + 1)
        index_shape[axis + 1] = length
        index = jnp.arange(length).reshape(index_shape)
        start = start.reshape((-1,) + (1,) * rank)
        end = start + size.reshape((-1,) + (1,) * rank)
        within = (index >= start) & (index < end)
        inside = within if inside is None else inside & within
    return inside


def cutmix_mask(key: Array, batch_size: int, *spatial_shape: int) -> Array:
    """(B, *spatial) bool, True inside each sample's box (the region pasted from its partner).

    spatial_shape is (H, W) or (D, H, W), static ints. 2-D, as the reference draws it: width an
    integer uniform in (W/2, W) (W itself excluded), height round(H*W/2 / width), the top-left
    corner uniform over the positions that fit: a box of about half the image. 3-D, as the
    reference's generate_cutout_mask_3d: that in-plane box over a slab of round(D/8) slices (at
    least 1; 10 of LA's 80) whose first slice is uniform in [0, D - 2 * slab] (the reference's
    z_start in [0, D - 20]: the slab never reaches the last `slab` slices).
    """
    spatial_shape = _check_spatial_shape("cutmix_mask", spatial_shape)
    height, width = spatial_shape[-2:]
    if width < 3 or height < 2:
        raise ValueError(f"augment.cutmix_mask: image plane {height}x{width} is too small for a "
                         f"rectangle of half the area with width in (W/2, W)")
    if len(spatial_shape) == 3 and spatial_shape[0] < 2:
        raise ValueError(f"augment.cutmix_mask: a volume of {spatial_shape[0]} slice is too small for a slab to mix")
    # 2-D: three keys, the draws of every earlier run; 3-D: one more, for the slab.
    width_key, col_key, row_key, *depth_key = jax.random.split(key, len(spatial_shape) + 1)
    box_w = jax.random.randint(width_key, (batch_size,), width // 2 + 1, width)
    box_h = jnp.round(height * width / 2 / box_w).astype(jnp.int32)
    col0 = jax.random.randint(col_key, (batch_size,), 0, width - box_w + 1)
    row0 = jax.random.randint(row_key, (batch_size,), 0, height - box_h + 1)
    if len(spatial_shape) == 2:
        return _box_mask((row0, col0), (box_h, box_w), spatial_shape)
    depth = spatial_shape[0]
    slab = cutmix_slab(depth)
    depth0 = jax.random.randint(depth_key[0], (batch_size,), 0, depth - 2 * slab + 1)
    return _box_mask((depth0, row0, col0), (jnp.full((batch_size,), slab), box_h, box_w), spatial_shape)


def cutmix_slab(depth: int) -> int:
    """Slices of a 3-D CutMix box: the reference's 10 of 80, scaled (at least 1, at most half)."""
    return max(1, min(int(round(depth / 8)), depth // 2))


def cutmix(key: Array, images: Array, labels: Array,
           confidences: Array) -> tuple[Array, Array, Array]:
    """Pastes a box of image (b+1) % B into image b; labels and confidences alike.

    The reference keeps sample b outside the box and takes the partner inside it; the box is
    `cutmix_mask(key, B, *spatial)`, so a caller can rebuild it from the same key.
    """
    rank = _check_batch("cutmix", images, labels, confidences)
    pasted = cutmix_mask(key, images.shape[0], *images.shape[1:rank + 1])

    def mix(x: Array) -> Array:
        partner = jnp.roll(x, -1, axis=0)  # partner[b] = x[(b + 1) % B]
        region = pasted.reshape(pasted.shape + (1,) * (x.ndim - pasted.ndim))
        return jnp.where(region, partner, x)

    return mix(images), mix(labels), mix(confidences)


# ----------------------------------------------------------------------------- ClassMix

MIXES = ("cutmix", "classmix")


def classmix_mask(key: Array, labels: Array, num_classes: int) -> Array:
    """(B, *spatial) bool, True on the pixels of half of the classes present in each label map.

    ReCo's generate_class_mask: of the n classes in labels[b] (values outside [0, num_classes),
    an ignore label, are no class and never chosen), n // 2 chosen uniformly at random (a class
    map of one class chooses none). Static shapes: a (B, num_classes) table of the classes
    present, ranked by uniform scores; the chosen ones are the first n // 2 of the ranking.
    """
    batch = labels.shape[0]
    flat = labels.reshape(batch, -1)
    valid = (flat >= 0) & (flat < num_classes)
    index = jnp.where(valid, flat, num_classes)  # out of the table: dropped by the scatter
    present = jax.vmap(lambda row: jnp.zeros(num_classes, bool).at[row].set(True, mode="drop"))(index)
    scores = jnp.where(present, jax.random.uniform(key, (batch, num_classes)), 2.0)
    rank = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
    chosen = present & (rank < jnp.sum(present, axis=1, keepdims=True) // 2)
    keep = jnp.take_along_axis(chosen, jnp.where(valid, flat, 0), axis=1) & valid
    return keep.reshape(labels.shape)


def classmix(key: Array, images: Array, labels: Array, confidences: Array, *,
             num_classes: int) -> tuple[Array, Array, Array]:
    """ReCo's ClassMix: sample b keeps its pixels of half of its classes (classmix_mask of its
    labels, here the teacher's pseudo-labels) pasted onto image (b + 1) % B, which shows
    everywhere else; labels and confidences alike. `num_classes` must be static."""
    _check_batch("classmix", images, labels, confidences)
    keep = classmix_mask(key, labels, num_classes)

    def mix(x: Array) -> Array:
        partner = jnp.roll(x, -1, axis=0)  # partner[b] = x[(b + 1) % B]
        own = keep.reshape(keep.shape + (1,) * (x.ndim - keep.ndim))
        return jnp.where(own, x, partner)

    return mix(images), mix(labels), mix(confidences)


# ----------------------------------------------------------------------------- photometric

def _per_sample(values: Array, like: Array) -> Array:
    """Reshapes a (B,) vector to broadcast against `like` (B, ...)."""
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


ValueRange = Optional[tuple[float, float]]
UNIT_RANGE = (0.0, 1.0)


def intensity_jitter(key: Array, images: Array, *, p: float = 0.5,
                     strength: tuple[float, float] = (0.75, 1.25), value_range: ValueRange = UNIT_RANGE) -> Array:
    """Brightness then contrast jitter with factors uniform in `strength`, per sample with p.

    torchvision's ColorJitter on a grayscale image: brightness multiplies, contrast blends with
    the image mean, each result clipped to `value_range`, [0, 1] as PIL's 8-bit images are (the
    range of min-max normalised data). None leaves the values unclipped: z-scored volumes (the
    LA's) have no such range, and clipping them to [0, 1] would erase most of each volume. Saturation and hue,
    also drawn by the reference, are no-ops on grayscale. The reference applies brightness and
    contrast in random order; the two commute up to the clipping, so the order here is fixed.
    With C > 1 every channel of a sample gets the same factors and the mean is over all of
    them (torchvision would take the mean of a grayscale conversion).
    """
    _image_spatial_rank("intensity_jitter", images)
    apply_key, brightness_key, contrast_key = jax.random.split(key, 3)
    batch = images.shape[0]
    apply = jax.random.bernoulli(apply_key, p, (batch,))
    low, high = strength
    brightness = jax.random.uniform(brightness_key, (batch,), minval=low, maxval=high)
    contrast = jax.random.uniform(contrast_key, (batch,), minval=low, maxval=high)

    clip = (lambda x: x) if value_range is None else (lambda x: jnp.clip(x, *value_range))  # noqa: E731
    brightened = clip(images * _per_sample(brightness, images))
    mean = jnp.mean(brightened, axis=tuple(range(1, images.ndim)), keepdims=True)
    contrasted = mean + _per_sample(contrast, images) * (brightened - mean)
    jittered = clip(contrasted)
    return jnp.where(_per_sample(apply, images), jittered, images)


_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights (ITU-R 601-2)
JITTER_STRENGTH = (0.75, 1.25)  # brightness / contrast factors of the intensity and colour jitters


@dataclasses.dataclass(frozen=True)
class ColourJitter:
    """The RGB colour jitter's settings (static): saturation factors uniform in [1 - s, 1 + s],
    hue shifts uniform in [-hue, hue] of the hue circle; images normalised per channel by
    (x - mean) / std (ImageNet's for the natural-image datasets), or None: RGB in [0, 1]."""

    saturation: float = 0.25
    hue: float = 0.25
    mean: Optional[tuple[float, float, float]] = None
    std: Optional[tuple[float, float, float]] = None


def _luma(rgb: Array) -> Array:
    """(..., 1) grayscale of (..., 3) RGB, as torchvision's rgb_to_grayscale."""
    return jnp.sum(rgb * jnp.asarray(_LUMA, rgb.dtype), axis=-1, keepdims=True)


def rgb_to_hsv(rgb: Array) -> Array:
    """(..., 3) RGB in [0, 1] -> (..., 3) HSV in [0, 1] (colorsys' formulas; hue 0 for grays)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maxc, minc = jnp.max(rgb, axis=-1), jnp.min(rgb, axis=-1)
    delta = maxc - minc
    gray = delta == 0
    safe = jnp.where(gray, 1.0, delta)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = jnp.where(gray, 0.0, jnp.mod(h / 6.0, 1.0))
    s = jnp.where(maxc == 0, 0.0, delta / jnp.where(maxc == 0, 1.0, maxc))
    return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(hsv: Array) -> Array:
    """(..., 3) HSV in [0, 1] -> (..., 3) RGB in [0, 1] (colorsys' six sectors)."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    sector = jnp.floor(h * 6.0)
    f = h * 6.0 - sector
    sector = jnp.mod(sector.astype(jnp.int32), 6)
    p, q, t = v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))
    table = jnp.stack([jnp.stack(c, axis=-1) for c in
                       ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], axis=0)
    return jnp.take_along_axis(table, sector[None, ..., None], axis=0)[0]


def colour_jitter(key: Array, images: Array, *, p: float = 0.8, settings: ColourJitter = ColourJitter(),
                  strength: tuple[float, float] = JITTER_STRENGTH) -> Array:
    """torchvision's ColorJitter as ReCo draws it, per sample with probability p, on RGB images.

    Brightness and contrast factors uniform in `strength`, saturation and hue as `settings`, the
    four applied in a random order per sample (as ColorJitter), each result clipped to [0, 1]:
    brightness scales, contrast blends with the mean luma of the image, saturation with each
    pixel's luma, hue turns the HSV hue. Normalised images are mapped back to [0, 1] RGB first
    and normalised again after. A gray pixel stays gray; saturation 0 and hue 0 jitter only
    brightness and contrast. Every step is computed for the whole batch and selected per
    sample: 16 elementwise passes, negligible beside a forward.
    """
    rank = _image_spatial_rank("colour_jitter", images)
    if images.shape[-1] != 3:
        raise ValueError(f"augment.colour_jitter: needs RGB images (3 channels), got shape {tuple(images.shape)}")
    batch = images.shape[0]
    apply_key, order_key, *factor_keys = jax.random.split(key, 6)
    apply = jax.random.bernoulli(apply_key, p, (batch,))
    order = jnp.argsort(jax.random.uniform(order_key, (batch, 4)), axis=1)  # a uniform permutation per sample
    ranges = (strength, strength, (1.0 - settings.saturation, 1.0 + settings.saturation),
              (-settings.hue, settings.hue))
    factors = [_per_sample(jax.random.uniform(k, (batch,), minval=low, maxval=high), images)
               for k, (low, high) in zip(factor_keys, ranges)]
    mean = None if settings.mean is None else jnp.asarray(settings.mean, images.dtype)
    std = None if settings.std is None else jnp.asarray(settings.std, images.dtype)
    rgb = images if mean is None else images * std + mean
    spatial = tuple(range(1, rank + 1))

    def brightness(x):
        return jnp.clip(x * factors[0], 0.0, 1.0)

    def contrast(x):
        level = jnp.mean(_luma(x), axis=spatial, keepdims=True)
        return jnp.clip(level + factors[1] * (x - level), 0.0, 1.0)

    def saturation(x):
        gray = _luma(x)
        return jnp.clip(gray + factors[2] * (x - gray), 0.0, 1.0)

    def hue(x):
        hsv = rgb_to_hsv(x)
        turned = jnp.mod(hsv[..., :1] + factors[3], 1.0)
        return jnp.clip(hsv_to_rgb(jnp.concatenate([turned, hsv[..., 1:]], axis=-1)), 0.0, 1.0)

    x = jnp.clip(rgb, 0.0, 1.0)
    for position in range(4):
        op = _per_sample(order[:, position], images)
        x = jnp.select([op == i for i in range(3)], [f(x) for f in (brightness, contrast, saturation)], hue(x))
    jittered = x if mean is None else (x - mean) / std
    return jnp.where(_per_sample(apply, images), jittered, images)


def horizontal_flip(key: Array, images: Array, labels: Array, confidences: Array, *,
                    p: float = 0.5) -> tuple[Array, Array, Array]:
    """Mirrors each sample along W with probability p: images, labels and confidences alike
    (ReCo flips the strong view's image, pseudo-labels and confidences together)."""
    rank = _check_batch("horizontal_flip", images, labels, confidences)
    flip = jax.random.bernoulli(key, p, (images.shape[0],))

    def mirror(x: Array) -> Array:
        return jnp.where(_per_sample(flip, x), jnp.flip(x, axis=rank), x)

    return mirror(images), mirror(labels), mirror(confidences)


def _gaussian_taps(sigma: Array, taps: int) -> Array:
    """(B, taps) normalised Gaussian weights, one row per sigma in the (B,) vector."""
    offsets = jnp.arange(taps, dtype=jnp.float32) - taps // 2
    weights = jnp.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    return weights / jnp.sum(weights, axis=1, keepdims=True)


def _filter_axis(x: Array, weights: Array, axis: int, pad_mode: str) -> Array:
    """Correlates x (B, ...) along `axis` with per-sample odd-length weights (B, K)."""
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
    """Separable Gaussian filter over every spatial axis of x (B, *spatial, C), per-sample sigma."""
    weights = _gaussian_taps(sigma, taps)
    for axis in range(1, x.ndim - 1):
        x = _filter_axis(x, weights, axis, pad_mode)
    return x


def gaussian_blur(key: Array, images: Array, *, p: float = 0.5,
                  sigma_range: tuple[float, float] = (0.15, 1.15)) -> Array:
    """Gaussian blur with sigma uniform in `sigma_range`, per sample with probability p.

    PIL's GaussianBlur(radius) is a Gaussian of standard deviation `radius` whose edges repeat
    the border pixels; here it is a 9-tap separable kernel with edge padding, along H and W or,
    for volumes, D, H and W with the same sigma in voxels (slice spacing is not known here).
    """
    _image_spatial_rank("gaussian_blur", images)
    apply_key, sigma_key = jax.random.split(key)
    batch = images.shape[0]
    apply = jax.random.bernoulli(apply_key, p, (batch,))
    sigma = jax.random.uniform(sigma_key, (batch,), minval=sigma_range[0],
                               maxval=sigma_range[1])
    blurred = _gaussian_filter(images, sigma, _BLUR_TAPS, "edge")
    return jnp.where(_per_sample(apply, images), blurred, images)


# ----------------------------------------------------------------------------- smooth warp

GridSpacing = Union[int, Sequence[int]]


def smooth_displacement(key: Array, batch_size: int, *spatial_shape: int,
                        magnitude: float = 1.5, grid_spacing: GridSpacing = 8,
                        smoothing_sigma: float = 1.0, squaring_steps: int = 8) -> Array:
    """(B, *spatial, r) voxel displacement, in axis order, of a random smooth diffeomorphism.

    spatial_shape is (H, W) or (D, H, W), static ints. The reference's random morphological
    warp: a velocity field uniform in [-1, 1] on a grid `grid_spacing` times coarser than the
    image (one int for every axis, or one per axis, e.g. (2, 8, 8) for thin volumes), scaled to
    unit L2 norm per sample and then by `magnitude` (in the normalised [-1, 1] frame),
    Gaussian-smoothed (zero padding, so it fades at the border), linearly upsampled and
    integrated by scaling and squaring, which keeps the map invertible. At 256 px and the
    defaults the displacement is about a pixel.
    """
    spatial_shape = _check_spatial_shape("smooth_displacement", spatial_shape)
    rank = len(spatial_shape)
    spacing = tuple(grid_spacing) if isinstance(grid_spacing, (tuple, list)) else (grid_spacing,) * rank
    if len(spacing) != rank:
        raise ValueError(f"augment.smooth_displacement: grid_spacing {grid_spacing} must be an int "
                         f"or one int per spatial axis of {spatial_shape}")
    coarse = tuple(max(size // step, 1) for size, step in zip(spatial_shape, spacing))
    velocity = jax.random.uniform(key, (batch_size,) + coarse + (rank,), minval=-1.0, maxval=1.0)
    norm = jnp.sqrt(jnp.sum(velocity ** 2, axis=tuple(range(1, rank + 2)), keepdims=True))
    velocity = magnitude * velocity / (norm + 1e-20)
    sigma = jnp.full((batch_size,), smoothing_sigma, jnp.float32)
    velocity = _gaussian_filter(velocity, sigma, _VELOCITY_SMOOTHING_TAPS, "constant")
    velocity = jax.image.resize(velocity, (batch_size,) + spatial_shape + (rank,), method="linear")
    # normalised [-1, 1] units -> voxels, corners at +-1
    velocity = velocity * jnp.array([(size - 1) / 2 for size in spatial_shape], jnp.float32)

    grid = _pixel_grid(spatial_shape)

    def square(_, displacement: Array) -> Array:
        # phi o phi with phi = id + u:  u(x) + u(x + u(x)), sampled with border clamping
        where = _clip_to_image(grid + displacement, spatial_shape)
        return displacement + resample(displacement, where, order=1)

    return jax.lax.fori_loop(0, squaring_steps, square, velocity / 2.0 ** squaring_steps)


def smooth_warp(key: Array, images: Array, labels: Optional[Array] = None,
                confidences: Optional[Array] = None, *, p: float = 0.5,
                magnitude: float = 1.5, grid_spacing: GridSpacing = 8
                ) -> tuple[Array, Optional[Array], Optional[Array]]:
    """With probability p (one draw for the whole batch) warps by `smooth_displacement`.

    Images are resampled linearly, labels and confidences by nearest neighbour, so each
    warped pixel keeps a (pseudo-label, confidence) pair that belongs together; all channels
    share one field. Samples that fall outside repeat the border, as the reference's clamped
    sampling grid does. The reference warps the image only; pass labels/confidences to warp
    them too, or None to leave them. `grid_spacing` must be static.
    """
    rank = _check_batch("smooth_warp", images, labels, confidences)
    decide_key, field_key = jax.random.split(key)
    batch, spatial_shape = images.shape[0], tuple(images.shape[1:rank + 1])

    def warp(arrays: tuple[Array, Optional[Array], Optional[Array]]):
        imgs, labs, confs = arrays
        displacement = smooth_displacement(field_key, batch, *spatial_shape,
                                           magnitude=magnitude, grid_spacing=grid_spacing)
        where = _clip_to_image(_pixel_grid(spatial_shape) + displacement, spatial_shape)
        imgs = resample(imgs, where, order=1)
        labs = None if labs is None else resample(labs, where, order=0)
        confs = None if confs is None else resample(confs, where, order=0)
        return imgs, labs, confs

    apply = jax.random.bernoulli(decide_key, p)
    return jax.lax.cond(apply, warp, lambda arrays: arrays, (images, labels, confidences))


# ----------------------------------------------------------------------------- similarity warps

def random_similarity(key: Array, batch_size: int, *, spatial_rank: int = 2,
                      scale_range: tuple[float, float] = (0.8, 1.2),
                      max_rotation_deg: float = 60.0, max_translation: float = 0.1,
                      mirror: bool = True) -> Array:
    """(B, 2, 3), or (B, 3, 4) with spatial_rank=3, random similarities for the equivariance loss.

    The reference's RandTPS in 'affine' mode: each matrix maps an output point (x, y, 1) in the
    normalised frame to the point it samples; its scale is uniform in the inverse of
    `scale_range` (content zoomed by 0.8 to 1.2), rotation uniform in +-`max_rotation_deg`,
    translation uniform in +-`max_translation` per axis, and with probability 1/2 the sampled
    x is mirrored. The reference draws the mirror once per batch; here each sample draws its
    own. Its extra thin-plate jitter of the control points (sigma 0.01) is left out.
    In 3-D the rotation stays in the (H, W) plane (about the depth axis: slices are often thick,
    so rotating depth into them would blur), the scale is isotropic and z gets its own shift;
    the (x, y) part is exactly the 2-D matrix of the same key. Rotations act on the normalised
    frame, so on a non-square image they also stretch, as PyTorch's affine_grid does.
    """
    if spatial_rank not in (2, 3):
        raise ValueError(f"augment.random_similarity: spatial_rank must be 2 (matrices (B, 2, 3)) "
                         f"or 3 (matrices (B, 3, 4)), got {spatial_rank}")
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
    if spatial_rank == 2:
        return matrices
    depth_shift = jax.random.uniform(jax.random.fold_in(shift_key, 1), (batch_size,),
                                     minval=-max_translation, maxval=max_translation)
    zeros = jnp.zeros((batch_size, 2, 1), matrices.dtype)
    in_plane = jnp.concatenate([matrices[:, :, :2], zeros, matrices[:, :, 2:]], axis=2)
    no_depth = jnp.zeros_like(scale)
    depth_row = jnp.stack([no_depth, no_depth, scale, depth_shift], axis=-1)[:, None, :]
    return jnp.concatenate([in_plane, depth_row], axis=1)


def warp_affine(x: Array, matrices: Array, *, order: int, cval: float = 0.0) -> Array:
    """Warps x (B, H, W, ...) by (B, 2, 3) or x (B, D, H, W, ...) by (B, 3, 4) matrices.

    The matrices are in the normalised frame (x, y[, z]) = (col, row[, depth]): output voxel p
    samples x at matrices @ (p_x, p_y[, p_z], 1); outside the image the value is `cval` (0: the
    reference's padding_mode='zeros'). Trailing axes (channels, classes) share the geometry.
    order 1 linear for images, logits, probabilities and masks; order 0 nearest for labels.
    """
    rank = matrices.shape[1] if matrices.ndim == 3 else 0
    if (rank not in (2, 3) or x.ndim < rank + 1 or matrices.shape != (x.shape[0], rank, rank + 1)):
        raise ValueError(f"augment.warp_affine: x {tuple(x.shape)} must be (B, H, W, ...) with "
                         f"matrices (B, 2, 3), or (B, D, H, W, ...) with matrices (B, 3, 4); got "
                         f"matrices {tuple(matrices.shape)}")
    spatial_shape = tuple(x.shape[1:rank + 1])
    # voxel -> normalised: x = 2 col / (W - 1) - 1, y = 2 row / (H - 1) - 1, z likewise with D
    to_norm = jnp.array([2.0 / max(size - 1, 1) for size in spatial_shape[::-1]], jnp.float32)
    pixels = _pixel_grid(spatial_shape)[..., ::-1]  # (col, row[, depth]) = (x, y[, z]) order
    points = pixels * to_norm - 1.0
    homogeneous = jnp.concatenate([points, jnp.ones(spatial_shape + (1,), jnp.float32)], -1)
    axes = "dhw"[-rank:]
    # HIGHEST: at DEFAULT precision TPUs (and GPUs with TF32) round the operands to bfloat16
    # (or TF32), which moves 256 px sample coordinates by up to ~0.4 px; exact float32 costs
    # nothing at this size (a few multiply-adds per pixel).
    sampled = jnp.einsum(f"bij,{axes}j->b{axes}i", matrices.astype(jnp.float32), homogeneous,
                         precision=jax.lax.Precision.HIGHEST)
    sampled_pixels = (sampled + 1.0) / to_norm
    return resample(x, sampled_pixels[..., ::-1], order=order, cval=cval)


# ----------------------------------------------------------------------------- random rescale

def _reflect_index(position: Array, size: Array) -> Array:
    """numpy.pad(mode='reflect') of an axis of `size` (>= 1) samples: where canvas position
    `position` (>= 0) reads, reflecting about the edge samples again and again when the pad is
    longer than the axis."""
    period = jnp.maximum(2 * (size - 1), 1)
    folded = jnp.mod(position, period)
    return jnp.where(size == 1, 0, jnp.where(folded < size, folded, period - folded))


def _axis_weights(canvas: Array, resized: Array, size: int) -> Array:
    """(L, size) rows of PIL's bilinear resize of an axis of `size` to `resized` samples (a
    triangle on pixel centres, stretched by the reduction factor when shrinking: PIL's
    antialiasing), each row the resized sample that canvas position `canvas` (L,) shows after
    reflection padding."""
    ratio = size / resized.astype(jnp.float32)
    support = jnp.maximum(ratio, 1.0)
    centre = (_reflect_index(canvas, resized).astype(jnp.float32) + 0.5) * ratio - 0.5
    weights = jnp.maximum(0.0, 1.0 - jnp.abs(jnp.arange(size, dtype=jnp.float32) - centre[:, None]) / support)
    return weights / jnp.sum(weights, axis=1, keepdims=True)


def _rescaled_size(size: int, scales: Array) -> Array:
    """int(size * s) per sample, at least 1: the axis length PIL's resize gives (ReCo's transform)."""
    return jnp.maximum(jnp.floor(size * scales).astype(jnp.int32), 1)


def rescale_crop(images: Array, labels: Array, confidences: Array, scales: Array, offsets: Array, *,
                 fill_label: int) -> tuple[Array, Array, Array]:
    """ReCo's transform(..., scale_size, augmentation=False) of a batch, with its draws given:
    sample b is resized to int(size * scales[b]) along every spatial axis (the image by PIL's
    bilinear filter, labels and confidences by PIL's nearest: source floor((i + .5) size / n)),
    padded at the end of each axis to at least its old size (the image by reflection, labels
    with `fill_label`, confidences with 0, so padding is never a pseudo-label) and cropped back
    to the old shape from offsets[b] (B, r) (in [0, max(n - size, 0)] per axis). Static shapes:
    each axis is one (B, size, size) matrix (image) or index vector (labels)."""
    rank = _check_batch("rescale_crop", images, labels, confidences)
    spatial = images.shape[1:rank + 1]
    inside = jnp.ones(labels.shape, bool)
    for axis, size in enumerate(spatial):
        resized = _rescaled_size(size, scales)  # (B,)
        canvas = jnp.arange(size)[None, :] + offsets[:, axis:axis + 1]  # (B, size)
        weights = jax.vmap(_axis_weights, in_axes=(0, 0, None))(canvas, resized, size)
        source = jnp.floor((jnp.minimum(canvas, resized[:, None] - 1) + 0.5) * size / resized[:, None])
        source = jnp.clip(source.astype(jnp.int32), 0, size - 1)
        images = jax.vmap(lambda x, w, a=axis: jnp.moveaxis(
            jnp.tensordot(w, x, axes=([1], [a]), precision=jax.lax.Precision.HIGHEST), 0, a))(images, weights)
        labels, confidences = (jax.vmap(lambda x, i, a=axis: jnp.take(x, i, axis=a))(x, source)
                               for x in (labels, confidences))
        within = canvas < resized[:, None]
        shape = [labels.shape[0]] + [1] * rank
        shape[axis + 1] = size
        inside = inside & within.reshape(shape)
    return (images, jnp.where(inside, labels, jnp.asarray(fill_label, labels.dtype)),
            jnp.where(inside, confidences, jnp.zeros((), confidences.dtype)))


def random_rescale(key: Array, images: Array, labels: Array, confidences: Array, *,
                   scale_range: tuple[float, float], fill_label: int) -> tuple[Array, Array, Array]:
    """ReCo's random rescale of the unlabeled batch with the teacher's pseudo-labels and
    confidences, before mixing (train_semisup.py: batch_transform(..., scale_size,
    apply_augmentation=False)): one scale per sample uniform in `scale_range`, the crop's start
    uniform over the positions that fit (RandomCrop), then `rescale_crop`."""
    rank = _check_batch("random_rescale", images, labels, confidences)
    batch, spatial = images.shape[0], images.shape[1:rank + 1]
    scale_key, *offset_keys = jax.random.split(key, rank + 1)
    scales = jax.random.uniform(scale_key, (batch,), minval=scale_range[0], maxval=scale_range[1])
    offsets = []
    for offset_key, size in zip(offset_keys, spatial):
        resized = _rescaled_size(size, scales)
        offsets.append(jax.random.randint(offset_key, (batch,), 0, jnp.maximum(resized - size, 0) + 1))
    return rescale_crop(images, labels, confidences, scales, jnp.stack(offsets, axis=1), fill_label=fill_label)


# ----------------------------------------------------------------------------- strong view

def photometric_and_warp(key: Array, images: Array, labels: Array, confidences: Array, *,
                         warp_labels: bool, warp_prob: float = 0.5, value_range: ValueRange = UNIT_RANGE,
                         jitter_prob: float = 0.5, colour: Optional[ColourJitter] = None,
                         blur_prob: float = 0.5, flip_prob: float = 0.0) -> tuple[Array, Array, Array]:
    """The strong view's steps after mixing: intensity_jitter (p=`jitter_prob` per sample,
    clipped to `value_range`), or with `colour` colour_jitter (RGB) -> gaussian_blur (p=`blur_prob`
    per sample) -> smooth_warp (p=`warp_prob` per batch) -> horizontal_flip (p=`flip_prob` per
    sample, drawn only when > 0, so the other draws are those of a run without it).

    With warp_labels=False the warp moves the image only, as the reference does, and the
    pseudo-labels no longer line up with it; True warps labels and confidences with the image.
    Every setting must be static.
    """
    _check_batch("photometric_and_warp", images, labels, confidences)
    jitter_key, blur_key, warp_key = jax.random.split(key, 3)
    if colour is None:
        images = intensity_jitter(jitter_key, images, p=jitter_prob, value_range=value_range)
    else:
        images = colour_jitter(jitter_key, images, p=jitter_prob, settings=colour)
    images = gaussian_blur(blur_key, images, p=blur_prob)
    if warp_prob > 0 and warp_labels:
        images, labels, confidences = smooth_warp(warp_key, images, labels, confidences, p=warp_prob)
    elif warp_prob > 0:
        images, _, _ = smooth_warp(warp_key, images, p=warp_prob)
    if flip_prob > 0:
        images, labels, confidences = horizontal_flip(jax.random.fold_in(key, 1), images, labels, confidences,
                                                      p=flip_prob)
    return images, labels, confidences


def labeled_photometric(key: Array, images: Array, *, jitter_prob: float, blur_prob: float,
                        value_range: ValueRange = UNIT_RANGE, colour: Optional[ColourJitter] = None) -> Array:
    """ReCo's photometric steps of the labeled view (build_data.transform(..., augmentation=True)):
    the jitter (colour_jitter with `colour`, else intensity_jitter clipped to `value_range`) per
    sample with p=`jitter_prob`, then gaussian_blur per sample with p=`blur_prob`. The labels stay
    as they are: neither step moves a pixel. Settings must be static."""
    _image_spatial_rank("labeled_photometric", images)
    jitter_key, blur_key = jax.random.split(key)
    if colour is None:
        images = intensity_jitter(jitter_key, images, p=jitter_prob, value_range=value_range)
    else:
        images = colour_jitter(jitter_key, images, p=jitter_prob, settings=colour)
    return gaussian_blur(blur_key, images, p=blur_prob)


def strong_augment(key: Array, images: Array, labels: Array, confidences: Array, *,
                   warp_labels: bool, warp_prob: float = 0.5, value_range: ValueRange = UNIT_RANGE,
                   mix: str = "cutmix", num_classes: Optional[int] = None, jitter_prob: float = 0.5,
                   colour: Optional[ColourJitter] = None, blur_prob: float = 0.5, flip_prob: float = 0.0,
                   rescale: Optional[tuple[float, float]] = None, fill_label: Optional[int] = None
                   ) -> tuple[Array, Array, Array]:
    """The strong view of the unlabeled batch, in the reference's order: with `rescale` (a scale
    range, ReCo's) first `random_rescale` with fold_in(key, 2), padding labels with `fill_label`
    (a value that is no class); then `mix` ('cutmix' or 'classmix', which needs `num_classes`;
    partner (b+1) % B) with `key`, then `photometric_and_warp` with fold_in(key, 1). The one
    builder of the strong view: the train step and the variance study call it
    (objective.strong_view, settings from config.augment)."""
    _check_batch("strong_augment", images, labels, confidences)
    if rescale is not None:
        if fill_label is None:
            raise ValueError("augment.strong_augment: rescale needs fill_label, the label of padded pixels")
        images, labels, confidences = random_rescale(jax.random.fold_in(key, 2), images, labels, confidences,
                                                     scale_range=rescale, fill_label=fill_label)
    if mix == "cutmix":
        images, labels, confidences = cutmix(key, images, labels, confidences)
    elif mix == "classmix":
        if num_classes is None:
            raise ValueError("augment.strong_augment: mix='classmix' needs num_classes")
        images, labels, confidences = classmix(key, images, labels, confidences, num_classes=num_classes)
    else:
        raise ValueError(f"augment.strong_augment: mix must be one of {MIXES}, got {mix!r}")
    return photometric_and_warp(jax.random.fold_in(key, 1), images, labels, confidences,
                                warp_labels=warp_labels, warp_prob=warp_prob, value_range=value_range,
                                jitter_prob=jitter_prob, colour=colour, blur_prob=blur_prob, flip_prob=flip_prob)


__all__ = [
    "ColourJitter",
    "classmix",
    "classmix_mask",
    "colour_jitter",
    "cutmix",
    "cutmix_mask",
    "gaussian_blur",
    "horizontal_flip",
    "hsv_to_rgb",
    "intensity_jitter",
    "labeled_photometric",
    "photometric_and_warp",
    "random_rescale",
    "random_similarity",
    "rescale_crop",
    "resample",
    "rgb_to_hsv",
    "smooth_displacement",
    "smooth_warp",
    "strong_augment",
    "warp_affine",
]
