"""The validation score that picks ``model.pt``: overlap of both classes and aneurysm detection.

Dice alone barely moves when a model adds a few small false aneurysms far from the true one, yet those
are what a reader of the output has to dismiss one by one. The score of a case is the mean of

* vessel Dice,
* aneurysm Dice,
* aneurysm detection F1 ``2 hits / (2 hits + misses + false positives)`` over 26-connected components
  (as :func:`scripts.metrics.detection_counts` counts them),

each 1 when truth and prediction are both empty and 0 when exactly one is. The run's score is the
mean over cases.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric

from scripts.labels import ANEURYSM_LABEL, VESSEL_LABEL
from scripts.metrics import detection_counts

__all__ = ["SegmentationScore", "case_score"]


def _dice(pred: np.ndarray, true: np.ndarray) -> float:
    total = int(pred.sum()) + int(true.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & true).sum()) / total


def _detection_f1(pred: np.ndarray, true: np.ndarray) -> float:
    counts = detection_counts(pred, true)
    misses = counts["true_components"] - counts["hits"]
    denominator = 2 * counts["hits"] + misses + counts["false_positives"]
    return 1.0 if denominator == 0 else 2.0 * counts["hits"] / denominator


def case_score(pred: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """Score of one case from (D, H, W) integer label volumes: its parts and their mean (``score``)."""
    parts = {
        "vessel_dice": _dice(pred == VESSEL_LABEL, label == VESSEL_LABEL),
        "aneurysm_dice": _dice(pred == ANEURYSM_LABEL, label == ANEURYSM_LABEL),
        "aneurysm_f1": _detection_f1(pred == ANEURYSM_LABEL, label == ANEURYSM_LABEL),
    }
    return {**parts, "score": float(np.mean(list(parts.values())))}


class SegmentationScore(CumulativeIterationMetric):
    """:func:`case_score` as a MONAI metric for ``IgniteMetricHandler``, on one-hot batches.

    ``y_pred``, ``y``: (B, C, D, H, W) one-hot (C >= 3: background, vessel, aneurysm). ``aggregate``
    returns the mean score over every case seen.
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) one-hot pair -> (B, 1) scores."""
        pred = y_pred.argmax(1).detach().cpu().numpy()
        label = y.argmax(1).detach().cpu().numpy()
        scores = [case_score(p, t)["score"] for p, t in zip(pred, label, strict=True)]
        return torch.tensor(scores, dtype=torch.float32).unsqueeze(1)

    def aggregate(self) -> torch.Tensor:
        """Mean score over the cases accumulated so far, a 0-dim tensor."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            raise ValueError("SegmentationScore has no cases to aggregate.")
        return data.float().mean()
