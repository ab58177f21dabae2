"""Which modules may import which: the shared pytrees (core.py) import no loss code, and the two
stages' losses (objective.py, pretrain.py) import neither each other nor the state builders; the
trainer and the config checks name no dataset and no evaluator module."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "arco_jax"
LOSS_CODE = {"arco_jax.losses", "arco_jax.objective", "arco_jax.pretrain", "arco_jax.sampling", "arco_jax.augment"}


def imported_modules(name: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {m for m in found if m.startswith("arco_jax")}


def test_core_imports_no_loss_code():
    assert not imported_modules("core") & LOSS_CODE


@pytest.mark.parametrize("stage, others", [("objective", {"arco_jax.state", "arco_jax.pretrain"}),
                                           ("pretrain", {"arco_jax.state", "arco_jax.objective"})])
def test_stage_losses_do_not_import_each_other_or_the_state_builders(stage, others):
    assert not imported_modules(stage) & others


@pytest.mark.parametrize("module", ["train", "config"])
def test_trainer_and_config_name_no_dataset_or_evaluator_module(module):
    named = {m for m in imported_modules(module)
             if m.startswith(("arco_jax.data.", "arco_jax.evaluators.")) and m not in (
                 "arco_jax.data.registry", "arco_jax.data.pipeline")}
    assert not named, named
    source = (PACKAGE / f"{module}.py").read_text()
    assert "'acdc'" not in source and '"acdc"' not in source and '"phantom"' not in source
