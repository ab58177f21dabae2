"""Named presets: which method runs (`config.method`) and which reading of ARCO it follows
(`config.arco.variant`). The code each method runs is in the modules beside this one.

A *method* decides which loss terms run and, for ARCO, how anchors and negatives are sampled:
'supervised' (labeled images only), 'mean_teacher' (SSL4MIS Mean Teacher), 'arco_ns' (uniform
sampling, i.e. MONA), 'arco_sg' and 'arco_sag'. A *variant* decides how the pieces on which the
ARCO paper and its reference code disagree behave; each piece has its own switch, and 'paper' and
'code' set all of them at once (`VARIANTS`), while 'custom' leaves them as they are.

Both names are checked against the switches they imply (`method_conflicts`,
`variant_conflicts`, called by `config.validate`), so a name can never describe a run that did
something else: `--config.arco.variant=code` alone fails, naming the first switch to change.
Within a method the magnitude of a term's weight is free, and a weight of 0 is an ablation of
that method; turning on a term the method does not have, or another sampler, needs
method='custom'.

Experiment files take a config string, the text after ':' in `--config=configs/acdc.py:...`:

    config_string := '' | setting (',' setting)*
    setting       := key '=' value        (spaces around tokens are ignored)
    key           := 'method' | 'variant' (each at most once)

for instance `--config=configs/acdc.py:variant=code,method=arco_sag`.
"""
from __future__ import annotations

import ml_collections

# Every switch on which the paper and the reference code differ, and its value in each.
VARIANTS: dict[str, dict[str, object]] = {
    "paper": {
        "arco.strata": "spatial",  # strata: a grid over the image, per class
        "arco.negatives": "other_classes",  # negatives of class c: representations of other classes
        "arco.nn_gradient": "active",  # the ablation treats L_nn as a trained term
        "arco.warp_pseudo_labels": True,  # labels follow the geometric augmentation of their image
        "data.one_patient_split": "whole",  # '1 labeled patient' = both frames of one patient
    },
    "code": {
        "arco.strata": "index",  # strata: blocks of the candidate list
        "arco.negatives": "reference",  # U2PL-style bank masks: the bank stays (almost) empty
        "arco.nn_gradient": "reference",  # L_nn reported, no gradient
        "arco.warp_pseudo_labels": False,  # the strong view's warp moves the image only
        "data.one_patient_split": "reference",  # 23 slices
    },
}
VARIANT_NAMES = (*VARIANTS, "custom")

ARCO_TERMS = ("unsup", "contrast", "eqv", "nn")  # the unlabeled terms only ARCO computes
UNLABELED_TERMS = ARCO_TERMS + ("consistency",)
ARCO_WEIGHTS = {"sup": 1.0, "unsup": 1.0, "contrast": 0.01, "eqv": 1.0, "nn": 1.0, "consistency": 0.0}
# SSL4MIS trains its baselines on 0.5 (CE + Dice); consistency 0.1, ramped over the whole run
# (200 'epochs' of 150 iterations = 30000 of 30000) after 1000 iterations without it.
BASELINE_SUP_WEIGHT = 0.5
_OFF = {term: 0.0 for term in UNLABELED_TERMS}

METHODS: dict[str, dict[str, object]] = {
    "supervised": {**{f"loss_weights.{t}": v for t, v in _OFF.items()},
                   "loss_weights.sup": BASELINE_SUP_WEIGHT, "pretrain.steps": 0},
    "mean_teacher": {**{f"loss_weights.{t}": v for t, v in _OFF.items()},
                     "loss_weights.sup": BASELINE_SUP_WEIGHT, "loss_weights.consistency": 0.1,
                     "arco.consistency_rampup": 1.0, "arco.consistency_delay": 1000 / 30000,
                     "arco.consistency_noise": 0.1, "arco.ema_warmup": True, "pretrain.steps": 0},
    **{name: {**{f"loss_weights.{t}": v for t, v in ARCO_WEIGHTS.items()}, "arco.sampler": sampler}
       for name, sampler in (("arco_ns", "uniform"), ("arco_sg", "sg"), ("arco_sag", "sag"))},
}
METHOD_NAMES = (*METHODS, "custom")  # the built-in names; method_names() adds registered methods


def method_names() -> tuple[str, ...]:
    """Every name config.method accepts: the presets above, registered methods, 'custom'."""
    return (*METHODS, "custom")

# What a method name promises about the run: terms that must be off, terms that must be on,
# and the sampler (None: any).
_METHOD_RULES: dict[str, tuple[tuple[str, ...], tuple[str, ...], str | None]] = {
    "supervised": (UNLABELED_TERMS, (), None),
    "mean_teacher": (ARCO_TERMS, ("consistency",), None),
    "arco_ns": (("consistency",), (), "uniform"),
    "arco_sg": (("consistency",), (), "sg"),
    "arco_sag": (("consistency",), (), "sag"),
}


def get_field(config: ml_collections.ConfigDict, dotted: str):
    """config['a.b.c'] for a dotted path."""
    node = config
    for name in dotted.split("."):
        node = node[name]
    return node


def set_field(config: ml_collections.ConfigDict, dotted: str, value) -> None:
    """Set a dotted path of config to value."""
    *parents, leaf = dotted.split(".")
    node = config
    for name in parents:
        node = node[name]
    node[leaf] = value


def apply_variant(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """Set config.arco.variant and, for 'paper' and 'code', every switch of that preset."""
    if name not in VARIANT_NAMES:
        raise ValueError(f"variant {name!r} is not one of {', '.join(map(repr, VARIANT_NAMES))}")
    for field, value in VARIANTS.get(name, {}).items():
        if _applies(config, field):
            set_field(config, field, value)
    config.arco.variant = name
    return config


def _applies(config: ml_collections.ConfigDict, field: str) -> bool:
    """A variant's data switch (data.one_patient_split) concerns the datasets that have it."""
    return not field.startswith("data.") or field.split(".", 1)[1] in config.data


def apply_method(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """Set config.method and the loss weights, sampler and schedule fields of that preset."""
    if name not in method_names():
        raise ValueError(f"method {name!r} is not one of {', '.join(map(repr, method_names()))}")
    for field, value in METHODS.get(name, {}).items():
        set_field(config, field, value)
    config.method = name
    return config


def variant_conflicts(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    """(field, problem) for every switch that differs from the named variant's preset."""
    name = config.arco.variant
    return [(field, f"{get_field(config, field)!r} contradicts arco.variant {name!r}, which sets {value!r}; "
                    f"apply the whole preset (--config=configs/<file>.py:variant={name}) or set "
                    f"arco.variant='custom' to mix switches")
            for field, value in VARIANTS.get(name, {}).items()
            if _applies(config, field) and get_field(config, field) != value]


def method_conflicts(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    """(field, problem) for every loss weight or sampler the named method does not allow."""
    name = config.method
    if name not in _METHOD_RULES:
        return []
    off, on, sampler = _METHOD_RULES[name]
    advice = (f"apply the whole preset (--config=configs/<file>.py:method={name}) or set "
              f"method='custom'")
    problems = [(f"loss_weights.{t}", f"{config.loss_weights[t]!r} contradicts method {name!r}, which "
                                      f"has no {t} term (weight 0); {advice}")
                for t in off if config.loss_weights[t] != 0]
    problems += [(f"loss_weights.{t}", f"{config.loss_weights[t]!r} contradicts method {name!r}, which "
                                       f"needs a {t} term (weight > 0); {advice}")
                 for t in on if not config.loss_weights[t] > 0]
    if sampler is not None and config.arco.sampler != sampler:
        problems.append(("arco.sampler", f"{config.arco.sampler!r} contradicts method {name!r}, which "
                                         f"sets {sampler!r}; {advice}"))
    return problems


CONFIG_STRING_KEYS = {"method": apply_method, "variant": apply_variant}


def parse_config_string(text: str | None) -> dict[str, str]:
    """'variant=code,method=arco_sag' -> {'variant': 'code', 'method': 'arco_sag'} (grammar in
    the module docstring); a bad token raises ValueError naming it."""
    settings: dict[str, str] = {}
    if text is None or not text.strip():
        return settings
    for token in text.split(","):
        key, sep, value = (part.strip() for part in token.partition("="))
        where = f"config string {text!r}, token {token.strip()!r}"
        if not sep or not key or not value:
            raise ValueError(f"{where}: expected key=value with key in {', '.join(CONFIG_STRING_KEYS)}")
        if key not in CONFIG_STRING_KEYS:
            raise ValueError(f"{where}: unknown key {key!r}; known: {', '.join(CONFIG_STRING_KEYS)}")
        if key in settings:
            raise ValueError(f"{where}: {key!r} is given twice")
        names = method_names() if key == "method" else VARIANT_NAMES
        if value not in names:
            raise ValueError(f"{where}: {value!r} is not one of {', '.join(map(repr, names))}")
        settings[key] = value
    return settings


def apply_config_string(config: ml_collections.ConfigDict, text: str | None) -> ml_collections.ConfigDict:
    """Apply the presets a config string names (see the module docstring); returns config."""
    for key, value in parse_config_string(text).items():
        CONFIG_STRING_KEYS[key](config, value)
    return config
