"""Fixed-capacity ring buffers that live in the train state: per-class feature banks for the
contrastive negatives and the FIFO pool of embeddings for L_nn.

Static shapes throughout: a bank is one (classes, capacity, dim) array with a write pointer
and a fill count per class, so pushing and sampling compile once and shard like any array.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


def _filled(count: jax.Array, num_rows: int) -> jax.Array:
    return jnp.arange(num_rows)[None, :] < count[:, None]


def _filled_and_zero_row(count: jax.Array, capacity: jax.Array, num_rows: int) -> jax.Array:
    return jnp.arange(num_rows)[None, :] < jnp.minimum(count + 1, capacity)[:, None]


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
        return _filled(self.count, self.keys.shape[1])

    @property
    def filled_and_zero_row(self) -> jax.Array:
        """(C, K) `filled` plus, while a class's buffer is not full, its next row: rows are
        written in order from a zero init, so that row is still all zeros. This is the
        reference code's bank, a list that starts as one zero vector which stays until the list
        overflows its capacity."""
        return _filled_and_zero_row(self.count, self.capacity, self.keys.shape[1])

    def rows(self, flat_index: jax.Array) -> jax.Array:
        """Rows at flat indices into the (C * K) rows of all classes: (..., D)."""
        return self.keys.reshape(-1, self.keys.shape[-1])[flat_index]


def init_class_bank(capacities: tuple[int, ...], dim: int, dtype=jnp.float32) -> ClassBank:
    largest = max(capacities)
    return ClassBank(
        keys=jnp.zeros((len(capacities), largest, dim), dtype),
        pointer=jnp.zeros((len(capacities),), jnp.int32),
        count=jnp.zeros((len(capacities),), jnp.int32),
        capacity=jnp.asarray(capacities, jnp.int32),
    )


@flax.struct.dataclass
class BankPush:
    """Rows waiting to enter each class's ring buffer: class c writes its first written[c]
    rows of keys[c]. The train step writes them after its non-finite guard (`push_class_bank`)
    and reads the bank meanwhile through `PushedBank`: a bank kept for a bad step and one
    updated for a good step would otherwise both be held, a second copy of the largest array
    of the state (400 MB at the ACDC settings)."""

    keys: jax.Array  # (C, n, D)
    written: jax.Array  # (C,) int32 in [0, n]


def bank_push(keys: jax.Array, valid: jax.Array) -> BankPush:
    """valid (C,) is either bool (class c writes all n rows or none) or an integer count (class
    c writes its first valid[c] rows, clipped to [0, n]), for a variable number of real entries
    under a static shape."""
    n = keys.shape[1]
    if valid.dtype == jnp.bool_:
        written = jnp.where(valid, n, 0)
    else:
        written = jnp.clip(valid, 0, n)
    return BankPush(keys=keys, written=written.astype(jnp.int32))


def push_class_bank(bank: ClassBank, keys: jax.Array, valid: jax.Array) -> ClassBank:
    """Write keys (C, n, D) into each class's ring buffer; other classes are untouched.
    `valid` as in `bank_push`."""
    push = bank_push(keys, valid)
    num_classes, n, _ = keys.shape
    rows = (bank.pointer[:, None] + jnp.arange(n)[None, :]) % bank.capacity[:, None]
    # Rows not written point past the end; mode='drop' ignores those writes.
    rows = jnp.where(jnp.arange(n)[None, :] < push.written[:, None], rows, bank.keys.shape[1])
    classes = jnp.broadcast_to(jnp.arange(num_classes)[:, None], rows.shape)
    new_keys = bank.keys.at[classes, rows].set(keys.astype(bank.keys.dtype), mode="drop")
    return bank.replace(
        keys=new_keys,
        pointer=(bank.pointer + push.written) % bank.capacity,
        count=jnp.minimum(bank.count + push.written, bank.capacity),
    )


@flax.struct.dataclass
class PushedBank:
    """Read-only view of `push_class_bank(bank, push.keys, push.written)` that writes nothing:
    the same `count`, `capacity`, `filled`, `filled_and_zero_row` and `rows`."""

    bank: ClassBank
    push: BankPush

    @property
    def capacity(self) -> jax.Array:
        return self.bank.capacity

    @property
    def count(self) -> jax.Array:
        return jnp.minimum(self.bank.count + self.push.written, self.bank.capacity)

    @property
    def filled(self) -> jax.Array:
        return _filled(self.count, self.bank.keys.shape[1])

    @property
    def filled_and_zero_row(self) -> jax.Array:
        return _filled_and_zero_row(self.count, self.capacity, self.bank.keys.shape[1])

    def rows(self, flat_index: jax.Array) -> jax.Array:
        """A row the push writes comes from the push, any other from the bank. The push writes
        row r of class c when its ring offset from the pointer, (r - pointer[c]) mod
        capacity[c], is below written[c] (never more than the capacity: no row twice)."""
        num_rows = self.bank.keys.shape[1]
        classes, row = jnp.divmod(flat_index, num_rows)
        offset = (row - self.bank.pointer[classes]) % self.bank.capacity[classes]
        pending = (offset < self.push.written[classes]) & (row < self.bank.capacity[classes])
        fresh = self.push.keys[classes, jnp.minimum(offset, self.push.keys.shape[1] - 1)]
        return jnp.where(pending[..., None], fresh.astype(self.bank.keys.dtype), self.bank.rows(flat_index))


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
