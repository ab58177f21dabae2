"""What a run resolves for the hardware it lands on, and the precision it pins.

- The global batch on N devices (config.data_mesh_size, a pure function of the counts, so these
  run without the devices): the shipped configs on 1, 4, 8 and 16 devices and on every TPU
  type the launch scripts name; impossible layouts refused naming the field.
- arco.remat_student auto: on for a single CPU device only; the resolved values are recorded
  in config.json and a resume on the same hardware passes the config check, other hardware not.
- Precision: the warp's coordinates and the similarities that select or scale a loss term are
  computed at HIGHEST (read from the traced program: the CPU ignores matmul precision, so only
  the program can show what a TPU would do), and bfloat16 networks compute their logits in float32.
"""
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arco_jax import augment, losses, models, pretrain, train
from arco_jax.config import ConfigError, base_config, data_mesh_size, resolve_for_devices, validate
from arco_jax.data import registry
from tests.tiny import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


# ----------------------------------------------------------------------------- the batch on N devices

@pytest.mark.parametrize("name", ["acdc", "demo"])
@pytest.mark.parametrize("devices, hosts, used", [(1, 1, 1), (4, 1, 4), (8, 1, 4), (16, 1, 4), (16, 4, 4)])
def test_shipped_configs_run_on_1_4_8_16_devices(name, devices, hosts, used):
    """4 + 4 is the experiment: it stays 4 + 4 and takes the devices it divides over."""
    c = load_config(name)
    validate(c, device_count=devices, process_count=hosts, platform="tpu", check_data=False)
    assert (c.data.batch_labeled, c.data.batch_unlabeled) == (4, 4)
    assert c.data.mesh_devices == used and c.arco.remat_student is False


# (devices, hosts) of each TPU type launch/tpu_vm.sh and the READMEs name, as tpu_vm.sh's topology() counts them.
ADVERTISED = {"v4-8": (4, 1), "v4-32": (16, 4), "v5litepod-8": (8, 1), "v5litepod-16": (16, 4), "v6e-8": (8, 1),
              "v2-8": (8, 1)}


@pytest.mark.parametrize("accelerator", sorted(ADVERTISED))
def test_every_advertised_tpu_type_runs_acdc_and_the_demo(accelerator):
    devices, hosts = ADVERTISED[accelerator]
    for name in ("acdc", "demo"):
        c = load_config(name)
        validate(c, device_count=devices, process_count=hosts, platform="tpu", check_data=False)
        assert c.data.mesh_devices == 4 and c.data.mesh_devices % hosts == 0


def test_mesh_size_is_the_largest_even_split():
    four = {"batch_labeled": 4, "batch_unlabeled": 4}
    assert [data_mesh_size(four, n) for n in (1, 2, 3, 4, 6, 8, 16)] == [1, 2, 2, 4, 4, 4, 4]
    assert data_mesh_size({"batch_labeled": 8, "batch_unlabeled": 16}, 16) == 8
    assert data_mesh_size({"batch_labeled": 16, "batch_unlabeled": 16}, 16, 4) == 16
    assert data_mesh_size({"batch_labeled": 12, "batch_unlabeled": 12}, 16, 4) == 12  # 3 devices of each host
    assert data_mesh_size(four, 8, requested=2) == 2


@pytest.mark.parametrize("batches, devices, hosts, requested, message", [
    ((4, 4), 32, 8, None, "config.data.batch_labeled: 4 rows cannot be split evenly over the 8 hosts"),
    ((8, 2), 16, 4, None, "config.data.batch_unlabeled: 2 rows cannot be split evenly over the 4 hosts"),
    ((4, 4), 8, 1, 3, "config.data.batch_labeled: 4 is not divisible by the 3 devices of the data mesh"),
    ((4, 4), 4, 1, 8, "config.data.mesh_devices: 8 devices asked for, this run has 4"),
    ((4, 4), 8, 4, 2, "config.data.mesh_devices: 2 devices cannot be taken equally from the 4 hosts"),
    ((4, 4), 8, 3, None, "8 devices over 3 hosts"),
], ids=["batch-over-hosts", "unlabeled-over-hosts", "requested-not-dividing", "requested-too-many",
        "requested-over-hosts", "uneven-hosts"])
def test_impossible_layouts_are_refused_naming_the_field(batches, devices, hosts, requested, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")):
        data_mesh_size(dict(zip(("batch_labeled", "batch_unlabeled"), batches)), devices, hosts, requested)


# ----------------------------------------------------------------------------- remat auto

def phantom_config():
    c = base_config()
    registry.select(c, "phantom")
    return c


@pytest.mark.parametrize("platform, devices, expected", [("cpu", 1, True), ("cpu", 2, False), ("cpu", 8, False),
                                                         ("gpu", 1, False), ("tpu", 8, False)])
def test_remat_auto_is_on_for_a_single_cpu_device_only(platform, devices, expected):
    c = phantom_config()
    assert c.arco.remat_student is None
    resolve_for_devices(c, devices, platform=platform)
    assert c.arco.remat_student is expected


def test_an_explicit_remat_and_mesh_are_kept():
    c = phantom_config()
    c.arco.remat_student, c.data.mesh_devices = True, 2
    resolve_for_devices(c, 8, platform="tpu")
    assert c.arco.remat_student is True and c.data.mesh_devices == 2
    c.arco.remat_student, c.data.mesh_devices = False, None
    resolve_for_devices(c, 1, platform="cpu")
    assert c.arco.remat_student is False


def test_pascal_recomputes_on_every_platform_to_stay_within_12_gb():
    """configs/pascal.py sets the switch (its 10 + 10 step needs 13.9 GB of XLA's compiled memory
    without, 8.2 GB with); the other natural-image configs keep the auto rule."""
    for platform, devices in (("gpu", 1), ("tpu", 8), ("cpu", 2)):
        c = load_config("pascal")
        resolve_for_devices(c, devices, platform=platform)
        assert c.arco.remat_student is True, platform
    sun = load_config("sun")
    resolve_for_devices(sun, 1, platform="gpu")
    assert sun.arco.remat_student is False


def test_remat_and_mesh_take_command_line_overrides():
    """The placeholders keep their types: --config.arco.remat_student=true and
    --config.data.mesh_devices=2 parse (here through the launchers' check)."""
    result = subprocess.run([sys.executable, "-m", "arco_jax.preflight", f"--config={CONFIGS / 'demo.py'}",
                             "--devices=8", "--platform=gpu", "--config.arco.remat_student=true",
                             "--config.data.mesh_devices=2"], capture_output=True, text=True, timeout=120,
                            cwd=CONFIGS.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("batches 4+4 on 2 of 8 gpu devices (1 host, 6 idle); arco.remat_student True; "
                                      "model.dtype float32")


def claimed_workdir(tmp_path: Path, config) -> Path:
    """A workdir holding a run of `config` (its config.json as the trainer writes it, one checkpoint)."""
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "last" / "3").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(config.to_dict()))
    return workdir


def test_resolved_values_are_recorded_and_checked_on_resume(tmp_path):
    started = phantom_config()
    validate(started, device_count=1, platform="cpu")
    record = train.config_record(started)
    assert record["data"]["mesh_devices"] == 1 and record["arco"]["remat_student"] is True
    workdir = claimed_workdir(tmp_path, started)

    same = phantom_config()  # the same command on the same machine: auto resolves the same way
    validate(same, device_count=1, platform="cpu")
    assert train.check_workdir_config(workdir, same, allow_change=False) is False

    elsewhere = phantom_config()  # the same command on a GPU: remat off, a different computation
    validate(elsewhere, device_count=1, platform="gpu")
    with pytest.raises(ConfigError, match=r"arco\.remat_student: True -> False") as info:
        train.check_workdir_config(workdir, elsewhere, allow_change=False)
    assert "--allow_config_change" in str(info.value)
    pinned = phantom_config()  # pinning the stored value resumes there
    pinned.arco.remat_student = True
    validate(pinned, device_count=1, platform="gpu")
    assert train.check_workdir_config(workdir, pinned, allow_change=False) is False


def test_a_workdir_from_before_the_mesh_was_recorded_resumes(tmp_path):
    old = phantom_config()
    old.arco.remat_student = False
    record = old.to_dict()
    del record["data"]["mesh_devices"]  # the field did not exist: the run used every device
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "last" / "3").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(record))
    given = phantom_config()
    given.arco.remat_student = False
    validate(given, device_count=2, platform="cpu")
    assert train.check_workdir_config(workdir, given, allow_change=False) is False


# ----------------------------------------------------------------------------- precision

def dot_precisions(closed_jaxpr) -> list:
    """The precision of every dot_general in a traced program, sub-programs included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(eqn.params["precision"])
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(sub, "jaxpr", None)
                    if inner is not None:
                        walk(inner if hasattr(inner, "eqns") else inner.jaxpr)

    walk(closed_jaxpr.jaxpr)
    return found


HIGHEST = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)


def test_warp_coordinates_are_computed_at_highest_precision():
    x = jnp.zeros((2, 32, 32, 3))
    matrices = augment.random_similarity(jax.random.PRNGKey(0), 2)
    assert dot_precisions(jax.make_jaxpr(lambda m: augment.warp_affine(x, m, order=1))(matrices)) == [HIGHEST]
    volume = jnp.zeros((1, 8, 16, 16, 1))
    m3 = augment.random_similarity(jax.random.PRNGKey(1), 1, spatial_rank=3)
    assert dot_precisions(jax.make_jaxpr(lambda m: augment.warp_affine(volume, m, order=0))(m3)) == [HIGHEST]


def test_bfloat16_operands_would_move_warp_samples_by_a_large_fraction_of_a_pixel():
    """Why the warp is pinned: at 256 px, rounding its operands to bfloat16 (what DEFAULT does on
    TPU) moves sample points by up to more than half a pixel; at HIGHEST they are exact to 1e-4 px."""
    size = 256
    matrices = np.asarray(augment.random_similarity(jax.random.PRNGKey(0), 64), np.float64)
    grid = np.arange(size) * 2.0 / (size - 1) - 1.0
    points = np.stack([*np.meshgrid(grid, grid), np.ones((size, size))], axis=-1)
    exact = np.einsum("bij,hwj->bhwi", matrices, points)
    to_bf16 = lambda a: np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16), np.float64)  # noqa: E731
    rounded = np.einsum("bij,hwj->bhwi", to_bf16(matrices), to_bf16(points))
    pixel = 2.0 / (size - 1)
    assert np.max(np.abs(rounded - exact)) / pixel > 0.3
    ours = jnp.einsum("bij,hwj->bhwi", jnp.asarray(matrices, jnp.float32), jnp.asarray(points, jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
    assert np.max(np.abs(np.asarray(ours, np.float64) - exact)) / pixel < 1e-3


def test_similarities_that_select_or_scale_a_term_are_pinned():
    rng = np.random.default_rng(0)
    anchors, positive = rng.standard_normal((8, 16)), rng.standard_normal(16)
    negatives = rng.standard_normal((8, 5, 16))
    info_nce = jax.make_jaxpr(lambda a: losses.info_nce(a, positive, negatives, 0.5))(anchors)
    assert dot_precisions(info_nce) == [HIGHEST, HIGHEST]
    rows = lambda n: losses.l2_normalize(jnp.asarray(rng.standard_normal((n, 16)), jnp.float32))  # noqa: E731
    pool, teacher = rows(6), rows(4)
    nn = jax.make_jaxpr(lambda s: losses.nearest_neighbour_loss(s, teacher, pool, 2))(rows(4))
    assert dot_precisions(nn) == [HIGHEST, HIGHEST]
    queue = rng.standard_normal((6, 3, 16))
    kl = jax.make_jaxpr(lambda s: pretrain.similarity_kl(s, rows(12).reshape(4, 3, 16), queue, 0.1, 0.1))(
        rows(12).reshape(4, 3, 16))
    assert dot_precisions(kl) == [HIGHEST, HIGHEST]


@pytest.mark.slow  # 57 s (UNet) and 92 s (VNet) on 2 cores: more than the suite's budget allows
@pytest.mark.parametrize("name, shape", [("unet", (2, 32, 32, 1)), ("vnet", (1, 16, 16, 16, 1))])
def test_bfloat16_networks_compute_their_logits_in_float32(name, shape):
    """The output conv runs in float32 on the bfloat16 features: the logits are those of the
    float32 conv (the old bfloat16 conv gave bfloat16-rounded values)."""
    model_config = base_config().model
    model_config.name = name
    if name == "vnet":
        model_config.vnet = {"n_filters": 4, "dropout": False}
    else:
        model_config.unet.features = (4, 8, 8, 16, 16)
    net = models.build_segmenter(model_config, num_classes=3, in_channels=1, dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(0).random(shape), jnp.float32)
    variables = net.init(jax.random.PRNGKey(0), x, train=False)
    logits, features = net.apply(variables, x, train=False)
    assert logits.dtype == jnp.float32 and features[-1].dtype == jnp.bfloat16
    kernel = variables["params"]["out_conv"]["kernel"]
    bias = variables["params"]["out_conv"]["bias"]
    last = features[-1] if name == "unet" else features[-1][..., -kernel.shape[-2]:]
    spatial = "".join("dhw"[-(last.ndim - 2):])
    expected = jax.lax.conv_general_dilated(
        last.astype(jnp.float32), kernel, (1,) * (last.ndim - 2), "SAME",
        dimension_numbers=(f"N{spatial.upper()}C", f"{spatial.upper()}IO", f"N{spatial.upper()}C"),
        precision=jax.lax.Precision.HIGHEST) + bias
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-5, atol=1e-5)
    as_bf16 = np.asarray(logits.astype(jnp.bfloat16).astype(jnp.float32))
    assert np.mean(as_bf16 != np.asarray(logits)) > 0.5
