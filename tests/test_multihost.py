"""Two real processes on localhost (jax.distributed, gloo collectives on CPU, one device each),
started through the command line as on a cluster, against one process with two devices.

The two-process run is preempted (SIGTERM to process 1 only, as when one host gets the
notice) and restarted, so this also checks that every process stops at the same step. With
two participants a cross-device sum is a + b in either order, so the runs agree bit for bit.
Only the supervised term is on: every collective crosses processes through TCP, and the
optional terms would multiply compile time and collectives without adding a code path here.
"""
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest

from arco_jax import checkpointing
from tests.test_resume import (PREEMPTED_EXIT_CODE, REPO, assert_bitwise_equal, cli_command, cli_env,
                               finish, last_train_step, read_metrics, saved_state, wait_until, without_speed,
                               write_tiny_config)

STEPS = 10
OVERRIDES = ("--config.loss_weights.contrast=0.0", "--config.loss_weights.nn=0.0", f"--config.train.steps={STEPS}",
             "--config.train.checkpoint_every=2", "--config.train.eval_every=5")
ERROR_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_processes(config_path: Path, workdir: Path, env: dict, logs: list[Path], *flags: str,
                    per_process_flags=((), ()), cwds=(REPO, REPO)) -> list[subprocess.Popen]:
    port = free_port()
    other_xla_flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=2", "")
    one_device = {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {other_xla_flags}".strip()}
    return [subprocess.Popen(
        cli_command(config_path, workdir, *flags, *per_process_flags[i], f"--coordinator_address=localhost:{port}",
                    "--num_processes=2", f"--process_id={i}"),
        cwd=cwds[i], env=one_device, stdout=logs[i].open("a"), stderr=subprocess.STDOUT) for i in range(2)]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])  # the session's (conftest.py)


@pytest.fixture(scope="module")
def phantom_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("phantom_cache")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, phantom_cache, compile_cache):
    base = tmp_path_factory.mktemp("multihost")
    config_path = write_tiny_config(base, phantom_cache)
    env = cli_env(compile_cache)
    single, multi = base / "single", base / "multi"
    logs = [base / "process0.log", base / "process1.log"]
    single_log = base / "single.log"
    reference = subprocess.Popen(cli_command(config_path, single, *OVERRIDES), cwd=REPO, env=env,
                                 stdout=single_log.open("w"), stderr=subprocess.STDOUT)

    processes = start_processes(config_path, multi, env, logs, *OVERRIDES)
    last_dir = multi / "checkpoints" / "last"
    wait_until(processes[1], lambda: checkpointing.committed_steps(last_dir) and last_train_step(multi) >= 3,
               logs[1])
    processes[1].send_signal(signal.SIGTERM)
    preempted_codes = [finish(p, logs[i]) for i, p in enumerate(processes)]
    preempted_output = [log.read_text() for log in logs]

    processes = start_processes(config_path, multi, env, logs, *OVERRIDES)
    codes = [finish(p, logs[i]) for i, p in enumerate(processes)]
    reference_code = finish(reference, single_log)
    return {"single": single, "multi": multi, "logs": logs, "preempted_codes": preempted_codes,
            "preempted_output": preempted_output, "codes": codes, "reference_code": reference_code,
            "config_path": config_path, "env": env, "base": base}


def test_both_processes_stop_at_the_same_step_on_a_preemption_notice_to_one(runs):
    assert runs["preempted_codes"] == [PREEMPTED_EXIT_CODE, PREEMPTED_EXIT_CODE], runs["preempted_output"]
    stops = [[line for line in output.splitlines() if line.startswith("preempted (SIGTERM) at step")]
             for output in runs["preempted_output"]]
    assert len(stops[0]) == 1 and stops[0] == stops[1], stops
    step = int(stops[0][0].split("at step ")[1].split(":")[0])
    assert 3 <= step < STEPS


def test_restarted_processes_finish(runs):
    assert runs["reference_code"] == 0
    assert runs["codes"] == [0, 0], [log.read_text()[-3000:] for log in runs["logs"]]


def test_two_processes_log_what_one_process_with_two_devices_logs(runs):
    multi, single = read_metrics(runs["multi"]), read_metrics(runs["single"])
    # Each step logged once (process 1 writes nothing), the same values as one process.
    assert [r["step"] for r in multi if r["split"] == "train"] == list(range(1, STEPS + 1))
    assert without_speed(multi) == without_speed(single)


def test_two_processes_end_with_the_same_state_as_one(runs):
    multi = saved_state(runs["multi"], STEPS)
    assert_bitwise_equal(multi, saved_state(runs["single"], STEPS))
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(multi) if leaf.dtype.kind == "f")


def test_only_process_0_prints_progress_and_results(runs):
    first, second = (log.read_text() for log in runs["logs"])
    assert f"step {STEPS}/{STEPS}" in first and "# ARCO results" in first and "2 process(es)" in first
    assert "step 1/" not in second and "# ARCO results" not in second and "val step" not in second
    assert (runs["multi"] / "results.json").read_text() == (runs["single"] / "results.json").read_text()


def test_processes_given_different_configs_stop_with_the_difference(runs, tmp_path):
    logs = [tmp_path / "p0.log", tmp_path / "p1.log"]
    processes = start_processes(runs["config_path"], tmp_path / "run", runs["env"], logs, *OVERRIDES,
                                per_process_flags=((), ("--config.arco.sampler=sag",)))
    codes = [finish(p, logs[i], ERROR_TIMEOUT_S) for i, p in enumerate(processes)]
    for code, log in zip(codes, logs):
        output = log.read_text()
        assert code not in (0, PREEMPTED_EXIT_CODE), output[-3000:]
        assert "were given different configs" in output and "process 1: arco.sampler: 'sg' -> 'sag'" in output
    assert not (tmp_path / "run").exists()


def test_a_data_file_missing_on_one_host_stops_every_host(runs, phantom_cache, tmp_path):
    """Each process reads the phantom from its own working directory (a relative cache_dir),
    as hosts with local disks do; host 1's copy lacks one slice."""
    cwds = [tmp_path / "host0", tmp_path / "host1"]
    for cwd in cwds:
        shutil.copytree(phantom_cache, cwd / "phantom_cache")
    missing = sorted((cwds[1] / "phantom_cache").glob("phantom-*/data/slices/*.h5"))[-1]
    missing.unlink()
    logs = [tmp_path / "p0.log", tmp_path / "p1.log"]
    processes = start_processes(runs["config_path"], tmp_path / "run", runs["env"], logs, *OVERRIDES,
                                "--config.data.cache_dir=phantom_cache", cwds=cwds)
    codes = [finish(p, logs[i], ERROR_TIMEOUT_S) for i, p in enumerate(processes)]
    first, second = (log.read_text() for log in logs)
    assert codes[0] not in (0, PREEMPTED_EXIT_CODE) and codes[1] not in (0, PREEMPTED_EXIT_CODE)
    assert "DataError" in second and missing.name in second
    assert "reading the data failed on 1 of 2 processes: process 1: DataError" in first
    assert missing.name in first
