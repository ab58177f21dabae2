"""Which modules may import which: the shared pytrees (core.py) import no loss code; the loss
modules (objective.py: ARCO, pretrain.py: stage 1, consistency.py: Mean Teacher) import neither
each other's stage nor the state builders, the step machinery or the method registry; the state
builders import no loss code and no method module (they reach methods through the registry);
the trainer and the config checks name no dataset and no evaluator module."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "arco_jax"
LOSS_CODE = {"arco_jax.losses", "arco_jax.objective", "arco_jax.pretrain", "arco_jax.consistency",
             "arco_jax.sampling", "arco_jax.augment"}
METHOD_MODULES = {f"arco_jax.methods.{p.stem}" for p in (PACKAGE / "methods").glob("*.py")} - {
    "arco_jax.methods.__init__", "arco_jax.methods.base", "arco_jax.methods.presets"}
ABOVE_LOSSES = {"arco_jax.state", "arco_jax.step", "arco_jax.methods", "arco_jax.train"} | METHOD_MODULES


def imported_modules(name: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{name.replace('.', '/')}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {m for m in found if m.startswith("arco_jax")}


def test_every_builtin_method_has_a_module():
    assert METHOD_MODULES == {"arco_jax.methods.arco", "arco_jax.methods.mean_teacher",
                              "arco_jax.methods.relational", "arco_jax.methods.supervised"}


@pytest.mark.parametrize("module", ["core", "methods.base", "methods.presets"])
def test_the_shared_pytrees_and_the_interface_import_no_loss_code(module):
    assert not imported_modules(module) & (LOSS_CODE | ABOVE_LOSSES)


@pytest.mark.parametrize("stage, other", [("objective", "arco_jax.pretrain"), ("pretrain", "arco_jax.objective"),
                                          ("consistency", "arco_jax.objective")])
def test_loss_modules_import_no_other_stage_nor_anything_above_them(stage, other):
    assert not imported_modules(stage) & (ABOVE_LOSSES | {other})


@pytest.mark.parametrize("module", ["state", "step", "methods.__init__"])
def test_state_and_step_builders_import_no_loss_code_and_no_method_module(module):
    assert not imported_modules(module) & (LOSS_CODE | METHOD_MODULES)


@pytest.mark.parametrize("module", ["train", "config"])
def test_trainer_and_config_name_no_dataset_or_evaluator_module(module):
    named = {m for m in imported_modules(module)
             if m.startswith(("arco_jax.data.", "arco_jax.evaluators.")) and m not in (
                 "arco_jax.data.registry", "arco_jax.data.pipeline")}
    assert not named, named
    source = (PACKAGE / f"{module}.py").read_text()
    assert "'acdc'" not in source and '"acdc"' not in source and '"phantom"' not in source


def test_trainer_names_no_method_module():
    assert not imported_modules("train") & (METHOD_MODULES | LOSS_CODE)
