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
"""
from __future__ import annotations

import json
import os

from etils import epath

REMOTE_PREFIXES = ("gs://", "s3://")


def is_remote(path: epath.PathLike) -> bool:
    return os.fspath(path).startswith(REMOTE_PREFIXES)


def workdir_path(path: epath.PathLike) -> epath.Path:
    """An epath for `path`: a local one made absolute (Orbax requires absolute paths), a
    bucket URI kept as it is."""
    if is_remote(path):
        return epath.Path(os.fspath(path))
    return epath.Path(os.path.abspath(os.fspath(path)))


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


def move(source: epath.Path, target: epath.Path) -> None:
    """Move a file or folder (in a bucket: copy every object, then delete)."""
    epath.Path(target).parent.mkdir(parents=True, exist_ok=True)
    epath.Path(source).rename(target)
