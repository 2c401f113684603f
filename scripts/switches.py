"""On/off settings from configs and the command line, checked to be real booleans."""

from __future__ import annotations

from typing import Any

__all__ = ["check_switch"]


def check_switch(name: str, value: Any) -> None:
    """Refuse anything but a real ``bool`` for an on/off setting.

    The bundle command line parses overrides as Python literals, so ``--use_dino false`` arrives as the
    string ``"false"``, which is truthy: accepting it would silently train the wrong ablation row.

    Raises:
        ValueError: ``value`` is not ``True`` or ``False``; the message names the key and the spelling.
    """
    if not isinstance(value, bool):
        raise ValueError(
            f"{name} must be True or False, got {value!r} ({type(value).__name__}). On the command line "
            f"write it as a Python literal: --{name} False (not false)."
        )
