"""Runs a script where `import tensorflow` would succeed if TensorFlow were installed, and
records that import: the TFDS builders and readers promise never to import TensorFlow."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent


def run_without_tensorflow(script: str, tmp_path: Path, timeout: int = 120) -> dict:
    """The JSON the script prints last, after checking it ran and never imported tensorflow
    (a stand-in `tensorflow` package first on the path writes a marker when imported)."""
    stand_in = tmp_path / "site" / "tensorflow"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text(textwrap.dedent("""\
        import os
        with open(os.environ["TF_IMPORT_MARKER"], "a") as marker:
            marker.write("tensorflow was imported\\n")
        raise ImportError("stand-in tensorflow")
        """))
    marker = tmp_path / "tf_imported.txt"
    env = {**os.environ, "TF_IMPORT_MARKER": str(marker),
           "PYTHONPATH": os.pathsep.join([str(stand_in.parent), str(REPOSITORY)])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not marker.exists(), marker.read_text()
    return json.loads(done.stdout.strip().splitlines()[-1])
