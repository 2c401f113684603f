"""Synthetic 3DRA data: vessel trees, aneurysms and look-alikes, 3DRA appearance, centres, previews.

``generate_case(seed, centre)`` is the entry point; ``scripts.data.synthetic`` writes datasets from it.
"""

from .centres import CENTRES, Centre, get_centre
from .lesions import LOCATIONS, Aneurysm
from .phantom import LABELS, generate_case, generate_geometry, local_diameter, phantom_affine, render_labels
from .preview import save_preview
from .raster import DistanceField, occupancy
from .vessel_tree import TEMPLATES, VesselTree

__all__ = [
    "CENTRES",
    "LABELS",
    "LOCATIONS",
    "TEMPLATES",
    "Aneurysm",
    "Centre",
    "DistanceField",
    "VesselTree",
    "generate_case",
    "generate_geometry",
    "get_centre",
    "local_diameter",
    "occupancy",
    "phantom_affine",
    "render_labels",
    "save_preview",
]
