"""Which loss terms move the network? Each weighted term's gradient on a trained ARCO run.

The samplers act only through the contrastive term, so what they can change is bounded by how
much that term steers training. This probe takes, for `batches` training batches, the train
step's own loss (objective.arco_loss with the step's labeled view and progress) and splits its
gradient into the terms' weighted gradients, per top-level parameter part (the segmenter, the
representation head, the anchor projector):

  python -m arco_jax.term_gradients --workdir=runs/acdc --checkpoint=best --batches=4

For each term: its value and weight; the norm of its weighted gradient in each part; its
share of the total gradient's norm there (its norm over the total's); and its cosine with the
total gradient (what the step applies; the terms' gradients sum to it). With SGD the update
is the learning rate times the momentum-averaged gradient, so a term whose weighted gradient
is a small share of the total and is near-orthogonal to it barely moves a part.

Writes <out>/term_gradients.json and .md; <out> defaults to <workdir>/term_gradients.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from arco_jax import cli, files, objective, train, variance
from arco_jax.data import registry
from arco_jax.state import build_networks, stage2_progress

QUANTITIES = ("norm", "share", "cosine")


def term_weights(config, metrics: dict) -> dict:
    """The weight the step gives each term: config.loss_weights, the Mean Teacher term's from
    its ramp (as arco_loss reports it in metrics)."""
    weights = {name: float(config.loss_weights[name]) for name in objective.TERMS}
    return {**weights, **({"consistency": metrics["consistency_weight"]} if "consistency_weight" in metrics else {})}


def active_terms(config) -> list[str]:
    return [name for name in objective.TERMS if config.loss_weights[name] > 0]


def _part_dot(a: dict, b: dict) -> dict:
    """{part: <a[part], b[part]>} over the top-level parameter parts."""
    return {part: optax.tree_utils.tree_vdot(a[part], b[part]) for part in a}


def make_term_gradients(config, nets):
    """jit(state, batch, key) -> per-term values and gradient statistics of the step's loss.

    Returns 'values' (T,) unweighted terms, 'weights' (T,), 'total' the weighted sum; per part
    'dot' (T,) <g_t, g_total>, 'sq' (T,) ||g_t||^2 and 'total_sq' ||g_total||^2, g_t being term
    t's weighted gradient, over the terms of `active_terms(config)`.
    """
    names = active_terms(config)
    if "contrast" not in names:
        raise ValueError(f"loss_weights.contrast is {config.loss_weights.contrast}: the run has no contrastive "
                         "term to weigh against the others")

    def weighted_terms(params, state, batch, key, progress):
        total, out = objective.arco_loss(params, state, batch, key, progress, config, nets)
        weights = term_weights(config, out.metrics)
        w = jnp.stack([jnp.asarray(weights[n], jnp.float32) for n in names])
        values = jnp.stack([out.terms[n] for n in names])
        return w * values, (values, w, total)

    @jax.jit
    def statistics(state, batch, key):
        batch = objective.labeled_view(config, nets, batch, key)
        progress = stage2_progress(config, state.step)
        _, pull, (values, weights, total) = jax.vjp(
            lambda p: weighted_terms(p, state, batch, key, progress), state.params, has_aux=True)
        per_term = jax.lax.map(lambda one_hot: pull(one_hot)[0], jnp.eye(len(names), dtype=jnp.float32))
        summed = jax.tree.map(lambda g: jnp.sum(g, axis=0), per_term)
        return {"values": values, "weights": weights, "total": total,
                "dot": jax.vmap(_part_dot, in_axes=(0, None))(per_term, summed),
                "sq": jax.vmap(lambda g: _part_dot(g, g))(per_term),
                "total_sq": _part_dot(summed, summed)}

    return names, statistics


def batch_record(stats: dict, names: Sequence[str]) -> dict:
    """Norms, shares and cosines of one batch, per term and part ('all': every parameter)."""
    parts = list(stats["sq"])
    sq = {p: np.asarray(stats["sq"][p], np.float64) for p in parts}
    dot = {p: np.asarray(stats["dot"][p], np.float64) for p in parts}
    total_sq = {p: float(stats["total_sq"][p]) for p in parts}
    sq["all"], dot["all"], total_sq["all"] = sum(sq.values()), sum(dot.values()), sum(total_sq.values())
    record = {"loss": float(stats["total"]), "total_norm": {p: float(np.sqrt(v)) for p, v in total_sq.items()},
              "terms": {}}
    for t, name in enumerate(names):
        row = {"value": float(stats["values"][t]), "weight": float(stats["weights"][t])}
        for p in sq:
            norm, total = float(np.sqrt(sq[p][t])), float(np.sqrt(total_sq[p]))
            row[p] = {"norm": norm, "share": norm / total if total > 0 else None,
                      "cosine": float(dot[p][t]) / (norm * total) if norm > 0 and total > 0 else None}
        record["terms"][name] = row
    return record


def summarize(per_batch: list[dict], names: Sequence[str]) -> dict:
    """The batch means of every quantity (a None, a zero gradient, counts as absent)."""
    parts = list(per_batch[0]["total_norm"])

    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    terms = {}
    for name in names:
        rows = [b["terms"][name] for b in per_batch]
        terms[name] = {"value": mean([r["value"] for r in rows]), "weight": mean([r["weight"] for r in rows]),
                       **{p: {q: mean([r[p][q] for r in rows]) for q in QUANTITIES} for p in parts}}
    return {"loss": mean([b["loss"] for b in per_batch]),
            "total_norm": {p: mean([b["total_norm"][p] for b in per_batch]) for p in parts}, "terms": terms}


def _fmt(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}" if abs(x) < 1e-2 and x != 0 else f"{x:.{digits}f}"


def markdown_report(report: dict) -> str:
    run, s = report["run"], report["summary"]
    parts = list(s["total_norm"])
    lines = [f"# Which terms move the network: {run['workdir']} ({run['checkpoint']}, step {run['step']})", "",
             f"{report['settings']['batches']} training batches, the train step's loss and gradient; g_t is term "
             "t's weighted gradient, g the step's (their sum). Share: ||g_t|| / ||g|| in the part; "
             "cosine: cos(g_t, g).", "",
             "| term | weight | value | " + " | ".join(f"{p}: share / cosine" for p in parts) + " |",
             "|---|---|---|" + "---|" * len(parts)]
    for name, row in s["terms"].items():
        cells = [f"{_fmt(row[p]['share'])} / {_fmt(row[p]['cosine'])}" for p in parts]
        lines.append(f"| {name} | {_fmt(row['weight'])} | {_fmt(row['value'])} | " + " | ".join(cells) + " |")
    lines += ["", "||g|| per part: " + ", ".join(f"{p} {_fmt(s['total_norm'][p])}" for p in parts) + "."]
    return "\n".join(lines) + "\n"


def run_probe(workdir: epath.PathLike, *, checkpoint: str | int = "best", batches: int = 4,
              out: epath.PathLike | None = None, seed: int = 0) -> dict:
    """Split the step's gradient by term on a trained run; write term_gradients.json and .md."""
    named = str(workdir)  # as the user wrote it: reports are committed, machine paths are not
    workdir = files.workdir_path(workdir)
    if not (isinstance(batches, int) and batches >= 1):
        raise ValueError(f"--batches must be an integer >= 1, got {batches!r}")
    config, state, directory, step = variance.restore_contrastive_run(workdir, checkpoint)
    nets = build_networks(config)
    names, statistics = make_term_gradients(config, nets)
    out = files.workdir_path(out) if out is not None else workdir / "term_gradients"

    streams = train.make_streams(config, registry.open_dataset(config))
    base_key = jax.random.key(seed)
    per_batch = []
    try:
        for b in range(batches):
            stats = jax.device_get(statistics(state, variance.next_batch(streams), jax.random.fold_in(base_key, b)))
            per_batch.append(batch_record(stats, names))
    finally:
        streams.close()

    report = {"run": {"workdir": named, "checkpoint": directory, "step": step, "dataset": config.data.dataset,
                      "method": config.method, "sampler": config.arco.sampler},
              "settings": {"batches": batches, "seed": seed, "terms": names},
              "summary": summarize(per_batch, names), "per_batch": per_batch}
    files.write_report(out, "term_gradients", report, markdown_report(report))
    return report


def main(argv) -> None:
    f = cli.report_flags(argv)
    print(markdown_report(run_probe(f.workdir, checkpoint=f.checkpoint, batches=f.batches, out=f.out, seed=f.seed)))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "A training workdir of an ARCO run.")
    flags.DEFINE_string("checkpoint", "best", "Which saved state: best, last or a step number.")
    flags.DEFINE_integer("batches", 4, "Training batches to average over.")
    flags.DEFINE_string("out", None, "Output folder (default <workdir>/term_gradients).")
    flags.DEFINE_integer("seed", 0, "Seed of the augmentation and sampling keys.")
    flags.mark_flag_as_required("workdir")
    app.run(main)
