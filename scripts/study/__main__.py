"""``python -m scripts.study --output_dir DIR --budget NAME ...``: the study's command (see :mod:`scripts.study`)."""

import fire

from scripts.cli import configure_logging

from . import main

__all__: list[str] = []

if __name__ == "__main__":
    configure_logging()
    fire.Fire(main)
