"""The benchmark module runs its cases and reports what it measured (no timing asserts)."""
import pytest

from arco_jax import benchmark


def test_sampler_case_times_every_sampler():
    result = benchmark.run_case("sampler:500:64", repeats=2)
    assert set(result["methods"]) == {"uniform", "sg", "sag"}
    for timing in result["methods"].values():
        assert timing["median_s"] > 0 and timing["compile_plus_first_s"] >= timing["median_s"]
    assert result["environment"]["jax"] and result["environment"]["device_count"] >= 1
    assert "sampler:500:64" in benchmark.summary_line(result)


def test_pipeline_case_reports_throughput():
    result = benchmark.run_case("pipeline:32", repeats=1)
    assert result["slices_per_s"] > 0
    assert "slices/s" in benchmark.summary_line(result)


def test_unknown_case_is_an_error():
    with pytest.raises(ValueError, match="unknown benchmark case"):
        benchmark.run_case("warp:64", repeats=1)


def test_failed_subprocess_case_is_reported_not_raised():
    result = benchmark.run_in_subprocess("warp:64", repeats=1)
    assert "error" in result and "FAILED" in benchmark.summary_line(result)


def test_a_failed_case_says_how_far_it_got_and_why():
    noise = "W0000 some XLA warning\nIf you'd like to file a bug, run with envvar XLA_FLAGS=...\n"
    progress = "benchmark: step compiled in 50.0 s\n"
    assert benchmark._failure(-9, progress + noise) == ["benchmark: step compiled in 50.0 s",
                                                         "killed by signal 9 (SIGKILL: out of memory?)"]
    traceback = "Traceback (most recent call last):\n  File \"x.py\", line 1\n    f()\nValueError: bad size\n"
    assert benchmark._failure(1, progress + traceback + noise)[-1] == "ValueError: bad size"


def test_unet_case_reports_flops_and_the_forward_share():
    result = benchmark.run_case("unet:64:batch=2+2", repeats=1)
    assert result["batch"] == "4+0" and result["terms"] == "sup"
    # Forward + backward of a conv net costs about three forwards.
    assert result["flops"] > 2 * result["forward_flops"] > 0
    assert result["gflops_per_s"] == result["flops"] / result["median_s"] / 1e9
    assert result["backward_and_update_s"] == result["median_s"] - result["forward_median_s"]
    line = benchmark.summary_line(result)
    assert "GFLOP/s" in line and "backward+update" in line


def test_remat_option_sets_the_switch_and_rejects_other_values():
    assert benchmark.step_config("acdc", (64, 64), remat="off").arco.remat_student is False
    assert benchmark.step_config("acdc", (64, 64), remat="on").arco.remat_student is True
    assert benchmark.step_config("acdc", (64, 64)).arco.remat_student is None  # configs/acdc.py: auto
    with pytest.raises(ValueError, match="remat='yes'"):
        benchmark.step_config("acdc", (64, 64), remat="yes")


def test_step_and_window_configs_come_from_the_config_files():
    la = benchmark.step_config("la", None)
    assert la.data.patch_size == (80, 112, 112) and la.model.name == "vnet" and la.arco.remat_student is None
    assert (la.data.batch_labeled, la.data.batch_unlabeled) == (4, 4) and la.data.dataset == "la"
    small = benchmark.step_config("la", (16, 32, 32), batch="2+3", dtype="bfloat16", filters="4")
    assert small.data.patch_size == (16, 32, 32) and (small.data.batch_labeled, small.data.batch_unlabeled) == (2, 3)
    assert small.model.dtype == "bfloat16" and small.model.vnet.n_filters == 4
    with pytest.raises(ValueError, match="n_filters"):
        benchmark.step_config("acdc", (64, 64), filters="4")
    with pytest.raises(ValueError, match="unknown option"):
        benchmark.run_case("step3d:16x32x32:steps=3", repeats=1)
    with pytest.raises(ValueError, match="3-D size"):
        benchmark.run_case("step3d:64", repeats=1)
    assert benchmark.expand_cases("la,sampler:10:2") == [*benchmark.LA_CASES, "sampler:10:2"]


def _check_memory(memory):
    assert set(memory) == {*benchmark.MEMORY_PARTS, "buffers", "total"}
    assert memory["buffers"] == memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
    assert memory["total"] == memory["buffers"] + memory["generated_code"]
    assert memory["argument"] > 0 and memory["temp"] > 0 and 0 <= memory["alias"] <= memory["argument"]


@pytest.mark.slow  # about a minute of compilation; its config path is checked above, its report by the 2-D case
def test_3d_step_case_reports_flops_and_compiled_memory():
    """The 3-D ARCO step of configs/la.py at a tiny size, compiled but not run (run=off: no
    state is built, so the one cost is the step's compilation, about 45 s on two cores at any
    size; the running path is the 2-D cases', tested above), remat off so that it compiles
    once, without stage 1 (whose windows do not fit so small a patch)."""
    result = benchmark.run_case("step3d:16x32x32:batch=2+2:filters=4:remat=off:stage1=off:run=off", repeats=1)
    assert result["kind"] == "step3d" and result["patch_size"] == [16, 32, 32] and result["batch"] == "2+2"
    assert result["model"] == "vnet" and result["vnet_filters"] == 4 and result["terms"] == "all"
    assert result["sampler"] == "sag" and result["rep_dim"] == 16 and result["remat_student"] is False
    assert result["compile_s"] > 0 and result["flops"] > 0
    assert "median_s" not in result and result["gflops_per_s"] is None and result["peak_memory_bytes"] is None
    _check_memory(result["compiled_memory"])
    assert result["step_buffers_bytes"] == result["compiled_memory"]["buffers"]
    assert result["peak_memory_before_running_bytes"] > 0 and "compiled_memory_without_remat" not in result
    assert result["environment"]["platform"] and "commit" in result["environment"]
    line = benchmark.summary_line(result)
    assert "not run" in line and "compiled" in line


def test_window_case_counts_windows_and_times_one_volume():
    result = benchmark.run_case("window3d:20x40x40:window=16x32x32:stride=8x16x16:filters=4", repeats=1)
    assert result["window"] == [16, 32, 32] and result["stride"] == [8, 16, 16]
    assert result["windows"] == 2 * 2 * 2 and result["window_batches"] == 2  # batches of 4 (configs/la.py)
    assert result["median_s"] > 0 and result["seconds_per_window"] == result["median_s"] / 8
    assert result["flops"] > 0 and "s/volume" in benchmark.summary_line(result)


def test_deeplab_case_takes_configs_pascal_and_its_backbone_options():
    pascal = benchmark.step_config("pascal", None)
    assert pascal.data.patch_size == (321, 321) and (pascal.data.batch_labeled, pascal.data.batch_unlabeled) == (10, 10)
    assert pascal.model.name == "deeplabv3plus" and pascal.model.deeplabv3plus.depth == 101
    assert pascal.model.rep_dim == 256 and pascal.augment.mix == "classmix"
    toy = benchmark.step_config("pascal", (65, 65), batch="2+2", depth="18", width="0.25")
    assert toy.model.deeplabv3plus.depth == 18 and toy.model.deeplabv3plus.width == 0.25
    with pytest.raises(ValueError, match="DeepLabv3\\+ ResNet's depth"):
        benchmark.step_config("acdc", (64, 64), depth="18")
    with pytest.raises(ValueError, match="2-D size"):
        benchmark.run_case("deeplab:65x65x65", repeats=1)
    assert benchmark.expand_cases("pascal") == list(benchmark.PASCAL_CASES)


@pytest.mark.slow  # about 80 s of compilation on two cores
def test_deeplab_step_case_reports_compiled_memory():
    result = benchmark.run_case("deeplab:65:batch=2+2:depth=18:width=0.25:remat=off:run=off", repeats=1)
    assert result["kind"] == "deeplab" and result["model"] == "deeplabv3plus" and result["patch_size"] == [65, 65]
    assert result["resnet_depth"] == 18 and result["rep_dim"] == 256 and result["batch"] == "2+2"
    _check_memory(result["compiled_memory"])
    assert "not run" in benchmark.summary_line(result)


def test_the_environment_names_the_cpu_model(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\nflags\t: fpu\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path,
                                                                          *a, **k))
    assert benchmark.cpu_model() == "AMD EPYC 9B14"
    assert benchmark.environment()["cpu_model"] == "AMD EPYC 9B14"


def test_the_pytorch_unet_is_our_unet_parameter_for_parameter(tmp_path):
    """benchmarks/torch_unet_step.py times the same network: its parameter count is the flax
    UNet's, per layer kind, and one step on a tiny batch gives a finite CE + Dice loss. Runs
    where PyTorch is installed (it is not a requirement)."""
    torch = pytest.importorskip("torch")
    import importlib.util
    import json

    import jax
    import jax.numpy as jnp

    from arco_jax.models.unet import UNet
    from tests.tiny import REPO

    spec = importlib.util.spec_from_file_location("torch_unet_step", REPO / "benchmarks" / "torch_unet_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shapes = jax.eval_shape(lambda k: UNet().init({"params": k, "dropout": k}, jnp.zeros((1, 32, 32, 1)), train=False),
                            jax.random.PRNGKey(0))
    flax_sizes = sorted(x.size for x in jax.tree.leaves(shapes["params"]))
    torch_sizes = sorted(p.numel() for p in module.UNet().parameters())
    assert torch_sizes == flax_sizes
    result = module.main(["--size=32", "--batch=2", "--repeats=1", "--warmup=0", "--device=cpu",
                          f"--out={tmp_path / 'r.json'}"])
    assert result["parameters"] == sum(flax_sizes) and torch.isfinite(torch.tensor(result["loss"]))
    assert json.loads((tmp_path / "r.json").read_text())["median_s"] == result["median_s"] > 0
