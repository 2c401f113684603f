"""Every command-line entry point logs through ``configs/logging.conf``, as the bundle's workflows do, from any
working directory; and no library module configures logging behind its caller's back."""

from __future__ import annotations

import ast
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.cli import LOGGING_FILE, LOGGING_FILE_VARIABLE, configure_logging

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"

# logging.conf's fullFormatter, "%(asctime)s - %(name)s - %(levelname)s - %(message)s", on stdout
CONF_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} - scripts\.probe - INFO - probe")
# Runs entry points as ``python -m`` does, one after the other in one process (each would pay MONAI's ~10 s
# import on its own), with ``fire.Fire`` replaced by one log line: what a command does is not tested here
# (each has its own tests), only how it logs. Before each, the root logger goes back to Python's unconfigured
# state (no handler, WARNING), so a command that does not configure logging logs nothing on stdout; a marker
# line separates the commands' outputs.
PROBE = """
import logging, runpy, sys
import fire
fire.Fire = lambda *args, **kwargs: logging.getLogger("scripts.probe").info("probe")
for module in sys.argv[1:]:
    for handler in list(logging.root.handlers):
        logging.root.removeHandler(handler)
    logging.root.setLevel(logging.WARNING)
    sys.stdout.write(f"=== {module}\\n")
    sys.stdout.flush()
    runpy.run_module(module, run_name="__main__", alter_sys=True)
"""
# Entry points not yet configured through configure_logging() (expected to fail, strictly), and modules
# allowed to configure logging themselves: none now; kept so that a newcomer is listed, not hidden.
PENDING: set[str] = set()
CONFIGURES_ITSELF: set[str] = set()


def is_main_guard(node: ast.stmt) -> bool:
    """Whether a module-level statement is ``if __name__ == "__main__":``."""
    return isinstance(node, ast.If) and ast.unparse(node.test) in {
        "__name__ == '__main__'",
        "'__main__' == __name__",
    }


def entry_points() -> list[str]:
    """Modules that run as commands (``if __name__ == "__main__":``; a package's ``__main__.py``), by name."""
    found = set()
    for path in SCRIPTS.rglob("*.py"):
        module = path.relative_to(ROOT).with_suffix("")
        if path.name == "__main__.py":
            found.add(".".join(module.parent.parts))
        elif any(is_main_guard(node) for node in ast.parse(path.read_text()).body):
            found.add(".".join(module.parts))
    return sorted(found)


def test_every_known_command_is_found():
    expected = {
        "scripts.benchmark",
        "scripts.export_nnunet",
        "scripts.export_torchscript",
        "scripts.nnunet_baseline",
        "scripts.release",
        "scripts.score",
        "scripts.study",
        "scripts.data.synthetic",
        "scripts.tune_postprocessing",
    }
    assert expected <= set(entry_points())


@pytest.fixture(scope="module")
def probe_outputs(tmp_path_factory) -> dict[str, str]:
    """What each entry point wrote on stdout when run by ``PROBE`` outside the bundle root, by module."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(LOGGING_FILE_VARIABLE, None)
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *entry_points()],
        cwd=tmp_path_factory.mktemp("elsewhere"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    parts = re.split(r"^=== (\S+)\n", result.stdout, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


@pytest.mark.parametrize(
    "module",
    [
        pytest.param(m, marks=pytest.mark.xfail(strict=True, reason="still configures logging itself"))
        if m in PENDING
        else m
        for m in entry_points()
    ],
)
def test_command_logs_in_logging_conf_format_from_any_directory(module, probe_outputs):
    assert CONF_LINE.fullmatch(probe_outputs[module].strip()), probe_outputs[module]


def test_another_logging_file_from_the_environment(tmp_path, monkeypatch, capsys):
    """``DINO3DRA_LOGGING_FILE`` swaps the file; a missing one is named, not a ``KeyError: 'formatters'``."""
    other = tmp_path / "other.conf"
    other.write_text(LOGGING_FILE.read_text().replace("format=%(asctime)s - ", "format=OTHER "))
    monkeypatch.setenv(LOGGING_FILE_VARIABLE, str(other))
    touched = [logging.root, logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")]
    saved = [(logger, logger.handlers[:], logger.level, logger.propagate) for logger in touched]
    try:
        assert configure_logging() == other
        logging.getLogger("scripts.probe").info("probe")
    finally:  # give pytest's process its logging back
        for logger, handlers, level, propagate in saved:
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate
    assert capsys.readouterr().out.strip() == "OTHER scripts.probe - INFO - probe"
    with pytest.raises(FileNotFoundError, match="missing.conf"):
        configure_logging(tmp_path / "missing.conf")


def test_library_modules_leave_logging_to_the_entry_point():
    """No ``basicConfig`` anywhere, and ``fileConfig`` only in ``scripts/cli.py``."""
    offenders = []
    for path in sorted(SCRIPTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            configures = isinstance(node, ast.Attribute) and node.attr in {
                "basicConfig",
                "fileConfig",
                "dictConfig",
            }
            if configures and not (path.name == "cli.py" and node.attr == "fileConfig"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.attr}")
    assert [o for o in offenders if o.split(":")[0] not in CONFIGURES_ITSELF] == []
