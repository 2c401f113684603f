"""Small 3D vector helpers shared by the vessel-tree and lesion generators (millimetre frame, (3,) arrays)."""

from __future__ import annotations

import numpy as np

__all__ = ["perpendicular", "rotate", "unit"]


def unit(v: np.ndarray) -> np.ndarray:
    """``v`` scaled to length 1.

    Args:
        v: (3,) vector; a zero vector stays zero (its norm is floored at 1e-12).

    Returns:
        (3,) unit vector along ``v``.
    """
    return v / max(float(np.linalg.norm(v)), 1e-12)


def perpendicular(rng: np.random.Generator, d: np.ndarray) -> np.ndarray:
    """A random unit vector perpendicular to unit ``d``.

    Args:
        rng: the generator to draw from (three standard normals).
        d: (3,) unit vector.

    Returns:
        (3,) unit vector ``v`` with ``v . d == 0``.
    """
    v = rng.standard_normal(3)
    v -= (v @ d) * d
    return unit(v)


def rotate(d: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues rotation of ``d`` about unit ``axis``.

    Args:
        d: (3,) vector to rotate.
        axis: (3,) unit rotation axis.
        angle: radians, counter-clockwise looking down ``axis``.

    Returns:
        (3,) rotated vector.
    """
    return d * np.cos(angle) + np.cross(axis, d) * np.sin(angle) + axis * (axis @ d) * (1.0 - np.cos(angle))
