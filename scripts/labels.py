"""The segmentation's labels, defined once: every module, config and test takes them from here.

A label volume holds one integer per voxel; the network's output has one channel per label, in this order.
``configs/metadata.json`` states the same mapping for the model zoo (``channel_def``), and a test keeps the
two equal.
"""

from __future__ import annotations

__all__ = ["ANEURYSM_LABEL", "BACKGROUND_LABEL", "LABEL_NAMES", "NUM_CLASSES", "VESSEL_LABEL"]

BACKGROUND_LABEL = 0
VESSEL_LABEL = 1
ANEURYSM_LABEL = 2
# label -> name, in channel order
LABEL_NAMES: dict[int, str] = {
    BACKGROUND_LABEL: "background",
    VESSEL_LABEL: "vessel",
    ANEURYSM_LABEL: "aneurysm",
}
NUM_CLASSES = len(LABEL_NAMES)
