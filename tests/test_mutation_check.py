"""The mutation check (.ci/mutation_check.py) stays runnable: each mutation names one exact line and real tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("mutation_check", ROOT / ".ci" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


check = _load()
MUTATIONS = check.MUTATIONS


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_each_mutation_still_applies_to_one_place_and_changes_it(mutation, tmp_path):
    (tmp_path / mutation.path).parent.mkdir(parents=True)
    (tmp_path / mutation.path).write_text((ROOT / mutation.path).read_text())
    original = check._apply(tmp_path, mutation)
    assert (tmp_path / mutation.path).read_text() != original


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_each_mutation_names_existing_tests(mutation):
    for node in mutation.tests:
        path, _, name = node.partition("::")
        assert (ROOT / path).exists(), f"{mutation.name}: no {path}"
        if name:
            assert f"def {name}(" in (ROOT / path).read_text(), f"{mutation.name}: no test {name} in {path}"


def test_names_are_unique():
    names = [m.name for m in MUTATIONS]
    assert len(names) == len(set(names))


def test_a_stale_mutation_is_refused(tmp_path):
    stale = check.Mutation("stale", "a.py", "x = 1", "x = 2", ("tests",))
    (tmp_path / "a.py").write_text("x = 1\nx = 1\n")
    with pytest.raises(ValueError, match="2 copies"):
        check._apply(tmp_path, stale)
