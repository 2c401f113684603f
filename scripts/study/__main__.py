"""``python -m scripts.study --output_dir DIR --budget NAME ...``: the study's command (see :mod:`scripts.study`)."""

import logging.config

import fire

from . import main
from .run import LOGGING_FILE

if __name__ == "__main__":
    logging.config.fileConfig(LOGGING_FILE, disable_existing_loggers=False)
    fire.Fire(main)
