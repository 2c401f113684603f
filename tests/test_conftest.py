"""The suite's shared fixtures stand in for nothing a user runs: a config file parsed once per session
(``read_each_config_file_once``) reads as a fresh parse would; and the suite's parallel workers share the CPUs
instead of each taking all of them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import MAX_WORKERS, pytest_xdist_auto_num_workers, threads_per_worker, usable_cpus
from monai.bundle import ConfigParser


def test_a_config_file_rewritten_within_one_clock_tick_is_parsed_again(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("value: 1\n")
    times = os.stat(path)
    first = ConfigParser.load_config_file(str(path))
    first["value"] = 99  # a caller changing what it got
    assert ConfigParser.load_config_file(str(path)) == {"value": 1}
    path.write_text("value: 2\n")  # the same size, and the same modification time as a quick rewrite can have
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert ConfigParser.load_config_file(str(path)) == {"value": 2}


def test_a_macro_takes_the_file_as_it_is_now(tmp_path):
    shared, config = tmp_path / "shared.yaml", tmp_path / "config.yaml"
    config.write_text(f"size: '%{shared}#size'\n")
    for size in (32, 64):
        shared.write_text(f"size: {size}\n")
        parser = ConfigParser()
        parser.read_config(str(config))
        assert parser.get_parsed_content("size") == size


@pytest.mark.parametrize("cpus, workers, threads", [(2, 2, 1), (16, 4, 4), (3, 2, 1), (1, 2, 1), (8, 1, 8)])
def test_the_cpus_are_split_between_the_workers(cpus, workers, threads):
    assert threads_per_worker(cpus, workers) == threads


def test_auto_starts_one_worker_per_usable_cpu_up_to_the_cap(monkeypatch):
    assert pytest_xdist_auto_num_workers(None) == min(usable_cpus(), MAX_WORKERS)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert pytest_xdist_auto_num_workers(None) == MAX_WORKERS


def test_this_worker_and_the_processes_it_starts_use_their_share_of_the_cpus():
    """The README's test command runs the suite in pytest-xdist workers (pyproject.toml: ``-n auto``)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is None:
        pytest.skip("not run in a pytest-xdist worker (-n 0): no CPUs to split")
    threads = threads_per_worker(usable_cpus(), int(workers))
    assert torch.get_num_threads() == threads
    started = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(started.stdout) == threads
