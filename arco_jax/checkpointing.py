"""Checkpoints that a killed, preempted or disk-starved run can always resume from exactly.

Two Orbax managers under `<workdir>/checkpoints`:
  last/<step>: the newest `train.keep_checkpoints` states, each with every process's Grain
    iterator position (grain's per-process handler) and a `meta` record;
  best/<step>: the best state by validation Dice, its `meta` holding that Dice, so the
    record and the state are committed together (best.json is a readable mirror).

Why a restore can be trusted:
- Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a
  run killed mid-save leaves only a tmp directory, which is never listed and is removed when
  the managers open.
- `meta` carries a fingerprint of every array of the state (two wrap-around uint32 sums of
  its bits per leaf), checked after reading: a flipped bit in a data file, which Orbax and
  TensorStore read back without complaint, is caught.
- A step that cannot be read or fails its fingerprint is moved to `checkpoints/corrupt/`
  with a warning and the next older one is used; every process takes the same decision.
- A step whose arrays have other shapes than this config builds is not corruption: that is
  a clear error (CheckpointMismatch), and nothing is moved.
- A step of an earlier state layout is read through the `legacy` hook (state.legacy_layout):
  restored into the old layout, fingerprint-checked there, then converted.

Saves are asynchronous: the arrays are copied to host memory before `save` returns (so the
next, donating, train step cannot change them), then written in the background. A failed
write (a full disk) surfaces at the next save or wait as CheckpointWriteError, which names
the step, the directory and the newest complete checkpoint.
"""
from __future__ import annotations

import errno
import json
import logging
import re
import time
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from arco_jax import files, parallel

log = logging.getLogger("arco_jax")
CORRUPT_DIR = "corrupt"
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os_error_code='(28|122)'")


LegacyHook = Callable[[tuple, Any], "tuple[Any, Callable] | None"]


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); the message says what is intact."""


class CheckpointMismatch(ValueError):
    """A checkpoint holds a state this run cannot take (other shapes, other process count)."""


# ----------------------------------------------------------------------------- fingerprint

FINGERPRINT_CHUNK = 1 << 22  # elements a pass reads: its temporaries stay at 16 MB whatever the leaf


def _host_bits(x) -> np.ndarray:
    """A leaf's bits, flat, as unsigned integers of its width (bool as 0/1), on the host: on a
    CPU a view of the array, no copy."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    value = np.ascontiguousarray(parallel.fetch(x))
    if value.dtype == np.bool_:
        return value.reshape(-1).view(np.uint8)
    width = {1: np.uint8, 2: np.uint16, 4: np.uint32}.get(value.dtype.itemsize)
    if width is None:
        raise TypeError(f"no fingerprint for dtype {value.dtype}")
    return value.reshape(-1).view(width)


def _leaf_fingerprint(x, chunk: int) -> list[int]:
    bits = _host_bits(x)
    total = weighted = 0
    for start in range(0, bits.size, chunk):
        part = bits[start:start + chunk].astype(np.uint32)
        position = np.arange(start + 1, start + 1 + part.size, dtype=np.uint32)
        # uint32 arithmetic wraps modulo 2**32, so the sums do not depend on the order or the chunks.
        total = (total + int(part.sum(dtype=np.uint32))) & 0xFFFFFFFF
        weighted = (weighted + int((part * position).sum(dtype=np.uint32))) & 0xFFFFFFFF
    return [total, weighted]


def state_fingerprint(tree, chunk: int = FINGERPRINT_CHUNK) -> list[list[int]]:
    """Per leaf [sum of bits, position-weighted sum of bits (positions from 1)] mod 2**32: any
    single flipped bit changes the first, swapped values change the second; the same on any
    device count or backend. Summed on the host a chunk at a time: a jitted sum over the whole
    state left XLA:CPU temporaries of twice the state (0.85 GB at the ACDC settings) at every save."""
    return [_leaf_fingerprint(x, chunk) for x in jax.tree.leaves(tree)]


# ----------------------------------------------------------------------------- helpers

def _leaf_specs(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """'params/segmenter/.../kernel' -> (shape, dtype name), for a state or Orbax's metadata of it."""
    def key_name(key) -> str:
        for attribute in ("name", "key", "idx"):
            if hasattr(key, attribute):
                return str(getattr(key, attribute))
        return str(key)

    return {"/".join(key_name(k) for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def saved_leaf_specs(step_dir: epath.PathLike) -> dict | None:
    """The `_leaf_specs` of the state saved in a step directory (`<manager>/<step>`), from its
    metadata; None when that cannot be read."""
    try:
        metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir) / "state")
    except Exception:  # noqa: BLE001
        return None
    return _leaf_specs(getattr(metadata, "tree", metadata))


def _shape_differences(saved: dict, wanted: dict, limit: int = 6) -> list[str]:
    lines = []
    for name in sorted(set(saved) | set(wanted)):
        have, want = saved.get(name), wanted.get(name)
        if have == want:
            continue
        describe = lambda spec: "absent" if spec is None else f"{spec[0]} {spec[1]}"  # noqa: E731
        lines.append(f"{name}: checkpoint {describe(have)}, this config {describe(want)}")
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the exception chain; TensorStore reports it as text."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return True
        if _DISK_FULL_TEXT.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def committed_steps(directory: epath.PathLike) -> list[int]:
    """Steps Orbax has committed in a manager directory (tmp directories are not steps)."""
    directory = epath.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


class StreamPosition:
    """The training streams' position in the form grain's checkpoint handler stores per process
    (bytes of JSON). Saving takes a snapshot at once, so the position written is the one of the
    saved step even though the files are finished later; restoring only records the bytes, which
    are applied to the streams after the whole checkpoint has been verified."""

    def __init__(self, state: bytes | None = None):
        self.state = state

    @classmethod
    def of(cls, streams) -> "StreamPosition":
        return cls(json.dumps(streams.get_state(), sort_keys=True).encode())

    def get_state(self) -> bytes:
        return self.state

    def set_state(self, state: bytes) -> None:
        self.state = state

    def start_prefetch(self) -> None:
        """Called by grain's handler after set_state; nothing runs until the streams get it."""

    def apply_to(self, streams) -> None:
        streams.set_state(json.loads(self.state))


# ----------------------------------------------------------------------------- the managers

class Checkpoints:
    """The `last` and `best` managers of a workdir. Every process calls every method (Orbax
    coordinates the writes; restore decisions are agreed between processes)."""

    def __init__(self, directory: epath.PathLike, keep: int, config_hash: str, legacy: LegacyHook | None = None):
        """`legacy(saved leaf names, target)` -> (the tree a checkpoint of an earlier layout is
        restored into, the function that turns it into the target's layout), or None when the
        saved names are of the current layout."""
        self.directory = files.workdir_path(directory)
        self.config_hash = config_hash
        self.legacy = legacy
        self._pending: dict[str, int] = {}
        self.last = self._manager("last", keep, {"state": ocp.StandardCheckpointHandler(),
                                                 "data": grain.checkpoint.CheckpointHandler(),
                                                 "meta": ocp.JsonCheckpointHandler()})
        self.best = self._manager("best", 1, {"state": ocp.StandardCheckpointHandler(),
                                              "meta": ocp.JsonCheckpointHandler()})
        self.best_file = self.directory / "best.json"

    def _manager(self, name: str, keep: int, handlers: dict) -> ocp.CheckpointManager:
        # Each manager names its barriers apart: both save step directories called '<step>', and
        # with the same names a best and a last save of one step would wait on each other's.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name))
        return ocp.CheckpointManager(self.directory / name, options=options, item_handlers=handlers)

    # -- writing

    def _meta(self, step: int, state, **extra) -> dict:
        return {"step": step, "config_hash": self.config_hash, "fingerprint": state_fingerprint(state), **extra}

    def _write(self, which: str, step: int, start: Callable[[], Any]) -> None:
        """Run a save or wait; turn a failed write into one clear error."""
        manager = getattr(self, which)
        try:
            start()
        except Exception as error:  # noqa: BLE001  (re-raised, with what is known)
            disk_full = is_disk_full(error)
            if not (disk_full or isinstance(error, OSError)):
                raise
            failed = self._pending.get(which, step)
            intact = [s for s in committed_steps(manager.directory) if s != failed]
            newest = (f"Checkpoints already complete are intact (newest: step {intact[-1]})" if intact
                      else "No checkpoint was complete yet")
            cause, remedy = (("no space left on the device", "Free space") if disk_full
                             else (f"{type(error).__name__}: {error}", "Fix that"))
            raise CheckpointWriteError(
                f"writing checkpoint step {failed} into {manager.directory} failed: {cause}. {newest}; "
                f"the partly written step is ignored and removed on resume. {remedy}, then run the same "
                "command again to resume.") from error

    def save_last(self, step: int, state, streams) -> None:
        """Start an asynchronous save of `state` and the streams' position at `step`."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(StreamPosition.of(streams)),
                                  meta=ocp.args.JsonSave(self._meta(step, state)))
        self._write("last", step, lambda: self.last.save(step, args=args, force=True))
        self._pending["last"] = step

    def save_best(self, step: int, state, value: float, metric: str = "dice") -> None:
        """Start an asynchronous save of the new best state (by validation `metric`); best.json
        mirrors its record {'step', 'val_<metric>'}."""
        record = {"step": step, f"val_{metric}": value}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(self._meta(step, state, best=record)))
        self._write("best", step, lambda: self.best.save(step, args=args, force=True))
        self._pending["best"] = step
        if parallel.is_main_process():
            files.write_json(self.best_file, record)

    @property
    def latest_saved_step(self) -> int | None:
        return self.last.latest_step()

    def wait(self) -> None:
        for which in ("last", "best"):
            self._write(which, self._pending.get(which, -1), getattr(self, which).wait_until_finished)
        self._pending.clear()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.last.close()
            self.best.close()

    # -- reading

    def _layout(self, manager: ocp.CheckpointManager, step: int, target):
        """(the tree to restore `step` into, the conversion to the target's layout or None),
        after checking that its shapes and process count fit this run (CheckpointMismatch
        otherwise). Metadata that cannot be read is left to the restore (and treated as corruption)."""
        saved = saved_leaf_specs(epath.Path(manager.directory) / str(step))
        if saved is None:
            return target, None
        convert = None
        upgrade = self.legacy(tuple(saved), target) if self.legacy is not None else None
        if upgrade is not None:
            target, convert = upgrade
        differences = _shape_differences(saved, _leaf_specs(target))
        if differences:
            raise CheckpointMismatch(
                f"checkpoint step {step} in {manager.directory} holds a state of another shape than this "
                f"config builds (was the config changed?):\n  " + "\n  ".join(differences))
        if manager is self.last:
            data_dir = epath.Path(manager.directory) / str(step) / "data"
            written = sorted(data_dir.glob("process_*-of-*.json")) if data_dir.is_dir() else []
            counts = {int(p.stem.rsplit("-of-", 1)[1]) for p in written}
            if counts and counts != {jax.process_count()}:
                raise CheckpointMismatch(
                    f"checkpoint step {step} in {manager.directory} was written by {counts.pop()} processes, "
                    f"this run has {jax.process_count()}: each process's position in the data stream "
                    "cannot be carried over. Resume with the same number of processes.")
        return target, convert

    def _restore_verified(self, manager: ocp.CheckpointManager, step: int, items: dict):
        restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **items))
        meta = restored["meta"]
        if "state" in items:
            if meta.get("step") != step or meta.get("fingerprint") != state_fingerprint(restored["state"]):
                raise ValueError("the arrays read back do not match the fingerprint saved with them")
        return restored

    def _restore_newest_good(self, which: str, target, extra_items: Callable[[], dict] | None = None):
        """(step, restored items) of the newest step that reads back intact, or (None, None).
        A step that fails anywhere is moved aside on every process's word, and the next older
        one is tried."""
        manager = getattr(self, which)
        for step in sorted(manager.all_steps(), reverse=True):
            layout, convert = self._layout(manager, step, target)
            items = {"state": ocp.args.StandardRestore(layout), **(extra_items() if extra_items else {})}
            try:
                restored, problem = self._restore_verified(manager, step, items), ""
            except Exception as error:  # noqa: BLE001  (any failure to read is corruption here)
                restored, problem = None, f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            problems = [p for p in parallel.gather_text(problem) if p]
            if not problems:
                if convert is not None:  # Outside the try: a conversion error is no corruption.
                    restored = {**{name: restored[name] for name in restored.keys()},
                                "state": convert(restored["state"])}
                return step, restored
            self._move_aside(manager, which, step, problems[0])
        return None, None

    def _move_aside(self, manager: ocp.CheckpointManager, which: str, step: int, problem: str) -> None:
        source = epath.Path(manager.directory) / str(step)
        target = self.directory / CORRUPT_DIR / f"{which}-{step}-{int(time.time())}"
        log.warning("checkpoint step %d in %s cannot be used (%s); moved it to %s and trying the one "
                    "before", step, manager.directory, problem, target)
        if parallel.is_main_process() and source.exists():
            files.move(source, target)
        parallel.barrier(f"checkpoint moved aside: {which} {step}")
        manager.reload()

    def restore_last(self, target, streams):
        """The newest intact `last` state (and set the streams to its position), or None."""
        positions = []

        def data_item():
            positions.append(StreamPosition())
            return {"data": grain.checkpoint.CheckpointRestore(positions[-1])}

        step, restored = self._restore_newest_good("last", target, data_item)
        if step is None:
            return None
        positions[-1].apply_to(streams)
        return restored["state"]

    def restore_best(self, target):
        """The best state, or None (none saved, or none intact)."""
        step, restored = self._restore_newest_good("best", target)
        return None if step is None else restored["state"]

    def best_record(self) -> dict | None:
        """{'step', 'val_<metric>', 'config_hash'} of the best checkpoint, read from the checkpoint
        itself; best.json is rewritten from it if a run died between the two writes."""
        step = self.best.latest_step()
        if step is None:
            return None
        try:
            meta = self.best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as error:  # noqa: BLE001
            log.warning("best checkpoint step %d: its record cannot be read (%s); best selection starts "
                        "again", step, error)
            return None
        record = dict(meta["best"])
        if parallel.is_main_process() and (not self.best_file.exists()
                                           or json.loads(self.best_file.read_text()) != record):
            files.write_json(self.best_file, record)
        return {**record, "config_hash": meta.get("config_hash")}

    def forget_best(self) -> None:
        """Delete the best checkpoint and its record (a stale one from a replaced config)."""
        for step in self.best.all_steps():
            self.best.delete(step)
        if parallel.is_main_process():
            self.best_file.unlink(missing_ok=True)
        parallel.barrier("best checkpoint forgotten")
        self.best.reload()

