"""A synthetic, LA-like 3-D MRI phantom in the UA-MT layout, as the registered dataset
'la_phantom'.

Why: the 3-D path (VNet, volumetric ARCO, sliding-window evaluation) must train and be tested
without the Left Atrium download. The phantom is written in the exact layout of the UA-MT
processed LA (`2018LA_Seg_Training Set/<case>/mri_norm2.h5` with `image` float32 (H, W, D)
z-scored and `label` uint8, `train.list`, `test.list`), so the LA reader, its splits and its
checks (data/la.py) run unchanged on it.

Each volume is a left-atrium-like blood pool (label 1): a wobbly ellipsoidal body with an
appendage lobe and two to four curved pulmonary-vein tubes leaving it, behind a thin dark wall.
What makes it a segmentation problem rather than a threshold: a ventricle and an aorta of the
same bright blood intensity (label 0) sit beside the atrium, separated from it by a wall of a
few voxels only; organs of random intensity, tissue texture, partial-volume blur, a smooth
multiplicative bias field and Rician noise blur the intensity ranges. The atrium's size,
pose, appendage and veins vary per case.

Generation is a pure function of (config, case number): case n draws from the numpy
generator seeded by (seed, n), so adding cases never changes the others. The folder is
written once into the cache (data/generated.py) and reused.

Its config.data fields (with la.py's labeled_cases and val_cases):
  cache_dir     where it is generated ('' -> $ARCO_JAX_CACHE or ~/.cache/arco_jax)
  la_phantom    cases (train, test), shape (D, H, W) of every volume, seed
A data_dir reads an already written phantom folder instead (e.g. one given to evaluate).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import h5py
import ml_collections
import numpy as np
from scipy import ndimage

from arco_jax.data import generated, la, registry
from arco_jax.errors import ConfigError

NAME = "la_phantom"
GENERATOR_VERSION = 1


@dataclasses.dataclass(frozen=True)
class AtriumPhantomConfig:
    """What defines one 3-D phantom (everything that changes its bytes).

    cases: (train, test) volumes; numbered consecutively, train first.
    shape: (D, H, W) voxels of every volume (stored (H, W, D) as UA-MT does).
    seed: base seed; case n uses the stream seeded by (seed, n).
    """

    cases: tuple[int, int] = (16, 4)
    shape: tuple[int, int, int] = (40, 64, 64)
    seed: int = 0

    def __post_init__(self):
        cases = tuple(int(n) for n in self.cases)
        shape = tuple(int(n) for n in self.shape)
        object.__setattr__(self, "cases", cases)
        object.__setattr__(self, "shape", shape)
        if len(cases) != 2 or cases[0] < 2 or cases[1] < 1:
            raise ValueError(f"cases must be (train >= 2, test >= 1) volumes, got {cases}")
        if len(shape) != 3 or min(shape) < 16:
            raise ValueError(f"shape must be (D, H, W) with every size >= 16 voxels, got {shape}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")

    def to_json(self) -> dict:
        return {"cases": list(self.cases), "shape": list(self.shape), "seed": self.seed}

    def fingerprint(self) -> str:
        return generated.fingerprint(GENERATOR_VERSION, self.to_json())


def case_name(number: int) -> str:
    return f"ATRIUM{number:03d}"


def split_cases(config: AtriumPhantomConfig) -> dict[str, list[str]]:
    """Case ids of train.list and test.list: train first, numbered from 001."""
    train, test = config.cases
    return {la.TRAIN_LIST: [case_name(n) for n in range(1, train + 1)],
            la.TEST_LIST: [case_name(n) for n in range(train + 1, train + test + 1)]}


# ----------------------------------------------------------------------------- geometry


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def _random_direction(rng: np.random.Generator, depth_weight: float = 1.0) -> np.ndarray:
    """A unit (z, y, x) vector; depth_weight < 1 keeps it nearer the in-plane directions."""
    return _unit(rng.standard_normal(3) * np.array([depth_weight, 1.0, 1.0]))


def _rotation(rng: np.random.Generator, max_angle: float) -> np.ndarray:
    """A random rotation of at most about max_angle radians about each axis."""
    matrix = np.eye(3)
    for axes in ((0, 1), (0, 2), (1, 2)):
        angle = rng.uniform(-max_angle, max_angle)
        turn = np.eye(3)
        i, j = axes
        turn[i, i] = turn[j, j] = np.cos(angle)
        turn[i, j], turn[j, i] = -np.sin(angle), np.sin(angle)
        matrix = turn @ matrix
    return matrix


def _smooth_field(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (blurred white noise)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-8)


def _ellipsoid(grid: np.ndarray, centre, radii, rotation: np.ndarray) -> np.ndarray:
    """Normalised radius (< 1 inside) of a rotated ellipsoid at every grid point (3, D, H, W)."""
    local = np.tensordot(rotation, grid - np.asarray(centre)[:, None, None, None], axes=1)
    return np.sqrt(sum((local[k] / radii[k]) ** 2 for k in range(3)))


def _tube(grid: np.ndarray, points: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Boolean mask within radii[i] of the polyline segment points[i] -> points[i + 1]."""
    mask = np.zeros(grid.shape[1:], bool)
    for start, end, radius in zip(points[:-1], points[1:], radii):
        step = end - start
        rel = grid - start[:, None, None, None]
        t = np.clip(np.tensordot(step, rel, axes=1) / (step @ step), 0.0, 1.0)
        closest = rel - t[None] * step[:, None, None, None]
        mask |= np.sum(closest ** 2, axis=0) < radius ** 2
    return mask


def _curve(rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, length: float,
           bend: float, pieces: int = 8) -> np.ndarray:
    """(pieces + 1, 3) points of a quadratic Bezier leaving start along direction, bent sideways."""
    side = _unit(np.cross(direction, _random_direction(rng)))
    middle = start + direction * length / 2 + side * bend * length
    end = start + direction * length
    t = np.linspace(0.0, 1.0, pieces + 1)[:, None]
    return (1 - t) ** 2 * start + 2 * (1 - t) * t * middle + t ** 2 * end


def _atrium(rng: np.random.Generator, grid: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray, float]:
    """(label mask, body centre, body radius) of one atrium: body, appendage and veins."""
    size = np.asarray(shape, np.float64)
    plane = min(shape[1:])
    centre = size / 2 + rng.uniform(-0.08, 0.08, 3) * size
    radius = plane * rng.uniform(0.15, 0.2)
    radii = radius * np.array([rng.uniform(0.75, 0.95), rng.uniform(0.9, 1.15), rng.uniform(0.9, 1.15)])
    radii[0] = min(radii[0], 0.3 * shape[0])
    wobble = 0.12 * _smooth_field(rng, shape, 0.15 * plane)
    mask = _ellipsoid(grid, centre, radii, _rotation(rng, 0.5)) + wobble < 1.0

    # The appendage: an elongated lobe just outside the body, mostly in-plane.
    direction = _random_direction(rng, 0.5)
    lobe_centre = centre + direction * radius * rng.uniform(0.9, 1.1)
    lobe_length, lobe_width = radius * rng.uniform(0.45, 0.6), radius * rng.uniform(0.22, 0.3)
    along = np.tensordot(direction, grid - lobe_centre[:, None, None, None], axes=1)
    across = np.sqrt(np.maximum(np.sum((grid - lobe_centre[:, None, None, None]) ** 2, axis=0) - along ** 2, 0))
    mask |= (along / lobe_length) ** 2 + (across / lobe_width) ** 2 < 1.0

    # Pulmonary veins: tapering tubes from inside the body outwards.
    for _ in range(int(rng.integers(2, 5))):
        direction = _random_direction(rng, 0.7)
        start = centre + direction * radius * 0.6
        points = _curve(rng, start, direction, plane * rng.uniform(0.25, 0.4), rng.uniform(-0.25, 0.25))
        widths = plane * rng.uniform(0.035, 0.05) * np.linspace(1.0, 0.7, len(points) - 1)
        mask |= _tube(grid, points, widths)
    return mask, centre, radius


def _render(rng: np.random.Generator, grid: np.ndarray, shape, atrium: np.ndarray, centre: np.ndarray,
            radius: float) -> np.ndarray:
    """z-scored float32 image of one case, (D, H, W)."""
    plane = min(shape[1:])
    blood = rng.uniform(0.7, 0.9)
    image = np.full(shape, rng.uniform(0.25, 0.35))
    wall = ndimage.binary_dilation(atrium, iterations=int(rng.integers(1, 3)))
    near = ndimage.binary_dilation(atrium, iterations=int(rng.integers(2, 4)))  # distractors stop here

    for _ in range(int(rng.integers(2, 5))):  # organs of any intensity
        organ_centre = rng.uniform(0.1, 0.9, 3) * np.asarray(shape)
        organ = _ellipsoid(grid, organ_centre, plane * rng.uniform(0.06, 0.14, 3), _rotation(rng, np.pi)) < 1.0
        image[organ & ~near] = rng.uniform(0.15, 0.95)

    # The ventricle: a bright ellipsoid touching the atrium's far side, behind a thin wall.
    direction = _random_direction(rng, 1.5)
    ventricle_radius = radius * rng.uniform(1.0, 1.3)
    ventricle_centre = centre + direction * (radius + ventricle_radius) * rng.uniform(0.8, 0.95)
    ventricle = _ellipsoid(grid, ventricle_centre, ventricle_radius * rng.uniform(0.85, 1.15, 3),
                           _rotation(rng, np.pi)) < 1.0
    # The aorta: a bright tube running through the volume, mostly along the slice axis.
    offset = _unit(np.cross(np.array([1.0, 0.0, 0.0]), _random_direction(rng)))
    start = centre + offset * radius * rng.uniform(1.4, 1.8)
    start[0] = -0.1 * shape[0]
    axis = _unit(np.array([1.0, *rng.uniform(-0.3, 0.3, 2)]))
    points = _curve(rng, start, axis, 1.2 * shape[0] / axis[0], rng.uniform(-0.2, 0.2))
    aorta = _tube(grid, points, np.full(len(points) - 1, plane * rng.uniform(0.05, 0.07)))
    image[(ventricle | aorta) & ~near] = blood * rng.uniform(0.9, 1.08)
    image[wall] = rng.uniform(0.08, 0.18)
    image[atrium] = blood

    # Texture, partial-volume blur, smooth multiplicative bias, Rician noise, z-score.
    image = image * (1.0 + 0.06 * _smooth_field(rng, shape, 1.5))
    image = ndimage.gaussian_filter(image, rng.uniform(0.5, 0.9))
    normalised = grid / np.asarray(shape, np.float64)[:, None, None, None] - 0.5
    c = rng.uniform(-0.5, 0.5, 6)
    bias = np.exp(c[0] * normalised[0] + c[1] * normalised[1] + c[2] * normalised[2]
                  + c[3] * normalised[1] * normalised[2] + c[4] * normalised[1] ** 2 + c[5] * normalised[2] ** 2)
    sigma = blood * rng.uniform(0.06, 0.1)
    noisy = np.hypot(image * bias + sigma * rng.standard_normal(shape), sigma * rng.standard_normal(shape))
    return ((noisy - noisy.mean()) / noisy.std()).astype(np.float32)


def generate_case(config: AtriumPhantomConfig, number: int) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, label uint8) of case `number`, both (D, H, W) as the LA reader returns them."""
    rng = np.random.default_rng([config.seed, number])
    shape = config.shape
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij"))
    atrium, centre, radius = _atrium(rng, grid, shape)
    image = _render(rng, grid, shape, atrium, centre, radius)
    return image, atrium.astype(np.uint8)


# ----------------------------------------------------------------------------- writing


def _write_layout(root: Path, config: AtriumPhantomConfig) -> dict:
    """The UA-MT layout under root (an empty directory); returns counts for the marker."""
    number = 0
    for list_name, cases in split_cases(config).items():
        for case in cases:
            number += 1
            image, label = generate_case(config, number)
            folder = root / la.CASE_DIR / case
            folder.mkdir(parents=True)
            with h5py.File(folder / la.VOLUME_FILE, "w") as f:  # (D, H, W) -> UA-MT's (H, W, D)
                f.create_dataset("image", data=np.transpose(image, (1, 2, 0)), compression="gzip",
                                 compression_opts=1)
                f.create_dataset("label", data=np.transpose(label, (1, 2, 0)), compression="gzip",
                                 compression_opts=1)
        (root / list_name).write_text("".join(f"{case}\n" for case in cases))
    train, test = config.cases
    return {"train_volumes": train, "test_volumes": test}


def write_atrium_phantom(root: str | os.PathLike, config: AtriumPhantomConfig) -> Path:
    """Writes the phantom to root in the UA-MT layout; all or nothing. FileExistsError if root exists."""
    marker = {"generator": "arco_jax.data.la_phantom", "generator_version": GENERATOR_VERSION,
              "config": config.to_json(), "class_names": list(la.CLASS_NAMES)}
    return generated.write_once(root, lambda staging: _write_layout(staging, config), marker)


def ensure_atrium_phantom(cache_dir: str | os.PathLike | None, config: AtriumPhantomConfig) -> Path:
    """`<cache_dir>/la_phantom-<hash>`, generated on first use (safe under concurrent first uses)."""
    cache = Path(cache_dir) if cache_dir else generated.default_cache_dir()
    return generated.ensure(cache / f"{NAME}-{config.fingerprint()}", lambda root: write_atrium_phantom(root, config),
                            GENERATOR_VERSION, config.to_json(), str(config))


# ----------------------------------------------------------------------------- the dataset


def phantom_config(config: ml_collections.ConfigDict) -> AtriumPhantomConfig:
    p = config.data.la_phantom
    try:
        return AtriumPhantomConfig(cases=tuple(p.cases), shape=tuple(p.shape), seed=p.seed)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config.data.la_phantom: {err}") from err


def validate(config: ml_collections.ConfigDict) -> None:
    d = config.data
    la.check_counts(config)
    if d.data_dir:
        if not os.path.isdir(d.data_dir):
            raise ConfigError(f"config.data.data_dir: {d.data_dir!r} is not a directory (leave it empty to "
                              "generate the phantom)")
        return
    train = phantom_config(config).cases[0]
    most = train - d.val_cases - 1
    if not 1 <= d.labeled_cases <= most:
        raise ConfigError(f"config.data.labeled_cases: {d.labeled_cases} is not in 1..{most}: the phantom has "
                          f"{train} train cases (config.data.la_phantom.cases), val_cases holds out {d.val_cases} "
                          "and at least one must stay unlabeled")


def open_phantom(config: ml_collections.ConfigDict) -> la.LADataset:
    d = config.data
    root = d.data_dir or ensure_atrium_phantom(d.cache_dir, phantom_config(config))
    return la.LADataset(config, root)


def _fields() -> dict:
    defaults = AtriumPhantomConfig()
    return {"labeled_cases": 4, "val_cases": 0, "cache_dir": "",
            "la_phantom": {"cases": tuple(defaults.cases), "shape": tuple(defaults.shape), "seed": defaults.seed}}


LA_PHANTOM = registry.DatasetSpec(
    name=NAME, fields=_fields, info=lambda config: la.INFO, validate=validate, open=open_phantom,
    description="built-in synthetic 3-D left-atrium phantom in the UA-MT layout (generated on first use)")
