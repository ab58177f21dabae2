"""Run outputs on a local disk or in a bucket: every workdir path goes through here.

A workdir may be a local folder or a bucket URI (`gs://bucket/runs/acdc`, also `s3://`), so
that a preempted TPU VM leaves its checkpoints where the next one finds them. Paths are
`etils.epath.Path`s, which Orbax also uses: local folders go through `os`, bucket URIs
through fsspec (gcsfs for gs://). `pathlib.Path` would silently turn `gs://b/x` into a
local folder called `gs:`.

Buckets differ from disks in two ways this module hides: an object cannot be appended to,
and there is no rename (it is copy + delete); but a single object write is atomic (the new
object appears whole or not at all), so the write-then-rename that protects local files is
neither possible nor needed there.

A workdir under Colab's Google Drive mount point is refused while Drive is not mounted: the
run would otherwise write to the runtime's own disk, lose everything with the runtime, and
leave files in the mount point that make a later `drive.mount` fail.
"""
from __future__ import annotations

import json
import os

from etils import epath

from arco_jax.errors import ConfigError

REMOTE_PREFIXES = ("gs://", "s3://")
DRIVE_MOUNT = "/content/drive"  # Where Colab's google.colab.drive.mount puts Google Drive.


def is_remote(path: epath.PathLike) -> bool:
    return os.fspath(path).startswith(REMOTE_PREFIXES)


def workdir_path(path: epath.PathLike) -> epath.Path:
    """An epath for `path`: a local one made absolute (Orbax requires absolute paths), a
    bucket URI kept as it is."""
    if is_remote(path):
        return epath.Path(os.fspath(path))
    absolute = os.path.abspath(os.fspath(path))
    check_drive_mounted(absolute)
    return epath.Path(absolute)


def check_drive_mounted(path: str, mount_root: str = DRIVE_MOUNT) -> None:
    """Raise ConfigError for a local path under `mount_root` when Drive is not mounted there
    (a mounted Drive always shows MyDrive/), before anything is created under it."""
    root = os.path.abspath(mount_root)
    absolute = os.path.abspath(path)
    if os.path.commonpath([absolute, root]) != root or os.path.isdir(os.path.join(root, "MyDrive")):
        return
    raise ConfigError(f"workdir {path} is on Google Drive, which is not mounted ({root}/MyDrive does not exist): "
                      f"mount it in a notebook cell first (from google.colab import drive; "
                      f"drive.mount('{root}')), or set WORKDIR_ON_DRIVE = True in launch/colab.ipynb, "
                      "or use a local workdir")


def write_text(path: epath.Path, text: str) -> None:
    """Write so that a crash never leaves a truncated file: local files are written beside
    and renamed; an object in a bucket is atomic by itself."""
    path = epath.Path(path)
    if is_remote(path):
        path.write_text(text)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: epath.Path, payload) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=True))


def write_report(folder: epath.PathLike, stem: str, report: dict, markdown: str) -> None:
    """<folder>/<stem>.json (the report in its own key order, as it reads best) and <stem>.md,
    the folder made if needed: how the probes and the study leave their results."""
    folder = epath.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / f"{stem}.json", json.dumps(report, indent=2))
    write_text(folder / f"{stem}.md", markdown)


def move(source: epath.Path, target: epath.Path) -> None:
    """Move a file or folder (in a bucket: copy every object, then delete)."""
    epath.Path(target).parent.mkdir(parents=True, exist_ok=True)
    epath.Path(source).rename(target)
