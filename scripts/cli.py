"""What every command-line entry point of the bundle shares: its logging, from ``configs/logging.conf``.

The bundle's workflows get their logging from ``python -m monai.bundle run ... --logging_file
configs/logging.conf``; the ``python -m scripts.<name>`` commands get the same format and levels by calling
:func:`configure_logging` first thing under ``if __name__ == "__main__":``::

    if __name__ == "__main__":
        configure_logging()
        fire.Fire(main)

The file is found from the bundle root, so a command logs the same from any working directory. Another
file (more detail, a file handler) is one environment variable away::

    DINO3DRA_LOGGING_FILE=my_logging.conf python -m scripts.score ...

Library modules never configure logging themselves: they only ``logging.getLogger(__name__)``.
"""

from __future__ import annotations

import logging.config
import os
from pathlib import Path

__all__ = ["LOGGING_FILE", "LOGGING_FILE_VARIABLE", "configure_logging"]

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
LOGGING_FILE = BUNDLE_ROOT / "configs" / "logging.conf"
LOGGING_FILE_VARIABLE = "DINO3DRA_LOGGING_FILE"


def configure_logging(logging_file: str | Path | None = None) -> Path:
    """Configure logging from a ``logging.config.fileConfig`` file, as ``monai.bundle run --logging_file`` does.

    Loggers that modules created at import time keep working (``disable_existing_loggers=False``).

    Args:
        logging_file: the file. Default: the environment variable ``DINO3DRA_LOGGING_FILE`` when it is set
            and not empty, else the bundle's ``configs/logging.conf``.

    Returns:
        The file that was read.

    Raises:
        FileNotFoundError: the file does not exist (named in the message).
    """
    path = Path(logging_file or os.environ.get(LOGGING_FILE_VARIABLE) or LOGGING_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"Logging file {str(path)!r} does not exist.")
    logging.config.fileConfig(path, disable_existing_loggers=False)
    return path
