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

# The longest test files, longest first (seconds measured on a 2-core CPU). Two xdist workers
# take whole files in collection order, so a long file collected last (alphabetically, the
# volumetric and variance files) would run alone at the end while the other worker idles.
# Starting with the longest keeps the two workers' ends close. A file not listed keeps its place
# after these.
LONGEST_FIRST = (
    "test_train.py", "test_resume.py", "test_volumetric.py", "test_parallel.py", "test_variance.py",
    "test_multihost.py", "test_natural_demo.py", "test_pretrain.py", "test_variants.py", "test_step.py",
    "test_plugin_dataset.py", "test_bucket.py", "test_launch.py", "test_step_memory.py",
    "test_plugin_method.py", "test_inference.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order
