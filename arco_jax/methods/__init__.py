"""Training methods as plug-ins: the named presets `config.method` applies (presets.py) and the
code behind them, one module per method, each a `base.Method`:

    supervised    the labeled-only UNet                    config.method 'supervised'
    mean_teacher  SSL4MIS Mean Teacher                     config.method 'mean_teacher'
    arco          ARCO stage 2 (objective.py)              config.method 'arco_ns' | 'arco_sg' | 'arco_sag'
    relational    stage-1 relational pretraining           config.pretrain.steps > 0
                  (pretrain.py)

`stage_methods(config)` is what a run executes: {1: relational} when it has a stage 1, and
{2: the method config.method names}. 'custom' (any mix of loss weights) runs the method whose
terms are on: ARCO when an ARCO term is, else Mean Teacher when the consistency term is, else
the labeled-only baseline.

Adding a method is a module that builds a `Method` and one call:

    methods.register(Method(name="mine", stage=2, terms=("sup", "mine"), make_step=...,
                            init_state=...), preset={"loss_weights.consistency": 0.0})

after which `--config.method=mine` runs it (the preset's fields are set by
`apply_method(config, "mine")`, as for the built-in names).
"""
from __future__ import annotations

import importlib

import ml_collections

from arco_jax.methods.base import InitOutputs, Method, StepFn  # noqa: F401  (the interface)
from arco_jax.methods.presets import (ARCO_TERMS, ARCO_WEIGHTS, BASELINE_SUP_WEIGHT, CONFIG_STRING_KEYS,  # noqa: F401
                                      METHOD_NAMES, METHODS, UNLABELED_TERMS, VARIANT_NAMES, VARIANTS,
                                      apply_config_string, apply_method, apply_variant, get_field,
                                      method_conflicts, method_names, parse_config_string, set_field,
                                      variant_conflicts)

# Methods shipped with arco_jax, imported when first asked for ("module:attribute").
_BUILTIN = {
    "supervised": "arco_jax.methods.supervised:METHOD",
    "mean_teacher": "arco_jax.methods.mean_teacher:METHOD",
    "arco": "arco_jax.methods.arco:METHOD",
    "relational": "arco_jax.methods.relational:METHOD",
}
# config.method -> the method it runs ('custom' is decided by the loss weights).
_RUNS = {"supervised": "supervised", "mean_teacher": "mean_teacher", "arco_ns": "arco", "arco_sg": "arco",
         "arco_sag": "arco"}
_REGISTERED: dict[str, Method] = {}


def register(method: Method, *, preset: dict | None = None, replace: bool = False) -> Method:
    """Make `method` runnable: a stage-2 method as config.method = method.name, with `preset`
    (dotted config fields -> values) what `apply_method` sets for it. Stage 1 runs the method
    named 'relational': a stage-1 method replaces it with that name and replace=True."""
    if method.stage == 1 and method.name != "relational":
        raise ValueError(f"method {method.name!r}: stage 1 runs the method named 'relational'; register a "
                         "replacement under that name with replace=True")
    if not replace and (method.name in _BUILTIN or method.name in _REGISTERED or method.name in METHODS
                        or method.name == "custom"):
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTERED[method.name] = method
    if method.stage == 2:
        METHODS[method.name] = dict(preset or {})
        _RUNS[method.name] = method.name
    return method


def unregister(name: str) -> None:
    """Forget a registered method (tests register their own)."""
    _REGISTERED.pop(name, None)
    if _RUNS.get(name) == name and name not in _BUILTIN:
        _RUNS.pop(name)
        METHODS.pop(name, None)


def get(name: str) -> Method:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        raise ValueError(f"method {name!r} is not registered; known: {', '.join(sorted({*_BUILTIN, *_REGISTERED}))}")
    module, attribute = _BUILTIN[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def stage2_method_name(config: ml_collections.ConfigDict) -> str:
    """The method config.method runs in stage 2."""
    if config.method in _RUNS:
        return _RUNS[config.method]
    if config.method != "custom":
        raise ValueError(f"config.method: {config.method!r} is not one of {', '.join(map(repr, method_names()))}")
    w = config.loss_weights
    if any(w[t] > 0 for t in ARCO_TERMS):
        return "arco"
    return "mean_teacher" if w.consistency > 0 else "supervised"


def stage_methods(config: ml_collections.ConfigDict) -> dict[int, Method]:
    """{stage: Method} of a run, in the order they run."""
    stages = {1: get("relational")} if config.pretrain.steps > 0 else {}
    return {**stages, 2: get(stage2_method_name(config))}
