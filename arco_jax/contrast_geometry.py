"""Can the contrastive term go lower? Its value against what the teacher's geometry allows.

ARCO's pixel-contrastive term is InfoNCE of student anchors against a teacher class prototype
(the positive) and teacher bank rows of the other classes (the negatives). Positive and
negatives are constants, so the student can only move its anchors, and the lowest value any
anchor can reach is set by where the teacher puts the prototype and the negatives. This
module measures that on a trained run:

  python -m arco_jax.contrast_geometry --workdir=runs/acdc --checkpoint=best --batches=4

For each of `batches` training batches (everything the term reads computed as the train step
does: `variance.contrast_inputs`) and each class, with the run's own anchor and negative draws:

  trained       the term as the student's anchors give it;
  at_prototype  the term if every anchor pointed exactly at the prototype;
  best          the lowest value of one anchor direction shared by all anchors, found by
                `steps` Adam steps on the unit sphere from the prototype (all anchors of a
                class see negatives from one distribution, so one direction is near-optimal);
  chance        ln(1 + m), every logit equal; ideal: ln(1 + m exp(-2 / T)), the floor with the
                positive at cosine 1 and every negative at -1;

and the mean cosines anchor-prototype, anchor-negative and prototype-negative. If `trained`
sits near `best` the student does what it can and the term is held up by the teacher's
geometry (hard negatives close to the prototype); if it sits near `chance` while `best` is far
below, the student is not learning the term.

Writes <out>/contrast_geometry.json and .md; <out> defaults to <workdir>/contrast_geometry.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from arco_jax import cli, files, losses, train, variance
from arco_jax.data import registry
from arco_jax.objective import Forward, class_negatives, contrast_draws, head_inputs
from arco_jax.state import build_networks

QUANTITIES = ("trained", "at_prototype", "best", "cos_anchor_prototype", "cos_anchor_negative",
              "cos_prototype_negative")


def best_direction_loss(prototype: jax.Array, negatives: jax.Array, temperature: float, steps: int,
                        learning_rate: float = 0.05) -> jax.Array:
    """(value at the prototype's direction, lowest value found): InfoNCE of one unit anchor
    direction shared by every anchor (each with its own negatives (n, m, D)), by Adam from the
    prototype's direction."""
    n = negatives.shape[0]

    def loss(u):
        return losses.info_nce(jnp.broadcast_to(u, (n, u.shape[0])), prototype, negatives, temperature)

    opt = optax.adam(learning_rate)
    u0 = losses.l2_normalize(prototype)

    def step(carry, _):
        u, opt_state, lowest = carry
        value, grad = jax.value_and_grad(loss)(u)
        updates, opt_state = opt.update(grad, opt_state)
        u = losses.l2_normalize(optax.apply_updates(u, updates))  # Stay on the sphere: Adam's steps are absolute.
        return (u, opt_state, jnp.minimum(lowest, value)), None

    at_start = loss(u0)
    (u, _, lowest), _ = jax.lax.scan(step, (u0, opt.init(u0), at_start), None, length=steps)
    return at_start, jnp.minimum(lowest, loss(u))


def make_geometry(config, nets, steps: int):
    """jit(params, teacher, inputs, key) -> per-class quantities (C,) and counted (C,)."""
    a = config.arco

    @jax.jit
    def geometry(params, teacher, inputs: variance.ContrastInputs, key: jax.Array) -> dict:
        fwd = Forward(config, nets, params, teacher, {})
        draws = contrast_draws(key, fwd, head_inputs(fwd, "student", inputs.features), inputs.teacher,
                               inputs.labels, inputs.teacher_probs, inputs.low)

        def one_class(args):
            k, c, class_anchors_, prototype = args
            negatives, ok = class_negatives(k, config, inputs.bank, c)
            anchor_u = losses.l2_normalize(class_anchors_)
            proto_u = losses.l2_normalize(prototype)
            neg_u = losses.l2_normalize(negatives)
            cos_an = jnp.einsum("nd,nmd->nm", anchor_u, neg_u, precision=jax.lax.Precision.HIGHEST)
            cos_pn = jnp.einsum("d,nmd->nm", proto_u, neg_u, precision=jax.lax.Precision.HIGHEST)
            at_prototype, best = best_direction_loss(prototype, negatives, a.temperature, steps)
            return {
                "trained": losses.info_nce(class_anchors_, prototype, negatives, a.temperature),
                "at_prototype": at_prototype,
                "best": best,
                "cos_anchor_prototype": jnp.mean(anchor_u @ proto_u),
                "cos_anchor_negative": jnp.mean(cos_an),
                "cos_prototype_negative": jnp.mean(cos_pn),
            }, ok

        per_class, has_negatives = jax.lax.map(one_class, (
            draws.negative_keys, jnp.arange(draws.present.shape[0]), draws.anchors, draws.prototypes))
        return {**per_class, "counted": draws.has_anchors & has_negatives & draws.present}

    return geometry


def summarize(per_batch: list[dict], class_names: list[str]) -> dict:
    """Per class: each quantity's mean over the batches in which the class was counted."""
    summary = {}
    for c, name in enumerate(class_names):
        rows = [b for b in per_batch if b["counted"][c]]
        summary[name] = {"batches": len(rows),
                         **{q: (float(np.mean([b[q][c] for b in rows])) if rows else None) for q in QUANTITIES}}
    return summary


def markdown_report(report: dict) -> str:
    run, s = report["run"], report["settings"]
    lines = [
        f"# Contrastive term against its reachable floor: {run['workdir']} ({run['checkpoint']}, step {run['step']})",
        "",
        f"{s['batches']} training batches, {s['num_anchors']} anchors x {s['num_negatives']} negatives per class, "
        f"T = {s['temperature']}: chance ln(1 + m) = {s['chance']:.3f}, ideal floor ln(1 + m e^(-2/T)) = "
        f"{s['ideal']:.3f}. 'best': one anchor direction optimised ({s['steps']} Adam steps).",
        "",
        "| class | batches | trained | at prototype | best | cos(anchor, proto) | cos(anchor, neg) | cos(proto, neg) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in report["summary"].items():
        cells = ["–" if row[q] is None else f"{row[q]:.3f}" for q in QUANTITIES]
        lines.append(f"| {name} | {row['batches']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_probe(workdir: epath.PathLike, *, checkpoint: str | int = "best", batches: int = 4, steps: int = 100,
              out: epath.PathLike | None = None, seed: int = 0) -> dict:
    """Measure the term and its floors on a trained run; write contrast_geometry.json and .md."""
    named = str(workdir)  # as the user wrote it: reports are committed, machine paths are not
    workdir = files.workdir_path(workdir)
    if not (isinstance(batches, int) and batches >= 1):
        raise ValueError(f"--batches must be an integer >= 1, got {batches!r}")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"--steps must be an integer >= 1, got {steps!r}")
    config, state, directory, step = variance.restore_contrastive_run(workdir, checkpoint)
    nets = build_networks(config)
    out = files.workdir_path(out) if out is not None else workdir / "contrast_geometry"
    class_names = ["background", *config.data.class_names]
    prepare = jax.jit(functools.partial(variance.contrast_inputs, config=config, nets=nets))
    geometry = make_geometry(config, nets, steps)

    streams = train.make_streams(config, registry.open_dataset(config))
    base_key = jax.random.key(seed)
    per_batch = []
    try:
        for b in range(batches):
            inputs_key, draw_key = jax.random.split(jax.random.fold_in(base_key, b))
            inputs = prepare(state, variance.next_batch(streams), inputs_key)
            record = jax.device_get(geometry(state.params, state.teacher, inputs, draw_key))
            per_batch.append({k: np.asarray(v).tolist() for k, v in record.items()})
    finally:
        streams.close()

    a = config.arco
    report = {
        "run": {"workdir": named, "checkpoint": directory, "step": step, "dataset": config.data.dataset,
                "sampler": a.sampler, "contrast_weight": config.loss_weights.contrast},
        "settings": {"batches": batches, "steps": steps, "seed": seed, "num_anchors": a.num_anchors,
                     "num_negatives": a.num_negatives, "temperature": a.temperature,
                     "chance": math.log1p(a.num_negatives),
                     "ideal": math.log1p(a.num_negatives * math.exp(-2.0 / a.temperature))},
        "classes": class_names,
        "summary": summarize(per_batch, class_names),
        "per_batch": per_batch,
    }
    files.write_report(out, "contrast_geometry", report, markdown_report(report))
    return report


def main(argv) -> None:
    f = cli.report_flags(argv)
    report = run_probe(f.workdir, checkpoint=f.checkpoint, batches=f.batches, steps=f.steps, out=f.out, seed=f.seed)
    print(markdown_report(report))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "A training workdir of an ARCO run.")
    flags.DEFINE_string("checkpoint", "best", "Which saved state: best, last or a step number.")
    flags.DEFINE_integer("batches", 4, "Training batches to average over.")
    flags.DEFINE_integer("steps", 100, "Adam steps of the best-direction search.")
    flags.DEFINE_string("out", None, "Output folder (default <workdir>/contrast_geometry).")
    flags.DEFINE_integer("seed", 0, "Seed of the augmentation and sampling keys.")
    flags.mark_flag_as_required("workdir")
    app.run(main)
