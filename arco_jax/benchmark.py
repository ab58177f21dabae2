"""Benchmarks: train-step time and peak memory, sampler calls, input-pipeline throughput.

  python -m arco_jax.benchmark --out=benchmarks.json                 # the standard set
  python -m arco_jax.benchmark --cases=step:256,unet:256 --repeats=5  # chosen cases

Step cases run configs/acdc.py at the given size; options after ':' change it: batch=L+U
(labeled + unlabeled images), remat=on|off (arco.remat_student, on in configs/acdc.py).

Every case runs in its own subprocess, so its peak memory is its own (host: the process's
maximum resident set; accelerators: the device's peak bytes in use). Times are the median of
`repeats` calls after a first, compiling call whose time is reported apart. Each result
names the machine, devices, versions and the config it measured.

Step cases also report the step's floating-point operations (XLA's cost analysis of the
compiled step) and the achieved GFLOP/s; the 'unet' case times the forward (segmenter in
train mode + supervised loss) on its own too, so the backward's share is visible. XLA counts a
loop body once, so with arco.remat_student the FLOPs are those of the same step without it:
the work the step has to do, its recomputation not counted.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from absl import app, flags

STANDARD_CASES = (
    "step:128", "step:192", "step:256", "step:256:remat=off", "step:256:batch=2+2", "step:256:batch=8+8",
    "unet:128", "unet:256",
    "sampler:5233:256", "sampler:30000:131072",
    "pipeline:256",
)

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined only when run as a program, so importing this module (the study reads
    `environment`) never clashes with another program's flags."""
    flags.DEFINE_string("cases", ",".join(STANDARD_CASES), "Comma-separated cases (see STANDARD_CASES).")
    flags.DEFINE_integer("repeats", 5, "Timed calls per case after the compiling call.")
    flags.DEFINE_string("out", "", "Write the results as JSON here.")
    flags.DEFINE_string("one", "", "Run one case in this process and print its JSON (used internally).")


def environment() -> dict:
    import jax

    devices = jax.devices()
    return {
        "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "platform": devices[0].platform,
        "device_kind": devices[0].device_kind, "device_count": len(devices),
        "python": platform.python_version(), "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _peak_memory_bytes() -> int:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB.


def _time_calls(fn, repeats: int) -> tuple[float, list[float]]:
    """(first call seconds, the following calls' seconds); fn must block until done."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, times


def _flops(compiled) -> float | None:
    """Floating-point operations of one call of a compiled computation, as XLA counts them."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # Older jaxlib: one dict per computation.
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def _rate(flops: float | None, seconds: float) -> float | None:
    return flops / seconds / 1e9 if flops else None


def _parse(case: str) -> tuple[str, list[str], dict]:
    kind, *rest = case.split(":")
    options = dict(part.split("=", 1) for part in rest if "=" in part)
    return kind, [part for part in rest if "=" not in part], options


def _acdc_config(size: int, batch: str | None, terms: str, remat: str | None = None):
    from configs import acdc

    from arco_jax.data import registry

    config = acdc.get_config()
    if remat is not None:
        if remat not in ("on", "off"):
            raise ValueError(f"benchmark option remat={remat!r}: use remat=on or remat=off")
        config.arco.remat_student = remat == "on"
    registry.select(config, "phantom")  # Shapes are all that matters here; validation needs no data dir.
    config.data.patch_size = (size, size)
    if batch:
        labeled, unlabeled = (int(b) for b in batch.split("+"))
        config.data.batch_labeled, config.data.batch_unlabeled = labeled, unlabeled
    if terms == "sup":
        for term in ("unsup", "contrast", "eqv", "nn"):
            config.loss_weights[term] = 0.0
    return config


def run_step_case(size: int, batch: str | None, terms: str, repeats: int, remat: str | None = None) -> dict:
    """The full ARCO stage-2 step ('step') or the plain supervised UNet step ('unet')."""
    import jax
    import numpy as np

    from arco_jax import parallel
    from arco_jax.config import validate
    from arco_jax.core import Batch
    from arco_jax.state import build_networks, build_optimizer, create_train_state
    from arco_jax.step import make_train_step

    config = _acdc_config(size, batch, terms, remat)
    if terms == "sup":  # The plain UNet step: one batch of labeled images, CE + Dice.
        config.data.batch_labeled = config.data.batch_labeled + config.data.batch_unlabeled
    mesh = parallel.make_mesh()
    validate(config, device_count=mesh.size)
    nets, tx = build_networks(config), build_optimizer(config)
    replicated = parallel.replicated(mesh)
    state = jax.jit(lambda key: create_train_state(config, nets, tx, key), out_shardings=replicated)(
        jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    d = config.data
    local = {
        "image_l": rng.random((d.batch_labeled, size, size, 1), np.float32),
        "label_l": rng.integers(0, d.num_classes, (d.batch_labeled, size, size), np.int32),
        "image_u": rng.random((d.batch_unlabeled, size, size, 1), np.float32),
    }
    batch_arrays = Batch(**parallel.global_batch(mesh, local))
    forward = _time_forward(config, nets, state, batch_arrays, repeats) if terms == "sup" else {}
    step = jax.jit(make_train_step(config, nets, tx), in_shardings=(replicated, parallel.batch_sharding(mesh)),
                   out_shardings=(replicated, replicated), donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, batch_arrays).compile()
    state_shapes = jax.eval_shape(lambda s: s, state)
    compile_s = time.perf_counter() - start
    peak_before_running = _peak_memory_bytes()  # includes XLA's own memory while compiling
    holder = {"state": state}

    def call():
        holder["state"], metrics = compiled(holder["state"], batch_arrays)
        jax.block_until_ready(metrics)

    first, times = _time_calls(call, repeats)
    median, peak = statistics.median(times), _peak_memory_bytes()
    if forward:
        forward["backward_and_update_s"] = median - forward["forward_median_s"]
    remat = config.arco.remat_student and terms != "sup"
    if remat:  # Compiled after the peak was read, so the second compilation does not count in it.
        config.arco.remat_student = False
        plain = jax.jit(make_train_step(config, nets, tx), donate_argnums=0).lower(state_shapes, batch_arrays).compile()
        flops = _flops(plain)
    else:
        flops = _flops(compiled)
    return {"size": size, "batch": f"{d.batch_labeled}+{d.batch_unlabeled if terms != 'sup' else 0}",
            "terms": "all" if terms != "sup" else "sup", "sampler": config.arco.sampler, "remat_student": remat,
            "rep_dim": config.model.rep_dim, "num_anchors": config.arco.num_anchors,
            "num_negatives": config.arco.num_negatives, "compile_plus_first_s": compile_s + first,
            "median_s": median, "times_s": times, "flops": flops, "gflops_per_s": _rate(flops, median),
            **forward, "peak_memory_bytes": peak,
            "peak_memory_before_running_bytes": peak_before_running, "step_buffers_bytes": _buffer_bytes(compiled)}


def _buffer_bytes(compiled) -> int | None:
    """What one call of the compiled step holds at its peak, by XLA's buffer assignment:
    arguments + outputs - donated aliases + temporaries. Unlike the process's peak resident
    set it leaves out the compiler's own memory and the Python runtime."""
    try:
        m = compiled.memory_analysis()
    except (AttributeError, NotImplementedError):
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def _time_forward(config, nets, state, batch, repeats: int) -> dict:
    """The plain step's forward alone: the segmenter in train mode (dropout, batch statistics)
    and the supervised loss, as the step runs them, without gradients."""
    import jax

    from arco_jax import losses

    def forward(params, batch_stats, images, labels, key):
        (logits, _), _ = nets.segmenter.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                              rngs={"dropout": key}, mutable=["batch_stats"])
        return losses.supervised_loss(logits, labels)[0]

    args = (state.params["segmenter"], state.batch_stats, batch.image_l, batch.label_l, state.rng)
    compiled = jax.jit(forward).lower(*args).compile()
    _, times = _time_calls(lambda: jax.block_until_ready(compiled(*args)), repeats)
    median, flops = statistics.median(times), _flops(compiled)
    return {"forward_median_s": median, "forward_flops": flops, "forward_gflops_per_s": _rate(flops, median)}


def run_sampler_case(num_candidates: int, num_samples: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from arco_jax import sampling

    mask = jnp.ones((num_candidates,), bool)
    results = {}
    for method in sampling.SAMPLERS:
        fn = jax.jit(lambda key, m, method=method: sampling.sample(key, m, num_samples, method=method))
        keys = iter(jax.random.split(jax.random.PRNGKey(0), repeats + 1))
        first, times = _time_calls(lambda: jax.block_until_ready(fn(next(keys), mask)), repeats)
        results[method] = {"compile_plus_first_s": first, "median_s": statistics.median(times)}
    return {"num_candidates": num_candidates, "num_samples": num_samples, "methods": results}


def run_pipeline_case(size: int, repeats: int) -> dict:
    """Slices per second of the training input pipeline (phantom data resized to `size`)."""
    import tempfile

    from arco_jax.data import phantom, pipeline

    with tempfile.TemporaryDirectory() as cache:
        root = phantom.ensure_phantom(cache, splits=(20, 1, 1), image_size=size, slices=(6, 10), seed=0)
        streams = pipeline.make_train_streams(root, num_labeled_slices=52, labeled_batch_size=4,
                                              unlabeled_batch_size=4, patch_size=(size, size), seed=0)
        batches = max(20, repeats * 10)
        next(streams)
        start = time.perf_counter()
        for _ in range(batches):
            next(streams)
        elapsed = time.perf_counter() - start
        streams.close()
    return {"size": size, "workers": 0, "slices_per_s": batches * 8 / elapsed}


def run_case(case: str, repeats: int) -> dict:
    kind, args, options = _parse(case)
    if kind in ("step", "unet"):
        result = run_step_case(int(args[0]), options.get("batch"), "all" if kind == "step" else "sup", repeats,
                               options.get("remat"))
    elif kind == "sampler":
        result = run_sampler_case(int(args[0]), int(args[1]), repeats)
    elif kind == "pipeline":
        result = run_pipeline_case(int(args[0]), repeats)
    else:
        raise ValueError(f"unknown benchmark case {case!r}; known kinds: step, unet, sampler, pipeline")
    return {"case": case, "kind": kind, **result, "environment": environment()}


def run_in_subprocess(case: str, repeats: int) -> dict:
    command = [sys.executable, "-m", "arco_jax.benchmark", f"--one={case}", f"--repeats={repeats}"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"case": case, "error": done.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary_line(result: dict) -> str:
    if "error" in result:
        return f"{result['case']:<24} FAILED: {result['error']}"
    if result["kind"] in ("step", "unet"):
        rate = result.get("gflops_per_s")
        line = (f"{result['case']:<24} {result['median_s']:8.3f} s/step  compile+first "
                f"{result['compile_plus_first_s']:6.1f} s  peak {result['peak_memory_bytes'] / 2**30:6.2f} GiB"
                + (f"  {rate:6.1f} GFLOP/s" if rate else ""))
        if result.get("step_buffers_bytes"):
            line += (f"  (before running {result['peak_memory_before_running_bytes'] / 2**30:.2f} GiB; "
                     f"step buffers {result['step_buffers_bytes'] / 2**30:.2f} GiB)")
        if "forward_median_s" in result:
            line += (f"  forward {result['forward_median_s']:.3f} s, backward+update "
                     f"{result['backward_and_update_s']:.3f} s")
        return line
    if result["kind"] == "sampler":
        times = "  ".join(f"{m} {r['median_s'] * 1e3:7.2f} ms" for m, r in result["methods"].items())
        return f"{result['case']:<24} {times}"
    return f"{result['case']:<24} {result['slices_per_s']:8.1f} slices/s"


def main(argv):
    del argv
    if FLAGS.one:
        print(json.dumps(run_case(FLAGS.one, FLAGS.repeats)))
        return
    results = []
    for case in filter(None, FLAGS.cases.split(",")):
        result = run_in_subprocess(case, FLAGS.repeats)
        print(summary_line(result), flush=True)
        results.append(result)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
