"""Fixed-capacity ring buffers that live in the train state: per-class feature banks for the
contrastive negatives and the FIFO pool of embeddings for L_nn.

Static shapes throughout: a bank is one (classes, capacity, dim) array with a write pointer
and a fill count per class, so pushing and sampling compile once and shard like any array.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class ClassBank:
    """Per-class ring buffers of L2-normalised teacher representations.

    Class c uses the first `capacity[c]` rows of `keys[c]` (ARCO: 50k background, 30k others).
    """

    keys: jax.Array  # (C, K, D)
    pointer: jax.Array  # (C,) next row to write
    count: jax.Array  # (C,) rows filled so far (saturates at capacity)
    capacity: jax.Array  # (C,)

    @property
    def filled(self) -> jax.Array:
        """(C, K) mask of rows that hold a real entry."""
        rows = jnp.arange(self.keys.shape[1])
        return rows[None, :] < self.count[:, None]

    @property
    def filled_and_zero_row(self) -> jax.Array:
        """(C, K) `filled` plus, while a class's buffer is not full, its next row: rows are
        written in order from a zero init, so that row is still all zeros. This is the
        reference code's bank, a list that starts as one zero vector which stays until the list
        overflows its capacity."""
        rows = jnp.arange(self.keys.shape[1])
        return rows[None, :] < jnp.minimum(self.count + 1, self.capacity)[:, None]


def init_class_bank(capacities: tuple[int, ...], dim: int, dtype=jnp.float32) -> ClassBank:
    largest = max(capacities)
    return ClassBank(
        keys=jnp.zeros((len(capacities), largest, dim), dtype),
        pointer=jnp.zeros((len(capacities),), jnp.int32),
        count=jnp.zeros((len(capacities),), jnp.int32),
        capacity=jnp.asarray(capacities, jnp.int32),
    )


def push_class_bank(bank: ClassBank, keys: jax.Array, valid: jax.Array) -> ClassBank:
    """Write keys (C, n, D) into each class's ring buffer; other classes are untouched.

    valid (C,) is either bool (class c writes all n rows or none) or an integer count (class c
    writes its first valid[c] rows, clipped to [0, n]), for a variable number of real entries
    under a static shape.
    """
    num_classes, n, _ = keys.shape
    if valid.dtype == jnp.bool_:
        written = jnp.where(valid, n, 0)
    else:
        written = jnp.clip(valid, 0, n).astype(jnp.int32)
    rows = (bank.pointer[:, None] + jnp.arange(n)[None, :]) % bank.capacity[:, None]
    # Rows not written point past the end; mode='drop' ignores those writes.
    rows = jnp.where(jnp.arange(n)[None, :] < written[:, None], rows, bank.keys.shape[1])
    classes = jnp.broadcast_to(jnp.arange(num_classes)[:, None], rows.shape)
    new_keys = bank.keys.at[classes, rows].set(keys.astype(bank.keys.dtype), mode="drop")
    return bank.replace(
        keys=new_keys,
        pointer=(bank.pointer + written) % bank.capacity,
        count=jnp.minimum(bank.count + written, bank.capacity),
    )


@flax.struct.dataclass
class EmbeddingPool:
    """FIFO of L2-normalised embeddings (rows), initialised with random unit vectors as the
    reference does, so L_nn is defined from the first step."""

    rows: jax.Array  # (P, E)
    pointer: jax.Array  # ()


def init_embedding_pool(key: jax.Array, size: int, dim: int) -> EmbeddingPool:
    rows = jax.random.normal(key, (size, dim), jnp.float32)
    rows = rows / jnp.linalg.norm(rows, axis=1, keepdims=True)
    return EmbeddingPool(rows=rows, pointer=jnp.zeros((), jnp.int32))


def push_embedding_pool(pool: EmbeddingPool, rows: jax.Array) -> EmbeddingPool:
    size = pool.rows.shape[0]
    index = (pool.pointer + jnp.arange(rows.shape[0])) % size
    return pool.replace(
        rows=pool.rows.at[index].set(rows.astype(pool.rows.dtype)),
        pointer=(pool.pointer + rows.shape[0]) % size,
    )
