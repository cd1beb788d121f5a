"""The model-port layout: model folders import only the shared modules; old paths still import."""

import ast
import importlib
import pathlib
import warnings

import pytest

import cfgzero_theory

PACKAGE = pathlib.Path(cfgzero_theory.__file__).parent
MODEL_FOLDERS = sorted(p.name for p in PACKAGE.iterdir()
                       if p.is_dir() and (p / "__init__.py").exists() and p.name != "ports")


def _imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_model_folders_exist():
    assert {"sd3"} <= set(MODEL_FOLDERS)


@pytest.mark.parametrize("model", MODEL_FOLDERS)
def test_a_model_folder_never_imports_another(model):
    others = [m for m in MODEL_FOLDERS if m != model]
    for path in sorted((PACKAGE / model).glob("*.py")):
        for name in _imported_modules(path):
            parts = name.split(".")
            assert not (parts[0] == "cfgzero_theory" and len(parts) > 1 and parts[1] in others), (
                f"{path.relative_to(PACKAGE)} imports {name}: model folders import cfgzero_theory.ports, "
                "never another model folder")


def test_shared_modules_import_no_model_folder():
    for path in sorted((PACKAGE / "ports").glob("*.py")):
        for name in _imported_modules(path):
            parts = name.split(".")
            assert not (parts[0] == "cfgzero_theory" and len(parts) > 1 and parts[1] in MODEL_FOLDERS), (
                f"ports/{path.name} imports the model folder {name}")


@pytest.mark.parametrize("old, new", [
    ("cfgzero_theory.sd3.clip", "cfgzero_theory.ports.clip"),
    ("cfgzero_theory.sd3.t5", "cfgzero_theory.ports.t5"),
    ("cfgzero_theory.sd3.vae", "cfgzero_theory.ports.autoencoder"),
    ("cfgzero_theory.sd3.loading", "cfgzero_theory.ports.loading"),
    ("cfgzero_theory.sd3.sharding", "cfgzero_theory.ports.sharding"),
])
def test_moved_modules_still_import_with_a_warning(old, new):
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


@pytest.mark.parametrize("module, name, new", [
    ("cfgzero_theory.sd3.transformer", "QKNorm", "cfgzero_theory.ports.layers.Norm"),
    ("cfgzero_theory.sd3.transformer", "attention_implementation",
     "cfgzero_theory.ports.attention.attention_implementation"),
    ("cfgzero_theory.sd3.pipeline", "save_png", "cfgzero_theory.ports.pipeline_parts.save_png"),
    ("cfgzero_theory.sd3.pipeline", "to_uint8", "cfgzero_theory.ports.pipeline_parts.to_uint8"),
])
def test_moved_names_resolve_with_a_warning(module, name, new):
    target_module, target_name = new.rsplit(".", 1)
    with pytest.warns(DeprecationWarning, match=f"moved to {new}"):
        value = getattr(importlib.import_module(module), name)
    assert value is getattr(importlib.import_module(target_module), target_name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
            getattr(importlib.import_module(module), "nonexistent")
