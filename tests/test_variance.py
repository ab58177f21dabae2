"""The variance study: on a synthetic population with known structure, stratified sampling
estimates a class mean with less variance than uniform sampling at the same n, and without
bias; the command end to end on a tiny trained run; bad arguments."""
import functools
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from arco_jax import contrast_geometry, inference, objective, sampling, term_gradients, train, variance
from arco_jax.data import registry
from arco_jax.state import build_networks, stage2_progress

import tiny

REPO = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------- synthetic population

SHAPE = (4, 64, 64)  # a batch of 4 images
NUM_SAMPLES = 32
NUM_DRAWS = 2000
ESTIMATORS = [("uniform", "index"), ("sg", "index"), ("sg", "spatial"), ("sag", "index"), ("sag", "spatial")]


def population():
    """Per-pixel 'losses': a smooth field that varies across each image and between images,
    plus a little noise; a rare class is a disc of radius 5 (81 pixels) at a different place
    in each image, the common class is everything else."""
    b, y, x = np.meshgrid(*(np.arange(s) for s in SHAPE), indexing="ij")
    noise = np.random.default_rng(0).normal(size=SHAPE)
    values = np.sin(y / 9.0 + b) + np.cos(x / 11.0) + 0.5 * b + 0.1 * noise
    centre_y = np.array([20, 40, 30, 44])[:, None, None]
    centre_x = np.array([24, 36, 44, 20])[:, None, None]
    rare = (y - centre_y) ** 2 + (x - centre_x) ** 2 <= 25
    return values.reshape(-1), {"common": ~rare, "rare": rare}


@functools.lru_cache(maxsize=None)
def _sample_many(method: str, layout: str):
    draw = lambda key, mask: sampling.sample(key, mask, NUM_SAMPLES, method=method, layout=layout)  # noqa: E731
    return jax.jit(jax.vmap(draw, in_axes=(0, None)))


@pytest.fixture(scope="module")
def sample_means():
    """{class: {(method, layout): (NUM_DRAWS,) sample means}} and the true class means."""
    values, masks = population()
    keys = jax.random.split(jax.random.key(0), NUM_DRAWS)
    means = {cls: {est: values[np.asarray(_sample_many(*est)(keys, jnp.asarray(mask))[0])].mean(axis=1)
                   for est in ESTIMATORS} for cls, mask in masks.items()}
    truth = {cls: values[mask.reshape(-1)].mean() for cls, mask in masks.items()}
    return means, truth


@pytest.mark.parametrize("cls", ["common", "rare"])
def test_stratified_sample_means_are_unbiased(sample_means, cls):
    means, truth = sample_means
    for est, m in means[cls].items():
        standard_error = m.std() / np.sqrt(m.size)
        assert abs(m.mean() - truth[cls]) < 4 * standard_error, (cls, est, m.mean(), truth[cls])


def test_stratification_lowers_the_variance_most_for_the_rare_class(sample_means):
    means, _ = sample_means
    ratio = {cls: {est: m.var() / by_est[("uniform", "index")].var() for est, m in by_est.items()}
             for cls, by_est in means.items()}
    for est in ESTIMATORS[1:]:
        # Both layouts split the common class's smooth field into strata with distinct means.
        assert ratio["common"][est] < 0.85, (est, ratio["common"][est])
        # The disc's values differ mostly between images; index blocks (image-major ranks) and
        # spatial cells (one disc per image, at different places) both separate the images,
        # so most of the rare class's variance goes away.
        assert ratio["rare"][est] < 0.4, (est, ratio["rare"][est])
        assert ratio["rare"][est] < ratio["common"][est], est
    # Antithetic pairs cancel the linear trend inside each stratum on top of stratifying.
    for cls in means:
        for layout in sampling.LAYOUTS:
            assert ratio[cls][("sag", layout)] < ratio[cls][("sg", layout)], (cls, layout)


# ----------------------------------------------------------------------------- pieces

def test_estimators_are_uniform_then_every_stratified_sampler_and_layout():
    names = [e.name for e in variance.estimators_for(["sag", "uniform", "sg"], ["spatial", "index"])]
    assert names == ["uniform", "sag/spatial", "sag/index", "sg/spatial", "sg/index"]
    assert [e.name for e in variance.estimators_for(["uniform"], [])] == ["uniform"]


def test_welford_matches_the_two_pass_variance():
    rng = np.random.default_rng(0)
    samples = [{"a": {"w": rng.normal(size=(3, 4))}, "b": {"w": rng.normal(size=5) + 10.0}} for _ in range(7)]
    carry = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, samples[0]), {"a": jnp.zeros(()), "b": jnp.zeros(())})
    for sample in samples:
        carry = variance.welford_update(carry, jax.tree.map(jnp.asarray, sample))
    count, mean, m2 = carry
    assert float(count) == 7
    for part in ("a", "b"):
        stacked = np.stack([x[part]["w"] for x in samples])
        np.testing.assert_allclose(mean[part]["w"], stacked.mean(0), rtol=1e-5)
        np.testing.assert_allclose(float(m2[part]), ((stacked - stacked.mean(0)) ** 2).sum(), rtol=1e-4)


# ----------------------------------------------------------------------------- the command

def tiny_config(cache_dir: Path):
    """tests/tiny.py's setting with a narrow UNet, two steps, the supervised and contrastive
    terms only."""
    c = tiny.tiny_config(cache_dir, steps=2, every=2, narrow=True)
    for term in ("unsup", "eqv", "nn"):
        c.loss_weights[term] = 0.0
    c.loss_weights.contrast = 0.1
    return c


BATCHES, DRAWS = 2, 6
STUDIED = ["uniform", "sag/spatial"]  # sag/spatial runs the most sampler machinery


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = tiny_config(tmp_path_factory.mktemp("phantom_cache"))
    train.train_and_evaluate(config, workdir)
    out = workdir / "study"
    completed = subprocess.run(
        [sys.executable, "-m", "arco_jax.variance", f"--workdir={workdir}", "--checkpoint=last",
         f"--batches={BATCHES}", f"--draws={DRAWS}", "--samplers=uniform,sag", "--strata=spatial",
         f"--out={out}"],
        cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((out / "variance.json").read_text())
    return types.SimpleNamespace(config=config, workdir=workdir, out=out, report=report, stdout=completed.stdout)


def test_report_covers_the_estimators_batches_and_classes(study):
    r = study.report
    assert r["estimators"] == STUDIED
    assert r["classes"] == ["background", "RV", "Myo", "LV"]
    assert r["run"]["checkpoint"] == "last" and r["run"]["step"] == 2
    assert r["settings"]["batches"] == BATCHES and r["settings"]["draws"] == DRAWS
    assert r["settings"]["num_anchors"] == 8 and r["settings"]["num_negatives"] == 4
    assert [b["batch"] for b in r["per_batch"]] == list(range(BATCHES))
    for b in r["per_batch"]:
        assert set(b["estimators"]) == set(STUDIED)
        # Which classes have a term depends on the batch, never on the sampler.
        counted = {name: set(e["per_class"]) for name, e in b["estimators"].items()}
        assert len({frozenset(c) for c in counted.values()}) == 1
        for cls in counted["uniform"]:
            assert b["anchor_candidates"][cls] > 0


def test_summary_is_the_batch_average_and_ratios_are_against_uniform(study):
    r = study.report
    summary, batches = r["summary"], r["per_batch"]
    for name in STUDIED:
        s = summary[name]
        rows = [b["estimators"][name] for b in batches]
        assert s["loss_mean"] == pytest.approx(np.mean([row["loss_mean"] for row in rows]))
        assert s["loss_var"] == pytest.approx(np.mean([row["loss_var"] for row in rows]))
        assert s["grad_var"] == pytest.approx(np.mean([row["grad_var"] for row in rows]))
        assert s["grad_var"] == pytest.approx(sum(s["grad_var_parts"].values()))
        assert s["loss_var"] > 0 and s["grad_var"] > 0 and s["grad_mean_sq"] > 0
        assert s["grad_rel_var"] == pytest.approx(s["grad_var"] / s["grad_mean_sq"])
        assert s["loss_var_ratio"] == pytest.approx(s["loss_var"] / summary["uniform"]["loss_var"])
        assert s["grad_var_ratio"] == pytest.approx(s["grad_var"] / summary["uniform"]["grad_var"])
        for cls, v in s["per_class"].items():
            per_batch = [row["per_class"][cls]["var"] for row in rows if cls in row["per_class"]]
            assert v["batches"] == len(per_batch) > 0
            assert v["var"] == pytest.approx(np.mean(per_batch))
            assert v["var_ratio"] == pytest.approx(v["var"] / summary["uniform"]["per_class"][cls]["var"])
    assert summary["uniform"]["loss_var_ratio"] == 1.0 and summary["uniform"]["loss_mean_shift_z"] == 0.0


def test_the_command_reports_progress_per_batch_and_estimator(study):
    lines = [line for line in study.stdout.splitlines() if line.startswith("batch ")]
    assert [line.split(" draws")[0] for line in lines] == [
        f"batch {b}/{BATCHES}, {name}: {DRAWS}" for b in range(1, BATCHES + 1) for name in STUDIED]


def test_markdown_tables_show_the_json_numbers(study):
    text = (study.out / "variance.md").read_text()
    assert text == variance.markdown_report(study.report)
    assert text in study.stdout
    summary = study.report["summary"]
    for name in STUDIED:
        s = summary[name]
        row = re.search(rf"^\| {re.escape(name)} \| ([^|]+) \| [^|]+ \| ([^|]+) \|", text, re.MULTILINE)
        assert row, name
        assert float(row.group(1)) == pytest.approx(s["loss_mean"], abs=1e-4)
        assert float(row.group(2)) == pytest.approx(s["loss_var_ratio"], rel=1e-2)
    assert re.search(r"^\| Class \| Anchor candidates \| Batches \| Var \(uniform\) \| sag/spatial \|$",
                     text, re.MULTILINE)
    for cls in study.report["classes"]:
        assert re.search(rf"^\| {cls} \|", text, re.MULTILINE), cls


def test_plot_shows_the_summary_ratios(study, tmp_path):
    with Image.open(study.out / "variance.png") as image:
        assert image.format == "PNG" and image.width > 200 and image.height > 200
    groups, names, ratios = variance.ratio_table(study.report)
    assert names == STUDIED[1:] and groups[:2] == ["loss", "gradient"]
    assert groups[2:] == study.report["classes"]
    summary = study.report["summary"]
    for e, name in enumerate(names):
        assert ratios[0, e] == pytest.approx(summary[name]["loss_var_ratio"])
        assert ratios[1, e] == pytest.approx(summary[name]["grad_var_ratio"])
    np.testing.assert_array_equal(variance.plot_ratios(study.report, tmp_path / "again.png"), ratios)


# ----------------------------------------------------------------------------- bad input

def test_uniform_is_required_as_the_baseline(tmp_path):
    with pytest.raises(ValueError, match="must include 'uniform'"):
        variance.run_study(tmp_path, samplers=["sg", "sag"])


@pytest.mark.parametrize("kwargs, message", [
    ({"samplers": ["uniform", "stratified"]}, "'stratified' is not one of"),
    ({"strata": ["grid"]}, "'grid' is not one of"),
    ({"draws": 1}, "--draws must be an integer >= 2"),
    ({"batches": 0}, "--batches must be an integer >= 1"),
])
def test_bad_arguments_name_the_flag(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        variance.run_study(tmp_path, **kwargs)


def test_missing_run_files_are_named(tmp_path, study):
    with pytest.raises(inference.WorkdirError, match=re.escape(str(tmp_path / "config.json"))):
        variance.run_study(tmp_path)
    (tmp_path / "config.json").write_text((study.workdir / "config.json").read_text())
    with pytest.raises(inference.WorkdirError, match=re.escape(str(tmp_path / "checkpoints" / "best"))):
        variance.run_study(tmp_path)


# ----------------------------------------------------------------------------- the contrast floor probe

def test_best_direction_finds_the_analytic_optimum():
    """Positive e1, every negative at e2: the best anchor is (e1 - e2) / sqrt 2, whose logit gap
    is sqrt 2 / T, so the floor is ln(1 + m exp(-sqrt 2 / T)); the prototype itself gets 1 / T."""
    m, temperature = 8, 0.5
    prototype = jnp.array([2.0, 0.0, 0.0])  # not normalised: the term normalises it
    negatives = jnp.broadcast_to(jnp.array([0.0, 1.0, 0.0]), (3, m, 3))
    at_prototype, best = (float(v) for v in contrast_geometry.best_direction_loss(prototype, negatives, temperature,
                                                                                  steps=300))
    assert best == pytest.approx(np.log1p(m * np.exp(-np.sqrt(2) / temperature)), abs=1e-3)
    assert best < np.log1p(m * np.exp(-1 / temperature))
    assert at_prototype == pytest.approx(np.log1p(m * np.exp(-1 / temperature)), rel=1e-5)


@pytest.fixture(scope="module")
def geometry(study, tmp_path_factory):
    """The probe on the study's run, named relative to the working directory as a user would."""
    out = tmp_path_factory.mktemp("geometry")
    cwd = os.getcwd()
    os.chdir(study.workdir.parent)
    try:
        report = contrast_geometry.run_probe(Path(study.workdir.name), checkpoint="last", batches=BATCHES, steps=20,
                                             out=out)
    finally:
        os.chdir(cwd)
    return report, out


def test_trained_term_is_the_train_steps_class_term(study, geometry):
    """'trained' is objective.per_class_contrast's class term for the same inputs and key, the
    floors are ordered (ideal <= best <= at_prototype) and the cosines are cosines."""
    report, out = geometry
    config, state, _, _ = variance.restore_run(study.workdir, "last")
    nets = build_networks(config)
    streams = train.make_streams(config, registry.open_dataset(config))
    try:
        inputs_key, draw_key = jax.random.split(jax.random.fold_in(jax.random.key(0), 0))
        inputs = variance.contrast_inputs(state, variance.next_batch(streams), inputs_key, config, nets)
    finally:
        streams.close()
    fwd = objective.Forward(config, nets, state.params, state.teacher, {})
    per_class, counted, _ = objective.per_class_contrast(
        draw_key, fwd, objective.head_inputs(fwd, "student", inputs.features), inputs.teacher, inputs.labels,
        inputs.teacher_probs, inputs.low, inputs.bank)
    first = report["per_batch"][0]
    assert first["counted"] == np.asarray(counted).tolist() and any(first["counted"])
    np.testing.assert_allclose(first["trained"], np.asarray(per_class), rtol=1e-4, atol=1e-5)
    assert report["run"]["workdir"] == study.workdir.name  # committed reports carry no machine paths
    s = report["settings"]
    for b in report["per_batch"]:
        for c, on in enumerate(b["counted"]):
            if on:
                assert s["ideal"] - 1e-4 <= b["best"][c] <= b["at_prototype"][c] + 1e-5
                assert -1 <= b["cos_anchor_negative"][c] <= 1 and -1 <= b["cos_prototype_negative"][c] <= 1
    assert s["chance"] == pytest.approx(np.log1p(config.arco.num_negatives))
    text = (out / "contrast_geometry.md").read_text()
    for name, row in report["summary"].items():
        if row["batches"]:
            assert f"| {name} | {row['batches']} | {row['trained']:.3f} | {row['at_prototype']:.3f} | " in text
    assert json.loads((out / "contrast_geometry.json").read_text())["summary"] == report["summary"]


@pytest.mark.parametrize("kwargs, message", [({"batches": 0}, "--batches must be an integer >= 1"),
                                             ({"steps": 0}, "--steps must be an integer >= 1")])
def test_probe_bad_arguments_name_the_flag(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        contrast_geometry.run_probe(tmp_path, **kwargs)


# ----------------------------------------------------------------------------- the term-gradient probe

@pytest.fixture(scope="module")
def gradients(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("term_gradients")
    return term_gradients.run_probe(study.workdir, checkpoint="last", batches=BATCHES, out=out), out


def test_term_gradients_split_the_steps_gradient(study, gradients):
    """The weighted terms' gradients sum to the gradient the step takes: the first batch's
    total norm per part is that of jax.grad of objective.arco_loss for the same batch and key;
    shares times cosines add up to 1 in every part; the supervised term never reaches the
    anchor projector, so there the contrastive term is the whole gradient."""
    report, out = gradients
    assert report["settings"]["terms"] == ["sup", "contrast"]
    config, state, _, _ = variance.restore_run(study.workdir, "last")
    nets = build_networks(config)
    streams = train.make_streams(config, registry.open_dataset(config))
    try:
        batch = variance.next_batch(streams)
    finally:
        streams.close()
    key = jax.random.fold_in(jax.random.key(0), 0)
    progress = stage2_progress(config, state.step)
    step_gradient = jax.jit(lambda *args: jax.value_and_grad(objective.arco_loss, has_aux=True)(*args, config, nets))
    (total, out_terms), grads = step_gradient(state.params, state, batch, key, progress)
    first = report["per_batch"][0]
    assert first["loss"] == pytest.approx(float(total), rel=1e-5)
    for name in ("sup", "contrast"):
        assert first["terms"][name]["value"] == pytest.approx(float(out_terms.terms[name]), rel=1e-5)
    for part, tree in grads.items():
        norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in jax.tree.leaves(tree))))
        assert first["total_norm"][part] == pytest.approx(norm, rel=1e-4)
    for b in report["per_batch"]:
        for part in b["total_norm"]:
            rows = [b["terms"][n][part] for n in ("sup", "contrast")]
            assert sum(r["share"] * r["cosine"] for r in rows if r["norm"] > 0) == pytest.approx(1.0, abs=1e-4)
        assert b["terms"]["sup"]["projector"]["norm"] == 0.0
        assert b["terms"]["contrast"]["projector"]["cosine"] == pytest.approx(1.0, abs=1e-5)
        assert b["terms"]["contrast"]["weight"] == pytest.approx(0.1)
    text = (out / "term_gradients.md").read_text()
    row = report["summary"]["terms"]["contrast"]
    assert f"| contrast | 0.100 | {row['value']:.3f} | " in text
    assert json.loads((out / "term_gradients.json").read_text())["summary"] == report["summary"]


def test_term_gradients_need_a_contrastive_term_and_name_bad_flags(study, tmp_path):
    with pytest.raises(ValueError, match=re.escape("--batches must be an integer >= 1")):
        term_gradients.run_probe(study.workdir, batches=0)
    config = tiny_config(tmp_path)
    config.loss_weights.contrast = 0.0
    with pytest.raises(ValueError, match="loss_weights.contrast is 0.0: the run has no contrastive term"):
        term_gradients.make_term_gradients(config, build_networks(config))
