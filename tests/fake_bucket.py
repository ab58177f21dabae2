"""A Google Cloud Storage bucket faked on the local disk, for tests of gs:// workdirs.

`gs://<bucket>/<key>` is stored at `<root>/<bucket>/<key>`. The fake is plugged in where the
real clients would be: epath's fsspec backend (which would use gcsfs) and Orbax's TensorStore
spec for GCS (which would use TensorStore's GCS driver). Like a real bucket it refuses to
append to an object. Nothing else is faked, so code that turns gs:// into a local path ends
up writing a folder called `gs:` in the current directory, which the tests look for.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils


class FakeGcsFileSystem(DirFileSystem):
    protocol = ("gs", "gcs")

    def __init__(self, root: Path):
        super().__init__(path=str(root), fs=LocalFileSystem(auto_mkdir=True))

    def open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise OSError(f"{path}: a Cloud Storage object cannot be appended to")
        return super().open(path, mode, **kwargs)


@contextlib.contextmanager
def fake_gcs(root: Path, monkeypatch):
    """Route gs:// to `root` for epath and Orbax while the context is open."""
    root.mkdir(parents=True, exist_ok=True)
    fake = FakeGcsFileSystem(root)
    real_fs = epath_backend._FileSystemSpecBackend.fs  # pylint: disable=protected-access

    def filesystem(self, path):
        return fake if os.fspath(path).startswith("gs://") else real_fs(self, path)

    def tensorstore_kvstore(path: str) -> dict:
        bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
        return {"driver": "file", "path": str(root / bucket / key)}

    with monkeypatch.context() as m:
        m.setattr(epath_backend._FileSystemSpecBackend, "fs", filesystem)  # pylint: disable=protected-access
        m.setattr(gcs_utils, "get_kvstore_for_gcs", tensorstore_kvstore)
        # Orbax asks the bucket's storage layout through google-cloud-storage.
        m.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
        yield fake
