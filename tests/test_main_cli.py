"""The command line's answer to a bad --config.<field> override: one line, exit code 2, no traceback.

Every case fails (or, with --only_check_args, stops) at flag parsing, so nothing trains.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*args, workdir):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "arco_jax.main", *args, f"--workdir={workdir}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("override, line", [
    ("--config.data_dir=/tmp", "--config.data_dir: no such config field; did you mean --config.data.data_dir?"),
    ("--config.train.stpes=3", "--config.train.stpes: no such config field; did you mean --config.train.steps?"),
    ("--config.trian.steps=3", "--config.trian.steps: no such config field; did you mean --config.train.steps?"),
])
def test_unknown_field_names_it_and_the_closest_field(tmp_path, override, line):
    result = _run("--config=configs/demo.py", override, workdir=tmp_path / "run")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == line
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "run").exists()


def test_bad_value_type_names_field_and_problem(tmp_path):
    result = _run("--config=configs/demo.py", "--config.train.steps=abc", workdir=tmp_path / "run")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("--config.train.steps: bad value 'abc', expected int (")


def test_unknown_field_after_a_config_string(tmp_path):
    result = _run("--config=configs/acdc.py:method=arco_sag", "--config.train.stpes=3", workdir=tmp_path / "run")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().endswith("did you mean --config.train.steps?")


@pytest.mark.parametrize("args", [
    ("--config=configs/demo.py", "--config.train.steps=3", "--config.data.data_dir=/tmp"),
    ("--config=configs/acdc.py:method=arco_sag",),
])
def test_good_flags_still_parse(tmp_path, args):
    result = _run(*args, "--only_check_args", workdir=tmp_path / "run")
    assert result.returncode == 0, result.stderr


def test_other_flag_errors_keep_abseils_message(tmp_path):
    result = _run("--config=configs/demo.py", "--bogus=1", workdir=tmp_path / "run")
    assert result.returncode == 1
    assert "FATAL Flags parsing error: Unknown command line flag 'bogus'" in result.stderr


def test_a_bad_data_folder_stops_with_one_line(tmp_path):
    result = _run("--config=configs/acdc.py", f"--config.data.data_dir={tmp_path / 'nowhere'}",
                  workdir=tmp_path / "run")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"ConfigError: config.data.data_dir: '{tmp_path / 'nowhere'}' is not a directory" in result.stderr
