"""How much do SG and SAG sampling lower the variance of the contrastive loss estimate?

ARCO's claim is that stratified (SG) and stratified antithetic (SAG) sampling give a lower
variance estimate of the contrastive loss, and of its gradient, than uniform sampling at the
same number of samples, most of all for the tail (rare) classes. This module measures that
on a trained run:

  python -m arco_jax.variance --workdir=runs/demo --checkpoint=best --batches=4 --draws=64

For each of `batches` real training batches, everything but the sampling is computed once:
teacher pseudo-labels, the strong view, student and teacher decoder maps, reliability masks;
the memory bank is the one saved with the checkpoint. Then the contrastive loss is estimated
`draws` times with independent sampling keys under each estimator (uniform, and SG / SAG under
each strata layout), at the run's anchor and negative counts. Per estimator it reports the mean
and variance of the loss estimate, the variance of its gradient with respect to the student's
representation head and projector, E||g - E g||^2 (also relative to ||E g||^2), the variance
of each class's term, and the ratios of these variances to uniform's.

Writes <out>/variance.json (everything, per batch too), variance.md (tables) and variance.png
(variance ratios per class and estimator). <out> defaults to <workdir>/variance.

The class terms come from `objective.per_class_contrast`, the function the train step's
contrastive term is built from, called here without the step's bank update.
"""
from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from arco_jax import cli, files, inference, losses, memory, sampling, train
from arco_jax.config import validate
from arco_jax.data import registry
from arco_jax.objective import (Batch, Forward, HeadInputs, anchor_masks, head_inputs, per_class_contrast,
                                 reliability_masks, strong_view)
from arco_jax.state import Networks, TrainState, build_networks, stage2_progress

TRAINABLE = ("head", "projector")  # the student parameters the contrastive term's gradient is taken for


class Estimator(NamedTuple):
    """A sampler and, for the stratified ones, the strata layout of its anchors."""

    sampler: str
    strata: str

    @property
    def name(self) -> str:
        return self.sampler if self.sampler == "uniform" else f"{self.sampler}/{self.strata}"


def estimators_for(samplers: Sequence[str], strata: Sequence[str]) -> list[Estimator]:
    """Uniform once (it has no strata) and every stratified sampler under every layout."""
    for name in samplers:
        if name not in sampling.SAMPLERS:
            raise ValueError(f"--samplers: {name!r} is not one of {', '.join(sampling.SAMPLERS)}")
    for name in strata:
        if name not in sampling.LAYOUTS:
            raise ValueError(f"--strata: {name!r} is not one of {', '.join(sampling.LAYOUTS)}")
    if "uniform" not in samplers:
        raise ValueError(f"--samplers must include 'uniform', the baseline of every ratio; got {list(samplers)}")
    stratified = [s for s in dict.fromkeys(samplers) if s != "uniform"]
    if stratified and not strata:
        raise ValueError("--strata is empty: SG and SAG need a layout ('index', 'spatial')")
    return [Estimator("uniform", "index")] + [Estimator(s, layout) for s in stratified
                                              for layout in dict.fromkeys(strata)]


# ----------------------------------------------------------------------------- the run

def restore_run(workdir: epath.PathLike, checkpoint: str | int = "best"
                ) -> tuple[ml_collections.ConfigDict, TrainState, str, int]:
    """(config, TrainState on one device, 'best' or 'last', step) of a trained run; checkpoint
    is 'best', 'last' or a step number (`inference.resolve_checkpoint`)."""
    workdir = files.workdir_path(workdir)
    config = inference.read_config(workdir)
    validate(config)
    directory, step = inference.resolve_checkpoint(workdir, checkpoint)
    state = inference.restore_state(workdir, config, directory, step)
    return config, state, directory, step


def restore_contrastive_run(workdir: epath.PathLike, checkpoint: str | int = "best"
                            ) -> tuple[ml_collections.ConfigDict, TrainState, str, int]:
    """`restore_run` of a run whose saved state has a contrastive term to study: ARCO's banks,
    holding negatives unless the reference's zero row stands in for them."""
    config, state, directory, step = restore_run(workdir, checkpoint)
    if "arco" not in state.methods:
        raise ValueError(f"{workdir}: method {config.method!r} has no contrastive term to study (no memory banks)")
    if config.arco.negatives == "other_classes" and not int(np.sum(state.methods["arco"].bank.count)):
        raise ValueError(f"{workdir}: the memory banks of the '{directory}' state are empty, so the contrastive "
                         f"term has no negatives (was the run trained with loss_weights.contrast > 0?)")
    return config, state, directory, step


# ----------------------------------------------------------------------------- fixed inputs

class ContrastInputs(NamedTuple):
    """Everything the contrastive term reads except the sampling key and the student head."""

    features: tuple  # student decoder maps of (labeled, strong unlabeled) images
    teacher: HeadInputs
    labels: jax.Array  # (B, H, W) labels, then pseudo-labels
    teacher_probs: jax.Array  # (B, H, W, C)
    low: jax.Array  # (B, H, W) reliable pixels
    bank: memory.ClassBank  # as saved with the state


def contrast_inputs(state: TrainState, batch: Batch, key: jax.Array, config: ml_collections.ConfigDict,
                    nets: Networks) -> ContrastInputs:
    """What the train step feeds the contrastive term, for one batch and one key (the same
    path as `objective.arco_loss`): teacher pseudo-labels, the strong view, the forwards and
    the reliability masks; the bank is the one saved with the state (the step's own update,
    a few hundred rows per class, is left out: every draw must see the same bank anyway)."""
    a = config.arco
    keys = jax.random.split(key, 6)
    fwd = Forward(config, nets, state.params, state.teacher, state.batch_stats)
    num_labeled = batch.image_l.shape[0]

    image_s, pseudo, _ = strong_view(fwd, batch.image_u, keys[0], keys[1])

    _, features_l = fwd.student(batch.image_l, keys[2])
    logits_u, features_u = fwd.student(image_s, keys[3])
    t_logits_l, t_features_l = fwd.teacher_net(batch.image_l, keys[4])
    t_logits_u, t_features_u = fwd.teacher_net(image_s, keys[5])
    features = tuple(jnp.concatenate([p, q]) for p, q in zip(features_l, features_u))
    teacher = head_inputs(fwd, "teacher", tuple(jnp.concatenate([p, q]) for p, q in zip(t_features_l, t_features_u)))
    labels = jnp.concatenate([batch.label_l, pseudo])
    teacher_probs = jax.nn.softmax(jnp.concatenate([t_logits_l, t_logits_u]).astype(jnp.float32), -1)
    progress = stage2_progress(config, state.step)
    low, _ = reliability_masks(jax.nn.softmax(logits_u.astype(jnp.float32), -1), num_labeled, progress,
                               a.entropy_percentile)
    return ContrastInputs(features, teacher, labels, teacher_probs, low, state.methods["arco"].bank)


# ----------------------------------------------------------------------------- draws

def estimator_config(config: ml_collections.ConfigDict, estimator: Estimator) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.arco.sampler, cfg.arco.strata = estimator.sampler, estimator.strata
    return cfg


def make_draw_statistics(config: ml_collections.ConfigDict, nets: Networks, estimator: Estimator):
    """jit(params, teacher, inputs, keys) -> draw statistics of one estimator on one batch.

    Returns a dict: 'loss' (D,) and 'per_class' (D, C) estimates; 'counted' (C,); the gradient's
    'grad_m2' (sum over draws of ||g - mean g||^2) and 'grad_mean_sq' (||mean g||^2), per
    trainable part.
    """
    cfg = estimator_config(config, estimator)

    def forward(params, teacher, trainable):
        return Forward(cfg, nets, {**params, **trainable}, teacher, {})

    def loss_fn(trainable, key, params, teacher, inputs: ContrastInputs):
        fwd = forward(params, teacher, trainable)
        per_class, counted, present = per_class_contrast(
            key, fwd, head_inputs(fwd, "student", inputs.features), inputs.teacher, inputs.labels,
            inputs.teacher_probs, inputs.low, inputs.bank)
        return losses.class_average(per_class, counted, present), (per_class, counted)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    @jax.jit
    def statistics(params, teacher, inputs: ContrastInputs, keys: jax.Array) -> dict:
        trainable = {part: params[part] for part in TRAINABLE}
        zeros = jax.tree.map(jnp.zeros_like, trainable)

        def draw(carry, key):
            (loss, (per_class, counted)), grads = grad_fn(trainable, key, params, teacher, inputs)
            return welford_update(carry, grads), (loss, per_class, counted)

        init = (jnp.zeros((), jnp.float32), zeros, {part: jnp.zeros((), jnp.float32) for part in TRAINABLE})
        (_, mean, m2), (loss, per_class, counted) = jax.lax.scan(draw, init, keys)
        return {"loss": loss, "per_class": per_class, "counted": counted[0], "grad_m2": m2,
                "grad_mean_sq": {part: tree_sq_norm(mean[part]) for part in TRAINABLE}}

    return statistics


def welford_update(carry: tuple, sample: dict) -> tuple:
    """One step of Welford's running mean and sum of squared deviations, per top-level part of
    a pytree: (count, mean tree, {part: M2}). Keeps no (draws x parameters) array and avoids
    the cancellation of E||g||^2 - ||E g||^2."""
    count, mean, m2 = carry
    count = count + 1
    delta = jax.tree.map(jnp.subtract, sample, mean)
    new_mean = jax.tree.map(lambda m, d: m + d / count, mean, delta)
    residual = jax.tree.map(jnp.subtract, sample, new_mean)
    new_m2 = {part: m2[part] + sum(jnp.vdot(d, r) for d, r in zip(jax.tree.leaves(delta[part]),
                                                                  jax.tree.leaves(residual[part])))
              for part in m2}
    return count, new_mean, new_m2


def tree_sq_norm(tree) -> jax.Array:
    """Squared L2 norm of a pytree."""
    return sum(jnp.vdot(leaf, leaf) for leaf in jax.tree.leaves(tree))


def batch_record(stats: dict, draws: int, class_names: Sequence[str]) -> dict:
    """Per-batch numbers of one estimator (variances with the 1/(D-1) normaliser)."""
    loss = np.asarray(stats["loss"], np.float64)
    per_class = np.asarray(stats["per_class"], np.float64)
    counted = np.asarray(stats["counted"], bool)
    grad_var = {part: float(stats["grad_m2"][part]) / (draws - 1) for part in TRAINABLE}
    # ||mean g||^2 overestimates ||E g||^2 by tr(Cov g) / D; removed here.
    grad_mean_sq = {part: float(stats["grad_mean_sq"][part]) - grad_var[part] / draws for part in TRAINABLE}
    return {
        "loss_mean": float(loss.mean()), "loss_var": float(loss.var(ddof=1)),
        "grad_var": sum(grad_var.values()), "grad_mean_sq": sum(grad_mean_sq.values()),
        "grad_var_parts": grad_var, "grad_mean_sq_parts": grad_mean_sq,
        "per_class": {name: {"mean": float(per_class[:, c].mean()), "var": float(per_class[:, c].var(ddof=1))}
                      for c, name in enumerate(class_names) if counted[c]},
    }


# ----------------------------------------------------------------------------- summary

def summarize(per_batch: list[dict], names: Sequence[str], class_names: Sequence[str], draws: int) -> dict:
    """Average over batches (a class over the batches it is counted in) and ratios to uniform.

    Ratios are of batch-averaged variances; the relative gradient variance is the averaged
    E||g - E g||^2 over the averaged ||E g||^2.
    """
    summary = {}
    for name in names:
        rows = [b["estimators"][name] for b in per_batch]
        var = float(np.mean([r["loss_var"] for r in rows]))
        grad_var = float(np.mean([r["grad_var"] for r in rows]))
        grad_mean_sq = float(np.mean([r["grad_mean_sq"] for r in rows]))
        per_class = {}
        for cls in class_names:
            values = [r["per_class"][cls] for r in rows if cls in r["per_class"]]
            if values:
                per_class[cls] = {"mean": float(np.mean([v["mean"] for v in values])),
                                  "var": float(np.mean([v["var"] for v in values])), "batches": len(values)}
        summary[name] = {
            "loss_mean": float(np.mean([r["loss_mean"] for r in rows])), "loss_var": var,
            "grad_var": grad_var, "grad_mean_sq": grad_mean_sq,
            "grad_rel_var": grad_var / grad_mean_sq if grad_mean_sq > 0 else None,
            "grad_var_parts": {p: float(np.mean([r["grad_var_parts"][p] for r in rows])) for p in TRAINABLE},
            "per_class": per_class,
        }
    base = summary["uniform"]
    for name in names:
        s = summary[name]
        s["loss_var_ratio"] = _ratio(s["loss_var"], base["loss_var"])
        s["grad_var_ratio"] = _ratio(s["grad_var"], base["grad_var"])
        # Difference of mean estimates in standard errors: near 0 when both estimate the same loss.
        se = math.sqrt((s["loss_var"] + base["loss_var"]) / (draws * len(per_batch)))
        s["loss_mean_shift_z"] = _ratio(s["loss_mean"] - base["loss_mean"], se)
        for cls, v in s["per_class"].items():
            v["var_ratio"] = _ratio(v["var"], base["per_class"][cls]["var"])
    return summary


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.3e}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_report(report: dict) -> str:
    run, settings, summary = report["run"], report["settings"], report["summary"]
    names, classes = report["estimators"], report["classes"]
    lines = [
        f"# Contrastive loss estimator variance: {run['workdir']} ({run['checkpoint']}, step {run['step']})",
        "",
        f"{settings['batches']} training batches x {settings['draws']} draws per estimator; "
        f"{settings['num_anchors']} anchors and {settings['num_negatives']} negatives per anchor and class, "
        f"G = {settings['num_strata']} strata, temperature {settings['temperature']}. Network outputs and "
        f"reliability masks fixed per batch, memory bank as saved; only the sampling key changes. "
        f"Gradient w.r.t. the student's {' and '.join(TRAINABLE)}. The layout (index/spatial) applies to "
        f"the anchors; negatives are always stratified over the bank's rows.",
        "",
        "| Estimator | Loss mean | Loss std | Var ratio vs uniform | Mean shift (z) | Grad E‖g−Eg‖²/‖Eg‖² "
        "| Grad var ratio vs uniform |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        s = summary[name]
        lines.append(f"| {name} | {s['loss_mean']:.4f} | {math.sqrt(s['loss_var']):.4g} | "
                     f"{_fmt(s['loss_var_ratio'])} | {_fmt(s['loss_mean_shift_z'], 2)} | "
                     f"{_fmt(s['grad_rel_var'])} | {_fmt(s['grad_var_ratio'])} |")
    lines += [
        "",
        "Per-class term: variance ratio vs uniform (anchor candidates: mean per batch; batches: "
        "in which the class had anchors and negatives).",
        "",
        _row(["Class", "Anchor candidates", "Batches", "Var (uniform)", *names[1:]]),
        _row(["---"] * (3 + len(names))),
    ]
    for cls in classes:
        base = summary["uniform"]["per_class"].get(cls)
        cells = [cls, f"{report['anchor_candidates'][cls]:.1f}", str(base["batches"] if base else 0),
                 _fmt(base["var"] if base else None)]
        cells += [_fmt(summary[n]["per_class"][cls]["var_ratio"] if base else None) for n in names[1:]]
        lines.append(_row(cells))
    rel_se = math.sqrt(2.0 / (settings["draws"] - 1))
    lines += [
        "",
        f"A variance from {settings['draws']} draws has a relative standard error of about {rel_se:.2f} per "
        f"batch (Gaussian approximation), about {rel_se / math.sqrt(settings['batches']):.2f} averaged over "
        f"{settings['batches']} batches. Mean shift: difference from uniform's mean loss in standard errors.",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the plot

def ratio_table(report: dict) -> tuple[list[str], list[str], np.ndarray]:
    """(groups, estimators, ratios): the variance ratio vs uniform of the loss, the gradient and
    each class's term (rows) for each stratified estimator (columns); NaN where undefined."""
    summary = report["summary"]
    names = report["estimators"][1:]
    groups = [("loss", lambda s: s["loss_var_ratio"]), ("gradient", lambda s: s["grad_var_ratio"])]
    groups += [(cls, lambda s, cls=cls: s["per_class"].get(cls, {}).get("var_ratio")) for cls in report["classes"]]
    ratios = np.array([[np.nan if get(summary[n]) is None else get(summary[n]) for n in names]
                       for _, get in groups], float).reshape(len(groups), len(names))
    return [label for label, _ in groups], names, ratios


def plot_ratios(report: dict, path: epath.PathLike) -> np.ndarray:
    """Grouped bars of the variance ratios vs uniform on a log axis, drawn from 1 (down: less
    variance than uniform, up: more), written as a PNG. Returns the plotted ratios (`ratio_table`)."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

    groups, names, ratios = ratio_table(report)
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(1.2 * len(groups) + 3, 4), dpi=100)
    for e, name in enumerate(names):
        height = np.nan_to_num(ratios[:, e], nan=1.0) - 1.0
        ax.bar(np.arange(len(groups)) + (e - (len(names) - 1) / 2) * width, height, width, bottom=1.0, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log", base=2)
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel("variance / uniform's variance")
    run = report["run"]
    ax.set_title(f"Contrastive loss estimators, {run['dataset']} step {run['step']} "
                 f"({report['settings']['draws']} draws x {report['settings']['batches']} batches)")
    ax.legend(frameon=False)
    fig.tight_layout()
    with epath.Path(path).open("wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return ratios


# ----------------------------------------------------------------------------- the study

def next_batch(streams) -> Batch:
    labeled, unlabeled = next(streams)
    return Batch(image_l=jnp.asarray(labeled["image"]), label_l=jnp.asarray(labeled["label"]),
                 image_u=jnp.asarray(unlabeled["image"]))


def run_study(workdir: epath.PathLike, *, checkpoint: str | int = "best", batches: int = 4, draws: int = 64,
              samplers: Sequence[str] = sampling.SAMPLERS, strata: Sequence[str] = sampling.LAYOUTS,
              out: epath.PathLike | None = None, seed: int = 0,
              progress: Callable[[str], None] | None = None) -> dict:
    """Measure the estimators on a trained run and write variance.json, .md and .png to `out`;
    `progress` hears of every estimator's draws on every batch (a real run takes many minutes)."""
    named = str(workdir)  # as the user wrote it: reports are committed, machine paths are not
    workdir = files.workdir_path(workdir)
    if not (isinstance(batches, int) and batches >= 1):
        raise ValueError(f"--batches must be an integer >= 1, got {batches!r}")
    if not (isinstance(draws, int) and draws >= 2):
        raise ValueError(f"--draws must be an integer >= 2 (a variance needs two draws), got {draws!r}")
    estimators = estimators_for(samplers, strata)
    config, state, directory, step = restore_contrastive_run(workdir, checkpoint)
    nets = build_networks(config)
    out = files.workdir_path(out) if out is not None else workdir / "variance"
    class_names = ["background", *config.data.class_names]

    streams = train.make_streams(config, registry.open_dataset(config))
    prepare = jax.jit(functools.partial(contrast_inputs, config=config, nets=nets))
    statistics = {e.name: make_draw_statistics(config, nets, e) for e in estimators}
    count_anchors = jax.jit(lambda inputs: jnp.sum(anchor_masks(
        inputs.labels, inputs.low, inputs.teacher_probs, config.arco.anchor_prob_threshold)[1].reshape(
            config.data.num_classes, -1), axis=1))

    base_key = jax.random.key(seed)
    per_batch = []
    try:
        for b in range(batches):
            inputs_key, draws_key = jax.random.split(jax.random.fold_in(base_key, b))
            inputs = prepare(state, next_batch(streams), inputs_key)
            keys = jax.random.split(draws_key, draws)
            candidates = np.asarray(count_anchors(inputs)).tolist()
            records = {}
            for e in estimators:
                started = time.perf_counter()
                records[e.name] = batch_record(jax.device_get(statistics[e.name](
                    state.params, state.teacher, inputs, keys)), draws, class_names)
                if progress is not None:
                    progress(f"batch {b + 1}/{batches}, {e.name}: {draws} draws in "
                             f"{time.perf_counter() - started:.1f} s")
            per_batch.append({"batch": b, "anchor_candidates": dict(zip(class_names, candidates)),
                              "estimators": records})
    finally:
        streams.close()

    names = [e.name for e in estimators]
    a = config.arco
    report = {
        "run": {"workdir": named, "checkpoint": directory, "step": step,
                "dataset": config.data.dataset, "trained_sampler": a.sampler, "trained_strata": a.strata},
        "settings": {"batches": batches, "draws": draws, "seed": seed, "num_anchors": a.num_anchors,
                     "num_negatives": a.num_negatives, "num_strata": a.num_strata, "temperature": a.temperature,
                     "gradient_of": list(TRAINABLE)},
        "classes": class_names,
        "estimators": names,
        "anchor_candidates": {c: float(np.mean([r["anchor_candidates"][c] for r in per_batch])) for c in class_names},
        "summary": summarize(per_batch, names, class_names, draws),
        "per_batch": per_batch,
    }
    files.write_report(out, "variance", report, markdown_report(report))
    plot_ratios(report, out / "variance.png")
    return report


def main(argv) -> None:
    f = cli.report_flags(argv)
    report = run_study(f.workdir, checkpoint=f.checkpoint, batches=f.batches, draws=f.draws,
                       samplers=f.samplers, strata=f.strata, out=f.out, seed=f.seed,
                       progress=lambda message: print(message, flush=True))
    print(markdown_report(report))
    out = f.out or str(files.workdir_path(f.workdir) / "variance")
    print(f"wrote {out}/variance.json, variance.md and variance.png")


def _define_flags() -> None:
    from absl import flags  # pylint: disable=import-outside-toplevel

    flags.DEFINE_string("workdir", None, "A training workdir (config.json and checkpoints/).")
    flags.DEFINE_string("checkpoint", "best", "Which saved state to study: best, last or a step number.")
    flags.DEFINE_integer("batches", 4, "Training batches to average over.")
    flags.DEFINE_integer("draws", 64, "Sampling keys per batch and estimator.")
    flags.DEFINE_list("samplers", list(sampling.SAMPLERS), "Samplers; 'uniform' is the baseline.")
    flags.DEFINE_list("strata", list(sampling.LAYOUTS), "Strata layouts for SG and SAG.")
    flags.DEFINE_string("out", None, "Output folder (default <workdir>/variance).")
    flags.DEFINE_integer("seed", 0, "Seed of the sampling and augmentation keys.")
    flags.mark_flag_as_required("workdir")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
