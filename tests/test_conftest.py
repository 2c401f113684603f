"""The suite's shared fixtures stand in for nothing a user runs: a config file parsed once per session
(``read_each_config_file_once``) reads as a fresh parse would."""

from __future__ import annotations

import os

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
