"""DINO-3DRA building blocks; configs use ``scripts.networks.Dino3DRA``."""

from .checkpoint import load_network_weights, read_network_state, recorded_encoder
from .dino_3dra import Dino3DRA, count_parameters
from .encoder_weights import (
    DEFAULT_DINO_MODEL,
    EncoderMismatchError,
    EncoderProvenance,
    EncoderWeightsError,
    load_encoder,
)
from .fusion import AdditiveFusion, CalibratedFusion
from .room_lite import RoomLite
from .slice_encoder import SliceEncoder

__all__ = [
    "DEFAULT_DINO_MODEL",
    "AdditiveFusion",
    "CalibratedFusion",
    "Dino3DRA",
    "EncoderMismatchError",
    "EncoderProvenance",
    "EncoderWeightsError",
    "RoomLite",
    "SliceEncoder",
    "count_parameters",
    "load_encoder",
    "load_network_weights",
    "read_network_state",
    "recorded_encoder",
]
