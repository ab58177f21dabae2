"""A synthetic, ACDC-like cardiac MRI phantom written in the SSL4MIS layout.

Why: the project must build, train and be tested without the ACDC download. The phantom has
the same classes (0 background, 1 RV, 2 myocardium, 3 LV), short-axis stacks of a few slices
from base to apex, two frames per patient (ED and a smaller ES), and the exact on-disk layout
of the SSL4MIS processed ACDC, so every reader, pipeline and evaluation path runs unchanged.

It is learnable but not trivial: blood pools (LV, RV) share one bright intensity range, the dark
myocardium overlaps the body and organ intensities, a bright "aorta" and random organs sit in
the background, papillary muscles darken the LV, and noise plus a bias field blur the ranges.
RV is the rare (tail) class: a thin crescent that vanishes in apical slices.

Generation is a pure function of (config, patient number): each patient draws from its own
numpy generator seeded by (seed, patient number), so adding patients never changes the others.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
from scipy import ndimage

from arco_jax.data import generated
from arco_jax.data.generated import MARKER_FILE, default_cache_dir, read_marker  # noqa: F401 (public names)

GENERATOR_VERSION = 1
CLASS_NAMES = ("background", "RV", "myocardium", "LV")
NUM_CLASSES = len(CLASS_NAMES)
SPLIT_NAMES = ("train", "val", "test")
# SSL4MIS names the end-diastolic frame01 and the end-systolic frame02.
FRAME_NAMES = ("frame01", "frame02")


@dataclasses.dataclass(frozen=True)
class PhantomConfig:
    """What defines one phantom dataset (everything that changes its bytes).

    splits: patients in (train, val, test); patients are numbered consecutively in that order.
    image_size: in-plane size (square) of every slice.
    slices: inclusive (min, max) number of short-axis slices per patient.
    seed: base seed; patient n uses the stream seeded by (seed, n).
    """

    splits: tuple[int, int, int] = (20, 4, 6)
    image_size: int = 64
    slices: tuple[int, int] = (6, 10)
    seed: int = 0

    def __post_init__(self):
        splits = tuple(int(n) for n in self.splits)
        slices = tuple(int(n) for n in self.slices)
        object.__setattr__(self, "splits", splits)
        object.__setattr__(self, "slices", slices)
        if len(splits) != 3 or min(splits) < 0 or splits[0] < 1:
            raise ValueError(
                f"splits must be (train >= 1, val >= 0, test >= 0) patients, got {splits}")
        if len(slices) != 2 or not 3 <= slices[0] <= slices[1]:
            raise ValueError(f"slices must be (min, max) with 3 <= min <= max, got {slices}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32 pixels, got {self.image_size}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")

    def to_json(self) -> dict:
        return {"splits": list(self.splits), "image_size": self.image_size,
                "slices": list(self.slices), "seed": self.seed}

    def fingerprint(self) -> str:
        """Short hash naming the cache directory; includes the generator version."""
        return generated.fingerprint(GENERATOR_VERSION, self.to_json())


def patient_name(number: int) -> str:
    return f"patient{number:03d}"


def split_patients(config: PhantomConfig) -> dict[str, list[str]]:
    """Patient names per split: train first, then val, then test, numbered from 001."""
    names: dict[str, list[str]] = {}
    start = 1
    for split, count in zip(SPLIT_NAMES, config.splits):
        names[split] = [patient_name(n) for n in range(start, start + count)]
        start += count
    return names


def split_cases(config: PhantomConfig) -> dict[str, list[str]]:
    """Volume ("case") names per split: both frames of every patient."""
    return {split: [f"{p}_{f}" for p in patients for f in FRAME_NAMES]
            for split, patients in split_patients(config).items()}


# ----------------------------------------------------------------------------- geometry


def _ellipse_radius(theta: np.ndarray, radius: np.ndarray, stretch: float,
                    orientation: float, harmonics: np.ndarray) -> np.ndarray:
    """Boundary radius of a wobbly ellipse at polar angle theta.

    radius (broadcastable, per slice) is the mean radius; stretch in [0, 1) makes it
    elliptic along `orientation`; harmonics rows (k, amplitude, phase) add the wobble.
    """
    a, b = 1.0 + stretch, 1.0 - stretch
    rel = theta - orientation
    unit = a * b / np.sqrt((b * np.cos(rel)) ** 2 + (a * np.sin(rel)) ** 2)
    wobble = 1.0 + sum(amp * np.cos(k * theta + phase) for k, amp, phase in harmonics)
    return radius * unit * wobble


def _harmonics(rng: np.random.Generator, max_amplitude: float) -> np.ndarray:
    ks = np.array([2.0, 3.0, 4.0, 5.0])
    return np.stack([ks, rng.uniform(0, max_amplitude, 4) / np.sqrt(ks - 1),
                     rng.uniform(0, 2 * np.pi, 4)], axis=1)


def _polar(yy: np.ndarray, xx: np.ndarray, cy: np.ndarray, cx: np.ndarray):
    dy, dx = yy - cy[:, None, None], xx - cx[:, None, None]
    return np.hypot(dy, dx), np.arctan2(dy, dx)


def _blob(yy, xx, cy, cx, radius, rng: np.random.Generator, max_stretch=0.35,
          max_wobble=0.12) -> np.ndarray:
    """Boolean (D, H, W) mask of a random wobbly ellipse whose centre/radius vary per slice."""
    rho, theta = _polar(yy, xx, cy, cx)
    bound = _ellipse_radius(theta, radius[:, None, None], rng.uniform(0, max_stretch),
                            rng.uniform(0, np.pi), _harmonics(rng, max_wobble))
    return rho < bound


def _smooth_track(rng: np.random.Generator, t: np.ndarray, start: float,
                  drift: float) -> np.ndarray:
    """A coordinate that moves smoothly (linear + a gentle bend) along the slice axis."""
    return start + drift * (rng.uniform(-1, 1) * t + rng.uniform(-0.5, 0.5) * t * t)


@dataclasses.dataclass(frozen=True)
class _Anatomy:
    """Per-patient shape and appearance draws shared by the ED and ES frames."""

    num_slices: int
    heart_y: np.ndarray
    heart_x: np.ndarray
    lv_radius: float
    lv_stretch: float
    lv_orientation: float
    lv_harmonics: np.ndarray
    wall: float
    wall_harmonics: np.ndarray
    lv_apex: float
    rv_angle: np.ndarray
    rv_extent: float
    rv_tangential: float
    rv_radial: float
    rv_offset: float
    rv_harmonics: np.ndarray
    es_lv: float
    es_wall: float
    es_rv: float


def _draw_anatomy(rng: np.random.Generator, config: PhantomConfig) -> _Anatomy:
    size = config.image_size
    depth = int(rng.integers(config.slices[0], config.slices[1] + 1))
    t = np.linspace(0.0, 1.0, depth)
    return _Anatomy(
        num_slices=depth,
        heart_y=_smooth_track(rng, t, size * (0.5 + rng.uniform(-0.08, 0.08)), 0.05 * size),
        heart_x=_smooth_track(rng, t, size * (0.5 + rng.uniform(-0.08, 0.08)), 0.05 * size),
        lv_radius=size * rng.uniform(0.11, 0.15),
        lv_stretch=rng.uniform(0.0, 0.18),
        lv_orientation=rng.uniform(0, np.pi),
        lv_harmonics=_harmonics(rng, 0.08),
        wall=rng.uniform(0.35, 0.5),
        wall_harmonics=_harmonics(rng, 0.15),
        lv_apex=rng.uniform(1.0, 1.2),
        rv_angle=np.pi + rng.uniform(-0.5, 0.5) + rng.uniform(-0.2, 0.2) * t,
        rv_extent=rng.uniform(0.55, 0.85),
        rv_tangential=rng.uniform(1.4, 1.9),
        rv_radial=rng.uniform(0.6, 0.9),
        rv_offset=rng.uniform(0.1, 0.4),
        rv_harmonics=_harmonics(rng, 0.1),
        es_lv=rng.uniform(0.6, 0.75),
        es_wall=rng.uniform(1.15, 1.4),
        es_rv=rng.uniform(0.6, 0.8),
    )


def _heart_labels(anatomy: _Anatomy, yy: np.ndarray, xx: np.ndarray, systole: bool) -> np.ndarray:
    """uint8 (D, H, W) labels of one frame; the ES frame shrinks the cavities, thickens the wall."""
    a = anatomy
    t = np.linspace(0.0, 1.0, a.num_slices)
    lv_scale = a.es_lv if systole else 1.0
    wall_scale = a.es_wall if systole else 1.0
    rv_scale = a.es_rv if systole else 1.0

    # Base (t=0) to apex (t=1): an ellipsoidal cap, the cavity may close in the last slice.
    profile = np.sqrt(np.clip(1.0 - (t / a.lv_apex) ** 2, 0.0, None))
    lv_r = a.lv_radius * lv_scale * profile
    wall_r = a.lv_radius * a.wall * wall_scale * (1.0 - 0.25 * t)

    rho, theta = _polar(yy, xx, a.heart_y, a.heart_x)
    lv_bound = _ellipse_radius(theta, lv_r[:, None, None], a.lv_stretch, a.lv_orientation,
                               a.lv_harmonics)
    outer_bound = lv_bound + _ellipse_radius(theta, wall_r[:, None, None], 0.0, 0.0,
                                             a.wall_harmonics)

    labels = np.zeros(rho.shape, np.uint8)
    labels[rho < outer_bound] = 2
    labels[rho < lv_bound] = 3

    # RV: an ellipse beside the septum, cut by the LV epicardium -> a crescent; it shrinks to
    # nothing before the apex, which makes it the rare class.
    rv_profile = np.sqrt(np.clip(1.0 - (t / a.rv_extent) ** 2, 0.0, None)) * rv_scale
    outer_mean = a.lv_radius * (lv_scale * profile + a.wall * wall_scale * (1.0 - 0.25 * t))
    rv_radial = a.lv_radius * a.rv_radial * rv_profile
    distance = outer_mean + a.rv_offset * rv_radial
    rv_y = a.heart_y + distance * np.sin(a.rv_angle)
    rv_x = a.heart_x + distance * np.cos(a.rv_angle)
    rv_rho, rv_theta = _polar(yy, xx, rv_y, rv_x)
    # Ellipse with its long (tangential) axis perpendicular to the LV->RV direction.
    tangential = a.rv_tangential / a.rv_radial
    stretch = (tangential - 1.0) / (tangential + 1.0)
    mean_radius = 0.5 * (a.lv_radius * a.rv_tangential * rv_profile + rv_radial)
    rv_bound = _ellipse_radius(rv_theta, mean_radius[:, None, None], stretch,
                               a.rv_angle[:, None, None] + np.pi / 2, a.rv_harmonics)
    rv = (rv_rho < rv_bound) & (labels == 0) & (rv_profile[:, None, None] > 0.05)
    labels[rv] = 1
    return labels


def _render(labels: np.ndarray, anatomy: _Anatomy, yy: np.ndarray, xx: np.ndarray,
            rng: np.random.Generator) -> np.ndarray:
    """Image of one frame: background anatomy, class intensities, blur, bias, Rician noise."""
    depth, size, _ = labels.shape
    t = np.linspace(0.0, 1.0, depth)
    blood = rng.uniform(0.65, 0.9)
    intensity = np.array([0.0, blood * rng.uniform(0.9, 1.05), rng.uniform(0.2, 0.35), blood])

    # Body (moderate), lungs (dark), organs of any intensity, a bright round aorta. Organs and
    # aorta keep a 2-pixel gap to the heart so that the blood pools have a visible border.
    image = np.full(labels.shape, rng.uniform(0.0, 0.04), np.float32)
    in_plane_cross = np.zeros((3, 3, 3), bool)
    in_plane_cross[1] = ndimage.generate_binary_structure(2, 1)
    free = ~ndimage.binary_dilation(labels > 0, in_plane_cross, iterations=2)
    centre = np.full(depth, size / 2.0)
    body = _blob(yy, xx, centre + rng.uniform(-2, 2), centre + rng.uniform(-2, 2),
                 np.full(depth, size * rng.uniform(0.40, 0.47)), rng, max_stretch=0.15,
                 max_wobble=0.05)
    image[body] = rng.uniform(0.3, 0.5)
    for side in (-1.0, 1.0):
        lung_y = anatomy.heart_y[0] - size * rng.uniform(0.0, 0.1)
        lung_x = anatomy.heart_x[0] + side * size * rng.uniform(0.26, 0.32)
        lung = _blob(yy, xx, _smooth_track(rng, t, lung_y, 2.0), _smooth_track(rng, t, lung_x, 2.0),
                     size * rng.uniform(0.10, 0.15) * (1.0 + 0.2 * t), rng)
        image[lung & body] = rng.uniform(0.02, 0.12)
    for _ in range(int(rng.integers(2, 5))):
        organ = _blob(yy, xx,
                      _smooth_track(rng, t, size * rng.uniform(0.15, 0.85), 3.0),
                      _smooth_track(rng, t, size * rng.uniform(0.15, 0.85), 3.0),
                      size * rng.uniform(0.04, 0.12) * (1.0 + rng.uniform(-0.3, 0.3) * t), rng)
        image[organ & body & free] = rng.uniform(0.15, 0.95)
    aorta_angle = rng.uniform(-np.pi / 2, np.pi / 2)  # opposite side from the RV
    aorta_distance = anatomy.lv_radius * rng.uniform(2.5, 3.0)
    aorta = _blob(yy, xx,
                  anatomy.heart_y + aorta_distance * np.sin(aorta_angle),
                  anatomy.heart_x + aorta_distance * np.cos(aorta_angle),
                  np.full(depth, size * rng.uniform(0.025, 0.04)), rng, max_stretch=0.1,
                  max_wobble=0.03)
    image[aorta & free] = blood * rng.uniform(0.9, 1.05)

    heart = labels > 0
    image[heart] = intensity[labels[heart]]
    # Papillary muscles: dark spots inside the LV cavity that are still labelled LV.
    for _ in range(int(rng.integers(0, 3))):
        angle = rng.uniform(0, 2 * np.pi)
        dist = anatomy.lv_radius * rng.uniform(0.3, 0.55)
        spot = _blob(yy, xx, anatomy.heart_y + dist * np.sin(angle),
                     anatomy.heart_x + dist * np.cos(angle),
                     np.full(depth, anatomy.lv_radius * rng.uniform(0.12, 0.22)), rng)
        image[spot & (labels == 3)] = intensity[2] * rng.uniform(1.0, 1.4)

    # Tissue texture, partial-volume blur, smooth multiplicative bias, Rician noise.
    texture = ndimage.gaussian_filter(rng.standard_normal(labels.shape), (0, 1.5, 1.5))
    image = image * (1.0 + 0.05 * texture / (texture.std() + 1e-8))
    image = ndimage.gaussian_filter(image, (0, *(2 * [rng.uniform(0.4, 0.8)])))
    u, v = (yy / size - 0.5), (xx / size - 0.5)
    c = rng.uniform(-0.5, 0.5, 6)
    bias = np.exp(c[0] * u + c[1] * v + c[2] * u * v + c[3] * u * u + c[4] * v * v
                  + 0.2 * c[5] * (t[:, None, None] - 0.5))
    sigma = blood * rng.uniform(0.04, 0.08)
    noisy = np.hypot(image * bias + sigma * rng.standard_normal(labels.shape),
                     sigma * rng.standard_normal(labels.shape))
    lo, hi = noisy.min(), noisy.max()
    return ((noisy - lo) / (hi - lo)).astype(np.float32)


def generate_patient(config: PhantomConfig, number: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(image, label)] for the ED and ES frames of one patient, each (D, H, W).

    image is float32 min-max normalised per volume to [0, 1]; label is uint8 in [0, 4).
    """
    rng = np.random.default_rng([config.seed, number])
    anatomy = _draw_anatomy(rng, config)
    size = config.image_size
    yy, xx = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64),
                         indexing="ij")
    yy, xx = yy[None], xx[None]
    frames = []
    for frame, systole in enumerate((False, True)):
        labels = _heart_labels(anatomy, yy, xx, systole)
        frame_rng = np.random.default_rng([config.seed, number, frame + 1])
        frames.append((_render(labels, anatomy, yy, xx, frame_rng), labels))
    return frames


# ----------------------------------------------------------------------------- writing


def _write_h5(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image, compression="gzip", compression_opts=1)
        f.create_dataset("label", data=label, compression="gzip", compression_opts=1)


def _iter_patients(config: PhantomConfig) -> Iterator[tuple[str, str, int]]:
    for split, patients in split_patients(config).items():
        for name in patients:
            yield split, name, int(name.removeprefix("patient"))


def _write_layout(root: Path, config: PhantomConfig) -> dict:
    """Writes every file of the layout under root (an empty directory); returns counts."""
    slices_dir = root / "data" / "slices"
    slices_dir.mkdir(parents=True)
    lists: dict[str, list[str]] = {split: [] for split in SPLIT_NAMES}
    train_slices: list[str] = []
    for split, patient, number in _iter_patients(config):
        for frame_name, (image, label) in zip(FRAME_NAMES, generate_patient(config, number)):
            case = f"{patient}_{frame_name}"
            lists[split].append(case)
            _write_h5(root / "data" / f"{case}.h5", image, label)
            if split == "train":
                for index in range(image.shape[0]):
                    name = f"{case}_slice_{index}"
                    _write_h5(slices_dir / f"{name}.h5", image[index], label[index])
                    train_slices.append(name)
    (root / "train_slices.list").write_text("".join(f"{n}\n" for n in train_slices))
    for split, cases in lists.items():
        (root / f"{split}.list").write_text("".join(f"{c}\n" for c in cases))
    return {"train_slices": len(train_slices), **{f"{s}_volumes": len(c) for s, c in lists.items()}}


def _resolve_config(config: PhantomConfig | None, params: dict) -> PhantomConfig:
    if config is not None and params:
        raise TypeError(
            f"pass either a PhantomConfig or its fields, not both (got {sorted(params)})")
    return config if config is not None else PhantomConfig(**params)


def write_phantom_dataset(root: str | os.PathLike, config: PhantomConfig | None = None,
                          **params) -> Path:
    """Writes the phantom to `root` in the SSL4MIS layout; all or nothing (generated.write_once).

    `params` are PhantomConfig fields (used when no config is given). Raises FileExistsError
    if root exists.
    """
    config = _resolve_config(config, params)
    marker = {"generator": "arco_jax.data.phantom", "generator_version": GENERATOR_VERSION,
              "config": config.to_json(), "class_names": list(CLASS_NAMES)}
    return generated.write_once(root, lambda staging: _write_layout(staging, config), marker)


def ensure_phantom(cache_dir: str | os.PathLike | None = None,
                   config: PhantomConfig | None = None, **params) -> Path:
    """Path of the phantom for these parameters, generated on first use, reused afterwards.

    The directory is `<cache_dir>/phantom-<hash of parameters and generator version>`;
    cache_dir defaults to $ARCO_JAX_CACHE or ~/.cache/arco_jax. Nothing is downloaded.
    Safe when several processes race: the first complete rename wins, the others reuse it.
    """
    config = _resolve_config(config, params)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return generated.ensure(cache / f"phantom-{config.fingerprint()}",
                            lambda root: write_phantom_dataset(root, config),
                            GENERATOR_VERSION, config.to_json(), str(config))
