"""Network checkpoints: the one reader of a ``model.pt`` or training checkpoint, and its strict loader.

A checkpoint is either the network's state dict (``models/model.pt``) or a resumable training checkpoint
that holds it under ``"model"`` (``checkpoint_epoch=N.pt``). It is read with ``weights_only=True``, and the
slice encoder's provenance it records is checked when the state dict is loaded
(:meth:`~scripts.networks.slice_encoder.SliceEncoder.set_extra_state`). Every error names the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from .encoder_weights import EncoderMismatchError, EncoderWeightsError, read_state_file

__all__ = ["load_network_weights", "read_network_state", "recorded_encoder"]


def read_network_state(checkpoint: str | os.PathLike) -> Mapping[str, Any]:
    """The network's state dict in ``checkpoint``, read on the CPU.

    Args:
        checkpoint: a ``model.pt`` state dict, or a training checkpoint holding it under ``"model"``.

    Raises:
        EncoderWeightsError: the file cannot be read, or holds no state dict.
    """
    state = read_state_file(checkpoint)
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]  # a resumable training checkpoint
    if not isinstance(state, Mapping):
        raise EncoderWeightsError(f"{checkpoint} holds no state dict.")
    return state


def load_network_weights(
    network: nn.Module, checkpoint: str | os.PathLike, name: str = "the network"
) -> nn.Module:
    """Load ``checkpoint``'s state dict into ``network`` strictly; returns ``network``.

    Args:
        network: the network built as the checkpoint's was (same settings and encoder).
        checkpoint: as in :func:`read_network_state`.
        name: what the error calls the network (e.g. ``"network_def"``). Default ``"the network"``.

    Raises:
        EncoderWeightsError: the file cannot be read, or holds no state dict.
        EncoderMismatchError: the checkpoint was trained with another encoder than ``network``'s.
        ValueError: missing, unexpected or misshapen keys, or a shape prior of other scales.
    """
    state = read_network_state(checkpoint)
    try:
        network.load_state_dict(state, strict=True)  # the encoder record is checked here too
    except EncoderMismatchError as error:
        raise EncoderMismatchError(f"{checkpoint}: {error}") from error
    except (RuntimeError, ValueError) as error:  # ValueError: the shape prior's scales differ
        raise ValueError(f"{checkpoint} does not fit {name}: {error}") from error
    return network


def recorded_encoder(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """The encoder record (:meth:`~scripts.networks.encoder_weights.EncoderProvenance.record`) a network
    checkpoint was saved with.

    Args:
        checkpoint: as in :func:`read_network_state`.

    Returns:
        the record (``source``, ``sha256``, ...), or ``None`` for a network without a slice encoder.

    Raises:
        EncoderWeightsError: the file cannot be read, or holds no state dict.
    """
    state = read_network_state(checkpoint)
    records = [value for key, value in state.items() if key.endswith("encoder._extra_state")]
    return dict(records[0]) if records else None
