"""Device mesh, shardings, and the few cross-process agreements a multi-host run needs.

The train step is one `jax.jit` over a 1-D ('data',) mesh: batches are split over the mesh,
the train state is replicated. This is what `jax.pmap` is built from since JAX 0.8, and the
same code runs on one CPU, several GPUs or a multi-host TPU slice: XLA inserts the gradient
all-reduce (and the cross-device reductions of BatchNorm statistics) from the shardings.

On several processes (after `jax.distributed.initialize()`) each process feeds its own rows
of the batch (`global_batch`) and reads replicated results from its own devices (`fetch`).
Host-side decisions that could differ between processes (a check that fails on one host
only, a different config) go through `gather_text`, so every process takes the same branch
instead of one raising while the others wait forever in the next collective.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
T = TypeVar("T")


class ProcessFailure(RuntimeError):
    """Another process failed a step that every process must pass; its message is included."""


def collectives_in_loops_are_safe() -> bool:
    """False on XLA:CPU with several devices: it runs the collectives inside a loop body
    unordered with the program's other collectives, so two devices can each wait in a
    different one (seen as a 40 s rendezvous timeout). Loops whose body needs collectives
    (a rematerialised pass over a sharded batch) are then unrolled."""
    return not (jax.default_backend() == "cpu" and jax.device_count() > 1)


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A ('data',) mesh over all devices of all processes, or over `num_devices` of them
    (config.data.mesh_devices): the first num_devices / process_count of every process, so
    each process feeds its rows to its own devices."""
    devices = jax.devices()
    if num_devices is not None:
        processes = sorted({d.process_index for d in devices})
        per_process, uneven = divmod(num_devices, len(processes))
        if num_devices > len(devices) or uneven or not per_process:
            raise ValueError(f"asked for {num_devices} devices, {len(devices)} are visible on {len(processes)} "
                             "processes (the mesh takes the same number from each)")
        devices = [d for p in processes for d in [d for d in devices if d.process_index == p][:per_process]]
    return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,))


def local_mesh() -> jax.sharding.Mesh:
    """A ('data',) mesh over this process's devices only (work no other process shares)."""
    return jax.sharding.Mesh(np.asarray(jax.local_devices()), (DATA_AXIS,))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(mesh: jax.sharding.Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assemble this process's part of a batch into global arrays sharded over 'data'.

    On one host the local batch is the global batch; on several hosts each process passes
    its own rows and the global batch is their concatenation in process order.
    """
    sharding = batch_sharding(mesh)
    return {name: jax.make_array_from_process_local_data(sharding, value) for name, value in local.items()}


def replicate(mesh: jax.sharding.Mesh, tree):
    """Place a pytree (e.g. a freshly initialised train state) replicated on the mesh."""
    return jax.device_put(tree, replicated(mesh))


def fetch(tree):
    """Host copy of replicated arrays, read from this process's first device: works when the
    array spans other processes' devices too (np.asarray would refuse those)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


def local_replica(tree, mesh: jax.sharding.Mesh):
    """This process's copy of a replicated pytree, replicated over `mesh` (a local mesh):
    no communication, so each process can then compute on its own."""
    return jax.device_put(jax.tree.map(lambda x: x.addressable_data(0), tree), replicated(mesh))


def is_main_process() -> bool:
    """Process 0 writes logs, metrics and results; all processes write checkpoints."""
    return jax.process_index() == 0


def gather_text(text: str) -> list[str]:
    """Every process's `text`, in process order, on every process (a collective: all call it)."""
    if jax.process_count() == 1:
        return [text]
    payload = np.frombuffer(text.encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray(payload.size, np.int32)).reshape(-1)
    padded = np.zeros(max(int(lengths.max()), 1), np.uint8)
    padded[:payload.size] = payload
    rows = multihost_utils.process_allgather(padded)
    return [bytes(rows[i, :lengths[i]]).decode() for i in range(len(lengths))]


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def on_all_processes(fn: Callable[[], T], what: str) -> T:
    """Run `fn` on every process; if it raises on any of them, raise on all of them.

    The process that failed re-raises its own error; the others raise ProcessFailure quoting
    it, so process 0's log names the problem even when another host had it (a data file
    missing on one host, a checkpoint that host cannot read).
    """
    try:
        result, error = fn(), None
    except Exception as exc:  # noqa: BLE001  (re-raised below, on every process)
        result, error = None, exc
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return result
    messages = gather_text("" if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = {i: m for i, m in enumerate(messages) if m}
    if failed:
        quoted = "; ".join(f"process {i}: {m}" for i, m in failed.items())
        raise ProcessFailure(f"{what} failed on {len(failed)} of {len(messages)} processes: {quoted}")
    return result
