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
    assert benchmark._acdc_config(64, None, "all", "off").arco.remat_student is False
    assert benchmark._acdc_config(64, None, "all", "on").arco.remat_student is True
    assert benchmark._acdc_config(64, None, "all").arco.remat_student is True  # configs/acdc.py
    with pytest.raises(ValueError, match="remat='yes'"):
        benchmark._acdc_config(64, None, "all", "yes")
