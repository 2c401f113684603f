"""Public names are declared: every module under ``scripts/`` has ``__all__``, and what others use is in it.

A name is *used* when another module of ``scripts/`` imports it (``from scripts.x import Y``, a relative
import, or ``module.Y`` on an imported module), a test imports it, or a config names it (``_target_:
scripts.x.Y``, ``$scripts.x.Y``, ``$from scripts.x import Y``). Every used name must be in its module's
``__all__`` and every name in ``__all__`` must exist there. No module under ``scripts/`` imports another
module's private (``_``) names; tests may, where they test a private helper on purpose.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BUNDLE_ROOT


def _dotted(path: Path) -> str:
    parts = path.relative_to(BUNDLE_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_dotted(path): path for path in sorted((BUNDLE_ROOT / "scripts").rglob("*.py"))}
TESTS = sorted((BUNDLE_ROOT / "tests").rglob("*.py"))
CONFIGS = sorted((BUNDLE_ROOT / "configs").rglob("*.yaml"))


def _rel(path: Path) -> str:
    return str(path.relative_to(BUNDLE_ROOT))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _declared(path: Path) -> list[str] | None:
    """The module's ``__all__`` (None when it has none)."""
    for node in _tree(path).body:
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign)
            else []
        )
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            return list(ast.literal_eval(node.value))
    return None


def _defined(path: Path) -> set[str]:
    """Names bound at the module's top level (definitions, assignments and imports)."""
    names: set[str] = set()
    for node in _tree(path).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


def _imported(path: Path, attributes: bool) -> Iterator[tuple[str, str]]:
    """``(module, name)`` for each name ``path`` takes from a module of ``scripts``; ``attributes``: also
    ``module.name`` on a module it imported."""
    here = _dotted(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    tree = _tree(path)
    modules: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join([*base, node.module] if node.module else base)
            if source not in MODULES:
                continue
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES:
                    modules[alias.asname or alias.name] = f"{source}.{alias.name}"
                else:
                    yield source, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES and alias.asname:
                    modules[alias.asname] = alias.name
                elif alias.name in MODULES:
                    modules["scripts"] = "scripts"  # import scripts.x.y binds scripts
    if attributes:
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                yield from _attribute_use(node, modules)


def _attribute_use(node: ast.Attribute, modules: dict[str, str]) -> Iterator[tuple[str, str]]:
    """``(module, name)`` for ``alias.sub.name`` where ``alias`` is an imported module of ``scripts``."""
    chain = []
    while isinstance(node, ast.Attribute):
        chain.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in modules:
        return
    module = modules[node.id]
    for name in reversed(chain):
        if f"{module}.{name}" not in MODULES:
            yield module, name
            return
        module = f"{module}.{name}"


def _config_names(path: Path) -> Iterator[tuple[str, str]]:
    """``(module, name)`` for each name a config takes from ``scripts``.

    Both ``scripts.x.Y`` (``_target_``, ``$scripts.x.Y(...)``) and ``$from scripts.x import Y``.
    """
    text = path.read_text()
    for match in re.finditer(r"from (scripts(?:\.\w+)*) import ([\w, ]+)", text):
        yield from ((match.group(1), name.strip()) for name in match.group(2).split(","))
    for match in re.finditer(r"(?<![\w.])(scripts(?:\.\w+)+)", text):
        module, _, name = match.group(1).rpartition(".")
        if module in MODULES and match.group(1) not in MODULES:
            yield module, name


def _uses() -> Iterator[tuple[str, str, str]]:
    """``(module, name, user)`` for every use of a module's name by another file."""
    for path in MODULES.values():
        yield from ((m, n, _rel(path)) for m, n in _imported(path, attributes=True) if m != _dotted(path))
    for path in TESTS:
        yield from ((m, n, _rel(path)) for m, n in _imported(path, attributes=False) if not n.startswith("_"))
    for path in CONFIGS:
        yield from ((m, n, _rel(path)) for m, n in _config_names(path))


@pytest.mark.parametrize("module", MODULES)
def test_every_module_declares_its_public_names_and_they_exist(module):
    declared = _declared(MODULES[module])
    assert declared is not None, f"{MODULES[module]} has no __all__"
    assert len(declared) == len(set(declared)), f"{module}.__all__ repeats a name"
    missing = set(declared) - _defined(MODULES[module])
    assert not missing, f"{module}.__all__ names {sorted(missing)}, which the module does not define"


def test_every_name_used_elsewhere_is_in_its_module_s_all():
    undeclared = sorted(
        {
            f"{module}.{name} (used by {user})"
            for module, name, user in _uses()
            if name not in (_declared(MODULES[module]) or [])
        }
    )
    assert not undeclared, "not in __all__: " + "; ".join(undeclared)


def test_no_module_imports_another_module_s_private_names():
    private = sorted(
        f"{_rel(path)}: {module}.{name}"
        for path in MODULES.values()
        for module, name in _imported(path, attributes=True)
        if name.startswith("_") and not name.startswith("__") and module != _dotted(path)
    )
    assert not private, "private names used across modules: " + "; ".join(private)


def test_the_check_sees_imports_attributes_and_configs():
    """The parsers above find what the tests rely on (a check that finds nothing passes vacuously)."""
    uses = set(_uses())
    assert ("scripts.atomic_io", "write_atomically", "scripts/study/tables.py") in uses
    assert ("scripts.nnunet_baseline", "run_nnunet", "scripts/study/nnunet.py") in uses
    assert any(
        m == "scripts.handlers" and n == "SeedEachEpoch" and u.endswith("train.yaml") for m, n, u in uses
    )
    assert any(
        m == "scripts.data.datalist" and n == "load_split" and u.endswith("train.yaml") for m, n, u in uses
    )
    assert ("scripts.data.raster", "DistanceField", "scripts/data/lesions.py") in uses
