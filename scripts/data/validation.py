"""Checks that a loaded case is usable, with errors that name the file and the problem."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform

from scripts.labels import LABEL_NAMES

__all__ = ["ValidateCased"]


def _source(item: Any) -> str:
    meta = getattr(item, "meta", {}) or {}
    return str(meta.get("filename_or_obj", "<in-memory volume>"))


class ValidateCased(MapTransform):
    """Refuse cases the network cannot learn from or be judged on.

    Runs right after ``LoadImaged(..., ensure_channel_first=True)`` and checks, naming the file:
    one channel and three spatial dimensions, finite intensities, label values within ``labels``, and a
    label with the image's shape and affine (same grid in the same place).

    Args:
        image_key: key of the image. Default ``"image"``.
        label_key: key of the label, skipped when absent (inference). Default ``"label"``.
        labels: allowed label values. Default: those of :data:`scripts.labels.LABEL_NAMES` (0, 1, 2).
        affine_atol: tolerance on affine entries (mm). Default 1e-3.
    """

    def __init__(
        self,
        image_key: str = "image",
        label_key: str = "label",
        labels: Sequence[int] = tuple(LABEL_NAMES),
        affine_atol: float = 1e-3,
    ) -> None:
        super().__init__([image_key, label_key], allow_missing_keys=True)
        self.image_key, self.label_key = image_key, label_key
        self.labels = np.asarray(sorted(labels))
        self.affine_atol = affine_atol

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        self._check_volume(image, "image")
        if not torch.isfinite(torch.as_tensor(image)).all():
            raise ValueError(f"{_source(image)}: image contains NaN or infinite values.")
        label = d.get(self.label_key)
        if label is None:
            return d
        self._check_volume(label, "label")
        values = np.unique(torch.as_tensor(label).cpu().numpy())
        unknown = np.setdiff1d(values, self.labels)
        if unknown.size:
            if np.all(np.isfinite(unknown)) and np.all(unknown == np.round(unknown)):
                unknown = unknown.astype(np.int64)
            raise ValueError(
                f"{_source(label)}: unknown label values {unknown.tolist()} (allowed: {self.labels.tolist()})."
            )
        if label.shape != image.shape:
            raise ValueError(
                f"{_source(label)}: label shape {tuple(label.shape[1:])} does not match image "
                f"{_source(image)} shape {tuple(image.shape[1:])}."
            )
        image_affine, label_affine = getattr(image, "affine", None), getattr(label, "affine", None)
        if (
            image_affine is not None
            and label_affine is not None
            and not torch.allclose(
                torch.as_tensor(image_affine), torch.as_tensor(label_affine), atol=self.affine_atol
            )
        ):
            raise ValueError(
                f"{_source(label)}: label geometry (affine) does not match image {_source(image)}:\n"
                f"{np.asarray(label_affine).round(4)}\nvs\n{np.asarray(image_affine).round(4)}"
            )
        return d

    @staticmethod
    def _check_volume(item: Any, what: str) -> None:
        if item.ndim != 4 or item.shape[0] != 1:
            raise ValueError(
                f"{_source(item)}: {what} must be a single-channel 3D volume, got array shape "
                f"{tuple(item.shape)} (channel first)."
            )
