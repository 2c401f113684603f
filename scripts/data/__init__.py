"""Synthetic 3DRA data: vessel trees, aneurysms and look-alikes, 3DRA appearance, centres, previews.

``generate_case(seed, centre)`` is the entry point; ``scripts.data.synthetic`` writes datasets from it.
"""

from .appearance import render_intensity
from .centres import CENTRES, DEFAULT_CENTRE, Centre, get_centre
from .lesions import (
    LOCATIONS,
    Aneurysm,
    HardNegative,
    place_aneurysms,
    place_hard_negatives,
    sample_aneurysm_size,
)
from .phantom import (
    GENERATOR_VERSION,
    LABELS,
    Phantom,
    PhantomGeometry,
    generate_case,
    generate_geometry,
    local_diameter,
    phantom_affine,
    render_labels,
)
from .preview import save_preview
from .raster import DistanceField, occupancy
from .vessel_tree import TEMPLATES, Bifurcation, Crossing, Landmark, Loop, Tube, VesselTree, grow_vessel_tree

__all__ = [
    "CENTRES",
    "DEFAULT_CENTRE",
    "GENERATOR_VERSION",
    "LABELS",
    "LOCATIONS",
    "TEMPLATES",
    "Aneurysm",
    "Bifurcation",
    "Centre",
    "Crossing",
    "DistanceField",
    "HardNegative",
    "Landmark",
    "Loop",
    "Phantom",
    "PhantomGeometry",
    "Tube",
    "VesselTree",
    "generate_case",
    "generate_geometry",
    "get_centre",
    "grow_vessel_tree",
    "local_diameter",
    "occupancy",
    "phantom_affine",
    "place_aneurysms",
    "place_hard_negatives",
    "render_intensity",
    "render_labels",
    "sample_aneurysm_size",
    "save_preview",
]
