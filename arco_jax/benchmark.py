"""Benchmarks: train-step time and memory, sliding-window prediction, sampler calls,
input-pipeline throughput.

  python -m arco_jax.benchmark --out=benchmarks.json                 # the standard set (2-D, ACDC)
  python -m arco_jax.benchmark --cases=la --out=la.json              # the 3-D set (Left Atrium)
  python -m arco_jax.benchmark --cases=pascal --out=pascal.json      # DeepLabv3+ (Pascal VOC)
  python -m arco_jax.benchmark --cases=step:256,unet:256 --repeats=5  # chosen cases

Step cases build a config file's state and a random batch of its shapes (no data is read):
  step:<S>             the full ARCO stage-2 step of configs/acdc.py on S x S images
  unet:<S>             the plain supervised UNet step (CE + Dice) at the same settings
  step3d:<D>x<H>x<W>   the full ARCO step of configs/la.py (VNet, 3-D head) on D x H x W patches
                       (depth first: the reference's 112 x 112 x 80 is step3d:80x112x112)
  deeplab:<S>          the full ARCO step of configs/pascal.py (DeepLabv3+ ResNet-101, 256-d
                       representation, ClassMix and colour jitter) on S x S crops (ReCo's 321)
Options after ':' change the config: batch=L+U (labeled + unlabeled samples), remat=on|off
(arco.remat_student; both config files leave it to auto: on for a single CPU device), dtype=float32|bfloat16 (model.dtype, the
networks' compute type; parameters and optimizer stay float32), filters=N (the VNet's
n_filters, 3-D cases only), depth=N and width=F (the ResNet's depth and width, deeplab
cases only), stage1=on|off (off: pretrain.steps = 0, the state of a run
without stage 1; the step measured is stage 2's either way, with the state the trainer gives it).

  window3d:<D>x<H>x<W> the evaluator's sliding-window prediction (evaluators/sliding_window.py)
                       of one random D x H x W volume with configs/la.py's network, its
                       eval.window and eval.stride (options window=DxHxW, stride=DxHxW, dtype,
                       filters); it reports the windows per volume and the seconds per volume.

Every case runs in its own subprocess, so its peak memory is its own (host: the process's
maximum resident set; accelerators: the device's peak bytes in use). Times are the median of
`repeats` calls after a first, compiling call whose time is reported apart. Each result
names the machine, devices, versions and the config it measured.

Step cases also report the step's floating-point operations (XLA's cost analysis of the
compiled step) and the achieved GFLOP/s; the 'unet' case times the forward (segmenter in
train mode + supervised loss) on its own too, so the backward's share is visible. XLA counts a
loop body once, so with arco.remat_student the FLOPs are those of the same step without it:
the work the step has to do, its recomputation not counted. They also report XLA's memory
analysis of the compiled step (`compiled_memory`: arguments, outputs, the donated
argument-output aliases, temporaries and generated code, and `total` = argument + output -
alias + temp + generated code), with remat on also that of the step without it
(`compiled_memory_without_remat`, compiled, never run); compiling needs no memory for the
step itself, so these are known even where the step cannot run.
"""
from __future__ import annotations

import functools
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
# configs/la.py as it is: the step at the reference's patch and batch in both compute types, and
# one LA-sized volume (UA-MT's processed volumes are about 88 slices of 140-180 px) by windows.
LA_CASES = ("step3d:80x112x112", "step3d:80x112x112:dtype=bfloat16", "window3d:88x144x144")
# configs/pascal.py: the step at ReCo's crop and batch (10 + 10) compiled in both compute types
# (never run: its compiled memory is the question), and timed on a CPU at 2 + 2.
PASCAL_CASES = ("deeplab:321:run=off", "deeplab:321:dtype=bfloat16:run=off", "deeplab:321:batch=2+2")
CASE_SETS = {"standard": STANDARD_CASES, "la": LA_CASES, "pascal": PASCAL_CASES}
# The config file behind each case kind.
CONFIG_FILES = {"step": "acdc", "unet": "acdc", "step3d": "la", "window3d": "la", "deeplab": "pascal"}
STEP_OPTIONS = ("batch", "remat", "dtype", "filters", "depth", "width", "stage1", "run")
WINDOW_OPTIONS = ("window", "stride", "dtype", "filters")

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined only when run as a program, so importing this module (the study reads
    `environment`) never clashes with another program's flags."""
    flags.DEFINE_string("cases", "standard", "Comma-separated cases, or a set of them: "
                        + ", ".join(CASE_SETS) + " (see STANDARD_CASES, LA_CASES, PASCAL_CASES).")
    flags.DEFINE_integer("repeats", 5, "Timed calls per case after the compiling call.")
    flags.DEFINE_string("out", "", "Write the results as JSON here.")
    flags.DEFINE_string("one", "", "Run one case in this process and print its JSON (used internally).")


def environment() -> dict:
    import jax

    devices = jax.devices()
    return {
        "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "platform": devices[0].platform,
        "device_kind": devices[0].device_kind, "device_count": len(devices),
        "python": platform.python_version(), "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""), **_source_version(),
    }


def cpu_model() -> str:
    """The CPU's name (/proc/cpuinfo's 'model name' on Linux): machines of one architecture
    differ by 1.5x and more in XLA:CPU speed, so a figure names the model it was measured on."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("model name", "Processor", "cpu model"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _source_version() -> dict:
    """The commit measured and whether the code (arco_jax/, configs/) differed from it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--", "arco_jax", "configs"], cwd=root,
                                 capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "uncommitted_changes": bool(changed)}


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


def _spatial(text: str, rank: int | None = None) -> tuple[int, ...]:
    """'256' -> (256, 256) (a 2-D size), '80x112x112' -> (80, 112, 112)."""
    try:
        sizes = tuple(int(part) for part in text.split("x"))
    except ValueError:
        raise ValueError(f"benchmark size {text!r}: use S or DxHxW (integers)") from None
    if len(sizes) == 1 and rank == 2:
        sizes = sizes * 2
    if rank is not None and len(sizes) != rank:
        raise ValueError(f"benchmark size {text!r}: this case takes a {rank}-D size")
    return sizes


def _check_options(case_kind: str, options: dict, known: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"benchmark case {case_kind!r}: unknown option(s) {unknown}; known: {', '.join(known)}")


def step_config(config_file: str, spatial, *, batch: str | None = None, terms: str = "all",
                remat: str | None = None, dtype: str | None = None, filters: str | None = None,
                depth: str | None = None, width: str | None = None, stage1: str | None = None):
    """A config file's config (configs/<config_file>.py) at patch size `spatial` (None: the
    file's), with the benchmark options applied: the one config every step and window case builds."""
    import importlib

    config = importlib.import_module(f"configs.{config_file}").get_config()
    if remat is not None:
        if remat not in ("on", "off"):
            raise ValueError(f"benchmark option remat={remat!r}: use remat=on or remat=off")
        config.arco.remat_student = remat == "on"
    if dtype is not None:
        config.model.dtype = dtype  # validate() names the choices
    if stage1 is not None:
        if stage1 not in ("on", "off"):
            raise ValueError(f"benchmark option stage1={stage1!r}: use stage1=on or stage1=off")
        if stage1 == "off":
            config.pretrain.steps = 0  # the run without stage 1: its part of the state left out
    if filters is not None:
        if config.model.name != "vnet":
            raise ValueError(f"benchmark option filters={filters}: sets the VNet's n_filters; this config's model is "
                             f"{config.model.name!r}")
        config.model.vnet.n_filters = int(filters)
    for option, value in (("depth", depth), ("width", width)):
        if value is not None:
            if config.model.name != "deeplabv3plus":
                raise ValueError(f"benchmark option {option}={value}: sets the DeepLabv3+ ResNet's {option}; this "
                                 f"config's model is {config.model.name!r}")
            config.model.deeplabv3plus[option] = (int if option == "depth" else float)(value)  # validate() checks
    if spatial is not None:
        config.data.patch_size = tuple(spatial)
    if batch:
        labeled, unlabeled = (int(b) for b in batch.split("+"))
        config.data.batch_labeled, config.data.batch_unlabeled = labeled, unlabeled
    if terms == "sup":
        for term in ("unsup", "contrast", "eqv", "nn"):
            config.loss_weights[term] = 0.0
    return config


def _validate_without_data(config, device_count: int) -> None:
    """config.validate, the dataset's own checks of its folder left out (a benchmark reads no
    data; the metadata, the shapes and every other check stay the dataset's)."""
    import dataclasses

    from arco_jax.config import validate
    from arco_jax.data import registry

    name = config.data.dataset
    stand_in = dataclasses.replace(registry.get(name), name=f"{name}_without_data", validate=lambda c: None)
    registry.register(stand_in, replace=True)
    try:
        config.data.dataset = stand_in.name
        validate(config, device_count=device_count)
    finally:
        config.data.dataset = name
        registry.unregister(stand_in.name)


def _random_batch(config, mesh):
    """A global Batch of the config's shapes: uniform images, uniformly drawn labels."""
    import numpy as np

    from arco_jax import parallel
    from arco_jax.core import Batch

    rng = np.random.default_rng(0)
    d = config.data
    spatial, channels = tuple(d.patch_size), d.in_channels
    local = {
        "image_l": rng.random((d.batch_labeled, *spatial, channels), np.float32),
        "label_l": rng.integers(0, d.num_classes, (d.batch_labeled, *spatial), np.int32),
        "image_u": rng.random((d.batch_unlabeled, *spatial, channels), np.float32),
    }
    return Batch(**parallel.global_batch(mesh, local))


def run_step_case(config_file: str, spatial, terms: str, repeats: int, options: dict | None = None) -> dict:
    """The full ARCO stage-2 step (terms 'all') or the plain supervised step (terms 'sup') of
    a config file at patch size `spatial`. Option run=off compiles the step without running it
    (times, FLOP rate and the peak after running are then left out)."""
    import jax

    from arco_jax import host_memory, parallel
    from arco_jax.state import build_networks, build_optimizer, create_train_state
    from arco_jax.step import make_train_step

    options = dict(options or {})
    run = options.pop("run", "on")
    if run not in ("on", "off"):
        raise ValueError(f"benchmark option run={run!r}: use run=on or run=off")
    config = step_config(config_file, spatial, terms=terms, **options)
    d = config.data
    if terms == "sup":  # The plain step: one batch of labeled images, CE + Dice.
        d.batch_labeled = d.batch_labeled + d.batch_unlabeled
    _validate_without_data(config, jax.device_count())  # resolves data.mesh_devices and arco.remat_student
    mesh = parallel.make_mesh(d.mesh_devices)
    nets, tx = build_networks(config), build_optimizer(config)
    replicated = parallel.replicated(mesh)
    init = jax.jit(lambda key: create_train_state(config, nets, tx, key), out_shardings=replicated)
    # Compiling needs shapes only: without running, the state is not built (nor its init compiled).
    state = (init if run == "on" else functools.partial(jax.eval_shape, init))(jax.random.PRNGKey(0))
    batch_arrays = _random_batch(config, mesh)
    forward = _time_forward(config, nets, state, batch_arrays, repeats) if terms == "sup" and run == "on" else {}
    step = jax.jit(make_train_step(config, nets, tx), in_shardings=(replicated, parallel.batch_sharding(mesh)),
                   out_shardings=(replicated, replicated), donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, batch_arrays).compile()
    state_shapes = jax.eval_shape(lambda s: s, state)
    compile_s = time.perf_counter() - start
    peak_before_running = _peak_memory_bytes()  # includes XLA's own memory while compiling
    host_memory.release_freed_memory()  # as the trainer does before a step's first call
    _progress(f"step compiled in {compile_s:.1f} s")
    timing = {"compile_s": compile_s}
    if run == "on":
        holder = {"state": state, "calls": 0}

        def call():
            start = time.perf_counter()
            holder["state"], metrics = compiled(holder["state"], batch_arrays)
            jax.block_until_ready(metrics)
            holder["calls"] += 1
            _progress(f"step call {holder['calls']} took {time.perf_counter() - start:.1f} s")

        first, times = _time_calls(call, repeats)
        timing.update(compile_plus_first_s=compile_s + first, median_s=statistics.median(times), times_s=times)
        if forward:
            forward["backward_and_update_s"] = timing["median_s"] - forward["forward_median_s"]
    peak = _peak_memory_bytes()
    remat = config.arco.remat_student and terms != "sup"
    memory = _memory_parts(compiled)
    _progress(f"compiled memory {memory}; peak {peak} bytes")
    plain_memory = None
    if remat:  # Compiled after the peak was read, so the second compilation does not count in it.
        config.arco.remat_student = False
        plain = jax.jit(make_train_step(config, nets, tx), donate_argnums=0).lower(state_shapes, batch_arrays).compile()
        flops, plain_memory = _flops(plain), _memory_parts(plain)
    else:
        flops = _flops(compiled)
    result = {"config": f"configs/{config_file}.py", "model": config.model.name, "dtype": config.model.dtype,
              "patch_size": list(d.patch_size),
              "batch": f"{d.batch_labeled}+{d.batch_unlabeled if terms != 'sup' else 0}",
              "terms": "all" if terms != "sup" else "sup", "sampler": config.arco.sampler, "remat_student": remat,
              "rep_dim": config.model.rep_dim, "num_anchors": config.arco.num_anchors,
              "num_negatives": config.arco.num_negatives, **timing, "flops": flops,
              "gflops_per_s": _rate(flops, timing["median_s"]) if run == "on" else None,
              **forward, "peak_memory_bytes": peak if run == "on" else None,
              "peak_memory_before_running_bytes": peak_before_running,
              "step_buffers_bytes": memory and memory["buffers"], "compiled_memory": memory}
    if config.model.name == "vnet":
        result["vnet_filters"] = config.model.vnet.n_filters
    if config.model.name == "deeplabv3plus":
        result["resnet_depth"] = config.model.deeplabv3plus.depth
        result["resnet_width"] = config.model.deeplabv3plus.width
        result["output_stride"] = config.model.deeplabv3plus.output_stride
        result["augment_mix"] = config.augment.mix
    if remat:
        result["compiled_memory_without_remat"] = plain_memory
    return result


MEMORY_PARTS = ("argument", "output", "alias", "temp", "generated_code")


def _memory_parts(compiled) -> dict | None:
    """XLA's memory analysis of a compiled computation, in bytes: its arguments, outputs, the
    donated arguments that alias outputs, temporaries and generated code; `buffers` what one
    call holds at its peak by XLA's buffer assignment (argument + output - alias + temp) and
    `total` that plus the generated code. Unlike the process's peak resident set these leave
    out the compiler's own memory and the Python runtime."""
    try:
        m = compiled.memory_analysis()
    except (AttributeError, NotImplementedError):
        return None
    if m is None:
        return None
    parts = {part: int(getattr(m, f"{part}_size_in_bytes")) for part in MEMORY_PARTS}
    parts["buffers"] = parts["argument"] + parts["output"] - parts["alias"] + parts["temp"]
    parts["total"] = parts["buffers"] + parts["generated_code"]
    return parts


def _time_forward(config, nets, state, batch, repeats: int) -> dict:
    """The plain step's forward alone: the segmenter in train mode (dropout, batch statistics)
    and the supervised loss, as the step runs them, without gradients."""
    import jax

    from arco_jax import losses

    def forward(params, batch_stats, images, labels, key):
        (logits, _), _ = nets.segmenter.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                              rngs={"dropout": key}, mutable=["batch_stats"])
        return losses.supervised_loss(logits, labels, config.data.ignore_label, kind=config.loss.supervised)[0]

    args = (state.params["segmenter"], state.batch_stats, batch.image_l, batch.label_l, state.rng)
    compiled = jax.jit(forward).lower(*args).compile()
    _, times = _time_calls(lambda: jax.block_until_ready(compiled(*args)), repeats)
    median, flops = statistics.median(times), _flops(compiled)
    return {"forward_median_s": median, "forward_flops": flops, "forward_gflops_per_s": _rate(flops, median)}


def _drawn_state(config, nets, tx):
    """A TrainState of the config's shapes with drawn values and nothing compiled (initialising
    the 3-D networks compiles for longer than a small window case runs): kernels (2 or more
    axes) He-normal over their fan-in, batch-norm variances and scales 1, every other leaf 0.
    Timing a prediction needs shapes, not trained values."""
    import jax
    import numpy as np

    from arco_jax.state import create_train_state

    shapes = jax.eval_shape(lambda key: create_train_state(config, nets, tx, key), jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if not np.issubdtype(leaf.dtype, np.floating):
            return np.zeros(leaf.shape, leaf.dtype)
        if len(leaf.shape) >= 2:
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)).astype(leaf.dtype)
        ones = name.endswith(("['var']", "['scale']"))
        return (np.ones if ones else np.zeros)(leaf.shape, leaf.dtype)

    return jax.device_put(jax.tree_util.tree_map_with_path(draw, shapes))


def run_window_case(config_file: str, volume_shape, repeats: int, options: dict | None = None) -> dict:
    """The sliding-window prediction of one random volume (evaluators/sliding_window.py, as the
    evaluator runs it: windows of eval.window every eval.stride, eval.window_batch_size at a
    time, through the trainer's Predictors) with drawn weights (`_drawn_state`)."""
    import jax
    import numpy as np

    from arco_jax import parallel
    from arco_jax.core import eval_variables
    from arco_jax.evaluators import sliding_window
    from arco_jax.state import build_networks, build_optimizer
    from arco_jax.train import Predictors

    options = dict(options or {})
    rank = len(volume_shape)
    window_text, stride_text = options.pop("window", None), options.pop("stride", None)
    config = step_config(config_file, None, stage1="off", **options)  # the segmenter is all it runs
    if window_text:
        config.eval.window = _spatial(window_text, rank)
    if stride_text:
        config.eval.stride = _spatial(stride_text, rank)
    window = tuple(config.eval.window) or tuple(config.data.patch_size)
    stride = tuple(config.eval.stride) or sliding_window.default_stride(window)
    config.data.patch_size = window  # the network is initialised (and checked) at the window's size
    mesh = parallel.make_mesh()
    _validate_without_data(config, mesh.size)
    batch_size = config.eval.window_batch_size
    nets, tx = build_networks(config), build_optimizer(config)
    state = _drawn_state(config, nets, tx)
    predict = Predictors(config, nets)(state)
    volume = np.random.default_rng(0).standard_normal(tuple(volume_shape)).astype(np.float32)
    padded = [max(s, w) for s, w in zip(volume_shape, window)]
    windows = len(sliding_window.window_positions(padded, window, stride))

    def call():
        sliding_window.predict_labels(predict, volume, window, stride, batch_size)

    first, times = _time_calls(call, repeats)
    median, peak = statistics.median(times), _peak_memory_bytes()
    batches = -(-windows // batch_size)
    logits = jax.jit(lambda variables, x: nets.segmenter.apply(variables, x, train=False)[0])
    shape = jax.ShapeDtypeStruct((batch_size, *window, config.data.in_channels), np.float32)
    window_flops = _flops(logits.lower(eval_variables(state, config.eval.model), shape).compile())
    flops = window_flops * batches if window_flops else None
    return {"config": f"configs/{config_file}.py", "model": config.model.name, "dtype": config.model.dtype,
            "volume_shape": list(volume_shape), "window": list(window), "stride": list(stride),
            "window_batch_size": batch_size, "windows": windows, "window_batches": batches,
            "compile_plus_first_s": first, "median_s": median, "times_s": times,
            "seconds_per_window": median / windows, "flops": flops, "gflops_per_s": _rate(flops, median),
            "peak_memory_bytes": peak,
            **({"vnet_filters": config.model.vnet.n_filters} if config.model.name == "vnet" else {})}


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
    if kind in ("step", "unet", "step3d", "deeplab"):
        _check_options(kind, options, STEP_OPTIONS)
        spatial = _spatial(args[0], 2 if kind != "step3d" else 3)
        result = run_step_case(CONFIG_FILES[kind], spatial, "sup" if kind == "unet" else "all", repeats, options)
        if kind not in ("step3d", "deeplab"):
            result = {"size": spatial[0], **result}
    elif kind == "window3d":
        _check_options(kind, options, WINDOW_OPTIONS)
        result = run_window_case(CONFIG_FILES[kind], _spatial(args[0], 3), repeats, options)
    elif kind == "sampler":
        result = run_sampler_case(int(args[0]), int(args[1]), repeats)
    elif kind == "pipeline":
        result = run_pipeline_case(int(args[0]), repeats)
    else:
        raise ValueError(f"unknown benchmark case {case!r}; known kinds: step, unet, step3d, deeplab, window3d, "
                         "sampler, pipeline")
    return {"case": case, "kind": kind, **result, "environment": environment()}


def expand_cases(cases: str) -> list[str]:
    """'standard,step3d:80x112x112' -> the standard set's cases, then that case."""
    return [one for entry in filter(None, cases.split(",")) for one in CASE_SETS.get(entry, (entry,))]


def _progress(message: str) -> None:
    """A line on stderr as a case goes, so that a case that dies or is stopped still says how far
    it got (run_in_subprocess reports these lines with the error)."""
    print(f"benchmark: {message}", file=sys.stderr, flush=True)


def _failure(returncode: int, stderr: str) -> list[str]:
    """What a failed case's subprocess said: its progress lines, then the exception line of its
    last traceback, or the signal that ended it (XLA's own warnings left out)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    said = [line for line in lines if line.startswith("benchmark: ")]
    if "Traceback (most recent call last):" in lines:
        after = lines[len(lines) - 1 - lines[::-1].index("Traceback (most recent call last):"):]
        said.append(next((line for line in after[1:] if not line.startswith(" ")), after[-1]))  # its exception
    elif returncode < 0:
        said.append(f"killed by signal {-returncode}" + (" (SIGKILL: out of memory?)" if returncode == -9 else ""))
    else:
        said.append(f"exit status {returncode}" + (f": {lines[-1]}" if lines else ""))
    return said


def run_in_subprocess(case: str, repeats: int) -> dict:
    command = [sys.executable, "-m", "arco_jax.benchmark", f"--one={case}", f"--repeats={repeats}"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"case": case, "error": _failure(done.returncode, done.stderr)}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def summary_line(result: dict) -> str:
    if "error" in result:
        return f"{result['case']:<24} FAILED: {result['error']}"
    if result["kind"] in ("step", "unet", "step3d", "deeplab"):
        rate = result.get("gflops_per_s")
        if "median_s" in result:
            line = (f"{result['case']:<24} {result['median_s']:8.3f} s/step  compile+first "
                    f"{result['compile_plus_first_s']:6.1f} s  peak {_gib(result['peak_memory_bytes']):>9}"
                    + (f"  {rate:6.1f} GFLOP/s" if rate else ""))
        else:
            line = f"{result['case']:<24} not run  compile {result['compile_s']:6.1f} s"
        memory = result.get("compiled_memory")
        if memory:
            line += (f"  (before running {_gib(result['peak_memory_before_running_bytes'])}; compiled "
                     f"{_gib(memory['total'])}: arguments {_gib(memory['argument'])}, temp {_gib(memory['temp'])})")
        if result.get("compiled_memory_without_remat"):
            line += f"  [without remat: compiled {_gib(result['compiled_memory_without_remat']['total'])}]"
        if "forward_median_s" in result:
            line += (f"  forward {result['forward_median_s']:.3f} s, backward+update "
                     f"{result['backward_and_update_s']:.3f} s")
        return line
    if result["kind"] == "window3d":
        rate = result.get("gflops_per_s")
        return (f"{result['case']:<24} {result['median_s']:8.2f} s/volume  {result['windows']} windows "
                f"({result['seconds_per_window']:.3f} s each)  first {result['compile_plus_first_s']:.1f} s  "
                f"peak {_gib(result['peak_memory_bytes'])}" + (f"  {rate:6.1f} GFLOP/s" if rate else ""))
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
    for case in expand_cases(FLAGS.cases):
        result = run_in_subprocess(case, FLAGS.repeats)
        print(summary_line(result), flush=True)
        results.append(result)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
