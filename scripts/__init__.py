"""DINO-3DRA bundle package: networks, data, metrics and entry points wired by ``configs/``."""

__all__: list[str] = []
