"""Frozen 2D foundation-model encoder applied to every slice of a 3D patch."""

from __future__ import annotations

import functools
import hashlib
import logging
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .encoder_weights import DEFAULT_DINO_MODEL, EncoderProvenance, load_encoder

__all__ = ["EmbeddingCache", "SliceEncoder"]

logger = logging.getLogger(__name__)

# Bump when the slice preprocessing changes, so cached embeddings made the old way are never reused.
PREPROCESSING_VERSION = 1


class EmbeddingCache(Protocol):
    """What :class:`SliceEncoder` needs from an embedding cache (see ``scripts.embedding_cache``)."""

    def encode(self, slices: torch.Tensor, encode_fn: Any, namespace: str) -> torch.Tensor: ...


class SliceEncoder(nn.Module):
    """Encode each slice of a volume with a frozen DINO ViT into one mean-pooled patch-token vector.

    Each slice (values expected in [0, 1]) is resized to ``image_size``^2, repeated to 3 channels,
    normalised with the encoder's image statistics and encoded; the CLS and register tokens are dropped and
    the patch tokens mean-pooled. Slices are encoded ``chunk_size`` at a time so memory stays bounded.

    The backbone is deliberately *not* a registered submodule: it never appears in ``parameters()`` (so no
    optimizer can train it), in ``state_dict()`` (we do not redistribute Meta's weights), or under
    ``train()`` (it stays in eval mode). It follows the input's device on the first forward. What the
    state dict does hold is the encoder's provenance, checked again at load time.

    Args:
        dino_model: weights, as accepted by :func:`~scripts.networks.encoder_weights.load_encoder`.
        image_size: side of the square image the encoder sees. Default 224 (196 ViT/16 patch tokens).
        slice_axis: spatial axis (0, 1 or 2 of ``D, H, W``) across which slices are taken. Default 2: the
            last axis, superior-inferior for RAS volumes as MONAI loads them, i.e. axial slices.
        chunk_size: slices per encoder call. Default 64.
        dino_config: architecture overrides for ``random`` or Meta ``.pth`` weights (tests use tiny ones).
        local_files_only: for hub ids, never go online (``None``: try the cache first, see ``load_encoder``).
        dtype: dtype the backbone runs in, ``"float32"`` or ``"bfloat16"`` (about 2x faster on CPUs with
            bf16 support; embeddings differ by ~0.5% relative). The provenance is of the weights as loaded; the
            dtype is part of :attr:`cache_namespace`.
        cache: where embeddings already computed are looked up, by slice content and :attr:`cache_namespace`
            (:class:`~scripts.embedding_cache.SliceEmbeddingCache`). It holds no weights and is not part of the
            state dict. Default None: every slice is encoded.
    """

    def __init__(
        self,
        dino_model: str = DEFAULT_DINO_MODEL,
        image_size: int = 224,
        slice_axis: int = 2,
        chunk_size: int = 64,
        dino_config: dict[str, Any] | None = None,
        local_files_only: bool | None = None,
        dtype: str = "float32",
        cache: EmbeddingCache | None = None,
    ) -> None:
        super().__init__()
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}.")
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2 (a spatial axis of D, H, W), got {slice_axis}.")
        if image_size < 1 or chunk_size < 1:
            raise ValueError(f"image_size and chunk_size must be positive, got {image_size}, {chunk_size}.")
        loaded = load_encoder(dino_model, dino_config=dino_config, local_files_only=local_files_only)
        patch = int(loaded.model.config.patch_size)
        if image_size % patch:
            raise ValueError(
                f"image_size {image_size} is not a multiple of the encoder's patch size {patch}."
            )
        object.__setattr__(
            self, "backbone", loaded.model.to(getattr(torch, dtype))
        )  # frozen: kept out of the module tree on purpose
        self.provenance: EncoderProvenance = loaded.provenance
        self.hidden_size = loaded.hidden_size
        self.num_prefix_tokens = loaded.num_prefix_tokens
        self.image_size = image_size
        self.slice_axis = slice_axis
        self.chunk_size = chunk_size
        self.dtype = getattr(torch, dtype)
        self.register_buffer("image_mean", torch.tensor(loaded.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(loaded.image_std).view(1, 3, 1, 1), persistent=False)
        self.cache = cache
        if cache is not None:
            logger.info("Slice embeddings are cached: %r", cache)

    @functools.cached_property
    def cache_namespace(self) -> str:
        """Everything besides the slice content that determines an embedding, hashed (once: all fixed).

        The encoder's identity (weights and output-changing settings), input size, image statistics, dtype and
        preprocessing version; :class:`~scripts.embedding_cache.SliceEmbeddingCache` adds the slice's pixels
        and shape.
        """
        parts = (
            self.provenance.sha256,
            self.image_size,
            self.image_mean.flatten().tolist(),
            self.image_std.flatten().tolist(),
            str(self.dtype),
            PREPROCESSING_VERSION,
        )
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed every slice of ``x``.

        Args:
            x: (B, 1, D, H, W) volume patch, intensities in [0, 1].

        Returns:
            (B, n_slices, hidden_size) with ``n_slices = x.shape[2 + slice_axis]``.
        """
        batch, n_slices = x.shape[0], x.shape[2 + self.slice_axis]
        # (B, 1, D, H, W) -> (B, n_slices, h, w) -> (B * n_slices, h, w)
        slices = x[:, 0].movedim(1 + self.slice_axis, 1)
        slices = slices.reshape(batch * n_slices, *slices.shape[2:])
        if self.cache is not None:
            embeddings = self.cache.encode(slices, self.encode_slices, self.cache_namespace)
        else:
            embeddings = self.encode_slices(slices)
        return embeddings.reshape(batch, n_slices, self.hidden_size)

    @torch.no_grad()
    def encode_slices(self, slices: torch.Tensor) -> torch.Tensor:
        """Encode a stack of 2D slices.

        Args:
            slices: (N, h, w) slices, intensities in [0, 1].

        Returns:
            (N, hidden_size) mean-pooled patch tokens, float32, on the slices' device.
        """
        self._follow_device(slices.device)
        pooled = [self._encode_chunk(chunk) for chunk in slices.split(self.chunk_size)]
        return torch.cat(pooled) if pooled else slices.new_zeros(0, self.hidden_size)

    def _encode_chunk(self, chunk: torch.Tensor) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        # (N, h, w) -> (N, 1, S, S) -> (N, 3, S, S), normalised like the encoder's training images
        images = F.interpolate(chunk.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False)
        images = (images.expand(-1, 3, -1, -1) - self.image_mean) / self.image_std
        tokens = self.backbone(pixel_values=images.to(self.dtype)).last_hidden_state
        # (N, prefix + patches, hidden) -> (N, patches, hidden) -> (N, hidden)
        return tokens[:, self.num_prefix_tokens :].mean(dim=1).float()

    def _follow_device(self, device: torch.device) -> None:
        if next(self.backbone.parameters()).device != device:
            self.backbone.to(device)

    def get_extra_state(self) -> dict[str, Any]:
        """Saved with the state dict: which encoder the rest of the network was trained with (its weights and
        the settings that change its output, see :class:`~scripts.networks.encoder_weights.EncoderProvenance`)."""
        return self.provenance.record()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint trained with another encoder (other weights or settings) than the one loaded now.

        Raises:
            EncoderMismatchError: naming both encoders and what differs.
        """
        self.provenance.check_record(state)
