"""The interface every training method implements (ARCO, stage-1 relational pretraining, Mean
Teacher, the labeled-only baseline, and any method a user registers).

A method owns three things and nothing else: its loss terms, its modules beyond the segmenter
and representation head (`Networks.methods[name]`), and its part of the train state
(`TrainState.methods[name]`). The trainer runs a stage's method through `make_step` alone, so
a new method is a new module plus `methods.register`, never an edit of train.py or state.py.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_collections
import optax

from arco_jax.core import Batch, Networks, TrainState

StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict]]


class InitOutputs(NamedTuple):
    """What a method's state may be shaped by: the student's initial parameters
    ({'segmenter', 'head', 'projector'}) and the segmenter's outputs on a one-image dummy batch."""

    params: dict
    logits: jax.Array
    features: tuple


def _nothing(*_args) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Method:
    """One training method.

    name: its key in Networks.methods and TrainState.methods.
    stage: 1, a pretraining method that runs for config.pretrain.steps before stage 2; or 2.
    terms: the loss terms its step reports as metrics `loss_<term>` (unweighted) and guards.
    make_step: (config, nets, tx) -> step(state, batch) -> (state, metrics), a pure function the
      trainer jits with donation. `tx` is the optimizer of TrainState.opt_state (stage 2's); a
      method with an optimizer of its own keeps its state in its part of the train state.
      The step must call `step.guarded` so a non-finite term freezes the state.
    networks: config -> its own modules (None: it has none).
    init_state: (config, nets, InitOutputs, key) -> its part of the train state (None: none).
    finish: state -> state, applied once right after the stage's last step (stage 1 hands its
      student over to stage 2's teacher there); None for nothing.
    """

    name: str
    stage: int
    terms: tuple[str, ...]
    make_step: Callable[[ml_collections.ConfigDict, Networks, optax.GradientTransformation], StepFn]
    networks: Callable[[ml_collections.ConfigDict], Any] = _nothing
    init_state: Callable[[ml_collections.ConfigDict, Networks, InitOutputs, jax.Array], Any] = _nothing
    finish: Callable[[TrainState], TrainState] | None = None

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise ValueError(f"method {self.name!r}: stage must be 1 or 2, got {self.stage!r}")
        if "sup" not in self.terms:
            raise ValueError(f"method {self.name!r}: its terms {self.terms} lack 'sup' (every stage trains the "
                             "segmenter on the labeled images)")
