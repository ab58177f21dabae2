"""A built-in natural-image set: synthetic RGB scenes, generated on first use, never downloaded.

Why: the natural-image path (DeepLabv3+, RGB with ImageNet normalisation, the ignore label,
ReCo's views, mIoU) must train and be tested without Pascal VOC. The scenes ask what VOC asks
of a segmenter, at toy size: five object classes, each with a shape, a surface (disc: radial
shading; box: checkerboard; kite: stripes; ring: an annulus with speckles; cross: flat) and a
typical hue whose ranges overlap, as VOC's classes have typical looks but no colour of their
own; backgrounds of duller low-frequency colour fields with fine texture, and background clutter
(small blobs of any colour, labeled background); 1 to 4 objects an image, 18 % to 55 % of the image across
(scale change), painted in depth order so that later objects occlude earlier ones, some cut by
the image border; an illumination gradient, noise and a slight blur; and an ignore band of
`border` pixels (255) along every object boundary, as VOC's void outlines. A surface is an
object's canonical one with probability `texture_fidelity` and one drawn from all five otherwise,
and, independently, its hue is its class's with that probability and any hue otherwise, so the
shape has to be read too.

Written in the layout arco_jax.data.scenes reads (any copy of it serves as data.data_dir):
  images/<id>.png    RGB images (H x W)
  labels/<id>.png    palette PNGs of class indices, 0 background, 1..5 the classes, 255 ignored
  train.txt, val.txt the image ids of each split

Generation is a pure function of (config, image number): image n draws from numpy's generator
seeded by (seed, n), so adding images never changes the others. Training draws the labeled
images by the natural-image class cover (data/natural.py).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from arco_jax.data import generated, natural, registry
from arco_jax.errors import ConfigError

GENERATOR_VERSION = 1
CLASS_NAMES = ("disc", "box", "kite", "ring", "cross")
NUM_CLASSES = len(CLASS_NAMES) + 1
IGNORE_LABEL = 255
SPLITS = ("train", "val")
IMAGE_DIR, LABEL_DIR = "images", "labels"
SURFACES = ("shaded", "checker", "stripes", "speckle", "flat")  # canonical surface of class i + 1
CLASS_HUES = tuple(i / len(CLASS_NAMES) for i in range(len(CLASS_NAMES)))  # typical hue of class i + 1
HUE_SPREAD = 0.15  # an object's hue: its class's +- this (classes' ranges overlap)


@dataclasses.dataclass(frozen=True)
class ScenesConfig:
    """What defines one scene set (everything that changes its bytes).

    splits: images in (train, val). image_size: (H, W). objects: inclusive range per image.
    scale: an object's size as a fraction of the image's shorter side (min, max).
    border: width in pixels of the ignore band on each side of an object boundary (0: none).
    texture_fidelity: probability that an object wears its class's own surface (and, drawn
      separately, its class's hue).
    """

    splits: tuple[int, int] = (240, 48)
    image_size: tuple[int, int] = (96, 96)
    objects: tuple[int, int] = (1, 4)
    scale: tuple[float, float] = (0.18, 0.55)
    border: int = 1
    texture_fidelity: float = 0.8
    seed: int = 0

    def __post_init__(self):
        for name, cast in (("splits", int), ("image_size", int), ("objects", int), ("scale", float)):
            object.__setattr__(self, name, tuple(cast(v) for v in getattr(self, name)))
        if len(self.splits) != 2 or min(self.splits) < 1 or self.splits[0] < 2:
            raise ValueError(f"splits must be (train >= 2, val >= 1) images, got {self.splits}")
        if len(self.image_size) != 2 or min(self.image_size) < 32:
            raise ValueError(f"image_size must be (H, W) with both at least 32, got {self.image_size}")
        if len(self.objects) != 2 or not 1 <= self.objects[0] <= self.objects[1]:
            raise ValueError(f"objects must be an inclusive range (min >= 1, max >= min), got {self.objects}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must be fractions 0 < min <= max <= 1, got {self.scale}")
        if not (isinstance(self.border, int) and 0 <= self.border <= 4):
            raise ValueError(f"border must be 0..4 pixels, got {self.border!r}")
        if not 0 <= self.texture_fidelity <= 1:
            raise ValueError(f"texture_fidelity must be in [0, 1], got {self.texture_fidelity}")

    def params(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def names(self, split: str) -> list[str]:
        start = 0 if split == "train" else self.splits[0]
        return [f"scene_{n:05d}" for n in range(start, start + self.splits[SPLITS.index(split)])]


# ----------------------------------------------------------------------------- drawing


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV (each in [0, 1]) -> RGB (..., 3) in [0, 1]."""
    i = np.floor(h * 6.0).astype(int) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return np.take_along_axis(table, i[None, ..., None].repeat(3, -1), 0)[0]


def _colour(rng: np.random.Generator, hue: float | None = None, saturation=(0.45, 0.95)) -> np.ndarray:
    """A colour, mid to bright: of any hue, or within HUE_SPREAD of `hue` (on the hue circle)."""
    h = rng.uniform() if hue is None else (hue + rng.uniform(-HUE_SPREAD, HUE_SPREAD)) % 1.0
    return _hsv_to_rgb(np.array(h), np.array(rng.uniform(*saturation)), np.array(rng.uniform(0.45, 0.95)))


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Low-frequency noise in [0, 1]."""
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma, mode="wrap")
    field -= field.min()
    return field / max(field.max(), 1e-6)


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    shape = yy.shape
    a, b = (_colour(rng, saturation=(0.1, 0.5)) * rng.uniform(0.4, 0.9) for _ in range(2))
    mix = _smooth_field(rng, shape, rng.uniform(6, 14))[..., None]
    image = a * mix + b * (1 - mix)
    kind = rng.integers(3)
    if kind == 0:  # fine stripes at a random angle (like a stripy object's, at low contrast)
        angle, period = rng.uniform(0, np.pi), rng.uniform(3, 8)
        fine = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    elif kind == 1:  # grain
        fine = ndimage.gaussian_filter(rng.normal(size=shape), 0.8)
        fine /= max(np.abs(fine).max(), 1e-6)
    else:  # blotches
        fine = 2 * _smooth_field(rng, shape, 2.5) - 1
    return image * (1 + rng.uniform(0.08, 0.25) * fine[..., None])


def _surface(kind: str, rng: np.random.Generator, colour: np.ndarray, u: np.ndarray, v: np.ndarray,
             r: np.ndarray) -> np.ndarray:
    """An object's surface on its own frame (u, v in object radii, r = the radius)."""
    other = _colour(rng)
    if kind == "shaded":  # a lit sphere: bright towards a light direction, dark at the rim
        angle = rng.uniform(0, 2 * np.pi)
        light = 0.55 + 0.45 * np.clip(1 - r, 0, 1) + 0.25 * (u * np.cos(angle) + v * np.sin(angle))
        return colour * np.clip(light, 0.2, 1.3)[..., None]
    if kind == "checker":
        period = rng.uniform(0.35, 0.7)
        cell = (np.floor(u / period) + np.floor(v / period)) % 2
        return np.where(cell[..., None] > 0, colour, 0.5 * colour + 0.5 * other)
    if kind == "stripes":
        period = rng.uniform(0.3, 0.6)
        band = (np.floor(u / period) % 2)[..., None]
        return np.where(band > 0, colour, 0.35 * colour)
    if kind == "speckle":
        dots = (rng.uniform(size=u.shape) < 0.18)[..., None]
        return np.where(dots, 0.6 * colour + 0.4, colour * 0.85)
    return np.broadcast_to(colour, u.shape + (3,))  # flat


def _shape_mask(cls: int, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Which pixels of the object's frame the class's shape covers (u, v in object radii)."""
    name = CLASS_NAMES[cls - 1]
    if name == "disc":
        return u ** 2 + v ** 2 <= 1
    if name == "box":
        aspect = rng.uniform(0.5, 1.0)
        return (np.abs(u) <= 0.9) & (np.abs(v) <= 0.9 * aspect)
    if name == "kite":  # a triangle pointing along +u
        return (u >= -0.6) & (np.abs(v) <= 0.55 * (1.0 - u))
    if name == "ring":
        inner = rng.uniform(0.45, 0.65)
        rr = u ** 2 + v ** 2
        return (rr <= 1) & (rr >= inner ** 2)
    width = rng.uniform(0.25, 0.4)  # cross
    return ((np.abs(u) <= width) & (np.abs(v) <= 1)) | ((np.abs(v) <= width) & (np.abs(u) <= 1))


def render(config: ScenesConfig, number: int) -> tuple[np.ndarray, np.ndarray]:
    """Scene `number`: (RGB uint8 (H, W, 3), labels uint8 (H, W): 0..5, 255 on the ignore band)."""
    rng = np.random.default_rng((config.seed, number))
    height, width = config.image_size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    image = _background(rng, yy, xx)
    label = np.zeros((height, width), np.uint8)
    side = min(height, width)
    for _ in range(rng.integers(3, 9)):  # clutter: small irregular blobs, background
        cy, cx, radius = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(0.03, 0.08) * side
        wobble = 1 + 0.35 * _smooth_field(rng, (height, width), 3.0)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2) * wobble <= radius ** 2
        image[blob] = 0.6 * _colour(rng) + 0.4 * image[blob]
    for _ in range(rng.integers(config.objects[0], config.objects[1] + 1)):  # back to front
        cls = int(rng.integers(1, NUM_CLASSES))
        radius = 0.5 * rng.uniform(*config.scale) * side
        cy, cx = rng.uniform(-0.1, 1.1) * height, rng.uniform(-0.1, 1.1) * width
        angle = rng.uniform(0, 2 * np.pi)
        dy, dx = (yy - cy) / radius, (xx - cx) / radius
        u, v = dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)
        mask = _shape_mask(cls, u, v, rng)
        if not mask.any():
            continue
        surface = SURFACES[cls - 1] if rng.uniform() < config.texture_fidelity else str(rng.choice(SURFACES))
        colour = _colour(rng, CLASS_HUES[cls - 1]) if rng.uniform() < config.texture_fidelity else _colour(rng)
        painted = _surface(surface, rng, colour, u, v, np.sqrt(u ** 2 + v ** 2))
        image[mask] = painted[mask]
        label[mask] = cls
    gy, gx = rng.uniform(-0.35, 0.35, size=2)
    light = 1 + gy * (yy / height - 0.5) + gx * (xx / width - 0.5)
    image = ndimage.gaussian_filter(image * light[..., None], (0.6, 0.6, 0)) + rng.normal(0, 0.03, image.shape)
    if config.border:
        size = 2 * config.border + 1
        edge = ndimage.maximum_filter(label, size) != ndimage.minimum_filter(label, size)
        label = np.where(edge, IGNORE_LABEL, label).astype(np.uint8)
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8), label


# ----------------------------------------------------------------------------- on disk


def write_scenes(root: str | Path, config: ScenesConfig) -> Path:
    """Write the scene set into root (complete or not at all; never overwrites)."""
    palette = natural.voc_palette().ravel().tolist()

    def layout(staging: Path) -> dict:
        (staging / IMAGE_DIR).mkdir()
        (staging / LABEL_DIR).mkdir()
        pixels = np.zeros(NUM_CLASSES, np.int64)
        for split in SPLITS:
            names = config.names(split)
            for name in names:
                image, label = render(config, int(name.split("_")[1]))
                Image.fromarray(image).save(staging / IMAGE_DIR / f"{name}.png")
                indexed = Image.fromarray(label, mode="P")
                indexed.putpalette(palette)
                indexed.save(staging / LABEL_DIR / f"{name}.png")
                if split == "train":
                    pixels += np.bincount(label[label != IGNORE_LABEL], minlength=NUM_CLASSES)[:NUM_CLASSES]
            (staging / f"{split}.txt").write_text("".join(f"{name}\n" for name in names))
        return {"train_pixels_per_class": pixels.tolist()}

    marker = {"generator_version": GENERATOR_VERSION, "config": config.params(), "class_names": list(CLASS_NAMES)}
    return generated.write_once(root, layout, marker)


def ensure_scenes(cache_dir: str | Path | None = None, **params) -> Path:
    """The scene set of these parameters, generated into the cache on first use (reused after)."""
    config = ScenesConfig(**params)
    cache = Path(cache_dir) if cache_dir else generated.default_cache_dir()
    fingerprint = generated.fingerprint(GENERATOR_VERSION, config.params())
    root = cache / f"scenes-{fingerprint}"
    return generated.ensure(root, lambda path: write_scenes(path, config), GENERATOR_VERSION, config.params(),
                            "these scene parameters")


# ----------------------------------------------------------------------------- the registered dataset


def _samples(root: Path, data, split: str) -> list[natural.Sample]:
    return natural.listed_samples(root / f"{split}.txt", lambda name: root / IMAGE_DIR / f"{name}.png",
                                  lambda name: root / LABEL_DIR / f"{name}.png")


LAYOUT = natural.Layout(
    samples=_samples,
    train_count=lambda root, data: len(natural.read_list(root / "train.txt")),
    where=lambda root, data, split: f"list file {root / f'{split}.txt'}",
    manual=f"a scene folder with {IMAGE_DIR}/, {LABEL_DIR}/, train.txt and val.txt (arco_jax.data.scenes)")
CODEC = natural.identity_codec(NUM_CLASSES)


def _scene_config(config) -> ScenesConfig:
    s = config.data.scenes
    try:
        return ScenesConfig(splits=tuple(s.splits), image_size=tuple(s.image_size), objects=tuple(s.objects),
                            scale=tuple(s.scale), border=s.border, texture_fidelity=s.texture_fidelity, seed=s.seed)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config.data.scenes: {err}") from None


def _root(config) -> Path:
    """data.data_dir (a scene folder already written), or the generated set in the cache."""
    d = config.data
    if d.data_dir:
        return Path(d.data_dir)
    return ensure_scenes(d.cache_dir or None, **dataclasses.asdict(_scene_config(config)))


def _with_root(config, root: Path):
    resolved = config.copy_and_resolve_references()
    with resolved.unlocked():
        resolved.data.data_dir = str(root)
    return resolved


def _validate(config) -> None:
    """The fields; a written folder (data_dir) as any natural-image folder, else labeled_images
    against the train split the generator will write (nothing is generated here)."""
    d = config.data
    if d.source != "folder":
        raise ConfigError(f"config.data.source: the 'scenes' set is read as 'folder', got {d.source!r}")
    scene = _scene_config(config)
    if d.data_dir:
        natural.validate(config, NAME, LAYOUT)
        return
    natural.check_subset_fields(config)
    if d.labeled_split:
        raise ConfigError("config.data.labeled_split: a split file names images of a written scene folder; set "
                          "config.data.data_dir to that folder too")
    natural.check_count(d.labeled_images, scene.splits[0], "the generated scenes' train split")


def _open(config):
    root = _root(config)
    resolved = _with_root(config, root)
    natural.check_fields(resolved, NAME, LAYOUT)
    return natural.NaturalDataset(resolved, natural.folder_store(resolved, LAYOUT, CODEC), "synthetic scenes")


def _fields() -> dict:
    defaults = ScenesConfig()
    return {**natural.COMMON_FIELDS, "labeled_images": 12,
            "cache_dir": "",  # '' -> $ARCO_JAX_CACHE or ~/.cache/arco_jax
            "scenes": {"splits": defaults.splits, "image_size": defaults.image_size, "objects": defaults.objects,
                       "scale": defaults.scale, "border": defaults.border,
                       "texture_fidelity": defaults.texture_fidelity, "seed": defaults.seed}}


NAME = "scenes"
SCENES = registry.DatasetSpec(
    name=NAME, fields=_fields, info=natural.image_info(CLASS_NAMES), validate=_validate, open=_open,
    description="built-in synthetic RGB scenes (5 object classes, 255 ignored; generated on first use), "
                "per-image mIoU")
