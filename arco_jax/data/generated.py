"""Built-in synthetic datasets, written once into a cache and reused.

Why one module: the 2-D cardiac phantom (data/phantom.py) and the 3-D atrium phantom
(data/la_phantom.py) are both pure functions of their parameters, generated on first use and
never downloaded. Both need the same guarantees: a dataset directory is written completely
or not at all (files go to a temporary sibling renamed into place), concurrent first uses
race safely (the first rename wins), and a directory is reused only when its marker file
records the same generator version and parameters.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

MARKER_FILE = "phantom.json"


def default_cache_dir() -> Path:
    return Path(os.environ.get("ARCO_JAX_CACHE", Path.home() / ".cache" / "arco_jax"))


def fingerprint(version: int, params: dict) -> str:
    """Short hash of the generator version and parameters, naming the cache directory."""
    blob = json.dumps({"version": version, **params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def write_once(root: str | os.PathLike, write_layout: Callable[[Path], dict], marker: dict) -> Path:
    """Runs write_layout(staging) into a temporary sibling of root and renames it to root when
    complete; the marker file records `marker` plus the counts write_layout returns. Raises
    FileExistsError if root exists (a generator never overwrites)."""
    root = Path(root)
    if root.exists():
        raise FileExistsError(f"{root} already exists; the phantom writer never overwrites")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        counts = write_layout(staging)
        (staging / MARKER_FILE).write_text(json.dumps({**marker, **counts}, indent=2) + "\n")
        os.rename(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


def read_marker(root: str | os.PathLike) -> dict | None:
    """The metadata json of a generated directory, or None when root holds none."""
    path = Path(root) / MARKER_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def ensure(root: str | os.PathLike, write: Callable[[Path], object], version: int, params: dict,
           description: str) -> Path:
    """root, written by write(root) on first use; an existing root must carry a marker of this
    generator version and these parameters (else FileExistsError naming the directory)."""
    root = Path(root)
    if not root.exists():
        try:
            write(root)
        except OSError:
            if not root.exists():  # a real failure, not a lost race
                raise
    marker = read_marker(root)
    if marker is None or marker.get("generator_version") != version or marker.get("config") != params:
        raise FileExistsError(
            f"{root} exists but its {MARKER_FILE} does not match {description}; delete the directory "
            "to regenerate it")
    return root
