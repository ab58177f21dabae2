"""The launch scripts and the Colab notebook.

The scripts run in dry-run mode, which prints every command instead of running it; a `gcloud`
that records its calls is first on PATH, so a dry run that ran anything would be caught. The
command that `tpu_vm.sh run` sends to the workers is also executed here, with stand-ins for
gcloud and the trainer, to check that its quoting hands arco_jax.main exactly the arguments given.
The notebook is executed top to bottom in a Jupyter kernel with its tiny setting.
"""
import json
import os
import shlex
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
TPU = LAUNCH / "tpu_vm.sh"
GPU = LAUNCH / "gpu.sh"
JAX_VERSION = next(line.split("==")[1] for line in (REPO / "requirements.txt").read_text().splitlines()
                   if line.startswith("jax=="))


def write_executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def recording_gcloud(tmp_path) -> tuple[Path, Path]:
    """(bin dir with a `gcloud` that appends its arguments to the record file, record file)."""
    bin_dir, record = tmp_path / "bin", tmp_path / "gcloud_calls.txt"
    write_executable(bin_dir / "gcloud", f'#!/usr/bin/env bash\necho "$*" >> {shlex.quote(str(record))}\n')
    return bin_dir, record


def run_script(script: Path, args: list[str], env: dict[str, str], bin_dir: Path | None = None):
    full_env = {k: v for k, v in os.environ.items() if k not in ("ZONE", "BUCKET", "PROJECT", "DATA", "WORKDIR",
                                                                  "DRY_RUN", "COORDINATOR_ADDRESS",
                                                                  "NUM_PROCESSES", "PROCESS_ID")}
    full_env.update(env)
    if bin_dir is not None:
        full_env["PATH"] = f"{bin_dir}{os.pathsep}{full_env['PATH']}"
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=full_env,
                          timeout=60)


def dry_run_tpu(command: str, *args: str, bin_dir: Path, **env: str) -> list[list[str]]:
    """The commands `tpu_vm.sh --dry-run COMMAND` prints, each split into words."""
    env = {"ZONE": "us-central2-b", "BUCKET": "gs://arco-bucket", **env}
    result = run_script(TPU, ["--dry-run", command, *args], env, bin_dir)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def flag(words: list[str], name: str) -> str:
    values = [w.split("=", 1)[1] for w in words if w.startswith(name + "=")]
    assert len(values) == 1, f"{name} appears {len(values)} times in {words}"
    return values[0]


# ----------------------------------------------------------------------------- all scripts

@pytest.mark.parametrize("script", sorted(LAUNCH.glob("*.sh")), ids=lambda p: p.name)
def test_script_parses_and_is_strict(script):
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "set -euo pipefail" in script.read_text()
    assert os.access(script, os.X_OK), f"{script.name} is not executable"


# ----------------------------------------------------------------------------- tpu_vm.sh

def test_tpu_create_and_delete(recording_gcloud):
    bin_dir, record = recording_gcloud
    [create] = dry_run_tpu("create", bin_dir=bin_dir, ACCELERATOR="v5litepod-16", SPOT="1", PROJECT="my-proj")
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "arco-jax"]
    assert flag(create, "--accelerator-type") == "v5litepod-16"
    assert flag(create, "--version") == "v2-alpha-tpuv5-lite"
    assert flag(create, "--zone") == "us-central2-b" and flag(create, "--project") == "my-proj"
    assert "--spot" in create
    [create_v4] = dry_run_tpu("create", bin_dir=bin_dir)
    assert flag(create_v4, "--accelerator-type") == "v4-8" and flag(create_v4, "--version") == "tpu-ubuntu2204-base"
    assert "--spot" not in create_v4 and not any(w.startswith("--project") for w in create_v4)
    [delete] = dry_run_tpu("delete", bin_dir=bin_dir, TPU_NAME="my-tpu")
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu"] and "--quiet" in delete
    assert not record.exists(), "a dry run called gcloud"


def test_tpu_copy_and_install_reach_every_worker(recording_gcloud):
    bin_dir, record = recording_gcloud
    pack, scp, unpack = dry_run_tpu("copy", bin_dir=bin_dir)
    assert "git ls-files" in pack[-1] and "tar -czf" in pack[-1]
    assert scp[4] == "scp" and "--worker=all" in scp and scp[6] == "arco-jax:arco_jax_code.tar.gz"
    assert "--worker=all" in unpack and "tar -xzf ~/arco_jax_code.tar.gz" in flag(unpack, "--command")
    [install] = dry_run_tpu("install", bin_dir=bin_dir)
    assert install[4] == "ssh" and "--worker=all" in install
    remote = flag(install, "--command")
    assert "-r requirements-gcs.txt" in remote and f"'jax[tpu]=={JAX_VERSION}'" in remote
    assert "--python 3.11" in remote
    assert not record.exists(), "a dry run called gcloud"


def test_tpu_run_trains_on_all_workers_with_gcs(recording_gcloud):
    bin_dir, record = recording_gcloud
    [run] = dry_run_tpu("run", "--config.data.labeled_patients=3", bin_dir=bin_dir,
                        WORKDIR="gs://arco-bucket/runs/sg_3")
    assert run[4:6] == ["ssh", "arco-jax"] and "--worker=all" in run
    remote = flag(run, "--command")
    assert "gcloud storage rsync --recursive gs://arco-bucket/ACDC $HOME/arco_jax_data/ACDC" in remote
    for piece in ("-m arco_jax.main", "--config=configs/acdc.py", "--workdir=gs://arco-bucket/runs/sg_3",
                  "--multihost", "--config.data.data_dir=$HOME/arco_jax_data/ACDC",
                  "--config.data.labeled_patients=3", "setsid nohup"):
        assert piece in remote, piece
    # DATA empty (the phantom demo): nothing staged, no data_dir.
    [demo] = dry_run_tpu("run", bin_dir=bin_dir, DATA="", CONFIG="configs/demo.py")
    remote = flag(demo, "--command")
    assert "rsync" not in remote and "data_dir" not in remote and "--config=configs/demo.py" in remote
    assert "--workdir=gs://arco-bucket/runs/acdc" in remote
    assert not record.exists(), "a dry run called gcloud"


def test_tpu_run_remote_command_passes_arguments_through(recording_gcloud, tmp_path):
    """Execute the worker command with stand-ins: the trainer must get exactly these arguments."""
    bin_dir, record = recording_gcloud
    overrides = ["--config.data.patch_size=(128, 128)", "--config.train.steps=5", "--config.seed=it's"]
    [run] = dry_run_tpu("run", *overrides, bin_dir=bin_dir)
    remote = flag(run, "--command")
    home = tmp_path / "home"
    argv_file = home / "argv.json"
    write_executable(home / "arco_jax" / ".venv" / "bin" / "python",
                     f"#!{sys.executable}\nimport json, sys\n"
                     f"open({str(argv_file)!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", "-c", remote], env=env, check=True, timeout=30)
    log = home / "arco_jax_train.log"
    deadline = time.monotonic() + 30
    while "exit code" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "arco_jax.main exit code 0" in log.read_text()
    data_dir = f"{home}/arco_jax_data/ACDC"
    assert json.loads(argv_file.read_text()) == [
        "-m", "arco_jax.main", "--config=configs/acdc.py", "--workdir=gs://arco-bucket/runs/acdc", "--multihost",
        f"--config.data.data_dir={data_dir}", *overrides]
    assert record.read_text().split() == ["storage", "rsync", "--recursive", "gs://arco-bucket/ACDC", data_dir]


@pytest.mark.parametrize("args, env, message", [
    ([], {"ZONE": "z"}, "COMMAND"),
    (["launch"], {"ZONE": "z"}, "unknown command 'launch'"),
    (["create"], {}, "set ZONE"),
    (["run"], {"ZONE": "z"}, "set BUCKET"),
    (["run"], {"ZONE": "z", "BUCKET": "my-bucket"}, "BUCKET must be a gs:// URL"),
    (["delete", "now"], {"ZONE": "z"}, "'delete' takes no arguments"),
], ids=["no-command", "unknown", "no-zone", "no-bucket", "bucket-not-gcs", "extra-argument"])
def test_tpu_bad_arguments(args, env, message, recording_gcloud):
    bin_dir, record = recording_gcloud
    result = run_script(TPU, args, env, bin_dir)
    assert result.returncode == 2
    assert message in result.stderr
    assert not record.exists()


# ----------------------------------------------------------------------------- gpu.sh

def test_gpu_single_host_and_multi_node(tmp_path):
    one = run_script(GPU, ["--dry-run", "configs/acdc.py", "runs/x", "--config.data.data_dir=/data/ACDC"],
                     {"PYTHON": sys.executable})
    assert one.returncode == 0, one.stderr
    lines = [shlex.split(line) for line in one.stdout.splitlines()]
    install = next(words for words in lines if "pip" in words)
    assert "requirements.txt" in install and f"jax[cuda12]=={JAX_VERSION}" in install
    assert lines[-1] == [".venv/bin/python", "-m", "arco_jax.main", "--config=configs/acdc.py",
                         "--workdir=runs/x", "--config.data.data_dir=/data/ACDC"]
    many = run_script(GPU, ["configs/demo.py", "runs/y"],
                      {"DRY_RUN": "1", "SKIP_INSTALL": "1", "COORDINATOR_ADDRESS": "10.0.0.2:1234",
                       "NUM_PROCESSES": "2", "PROCESS_ID": "1"})
    assert many.returncode == 0, many.stderr
    assert shlex.split(many.stdout) == [
        ".venv/bin/python", "-m", "arco_jax.main", "--config=configs/demo.py", "--workdir=runs/y",
        "--coordinator_address=10.0.0.2:1234", "--num_processes=2", "--process_id=1"]


@pytest.mark.parametrize("args, env, message", [
    (["configs/acdc.py"], {}, "CONFIG WORKDIR"),
    (["configs/missing.py", "runs/x"], {}, "config file 'configs/missing.py' not found"),
    (["configs/acdc.py", "runs/x"], {"NUM_PROCESSES": "2"}, "need all of COORDINATOR_ADDRESS"),
], ids=["no-workdir", "missing-config", "partial-cluster"])
def test_gpu_bad_arguments(args, env, message):
    result = run_script(GPU, ["--dry-run", *args], {"SKIP_INSTALL": "1", **env})
    assert result.returncode == 2
    assert message in result.stderr


# ----------------------------------------------------------------------------- the notebook

def test_notebook_is_stored_without_outputs():
    notebook = json.loads((LAUNCH / "colab.ipynb").read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert len(code) == 6
    for cell in code:
        assert cell["outputs"] == [] and cell["execution_count"] is None


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    import nbclient  # With nbformat and ipykernel: the test requirements that run notebooks.
    import nbformat
    from PIL import Image

    workdir = tmp_path / "notebook_run"
    monkeypatch.setenv("ARCO_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("ARCO_NOTEBOOK_WORKDIR", str(workdir))
    monkeypatch.setenv("ARCO_JAX_CACHE", str(tmp_path / "cache"))
    notebook = nbformat.read(LAUNCH / "colab.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO)}})
    client.execute()  # Raises CellExecutionError, naming the cell, if any cell fails.

    assert not (REPO / "arco_jax_repo").exists(), "the install cell cloned inside a checkout"
    for name in ("loss_curves.png", "predictions.png"):
        with Image.open(workdir / name) as image:
            assert image.format == "PNG" and min(image.size) >= 300, (name, image.size)
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == 20 and "last" in results["test"]
    outputs = "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))
    assert "Dice (%)" in outputs and "mean test Dice" in outputs
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if r["split"] == "train"] == [5, 10, 15, 20]
