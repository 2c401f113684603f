"""The segmentation's labels, defined once: every module, config and test takes them from here.

A label volume holds one integer per voxel; the network's output has one channel per label, in this order.
``configs/metadata.json`` states the same mapping for the model zoo (``channel_def``), and a test keeps the
two equal.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "ANEURYSM_LABEL",
    "BACKGROUND_LABEL",
    "COMPONENT_CONNECTIVITY",
    "LABEL_NAMES",
    "NUM_CLASSES",
    "VESSEL_LABEL",
]

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
# one structure (one aneurysm, one false component) is a 26-connected set of voxels of its label: the detection
# metric, the measurements, the post-processing and the training crops all count components with this
COMPONENT_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)
