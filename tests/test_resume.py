"""Exact resume, preemption and the guards around a workdir.

The command-line scenario (a module fixture) runs the training CLI on a tiny config three
ways in the same conditions: uninterrupted; and interrupted twice: SIGTERM once a checkpoint
exists (a save and exit code 75), then SIGKILL at an arbitrary later step, each time
restarted with the same command. Both must end with the same state bit for bit and the
same metrics. The runs share a persistent compilation cache, so only the first compiles.
The tiny config keeps the terms that carry state across steps (contrast: class banks,
L_nn: embedding pool) and drops the stateless unsup and eqv terms to compile faster.

The other tests drive `Checkpoints`, the config guard and the metrics log on a small fake
state, with no train step to compile.
"""
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from arco_jax import checkpointing, train
from arco_jax.checkpointing import CheckpointMismatch, Checkpoints, CheckpointWriteError
from arco_jax.config import ConfigError, base_config

REPO = Path(__file__).resolve().parent.parent
PREEMPTED_EXIT_CODE = 75
STEPS = 32
KILL_AFTER = 6  # SIGKILL this many steps after the step SIGTERM stopped at
CHECKPOINT_EVERY = 4
RUN_TIMEOUT_S = 400

TINY_CONFIG = """
from arco_jax.config import base_config
from arco_jax.data import registry


def get_config():
    c = base_config()
    registry.select(c, "phantom")
    d = c.data
    d.cache_dir = {cache_dir!r}
    d.phantom.splits = (3, 1, 1)
    d.phantom.image_size = 32
    d.phantom.slices = (3, 4)
    d.patch_size = (32, 32)
    d.labeled_patients = 1
    d.batch_labeled = 2
    d.batch_unlabeled = 2
    d.num_workers = 0
    c.model.unet.features = (4, 8, 8, 16, 16)
    c.model.rep_dim = 16
    a = c.arco
    a.num_anchors = 8
    a.num_negatives = 4
    a.bank_size = 64
    a.bank_size_background = 64
    a.bank_enqueue = 16
    a.nn_pool_size = 4
    a.nn_topk = 2
    a.nn_grid = 2
    c.loss_weights.unsup = 0.0
    c.loss_weights.eqv = 0.0
    c.train.steps = {steps}
    c.train.log_every = 1
    c.train.eval_every = 8
    c.train.checkpoint_every = {checkpoint_every}
    c.eval.slice_batch_size = 8
    return c
"""


# ----------------------------------------------------------------------------- CLI helpers

def write_tiny_config(directory: Path, phantom_cache: Path, steps: int = STEPS) -> Path:
    path = directory / "tiny_config.py"
    path.write_text(TINY_CONFIG.format(cache_dir=str(phantom_cache), steps=steps,
                                       checkpoint_every=CHECKPOINT_EVERY))
    return path


def cli_env(compile_cache: Path, **extra) -> dict:
    """The test session's environment (two CPU devices) plus a shared compilation cache."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(compile_cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
            "PYTHONPATH": str(REPO), **extra}


def cli_command(config_path: Path, workdir: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "arco_jax.main", f"--config={config_path}", f"--workdir={workdir}", *flags]


def start_cli(config_path: Path, workdir: Path, env: dict, log_path: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(cli_command(config_path, workdir, *flags), cwd=REPO, env=env,
                            stdout=log_path.open("a"), stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, log_path: Path, timeout: float = RUN_TIMEOUT_S) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"the run did not finish in {timeout} s; its output:\n{log_path.read_text()[-3000:]}")


def read_metrics(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return records


def last_train_step(workdir: Path) -> int:
    return max((r["step"] for r in read_metrics(workdir) if r["split"] == "train"), default=0)


def wait_until(process: subprocess.Popen, condition, log_path: Path, timeout: float = RUN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended (code {process.returncode}) before the moment to interrupt it; "
                        f"its output:\n{log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting; output:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.02)


def saved_state(workdir: Path, step: int) -> dict:
    """A checkpointed TrainState as nested dicts of numpy arrays, read onto this process's first
    device whatever devices or processes wrote it."""
    manager = ocp.CheckpointManager(workdir / "checkpoints" / "last",
                                    item_handlers={"state": ocp.StandardCheckpointHandler()})
    metadata = manager.item_metadata(step)["state"]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                          getattr(metadata, "tree", metadata))
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    manager.close()
    return jax.tree.map(np.asarray, state)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)


def without_speed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "steps_per_sec"} for r in records]


@pytest.fixture(scope="module")
def phantom_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("phantom_cache")


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One persistent compilation cache for every command-line run of the test session."""
    return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])  # the session's (conftest.py)


# ----------------------------------------------------------------------------- the scenario

@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, phantom_cache, compile_cache):
    base = tmp_path_factory.mktemp("cli")
    config_path = write_tiny_config(base, phantom_cache)
    env = cli_env(compile_cache)
    out = {"base": base}

    # Uninterrupted.
    straight = base / "straight"
    log_path = base / "straight.log"
    code = finish(start_cli(config_path, straight, env, log_path), log_path)
    assert code == 0, log_path.read_text()[-3000:]
    out["straight"] = straight

    # SIGTERM once a checkpoint is committed and training has moved past it.
    resumed = base / "resumed"
    log_path = out["log"] = base / "resumed.log"
    last_dir = resumed / "checkpoints" / "last"
    process = start_cli(config_path, resumed, env, log_path)
    wait_until(process, lambda: (checkpointing.committed_steps(last_dir)
                                 and last_train_step(resumed) > max(checkpointing.committed_steps(last_dir))),
               log_path)
    process.send_signal(signal.SIGTERM)
    out["sigterm_code"] = finish(process, log_path)
    out["sigterm_output"] = log_path.read_text()
    out["steps_after_sigterm"] = checkpointing.committed_steps(last_dir)
    out["logged_after_sigterm"] = last_train_step(resumed)

    # Same command; SIGKILL a few steps later, wherever the saves happen to be.
    after_sigterm = out["logged_after_sigterm"]
    process = start_cli(config_path, resumed, env, log_path)
    kill_at = min(after_sigterm + KILL_AFTER, STEPS - CHECKPOINT_EVERY)
    wait_until(process, lambda: last_train_step(resumed) >= kill_at, log_path)
    process.kill()
    process.wait()
    out["killed_at"] = last_train_step(resumed)
    out["steps_after_kill"] = checkpointing.committed_steps(last_dir)

    # Same command, to the end.
    out["final_code"] = finish(start_cli(config_path, resumed, env, log_path), log_path)
    out["resumed"] = resumed
    return out


def test_sigterm_saves_the_current_step_and_exits_with_75(interrupted):
    assert interrupted["sigterm_code"] == PREEMPTED_EXIT_CODE, interrupted["sigterm_output"][-3000:]
    stopped = interrupted["logged_after_sigterm"]
    # The step it stopped at is saved even when it is not a multiple of checkpoint_every.
    assert max(interrupted["steps_after_sigterm"]) == stopped
    assert f"preempted (SIGTERM) at step {stopped}" in interrupted["sigterm_output"]


def test_sigkill_left_training_mid_way(interrupted):
    assert interrupted["final_code"] == 0, interrupted["log"].read_text()[-3000:]
    assert max(interrupted["steps_after_sigterm"]) < interrupted["killed_at"] < STEPS


def test_interrupted_run_ends_with_the_same_state_bit_for_bit(interrupted):
    assert_bitwise_equal(saved_state(interrupted["straight"], STEPS), saved_state(interrupted["resumed"], STEPS))


def test_interrupted_run_logs_the_same_metrics_once_per_step(interrupted):
    straight = read_metrics(interrupted["straight"])
    resumed = read_metrics(interrupted["resumed"])
    assert [r["step"] for r in straight if r["split"] == "train"] == list(range(1, STEPS + 1))
    assert without_speed(resumed) == without_speed(straight)


def test_interrupted_run_reports_the_same_results(interrupted):
    straight = json.loads((interrupted["straight"] / "results.json").read_text())
    resumed = json.loads((interrupted["resumed"] / "results.json").read_text())
    assert resumed == straight


def test_resumed_workdir_keeps_the_newest_checkpoints_and_no_partial_ones(interrupted):
    for name in ("last", "best"):
        directory = interrupted["resumed"] / "checkpoints" / name
        assert not [p.name for p in directory.iterdir() if "tmp" in p.name]
    last = interrupted["resumed"] / "checkpoints" / "last"
    assert checkpointing.committed_steps(last) == [STEPS - CHECKPOINT_EVERY, STEPS]


def test_changed_config_is_refused_with_the_fields_listed(interrupted, compile_cache):
    """The same workdir with more steps and another sampler: refused before anything runs."""
    config_path = interrupted["base"] / "tiny_config.py"
    completed = subprocess.run(
        cli_command(config_path, interrupted["resumed"], f"--config.train.steps={STEPS + 4}",
                    "--config.arco.sampler=sag", "--config.method=arco_sag"),
        cwd=REPO, env=cli_env(compile_cache), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 1, output[-3000:]
    assert "holds a run with another config" in output
    assert f"train.steps: {STEPS} -> {STEPS + 4}" in output
    assert "arco.sampler: 'sg' -> 'sag'" in output
    assert "method: 'arco_sg' -> 'arco_sag'" in output
    assert "--allow_config_change" in output
    last = interrupted["resumed"] / "checkpoints" / "last"
    assert checkpointing.committed_steps(last) == [STEPS - CHECKPOINT_EVERY, STEPS]


# ----------------------------------------------------------------------------- checkpoints

class FakeStreams:
    def __init__(self, position: int = 0):
        self.position = position

    def get_state(self) -> dict:
        return {"labeled": {"next_index": self.position}, "unlabeled": {"next_index": 2 * self.position}}

    def set_state(self, state: dict) -> None:
        self.position = state["labeled"]["next_index"]


def fake_state(step: int, size: int = 64) -> dict:
    key = jax.random.PRNGKey(step)
    return {"step": jnp.int32(step), "weights": jax.random.normal(key, (size, size)),
            "flags": jnp.arange(6) % (step + 1) == 0, "rng": key}


@pytest.fixture
def saved_steps(tmp_path):
    """Steps 2 and 4 saved (and committed) in a fresh checkpoint directory."""
    directory = tmp_path / "checkpoints"
    checkpoints = Checkpoints(directory, keep=5, config_hash="h")
    for step in (2, 4):
        checkpoints.save_last(step, fake_state(step), FakeStreams(step))
    checkpoints.close()
    return directory


def restore(directory: Path, target=None):
    checkpoints = Checkpoints(directory, keep=5, config_hash="h")
    streams = FakeStreams()
    state = checkpoints.restore_last(target if target is not None else fake_state(0), streams)
    checkpoints.close()
    return state, streams


def step_files(directory: Path, step: int) -> list[Path]:
    """The array data files of a step, largest first."""
    files = [p for p in (directory / "last" / str(step) / "state").rglob("*")
             if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: -p.stat().st_size)


def assert_same_tree(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_the_fingerprint_is_the_modular_bit_sums_of_every_leaf_in_any_chunking():
    """Checkpoints written before the fingerprint was summed on the host must still verify: the
    same two sums modulo 2**32 as the jitted formula that computed it then (here the oracle)."""
    def oracle(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        bits = x.astype(jnp.uint32) if x.dtype == jnp.bool_ else jax.lax.bitcast_convert_type(
            x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]).astype(jnp.uint32)
        bits = bits.reshape(-1)
        position = jnp.arange(1, bits.size + 1, dtype=jnp.uint32)
        return [int(jnp.sum(bits, dtype=jnp.uint32)), int(jnp.sum(bits * position, dtype=jnp.uint32))]

    key = jax.random.PRNGKey(3)
    tree = {"f32": jax.random.normal(key, (37, 11)) * 1e6, "bf16": jnp.linspace(-3, 3, 50, dtype=jnp.bfloat16),
            "i8": jnp.arange(-60, 60, dtype=jnp.int8), "flags": jnp.arange(9) % 2 == 0, "step": jnp.int32(123456789),
            "typed_key": jax.random.key(5), "raw_key": key, "big": jnp.full((5000,), 0xFFFFFFFF, jnp.uint32)}
    expected = [oracle(x) for x in jax.tree.leaves(tree)]
    assert max(w for _, w in expected) > 2 ** 31  # the sums do wrap
    for chunk in (7, 1000, checkpointing.FINGERPRINT_CHUNK):
        assert checkpointing.state_fingerprint(tree, chunk=chunk) == expected
    with pytest.raises(TypeError, match="no fingerprint for dtype float64"):
        checkpointing.state_fingerprint({"x": np.zeros(3)})


def test_restore_returns_the_newest_state_and_stream_position(saved_steps):
    state, streams = restore(saved_steps)
    assert_same_tree(state, fake_state(4))
    assert streams.position == 4


def flip_a_byte(directory: Path) -> None:
    path = step_files(directory, 4)[0]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def truncate_array_file(directory: Path) -> None:
    path = step_files(directory, 4)[0]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def delete_stream_position(directory: Path) -> None:
    for path in (directory / "last" / "4" / "data").glob("process_*.json"):
        path.unlink()


def arrays_of_another_step(directory: Path) -> None:
    """Readable arrays, but not the ones saved with step 4: only the fingerprint can tell."""
    shutil.rmtree(directory / "last" / "4" / "state")
    shutil.copytree(directory / "last" / "2" / "state", directory / "last" / "4" / "state")


@pytest.mark.parametrize("corrupt", [flip_a_byte, truncate_array_file, delete_stream_position,
                                     arrays_of_another_step])
def test_corrupt_newest_step_is_set_aside_and_the_one_before_used(saved_steps, corrupt, caplog):
    corrupt(saved_steps)
    with caplog.at_level(logging.WARNING, logger="arco_jax"):
        state, streams = restore(saved_steps)
    assert_same_tree(state, fake_state(2))
    assert streams.position == 2
    assert "checkpoint step 4" in caplog.text and "cannot be used" in caplog.text
    assert checkpointing.committed_steps(saved_steps / "last") == [2]
    assert [p.name.split("-")[:2] for p in (saved_steps / "corrupt").iterdir()] == [["last", "4"]]


def test_no_intact_step_means_a_fresh_start(saved_steps):
    arrays_of_another_step(saved_steps)
    delete_stream_position(saved_steps)  # of step 4 only; now break step 2 as well
    for path in (saved_steps / "last" / "2" / "data").glob("process_*.json"):
        path.unlink()
    streams = FakeStreams(7)
    checkpoints = Checkpoints(saved_steps, keep=5, config_hash="h")
    assert checkpoints.restore_last(fake_state(0), streams) is None
    checkpoints.close()
    assert streams.position == 7  # untouched by the failed attempts


def test_half_written_step_of_a_killed_save_is_ignored_and_removed(saved_steps):
    """A kill during an asynchronous save leaves the step in Orbax's tmp directory."""
    partial = saved_steps / "last" / "6.orbax-checkpoint-tmp"
    shutil.copytree(saved_steps / "last" / "4", partial)
    half = step_files(saved_steps, 4)[0]
    (partial / half.relative_to(saved_steps / "last" / "4")).write_bytes(half.read_bytes()[:10])
    state, _ = restore(saved_steps)
    assert_same_tree(state, fake_state(4))
    assert not partial.exists()


def test_state_of_another_shape_is_an_error_not_corruption(saved_steps):
    with pytest.raises(CheckpointMismatch, match=r"weights: checkpoint \(64, 64\) float32, this config \(32, 32\)"):
        restore(saved_steps, target=fake_state(0, size=32))
    assert checkpointing.committed_steps(saved_steps / "last") == [2, 4]


def test_checkpoint_of_another_process_count_is_an_error(saved_steps):
    data = saved_steps / "last" / "4" / "data"
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
    with pytest.raises(CheckpointMismatch, match="written by 2 processes, this run has 1"):
        restore(saved_steps)


def test_best_record_lives_in_the_checkpoint_and_best_json_follows_it(tmp_path):
    checkpoints = Checkpoints(tmp_path, keep=2, config_hash="h")
    checkpoints.save_best(3, fake_state(3), 0.5)
    checkpoints.close()
    (tmp_path / "best.json").write_text(json.dumps({"step": 1, "val_dice": 0.1}))  # a kill in between
    checkpoints = Checkpoints(tmp_path, keep=2, config_hash="h")
    assert checkpoints.best_record() == {"step": 3, "val_dice": 0.5, "config_hash": "h"}
    assert json.loads((tmp_path / "best.json").read_text()) == {"step": 3, "val_dice": 0.5}
    assert_same_tree(checkpoints.restore_best(fake_state(0)), fake_state(3))
    checkpoints.close()


def test_forgotten_best_leaves_no_checkpoint_and_no_record(tmp_path):
    checkpoints = Checkpoints(tmp_path, keep=2, config_hash="old")
    checkpoints.save_best(6, fake_state(6), 0.7)
    checkpoints.wait()
    checkpoints.forget_best()
    assert checkpoints.best_record() is None and checkpoints.restore_best(fake_state(0)) is None
    assert not (tmp_path / "best.json").exists()
    checkpoints.close()


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


async def enospc_async(*args, **kwargs):
    enospc()


def test_disk_full_in_a_blocking_write_is_reported(saved_steps, monkeypatch):
    monkeypatch.setattr(grain.checkpoint.CheckpointHandler, "save", enospc)
    checkpoints = Checkpoints(saved_steps, keep=5, config_hash="h")
    with pytest.raises(CheckpointWriteError) as info:
        checkpoints.save_last(6, fake_state(6), FakeStreams(6))
    message = str(info.value)
    assert "writing checkpoint step 6" in message and "no space left on the device" in message
    assert "intact (newest: step 4)" in message and "Free space, then run the same command again" in message
    monkeypatch.undo()
    checkpoints.close()
    assert_same_tree(restore(saved_steps)[0], fake_state(4))


def test_disk_full_in_a_background_write_is_reported_at_the_next_wait(saved_steps, monkeypatch):
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", enospc_async)
    checkpoints = Checkpoints(saved_steps, keep=5, config_hash="h")
    checkpoints.save_last(6, fake_state(6), FakeStreams(6))  # returns: the write runs in the background
    with pytest.raises(CheckpointWriteError, match=r"writing checkpoint step 6 .* no space left on the device.*"
                                                   r"newest: step 4"):
        checkpoints.wait()
    monkeypatch.undo()
    assert_same_tree(restore(saved_steps)[0], fake_state(4))


def test_disk_full_is_recognised_in_tensorstore_errors():
    # What TensorStore raised when a checkpoint filled a 64 kB tmpfs (the path shortened).
    error = ValueError('RESOURCE_EXHAUSTED: Error writing "a/0" in OCDBT database at local file "ck/1.orbax-'
                       'checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": Failed to write 41430 bytes '
                       "to file 4: No space left on device [os_error_code='28']")
    assert checkpointing.is_disk_full(error)
    assert not checkpointing.is_disk_full(ValueError("PERMISSION_DENIED: Error writing local file"))
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, "quota")
    assert checkpointing.is_disk_full(wrapped)


# ----------------------------------------------------------------------------- config guard

def workdir_with_run(tmp_path: Path, config) -> Path:
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "last" / "4").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(train.config_record(config)))
    return workdir


def test_other_config_is_refused_naming_each_field(tmp_path):
    workdir = workdir_with_run(tmp_path, base_config())
    changed = base_config()
    changed.train.steps = 123
    changed.data.patch_size = (128, 128)
    with pytest.raises(ConfigError) as info:
        train.check_workdir_config(workdir, changed, allow_change=False)
    message = str(info.value)
    assert "train.steps: 30000 -> 123" in message
    assert "data.patch_size: [256, 256] -> [128, 128]" in message
    assert "--allow_config_change" in message


def test_scheduling_fields_may_change_on_resume(tmp_path):
    workdir = workdir_with_run(tmp_path, base_config())
    changed = base_config()
    changed.train.log_every = 7
    changed.train.keep_checkpoints = 9
    assert train.check_workdir_config(workdir, changed, allow_change=False) is False


def test_allowed_config_change_keeps_the_old_config(tmp_path):
    config = base_config()
    workdir = workdir_with_run(tmp_path, config)
    changed = base_config()
    changed.arco.sampler = "sag"
    assert train.check_workdir_config(workdir, changed, allow_change=True) is True
    assert json.loads((workdir / "config.before_change_1.json").read_text()) == train.config_record(config)


def test_workdir_without_a_checkpoint_takes_the_new_config(tmp_path):
    workdir = workdir_with_run(tmp_path, base_config())
    shutil.rmtree(workdir / "checkpoints")
    changed = base_config()
    changed.data.data_dir = "/elsewhere"
    assert train.check_workdir_config(workdir, changed, allow_change=False) is False


def test_processes_with_the_same_config_pass():
    train.check_same_config_on_all_processes(base_config())  # one process: compares with itself


# ----------------------------------------------------------------------------- metrics log

def test_metrics_after_the_resumed_step_and_a_cut_line_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"split": "train", "step": s} for s in (1, 2, 3)] + [{"split": "val", "step": 2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"split": "train", "st')
    train.MetricLog(tmp_path, total_steps=10).keep_until(2)
    assert read_metrics(tmp_path) == [lines[0], lines[1], lines[3]]
    assert path.read_text().endswith("\n")
