"""Device mesh and shardings for data parallelism.

The train step is one `jax.jit` over a 1-D ('data',) mesh: batches are split over the mesh,
the train state is replicated. This is what `jax.pmap` is built from since JAX 0.8, and the
same code runs on one CPU, several GPUs or a multi-host TPU slice: XLA inserts the gradient
all-reduce (and the cross-device reductions of BatchNorm statistics) from the shardings.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A ('data',) mesh over all devices (or the first `num_devices`)."""
    devices = jax.devices()
    if num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices, only {len(devices)} are visible")
        devices = devices[:num_devices]
    return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,))


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
