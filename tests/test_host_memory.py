"""Freed heap pages go back to the OS (glibc Linux); elsewhere the call reports it cannot."""
import sys

import numpy as np
import pytest

from arco_jax import host_memory


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux") or host_memory._malloc_trim() is None,
                    reason="glibc's malloc_trim only")
def test_freed_heap_is_returned():
    # 300 MB in 32 KB blocks (below glibc's mmap threshold: they live on the heap), freed under a
    # block that stays, so the allocator cannot shrink the heap's top by itself.
    blocks = [np.ones(32 * 1024 // 8) for _ in range(300 * 32)]
    keep = np.ones(32 * 1024 // 8)
    del blocks
    before = resident_bytes()
    assert host_memory.release_freed_memory()
    assert before - resident_bytes() > 100e6
    assert keep.sum() == keep.size


def test_without_malloc_trim_nothing_happens(monkeypatch):
    monkeypatch.setattr(host_memory, "_malloc_trim", lambda: None)
    assert host_memory.release_freed_memory() is False
