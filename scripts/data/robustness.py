"""Volumes without a vessel, on which a model must label nothing: a blank volume and background-only renders.

::

    python -m scripts.data.robustness --output_dir data/robustness

writes ``imagesTs/<name>.nii.gz`` and an all-background ``labelsTs/<name>.nii.gz`` per volume. Segment the
images with the inference command (``--dataset_dir data/robustness/imagesTs``) and score them with
``python -m scripts.score --truth_dir data/robustness/labelsTs --pred_dir ...``: ``per_case.csv`` then
gives each volume's predicted vessel and aneurysm voxels (``*_pred_voxels``) and false aneurysm components.

The background-only renders (:func:`~scripts.data.phantom.render_background_only`) are the appearance of
test seeds (tissue texture, bone, metal, rings, streaks, noise, intensity units) with no lumen drawn, so
any label in them is a false positive; the blank volume is all zeros on centre A's grid.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from .centres import get_centre
from .phantom import phantom_affine, render_background_only
from .synthetic import write_nifti

__all__ = ["DEFAULT_VOLUMES", "main", "write_robustness_volumes"]

logger = logging.getLogger(__name__)

#: ``"blank:<centre>"`` or ``"background:<centre>:<seed>"``; the seeds are those of the test phantoms
DEFAULT_VOLUMES: tuple[str, ...] = (
    "blank:A",
    "background:A:1000",
    "background:A:1001",
    "background:A:1002",
    "background:B:1000",
    "background:C:1000",
    "background:C:1001",
)


def _render(volume: str) -> tuple[str, np.ndarray, np.ndarray]:
    """``(name, image, affine)`` of one volume spec; ValueError naming a spec it cannot read."""
    kind, _, rest = volume.partition(":")
    parts = rest.split(":")
    if kind == "blank" and len(parts) == 1:
        style = get_centre(parts[0])
        image = np.zeros(style.shape, dtype=np.float32)
        return f"blank_{style.name}", image, phantom_affine(style.shape, style.spacing)
    if kind == "background" and len(parts) == 2 and parts[1].isdigit():
        style = get_centre(parts[0])
        image, _, _ = render_background_only(int(parts[1]), style)
        return f"background_{style.name}_{int(parts[1])}", image, phantom_affine(style.shape, style.spacing)
    raise ValueError(f"Volume {volume!r}: expected 'blank:<centre>' or 'background:<centre>:<seed>'.")


def write_robustness_volumes(output_dir: str, volumes: Sequence[str] = DEFAULT_VOLUMES) -> list[str]:
    """Write each volume's image to ``output_dir/imagesTs`` and its all-background label to ``labelsTs``.

    Args:
        output_dir: created if needed; files already there are replaced (each write is atomic).
        volumes: specs, see :data:`DEFAULT_VOLUMES`.

    Returns:
        the volumes' names, in order.

    Raises:
        ValueError: a spec that is not understood or names an unknown centre (before anything is written).
    """
    if isinstance(volumes, str):
        volumes = [volumes]
    rendered = [_render(volume) for volume in volumes]
    for name, image, affine in rendered:
        write_nifti(image, affine, os.path.join(output_dir, "imagesTs", f"{name}.nii.gz"))
        label = np.zeros(image.shape, dtype=np.uint8)
        write_nifti(label, affine, os.path.join(output_dir, "labelsTs", f"{name}.nii.gz"))
        logger.info("%s: %s voxels -> %s", name, "x".join(map(str, image.shape)), output_dir)
    return [name for name, _, _ in rendered]


main = write_robustness_volumes
"""The command line: ``python -m scripts.data.robustness --output_dir D [--volumes "['blank:A']"]``."""


if __name__ == "__main__":
    import fire

    from scripts.cli import configure_logging

    configure_logging()
    fire.Fire(main)
