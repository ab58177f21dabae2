"""Class banks and the embedding pool against a plain Python model of per-class ring buffers."""
import jax
import jax.numpy as jnp
import numpy as np

from arco_jax import memory


class RingModel:
    """Per-class ring buffers written one row at a time: what push_class_bank must equal."""

    def __init__(self, capacities, dim):
        self.capacities = list(capacities)
        self.keys = np.zeros((len(capacities), max(capacities), dim), np.float32)
        self.pointer = [0] * len(capacities)
        self.count = [0] * len(capacities)

    def push(self, keys, valid):
        for c, ok in enumerate(valid):
            if not ok:
                continue
            for row in keys[c]:
                self.keys[c, self.pointer[c]] = row
                self.pointer[c] = (self.pointer[c] + 1) % self.capacities[c]
                self.count[c] = min(self.count[c] + 1, self.capacities[c])


def assert_bank_equals(bank: memory.ClassBank, model: RingModel):
    np.testing.assert_array_equal(bank.keys, model.keys)
    np.testing.assert_array_equal(bank.pointer, model.pointer)
    np.testing.assert_array_equal(bank.count, model.count)
    rows = np.arange(model.keys.shape[1])
    np.testing.assert_array_equal(bank.filled, rows[None, :] < np.asarray(model.count)[:, None])


def distinct_keys(step: int, num_classes: int, n: int, dim: int) -> np.ndarray:
    """Keys whose values say (step, class, row), so any misplaced write shows."""
    s, c, r, d = np.meshgrid(step + 1, np.arange(num_classes), np.arange(n), np.arange(dim), indexing="ij")
    return (1000.0 * s + 100.0 * c + 10.0 * r + d)[0].astype(np.float32)


def test_init_class_bank_is_empty_with_per_class_capacity():
    bank = memory.init_class_bank((7, 4, 4), dim=3)
    assert bank.keys.shape == (3, 7, 3) and bank.keys.dtype == jnp.float32
    np.testing.assert_array_equal(bank.keys, 0.0)
    np.testing.assert_array_equal(bank.pointer, 0)
    np.testing.assert_array_equal(bank.count, 0)
    np.testing.assert_array_equal(bank.capacity, [7, 4, 4])
    assert not np.asarray(bank.filled).any()


def test_push_class_bank_is_a_per_class_ring_buffer():
    capacities, dim, n = (7, 4, 5), 2, 3
    bank = memory.init_class_bank(capacities, dim)
    model = RingModel(capacities, dim)
    push = jax.jit(memory.push_class_bank)  # as it runs inside the train step
    valid_per_step = [(True, True, True), (True, False, True), (True, True, False),
                      (False, True, True), (True, True, True), (True, True, True)]
    for step, valid in enumerate(valid_per_step):
        keys = distinct_keys(step, len(capacities), n, dim)
        bank = push(bank, jnp.asarray(keys), jnp.asarray(valid))
        model.push(keys, valid)
        assert_bank_equals(bank, model)
    # The sequence wrapped every class around at least once and saturated its count.
    np.testing.assert_array_equal(bank.count, capacities)
    # Class 1 (capacity 4 < 7 rows) never wrote past its capacity.
    np.testing.assert_array_equal(bank.keys[1, 4:], 0.0)


def test_push_class_bank_wraps_pointer_and_saturates_count():
    bank = memory.init_class_bank((5,), dim=1)
    for step in range(3):
        bank = memory.push_class_bank(bank, jnp.full((1, 2, 1), step + 1.0), jnp.array([True]))
    # Writes: rows 0,1 <- 1; rows 2,3 <- 2; rows 4,0 <- 3.
    np.testing.assert_array_equal(bank.keys[0, :, 0], [3.0, 1.0, 2.0, 2.0, 3.0])
    assert int(bank.pointer[0]) == 1 and int(bank.count[0]) == 5


def test_push_class_bank_leaves_skipped_classes_untouched():
    bank = memory.init_class_bank((4, 4), dim=2)
    bank = memory.push_class_bank(bank, jnp.ones((2, 3, 2)), jnp.array([True, True]))
    before = jax.tree.map(np.asarray, bank)
    after = memory.push_class_bank(bank, jnp.full((2, 3, 2), 9.0), jnp.array([False, True]))
    np.testing.assert_array_equal(after.keys[0], before.keys[0])
    assert int(after.pointer[0]) == int(before.pointer[0]) == 3
    assert int(after.count[0]) == int(before.count[0]) == 3
    np.testing.assert_array_equal(after.keys[1, [3, 0, 1]], 9.0)
    np.testing.assert_array_equal(after.keys[1, 2], 1.0)


def test_push_class_bank_with_no_valid_class_changes_nothing():
    bank = memory.push_class_bank(memory.init_class_bank((3, 2), dim=2), jnp.ones((2, 2, 2)),
                                  jnp.array([True, True]))
    after = memory.push_class_bank(bank, jnp.full((2, 2, 2), 5.0), jnp.array([False, False]))
    for new, old in zip(jax.tree.leaves(after), jax.tree.leaves(bank)):
        np.testing.assert_array_equal(new, old)


def test_push_class_bank_casts_keys_to_the_bank_dtype():
    bank = memory.init_class_bank((4,), dim=2, dtype=jnp.bfloat16)
    bank = memory.push_class_bank(bank, jnp.ones((1, 2, 2), jnp.float32), jnp.array([True]))
    assert bank.keys.dtype == jnp.bfloat16


def test_class_bank_is_a_pytree_for_jit_and_checkpoints():
    bank = memory.init_class_bank((4, 2), dim=3)
    leaves, treedef = jax.tree.flatten(bank)
    assert len(leaves) == 4
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert isinstance(rebuilt, memory.ClassBank)


def test_init_embedding_pool_rows_are_unit_random_and_reproducible():
    pool = memory.init_embedding_pool(jax.random.key(0), size=6, dim=5)
    assert pool.rows.shape == (6, 5) and int(pool.pointer) == 0
    np.testing.assert_allclose(np.linalg.norm(pool.rows, axis=1), 1.0, rtol=1e-6)
    assert np.linalg.matrix_rank(np.asarray(pool.rows)) == 5  # random directions, not a constant
    again = memory.init_embedding_pool(jax.random.key(0), size=6, dim=5)
    np.testing.assert_array_equal(pool.rows, again.rows)
    other = memory.init_embedding_pool(jax.random.key(1), size=6, dim=5)
    assert not np.allclose(pool.rows, other.rows)


def test_push_embedding_pool_is_fifo_with_wrap_around():
    pool = memory.init_embedding_pool(jax.random.key(2), size=5, dim=2)
    expected = np.asarray(pool.rows).copy()
    push = jax.jit(memory.push_embedding_pool)
    pointer = 0
    for step in range(4):
        rows = np.full((3, 2), step + 1.0, np.float32) + np.arange(3, dtype=np.float32)[:, None] / 10
        pool = push(pool, jnp.asarray(rows))
        for row in rows:
            expected[pointer] = row
            pointer = (pointer + 1) % 5
        np.testing.assert_array_equal(pool.rows, expected)
        assert int(pool.pointer) == pointer
    # 12 pushes into 5 rows: the last five written survive, the newest at pointer - 1.
    np.testing.assert_allclose(pool.rows[:, 0], [4.1, 4.2, 3.1, 3.2, 4.0])


def test_pushed_bank_reads_what_the_push_will_write():
    """The view the contrastive term reads during a step equals the bank after the push, at
    every row, through wrap-around, partial pushes, a class that writes nothing and a full bank."""
    capacities, dim, n = (7, 5, 4), 3, 3
    bank = memory.init_class_bank(capacities, dim)
    rng = np.random.default_rng(0)
    view_rows = jax.jit(lambda b, p, i: memory.PushedBank(b, p).rows(i))
    for step in range(6):
        keys = jnp.asarray(rng.normal(size=(3, n, dim)), jnp.float32)
        valid = jnp.asarray([3, step % 4, 0 if step % 2 else 2], jnp.int32)
        push = memory.bank_push(keys, valid)
        view, after = memory.PushedBank(bank, push), memory.push_class_bank(bank, keys, valid)
        flat = jnp.arange(3 * max(capacities))
        np.testing.assert_array_equal(view_rows(bank, push, flat), after.keys.reshape(-1, dim))
        np.testing.assert_array_equal(view.count, after.count)
        np.testing.assert_array_equal(view.filled, after.filled)
        np.testing.assert_array_equal(view.filled_and_zero_row, after.filled_and_zero_row)
        bank = after
    assert int(bank.count[0]) == capacities[0]  # the loop did wrap the largest ring


def test_bank_push_normalises_valid_to_row_counts():
    keys = jnp.ones((3, 4, 2))
    np.testing.assert_array_equal(memory.bank_push(keys, jnp.array([True, False, True])).written, [4, 0, 4])
    np.testing.assert_array_equal(memory.bank_push(keys, jnp.array([-1, 2, 9])).written, [0, 2, 4])


def test_chunked_info_nce_equals_gathering_every_negative_at_once():
    """The contrastive term gathers a chunk of anchors' negatives at a time (memory): value and
    anchor gradient equal those of one gather, from a bank and from a bank with a pending push,
    for chunk sizes that divide the anchors and one that does not."""
    from arco_jax import losses, objective  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(1)
    n, m, dim = 12, 5, 6
    bank = memory.push_class_bank(memory.init_class_bank((9, 7), dim),
                                  jnp.asarray(rng.normal(size=(2, 9, dim)), jnp.float32), jnp.asarray([9, 4]))
    push = memory.bank_push(jnp.asarray(rng.normal(size=(2, 3, dim)), jnp.float32), jnp.asarray([3, 2]))
    anchors = jnp.asarray(rng.normal(size=(n, dim)), jnp.float32)
    prototype = jnp.asarray(rng.normal(size=(dim,)), jnp.float32)
    index = jnp.asarray(rng.integers(0, 2 * 9, size=(n, m)), jnp.int32)
    for source in (bank, memory.PushedBank(bank, push)):
        def whole(a, source=source):
            return losses.info_nce(a, prototype, source.rows(index.reshape(-1)).reshape(n, m, dim), 0.5)
        for chunk in (1, 4, 5, 12, 64):
            chunked = jax.jit(lambda a, source=source, chunk=chunk: objective.chunked_info_nce(
                a, prototype, index, source, 0.5, chunk))
            np.testing.assert_allclose(chunked(anchors), whole(anchors), rtol=1e-6)
            np.testing.assert_allclose(jax.grad(chunked)(anchors), jax.grad(whole)(anchors), rtol=1e-5, atol=1e-7)


def test_chunked_info_nce_holds_a_chunk_of_negatives_not_all():
    """XLA's buffer assignment for the anchors' gradient: the temporaries of 8-anchor chunks
    are a fraction of those of gathering the 64 anchors' negatives at once."""
    from arco_jax import objective  # pylint: disable=import-outside-toplevel

    n, m, dim = 64, 128, 64  # one gather of every negative: 2 MB
    bank = memory.init_class_bank((4096, 4096), dim)
    index = jnp.zeros((n, m), jnp.int32)
    anchors, prototype = jnp.ones((n, dim)), jnp.ones((dim,))

    def temp_bytes(chunk):
        grad = jax.jit(jax.grad(lambda a: objective.chunked_info_nce(a, prototype, index, bank, 0.5, chunk)))
        return grad.lower(anchors).compile().memory_analysis().temp_size_in_bytes

    whole, chunked = temp_bytes(n), temp_bytes(8)
    assert whole > n * m * dim * 4  # at least the gathered negatives
    assert chunked < whole / 3, (chunked, whole)
