"""The launch scripts and the Colab notebook.

The scripts run in dry-run mode, which prints every command instead of running it; a `gcloud`
that records its calls is first on PATH, so a dry run that ran anything would be caught. The
command that `tpu_vm.sh start` sends to the workers is also executed here, with stand-ins for
gcloud and the trainer, to check that its quoting hands arco_jax.main exactly the arguments given,
and `tpu_vm.sh run` is driven through a preemption by a stand-in gcloud that keeps a TPU's state
and runs the workers' commands on this machine. gpu.sh installs for real into a copy of the
repository with a stand-in Python, twice at once, to check that only one of them builds .venv.
The notebook is executed top to bottom in a Jupyter kernel with its tiny setting and its workdir
on a stand-in Google Drive (a `google.colab` package whose drive.mount records the call and makes
the folder a mounted Drive shows), then again in a fresh kernel, as after a disconnect.
"""
import json
import os
import re
import shlex
import shutil
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
                                                                  "DRY_RUN", "COORDINATOR_ADDRESS", "CUDA", "SPOT",
                                                                  "NUM_PROCESSES", "PROCESS_ID", "ACCELERATOR")}
    full_env["PYTHON"] = sys.executable  # the config check runs with this checkout's environment
    full_env.update(env)
    if bin_dir is not None:
        full_env["PATH"] = f"{bin_dir}{os.pathsep}{full_env['PATH']}"
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=full_env,
                          timeout=120)


def dry_run_tpu(command: str, *args: str, bin_dir: Path, **env: str) -> list[list[str]]:
    """The commands `tpu_vm.sh --dry-run COMMAND` prints, each split into words (comments left out)."""
    env = {"ZONE": "us-central2-b", "BUCKET": "gs://arco-bucket", **env}
    result = run_script(TPU, ["--dry-run", command, *args], env, bin_dir)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if line.strip() and not line.startswith("#")]


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


# ----------------------------------------------------------------------------- bash 3.2

# What bash 3.2 (macOS) lacks or treats differently: associative arrays, case conversion,
# namerefs, mapfile, ;& and |&, and "${a[@]}" of an empty array under set -u (an unbound-variable
# error before bash 4.4). This bash is newer, so the scripts are read for them.
BASH4_ONLY = [(re.compile(r"\bdeclare\s+-[a-zA-Z]*A"), "associative array"),
              (re.compile(r"\$\{[^}]*(,,|\^\^)"), "${x,,} / ${x^^}"),
              (re.compile(r"\blocal\s+-n\b|\bdeclare\s+-n\b"), "nameref"),
              (re.compile(r"\b(mapfile|readarray|coproc)\b"), "bash 4 builtin"),
              (re.compile(r";;&|;&|\|&"), "bash 4 operator"),
              (re.compile(r'(?<!\+)"\$\{[A-Za-z_][A-Za-z_0-9]*\[@\]\}"'), 'unguarded "${a[@]}"')]


@pytest.mark.parametrize("script", sorted(LAUNCH.glob("*.sh")), ids=lambda p: p.name)
def test_scripts_use_only_bash_3_2(script):
    problems = []
    for number, line in enumerate(script.read_text().splitlines(), 1):
        code = line.split(" # ")[0] if not line.lstrip().startswith("#") else ""
        for pattern, what in BASH4_ONLY:
            if pattern.search(code):
                problems.append(f"{script.name}:{number}: {what}: {line.strip()}")
    assert not problems, "\n".join(problems)


def test_bash_3_2_lint_catches_what_it_looks_for():
    bad = ['x=("${extra[@]}")', "declare -A seen", 'echo "${name,,}"', "mapfile -t lines"]
    good = ['x=(${extra[@]+"${extra[@]}"})', 'echo "$@"']
    assert all(any(p.search(line) for p, _ in BASH4_ONLY) for line in bad)
    assert not any(p.search(line) for line in good for p, _ in BASH4_ONLY)


# ----------------------------------------------------------------------------- tpu_vm.sh

def test_tpu_create_queues_a_resource_after_checking_the_config(recording_gcloud):
    bin_dir, record = recording_gcloud
    result = run_script(TPU, ["--dry-run", "create"], {"ZONE": "us-central2-b", "ACCELERATOR": "v5litepod-16",
                                                       "SPOT": "1", "PROJECT": "my-proj"}, bin_dir)
    assert result.returncode == 0, result.stderr
    assert "configs/acdc.py on v5litepod-16: batches 4+4 on 4 of 16 tpu devices (4 hosts, 12 idle)" in result.stderr
    create, describe = [shlex.split(line) for line in result.stdout.splitlines() if not line.startswith("#")]
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "arco-jax"]
    assert flag(create, "--node-id") == "arco-jax" and flag(create, "--accelerator-type") == "v5litepod-16"
    assert flag(create, "--runtime-version") == "v2-alpha-tpuv5-lite"
    assert flag(create, "--zone") == "us-central2-b" and flag(create, "--project") == "my-proj"
    assert "--spot" in create
    assert describe[3:5] == ["queued-resources", "describe"] and flag(describe, "--format") == "value(state.state)"
    [create_vm] = dry_run_tpu("create", bin_dir=bin_dir, PROVISION="vm")
    assert create_vm[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "arco-jax"]
    assert flag(create_vm, "--accelerator-type") == "v4-8" and flag(create_vm, "--version") == "tpu-ubuntu2204-base"
    assert "--spot" not in create_vm and not any(w.startswith("--project") for w in create_vm)
    [delete] = dry_run_tpu("delete", bin_dir=bin_dir, TPU_NAME="my-tpu")
    assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "my-tpu"]
    assert "--force" in delete and "--quiet" in delete
    [delete_vm] = dry_run_tpu("delete", bin_dir=bin_dir, PROVISION="vm")
    assert delete_vm[3:6] == ["tpu-vm", "delete", "arco-jax"]
    assert not record.exists(), "a dry run called gcloud"


@pytest.mark.parametrize("dry, accelerator, config, overrides, message", [
    (False, "v4-64", "configs/acdc.py", [], "4 rows cannot be split evenly over the 8 hosts"),
    (True, "v5litepod-16", "configs/la_demo.py", [], "2 rows cannot be split evenly over the 4 hosts"),
    (True, "v6e-8", "configs/demo.py", ["--config.data.mesh_devices=16"], "16 devices asked for, this run has 8"),
    (False, "v9x-8", "configs/demo.py", [], "unknown TPU generation 'v9x'"),
], ids=["acdc-on-8-hosts", "la-demo-on-4-hosts", "mesh-too-large", "unknown-type"])
def test_tpu_create_refuses_a_config_the_accelerator_cannot_run(dry, accelerator, config, overrides, message,
                                                                 recording_gcloud):
    """Before anything is created (dry run or not): one line naming what to change."""
    bin_dir, record = recording_gcloud
    result = run_script(TPU, [*(["--dry-run"] if dry else []), "create", *overrides],
                        {"ZONE": "z", "ACCELERATOR": accelerator, "CONFIG": config}, bin_dir)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stdout == "" and not record.exists()


def test_tpu_check_names_the_layout_for_each_advertised_accelerator(recording_gcloud):
    """v4-8 and v6e-8 lay 4 + 4 out as v5litepod-8 and v4-32 do (tests/test_accelerator_defaults.py
    checks every advertised type without the script)."""
    bin_dir, _ = recording_gcloud
    for accelerator, layout in (("v5litepod-8", "on 4 of 8 tpu devices (1 host, 4 idle)"),
                                ("v4-32", "on 4 of 16 tpu devices (4 hosts, 12 idle)")):
        result = run_script(TPU, ["check"], {"ACCELERATOR": accelerator}, bin_dir)
        assert result.returncode == 0 and layout in result.stderr, (accelerator, result.stderr)
    bigger = run_script(TPU, ["check", "--config.data.batch_labeled=8", "--config.data.batch_unlabeled=8"],
                        {"ACCELERATOR": "v6e-8", "CONFIG": "configs/demo.py"}, bin_dir)
    assert bigger.returncode == 0 and "batches 8+8 on 8 of 8 tpu devices (1 host)" in bigger.stderr


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


def test_tpu_start_trains_on_all_workers_with_gcs(recording_gcloud):
    bin_dir, record = recording_gcloud
    [start] = dry_run_tpu("start", "--config.data.labeled_patients=3", bin_dir=bin_dir,
                          WORKDIR="gs://arco-bucket/runs/sg_3")
    assert start[4:6] == ["ssh", "arco-jax"] and "--worker=all" in start
    remote = flag(start, "--command")
    assert "gcloud storage rsync --recursive gs://arco-bucket/ACDC $HOME/arco_jax_data/ACDC" in remote
    for piece in ("-m arco_jax.main", "--config=configs/acdc.py", "--workdir=gs://arco-bucket/runs/sg_3",
                  "--multihost", "--config.data.data_dir=$HOME/arco_jax_data/ACDC",
                  "--config.data.labeled_patients=3", "setsid nohup", "busy"):
        assert piece in remote, piece
    # DATA empty (the phantom demo): nothing staged, no data_dir.
    [demo] = dry_run_tpu("start", bin_dir=bin_dir, DATA="", CONFIG="configs/demo.py")
    remote = flag(demo, "--command")
    assert "rsync" not in remote and "data_dir" not in remote and "--config=configs/demo.py" in remote
    assert "--workdir=gs://arco-bucket/runs/acdc" in remote
    assert not record.exists(), "a dry run called gcloud"


def run_remote(remote: str, home: Path, bin_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", remote], env=env, capture_output=True, text=True, timeout=30)


def wait_for_exit_code(home: Path) -> str:
    log, deadline = home / "arco_jax_train.log", time.monotonic() + 30
    while not (home / "arco_jax_train.exit").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return log.read_text()


def test_tpu_start_remote_command_passes_arguments_through_and_refuses_a_busy_tpu(recording_gcloud, tmp_path):
    """Execute the worker command with stand-ins: the trainer must get exactly these arguments,
    the exit code is recorded, and a second start while a job runs is refused."""
    bin_dir, record = recording_gcloud
    overrides = ["--config.data.patch_size=(128, 128)", "--config.train.steps=5", "--config.model.init_from=it's"]
    [start] = dry_run_tpu("start", *overrides, bin_dir=bin_dir)
    remote = flag(start, "--command")
    home = tmp_path / "home"
    argv_file = home / "argv.json"
    write_executable(home / "arco_jax" / ".venv" / "bin" / "python",
                     f"#!{sys.executable}\nimport json, sys\n"
                     f"open({str(argv_file)!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    assert run_remote(remote, home, bin_dir).returncode == 0
    assert "arco_jax.main exit code 0" in wait_for_exit_code(home)
    assert (home / "arco_jax_train.exit").read_text().strip() == "0"
    data_dir = f"{home}/arco_jax_data/ACDC"
    assert json.loads(argv_file.read_text()) == [
        "-m", "arco_jax.main", "--config=configs/acdc.py", "--workdir=gs://arco-bucket/runs/acdc", "--multihost",
        f"--config.data.data_dir={data_dir}", *overrides]
    assert record.read_text().split() == ["storage", "rsync", "--recursive", "gs://arco-bucket/ACDC", data_dir]

    (home / "arco_jax_train.pid").write_text(str(os.getpid()))  # a job that still runs
    busy = run_remote(remote, home, bin_dir)
    assert busy.returncode == 3 and "busy: training job" in busy.stderr
    assert (home / "arco_jax_train.exit").exists(), "a refused start must not touch the running job's state"


# A gcloud that keeps one TPU's state in $FAKE_TPU (files node, queued: the node's and the queued
# resource's state) and runs the workers' commands here, with HOME the worker's home. The stand-in
# trainer exits with the codes in $TRAINER_CODES in turn; exit code 75 also takes the Spot TPU
# back (node PREEMPTED, queued resource SUSPENDED), as a preemption does.
FAKE_GCLOUD = """#!{python}
import os, shutil, subprocess, sys
from pathlib import Path
state, args = Path(os.environ["FAKE_TPU"]), sys.argv[1:]
with open(state / "calls.txt", "a") as f:
    f.write(" ".join(args) + "\\n")
node, queued = state / "node", state / "queued"
value = lambda name: next(a.split("=", 1)[1] for a in args if a.startswith(name + "="))
if args[0] == "storage":
    sys.exit(0)
group, verb = args[2], args[3]
if group == "queued-resources" and verb == "create":
    node.write_text("READY"); queued.write_text("ACTIVE")
elif verb == "describe":
    target = queued if group == "queued-resources" else node
    if not target.exists():
        sys.exit(1)
    print(target.read_text())
elif verb == "delete":
    for path in (node, queued):
        path.unlink(missing_ok=True)
elif verb == "scp":
    shutil.copy(args[4], Path(os.environ["WORKER_HOME"]) / args[5].split(":", 1)[1])
elif verb == "ssh":
    if not node.exists() or node.read_text() != "READY":
        sys.exit(255)
    env = {{**os.environ, "HOME": os.environ["WORKER_HOME"],
           "PATH": os.environ["WORKER_BIN"] + os.pathsep + os.environ["PATH"]}}
    sys.exit(subprocess.run(["bash", "-c", value("--command")], env=env).returncode)
"""

FAKE_TRAINER = """#!{python}
import json, os, sys, time
from pathlib import Path
home, state = Path(os.environ["HOME"]), Path(os.environ["FAKE_TPU"])
calls = home / "trainer_calls.jsonl"
with calls.open("a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
code = int(os.environ["TRAINER_CODES"].split(",")[len(calls.read_text().splitlines()) - 1])
time.sleep(0.5)
if code == 75:
    (state / "node").write_text("PREEMPTED"); (state / "queued").write_text("SUSPENDED")
sys.exit(code)
"""


@pytest.fixture
def fake_tpu(tmp_path):
    """(environment for tpu_vm.sh against the stand-in TPU, its state folder, the worker's home)."""
    state, home, worker_bin, bin_dir = (tmp_path / name for name in ("tpu", "worker_home", "worker_bin", "bin"))
    for folder in (state, home):
        folder.mkdir()
    write_executable(bin_dir / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
    write_executable(worker_bin / "python3", "#!/usr/bin/env bash\nexit 0\n")  # pip install --user uv
    trainer = FAKE_TRAINER.format(python=sys.executable)
    write_executable(home / ".local" / "bin" / "uv", "#!/usr/bin/env bash\nset -e\nif [ \"$1\" = venv ]; then "
                     "mkdir -p .venv/bin && cat > .venv/bin/python <<'EOF'\n" + trainer + "EOF\n"
                     "chmod +x .venv/bin/python; fi\n")
    env = {"ZONE": "z", "BUCKET": "gs://arco-bucket", "DATA": "", "SPOT": "1", "POLL_SECONDS": "0.2",
           "FAKE_TPU": str(state), "WORKER_HOME": str(home), "WORKER_BIN": str(worker_bin),
           "TMPDIR": str(tmp_path), "SKIP_CHECK": "1", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return env, state, home


def gcloud_calls(state: Path) -> list[str]:
    return [" ".join(line.split()[:4]) for line in (state / "calls.txt").read_text().splitlines()]


def test_tpu_run_relaunches_after_a_preemption_until_training_finishes(fake_tpu):
    env, state, home = fake_tpu
    result = run_script(TPU, ["run", "--config.train.steps=7"], {**env, "TRAINER_CODES": "75,0"})
    assert result.returncode == 0, result.stderr
    trained = [json.loads(line) for line in (home / "trainer_calls.jsonl").read_text().splitlines()]
    assert len(trained) == 2 and trained[0] == trained[1]  # the same command: it resumes from WORKDIR
    assert trained[0][-1] == "--config.train.steps=7"
    calls = gcloud_calls(state)
    creates = [i for i, c in enumerate(calls) if c == "compute tpus queued-resources create"]
    deletes = [i for i, c in enumerate(calls) if c == "compute tpus queued-resources delete"]
    assert len(creates) == 2 and len(deletes) == 1 and creates[0] < deletes[0] < creates[1]
    assert "--spot" in (state / "calls.txt").read_text().splitlines()[creates[1]]
    assert "preempted" in result.stderr or "starting again" in result.stderr
    assert "training finished (exit code 0)" in result.stderr
    assert (state / "node").read_text() == "READY"  # left running: `delete` frees it


def test_tpu_run_stops_on_a_real_failure_and_refuses_a_busy_tpu(fake_tpu):
    env, state, home = fake_tpu
    failed = run_script(TPU, ["run"], {**env, "TRAINER_CODES": "1"})
    assert failed.returncode == 1 and "training failed (exit 1, not a preemption)" in failed.stderr
    assert len((home / "trainer_calls.jsonl").read_text().splitlines()) == 1
    # The TPU is up; a job that still runs there (this process stands in for it) is not started over.
    (home / "arco_jax_train.exit").unlink()
    (home / "arco_jax_train.pid").write_text(str(os.getpid()))
    busy = run_script(TPU, ["run"], {**env, "TRAINER_CODES": "0"})
    assert busy.returncode == 2 and "busy: a training job already runs on arco-jax" in busy.stderr
    assert len((home / "trainer_calls.jsonl").read_text().splitlines()) == 1
    status = run_script(TPU, ["status"], env)
    assert status.stdout.strip() == "TPU arco-jax: READY (queued resource: ACTIVE); training: running"


@pytest.mark.parametrize("args, env, message", [
    ([], {"ZONE": "z"}, "COMMAND"),
    (["launch"], {"ZONE": "z"}, "unknown command 'launch'"),
    (["create"], {}, "set ZONE"),
    (["run"], {"ZONE": "z", "SKIP_CHECK": "1"}, "set BUCKET"),
    (["start"], {"ZONE": "z", "BUCKET": "my-bucket", "SKIP_CHECK": "1"}, "BUCKET must be a gs:// URL"),
    (["delete", "now"], {"ZONE": "z"}, "'delete' takes no arguments"),
    (["create"], {"ZONE": "z", "PYTHON": "/bin/false"}, "needs arco_jax's requirements in a local Python"),
], ids=["no-command", "unknown", "no-zone", "no-bucket", "bucket-not-gcs", "extra-argument", "no-python"])
def test_tpu_bad_arguments(args, env, message, recording_gcloud):
    bin_dir, record = recording_gcloud
    result = run_script(TPU, args, env, bin_dir)
    assert result.returncode == 2
    assert message in result.stderr
    assert not record.exists()


# ----------------------------------------------------------------------------- gpu.sh

def test_gpu_single_host_and_multi_node(tmp_path):
    bin_dir = tmp_path / "bin"
    write_executable(bin_dir / "nvidia-smi", "#!/usr/bin/env bash\necho '| NVIDIA-SMI 550.54  Driver Version: "
                     "550.54  CUDA Version: 12.4 |'\n")
    one = run_script(GPU, ["--dry-run", "configs/acdc.py", "runs/x", "--config.data.data_dir=/data/ACDC"],
                     {"PYTHON": sys.executable}, bin_dir)
    assert one.returncode == 0, one.stderr
    lines = [shlex.split(line.split("  #")[0]) for line in one.stdout.splitlines()]
    install = next(words for words in lines if "pip" in words)
    assert "requirements.txt" in install and f"jax[cuda12]=={JAX_VERSION}" in install
    assert lines[-1] == [".venv/bin/python", "-m", "arco_jax.main", "--config=configs/acdc.py",
                         "--workdir=runs/x", "--config.data.data_dir=/data/ACDC"]
    newer = run_script(GPU, ["--dry-run", "configs/demo.py", "runs/x"], {"CUDA": "13"}, bin_dir)
    assert f"jax[cuda13]=={JAX_VERSION}" in newer.stdout
    many = run_script(GPU, ["configs/demo.py", "runs/y"],
                      {"DRY_RUN": "1", "SKIP_INSTALL": "1", "COORDINATOR_ADDRESS": "10.0.0.2:1234",
                       "NUM_PROCESSES": "2", "PROCESS_ID": "1"})
    assert many.returncode == 0, many.stderr
    assert shlex.split(many.stdout) == [
        ".venv/bin/python", "-m", "arco_jax.main", "--config=configs/demo.py", "--workdir=runs/y",
        "--coordinator_address=10.0.0.2:1234", "--num_processes=2", "--process_id=1"]


# A python that builds a stand-in .venv: its pip records each install (slowly, so two machines
# overlap), its trainer records that it ran.
FAKE_PYTHON = """#!/usr/bin/env bash
case "$1 $2" in
  "-m venv") mkdir -p "$3/bin" && cp "$0" "$3/bin/python" ;;
  "-m pip") echo "$*" >> "$INSTALLS"; sleep 1 ;;
  "-m arco_jax.main") echo "$*" >> "$TRAINED" ;;
esac
"""


def test_gpu_installs_once_on_a_shared_filesystem(tmp_path):
    """Two machines on one checkout: one builds .venv, the other waits and uses it; a rerun installs nothing."""
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    (repo / "configs").mkdir()
    shutil.copy(GPU, repo / "launch" / "gpu.sh")
    shutil.copy(REPO / "requirements.txt", repo / "requirements.txt")
    (repo / "configs" / "demo.py").write_text("")
    python = write_executable(tmp_path / "python", FAKE_PYTHON)
    env = {**os.environ, "PYTHON": str(python), "CUDA": "13", "INSTALLS": str(tmp_path / "installs.txt"),
           "TRAINED": str(tmp_path / "trained.txt")}
    for name in ("COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID", "DRY_RUN", "SKIP_INSTALL"):
        env.pop(name, None)
    command = ["bash", str(repo / "launch" / "gpu.sh"), "configs/demo.py", "runs/x"]
    machines = [subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [m.communicate(timeout=60)[1] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], outputs
    installs = (tmp_path / "installs.txt").read_text().splitlines()
    assert len(installs) == 1 and f"jax[cuda13]=={JAX_VERSION}" in installs[0]
    assert len((tmp_path / "trained.txt").read_text().splitlines()) == 2
    assert not (repo / ".venv.install.lock").exists()
    assert subprocess.run(command, env=env, timeout=60).returncode == 0
    assert len((tmp_path / "installs.txt").read_text().splitlines()) == 1  # ready: nothing reinstalled
    switched = subprocess.run(command, env={**env, "CUDA": "12"}, timeout=60)
    assert switched.returncode == 0
    assert f"jax[cuda12]=={JAX_VERSION}" in (tmp_path / "installs.txt").read_text().splitlines()[-1]


@pytest.mark.parametrize("args, env, message", [
    (["configs/acdc.py"], {}, "CONFIG WORKDIR"),
    (["configs/missing.py", "runs/x"], {}, "config file 'configs/missing.py' not found"),
    (["configs/acdc.py", "runs/x"], {"NUM_PROCESSES": "2"}, "need all of COORDINATOR_ADDRESS"),
    (["configs/acdc.py", "runs/x"], {"SKIP_INSTALL": "0", "CUDA": "11"}, "CUDA must be 12 or 13, got '11'"),
], ids=["no-workdir", "missing-config", "partial-cluster", "bad-cuda"])
def test_gpu_bad_arguments(args, env, message):
    result = run_script(GPU, ["--dry-run", *args], {"SKIP_INSTALL": "1", **env})
    assert result.returncode == 2
    assert message in result.stderr


# ----------------------------------------------------------------------------- the notebook

def test_notebook_is_stored_without_outputs():
    notebook = json.loads((LAUNCH / "colab.ipynb").read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert len(code) == 7
    for cell in code:
        assert cell["outputs"] == [] and cell["execution_count"] is None


FAKE_DRIVE = """from pathlib import Path

RECORD = Path(__file__).with_name("mounts.txt")


def mount(mountpoint, force_remount=False, timeout_ms=120000, use_metadata_server=None):
    with RECORD.open("a") as record:
        record.write(mountpoint + "\\n")
    (Path(mountpoint) / "MyDrive").mkdir(parents=True, exist_ok=True)
"""


def notebook_on_fake_drive(tmp_path, monkeypatch):
    """(the notebook with WORKDIR_ON_DRIVE checked and Drive's mount point under tmp_path, the
    mount point, the file where the stand-in drive.mount records its calls)."""
    import nbformat

    colab = tmp_path / "stubs" / "google" / "colab"  # No google/__init__.py: google stays a namespace package.
    colab.mkdir(parents=True)
    (colab / "__init__.py").write_text("")
    (colab / "drive.py").write_text(FAKE_DRIVE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "stubs"), *filter(None, [
        os.environ.get("PYTHONPATH")])]))
    mount = tmp_path / "content" / "drive"
    mount.parent.mkdir()
    notebook = nbformat.read(LAUNCH / "colab.ipynb", as_version=4)
    [cell] = [c for c in notebook.cells if c.get("id") == "cell-drive"]
    assert 'WORKDIR_ON_DRIVE = False' in cell.source and '"/content/drive/MyDrive/' in cell.source
    cell.source = cell.source.replace("WORKDIR_ON_DRIVE = False", "WORKDIR_ON_DRIVE = True").replace(
        '"/content/drive', f'"{mount}')  # What a user types into the form, with another mount point.
    return notebook, mount, colab / "mounts.txt"


def execute(notebook) -> str:
    """Run every cell in a fresh kernel started in the repository; the text the cells printed."""
    import nbclient  # With nbformat and ipykernel: the test requirements that run notebooks.

    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO)}})
    client.execute()  # Raises CellExecutionError, naming the cell, if any cell fails.
    return "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory):
    """The tiny notebook executed once with its workdir on the stand-in Drive: (the cells as
    they were before running, the environment the kernel had, mount point, mount record,
    printed text)."""
    import copy

    tmp_path = tmp_path_factory.mktemp("notebook")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("ARCO_NOTEBOOK_SMOKE", "1")
        monkeypatch.delenv("ARCO_NOTEBOOK_WORKDIR", raising=False)
        monkeypatch.setenv("ARCO_JAX_CACHE", str(tmp_path / "cache"))
        notebook, mount, mounts = notebook_on_fake_drive(tmp_path, monkeypatch)
        cells = copy.deepcopy(notebook.cells)
        env = {k: os.environ[k] for k in ("ARCO_NOTEBOOK_SMOKE", "ARCO_JAX_CACHE", "PYTHONPATH")}
        outputs = execute(notebook)
    return cells, env, mount, mounts, outputs


def test_notebook_runs_top_to_bottom_with_its_workdir_on_drive(notebook_run):
    from PIL import Image

    _, _, mount, mounts, outputs = notebook_run
    workdir = mount / "MyDrive" / "arco_jax" / "notebook_demo"
    assert mounts.read_text().splitlines() == [str(mount)]
    assert f"workdir: {workdir}" in outputs
    assert not (REPO / "arco_jax_repo").exists(), "the install cell cloned inside a checkout"
    for name in ("loss_curves.png", "predictions.png"):
        with Image.open(workdir / name) as image:
            assert image.format == "PNG" and min(image.size) >= 300, (name, image.size)
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == 20 and "last" in results["test"]
    assert "Dice (%)" in outputs and "mean test Dice" in outputs
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if r["split"] == "train"] == [5, 10, 15, 20]


@pytest.mark.slow  # a second kernel and a resume: 11-30 s
def test_notebook_in_a_new_runtime_finds_its_run_on_drive(notebook_run, monkeypatch):
    """A fresh kernel mounts Drive again and the train cell resumes the finished run there: it
    only repeats the test report, nothing is trained or logged again."""
    import nbformat

    cells, env, mount, mounts, _ = notebook_run
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("ARCO_NOTEBOOK_WORKDIR", raising=False)
    workdir = mount / "MyDrive" / "arco_jax" / "notebook_demo"
    metrics = (workdir / "metrics.jsonl").read_text()
    notebook = nbformat.v4.new_notebook(cells=[c for c in cells if c.get("id") in ("cell-2", "cell-drive",
                                                                                  "cell-4", "cell-6")])
    assert len(notebook.cells) == 4
    outputs = execute(notebook)
    assert mounts.read_text().splitlines() == [str(mount)] * 2
    assert f"workdir: {workdir}" in outputs and "resumed from step 20" in outputs
    assert (workdir / "metrics.jsonl").read_text() == metrics
    assert json.loads((workdir / "results.json").read_text())["steps"] == 20


def drive_cell_functions() -> dict:
    """The Drive cell's definitions (everything before it acts), run in a fresh namespace."""
    notebook = json.loads((LAUNCH / "colab.ipynb").read_text())
    source = "".join(next(c for c in notebook["cells"] if c.get("id") == "cell-drive")["source"])
    namespace: dict = {"os": os, "Path": Path}
    exec(source[:source.index("SMOKE = ")], namespace)  # noqa: S102
    return namespace


def test_notebook_drive_workdir_that_is_not_mounted_stops_with_one_message(tmp_path, monkeypatch):
    import types

    from arco_jax.errors import ConfigError

    mount, workdir = tmp_path / "drive", str(tmp_path / "drive" / "MyDrive" / "runs" / "demo")
    drive_workdir = drive_cell_functions()["drive_workdir"]
    monkeypatch.setitem(sys.modules, "google.colab", None)  # Not on Colab: the import fails.
    with pytest.raises(RuntimeError, match="not mounted at .*run this notebook on Colab, or uncheck WORKDIR_ON"):
        drive_workdir(workdir, str(mount))
    with pytest.raises(RuntimeError, match="is not on Google Drive: use a folder under .*/MyDrive/"):
        drive_workdir(str(tmp_path / "elsewhere"), str(mount))
    mounted = []  # On Colab with a mount that did not take (no MyDrive/ appeared): the trainer's message.
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=lambda mountpoint: mounted.append(mountpoint))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    with pytest.raises(ConfigError, match="is on Google Drive, which is not mounted"):
        drive_workdir(workdir, str(mount))
    assert mounted == [str(mount)] and not mount.exists(), "something was written into the mount point"
    (mount / "MyDrive").mkdir(parents=True)
    assert drive_workdir(workdir, str(mount)) == Path(workdir) and mounted == [str(mount)] * 2


def test_workdir_on_unmounted_drive_is_refused_before_anything_is_written(tmp_path):
    from arco_jax import files
    from arco_jax.errors import ConfigError

    mount = tmp_path / "drive"
    for path in (mount / "MyDrive" / "runs" / "a", mount / "Shareddrives" / "team" / "a", mount):
        with pytest.raises(ConfigError) as error:
            files.check_drive_mounted(str(path), str(mount))
        message = str(error.value)
        assert "\n" not in message and f"workdir {path} is on Google Drive, which is not mounted" in message
        assert f"drive.mount('{mount}')" in message
    files.check_drive_mounted(str(tmp_path / "drive2" / "run"), str(mount))  # Beside the mount point: not Drive.
    files.check_drive_mounted(str(tmp_path / "run"), str(mount))
    assert not mount.exists()
    (mount / "MyDrive").mkdir(parents=True)
    files.check_drive_mounted(str(mount / "MyDrive" / "runs" / "a"), str(mount))
    files.check_drive_mounted(str(mount / "MyDrive" / ".." / "MyDrive" / "b"), str(mount))
    # Every workdir path is checked against Colab's mount point, gs:// ones excepted.
    assert str(files.workdir_path("gs://bucket/content/drive/run")) == "gs://bucket/content/drive/run"
    if not os.path.isdir("/content/drive/MyDrive"):
        with pytest.raises(ConfigError, match="/content/drive/MyDrive does not exist"):
            files.workdir_path("/content/drive/MyDrive/runs/a")


@pytest.mark.skipif(os.path.isdir("/content/drive/MyDrive"), reason="Google Drive is mounted here")
def test_trainer_refuses_a_workdir_on_unmounted_drive_in_one_line():
    existed = os.path.exists("/content")
    result = subprocess.run([sys.executable, "-m", "arco_jax.main", "--config=configs/demo.py",
                             "--workdir=/content/drive/MyDrive/arco_jax/demo"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "workdir /content/drive/MyDrive/arco_jax/demo is on Google Drive, which is not mounted (/content/drive/"
        "MyDrive does not exist): mount it in a notebook cell first (from google.colab import drive; "
        "drive.mount('/content/drive')), or set WORKDIR_ON_DRIVE = True in launch/colab.ipynb, or use a local "
        "workdir"]
    assert os.path.exists("/content") == existed and not os.path.exists("/content/drive/MyDrive")


def install_cell_functions() -> dict:
    """The install cell's definitions (everything before it acts), run in a fresh namespace."""
    notebook = json.loads((LAUNCH / "colab.ipynb").read_text())
    source = "".join(next(c for c in notebook["cells"] if c["cell_type"] == "code")["source"])
    namespace: dict = {}
    exec(source[:source.index("REPO = find_checkout()")], namespace)  # noqa: S102
    return namespace


def test_notebook_unpacks_a_zip_when_no_repository_url_is_given(tmp_path, monkeypatch):
    """Outside a checkout, with REPO_URL empty: a GitHub-style zip beside the notebook is used."""
    top = tmp_path / "src" / "arco_jax-main"
    for folder in ("arco_jax", "configs"):
        (top / folder).mkdir(parents=True)
    (top / "arco_jax" / "__init__.py").write_text("")
    (top / "requirements.txt").write_text("jax==0.0\n")
    work = tmp_path / "content"
    work.mkdir()
    shutil.make_archive(str(work / "arco_jax-main"), "zip", tmp_path / "src")
    monkeypatch.chdir(work)
    monkeypatch.delenv("ARCO_REPO_URL", raising=False)
    cell = install_cell_functions()
    root = cell["fetch_repository"]()
    assert root == work / "arco_jax_repo" and (root / "arco_jax" / "__init__.py").is_file()
    assert (root / "requirements.txt").read_text() == "jax==0.0\n"
    (work / "arco_jax-main.zip").unlink()
    with pytest.raises(RuntimeError, match="set REPO_URL"):  # no zip, not on Colab: one message
        install_cell_functions()["fetch_repository"]()


def test_notebook_picks_the_jax_build_of_the_runtime(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    write_executable(bin_dir / "nvidia-smi", "#!/usr/bin/env bash\necho 'Driver Version: 550.54  CUDA Version: 12.4'\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert install_cell_functions()["accelerator_requirement"]("1.2.3") == ["jax[cuda12]==1.2.3"]
    write_executable(bin_dir / "nvidia-smi", "#!/usr/bin/env bash\necho 'Driver Version: 580.1  CUDA Version: 13.0'\n")
    assert install_cell_functions()["accelerator_requirement"]("1.2.3") == ["jax[cuda13]==1.2.3"]
    (bin_dir / "nvidia-smi").unlink()
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    cell = install_cell_functions()
    monkeypatch.setattr(cell["glob"], "glob", lambda pattern: ["/dev/vfio/0"] if pattern == "/dev/vfio/*" else [])
    assert cell["accelerator_requirement"]("1.2.3") == ["jax[tpu]==1.2.3"]  # a v5e / v6e TPU VM runtime
    monkeypatch.setattr(cell["glob"], "glob", lambda pattern: [])
    monkeypatch.setenv("COLAB_TPU_ADDR", "10.0.0.2:8470")  # the retired TPU-Node runtime: no TPU build
    assert cell["accelerator_requirement"]("1.2.3") == []
