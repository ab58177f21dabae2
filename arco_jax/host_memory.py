"""Handing freed host memory back to the operating system.

XLA:CPU's compiler, and a state's initialisation, free hundreds of MB that glibc's allocator
keeps mapped (0.7 GB after compiling the 128 px ACDC step on a CPU): the step's own buffers then
come on top of them, and the process's resident set stays that much above what it uses.
glibc's `malloc_trim(0)` returns them; the trainer calls it after building the state, after each
compile and after each evaluation. Where the C library has no malloc_trim (macOS, musl) it does
nothing.
"""
from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return the heap's free pages to the OS; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
