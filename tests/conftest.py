"""Test setup: two fake CPU devices for the data-parallel paths, deterministic float32, and one
persistent compilation cache for the whole session (subprocesses inherit it through the
environment, xdist workers included), so a step that several test files compile is compiled once.
The process that made the cache removes it at exit."""
import atexit
import os
import shutil
import tempfile

# Must happen before jax is imported anywhere in the test session.
# LLVM at -O0: the suite's steps are tiny and compiled once each, so compiling is most of its time;
# -O0 halves a train step's compile for about twice its (milliseconds) run time. Subprocesses
# (the CLI runs, the two-process run) inherit it.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="arco_jax_test_compile_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
