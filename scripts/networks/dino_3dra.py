"""DINO-3DRA: a 3D U-Net whose three finest skips receive frozen DINO slice semantics."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.layers.factories import Conv
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from torch import nn

from scripts.labels import NUM_CLASSES
from scripts.switches import check_switch

from .dino_path import DinoPath
from .encoder_weights import DEFAULT_DINO_MODEL
from .fusion import AdditiveFusion, CalibratedFusion
from .shape_prior import HessianBlobness, SurfaceConvexity
from .slice_encoder import EmbeddingCache, SliceEncoder

__all__ = ["Dino3DRA", "count_parameters"]

logger = logging.getLogger(__name__)

NUM_DINO_SKIPS = 3


class Dino3DRA(nn.Module):
    """3D U-Net with DINO slice features fused into its skips (DINO-3DRA).

    The U-Net has ``len(channels) - 1`` down-samplings (two 3x3x3 conv-norm-act per level, max-pool down,
    transposed-conv up). The DINO path (frozen slice encoder -> 1x1 projections -> Room-Lite) is fused into
    the three finest skips; the encoder path of the U-Net itself is unchanged, so ``use_dino=False`` is
    exactly the plain U-Net. The paper's ablation rows are settings:

    ==========================  ==================================================================
    plain U-Net                 ``use_dino=False``
    random features             ``dino_model="random"``
    DINOv2-small                ``dino_model="facebook/dinov2-small"``
    without calibration         ``use_calibration=False`` (plain additive injection)
    without Room-Lite           ``use_room_lite=False``
    ==========================  ==================================================================

    With ``deep_supervision=k`` the ``k`` coarsest-but-one decoder levels get their own 1x1 heads, as in
    nnU-Net: in training mode ``forward`` then returns the full-resolution logits followed by theirs
    (finest first, each level half the size of the one before), for
    :class:`monai.losses.DeepSupervisionLoss`. In eval mode it always returns the full-resolution logits
    alone, so inference, the sliding window and exports see one tensor. The heads are part of the
    checkpoint, so inference must build the network with the same ``deep_supervision``.

    Args:
        spatial_dims: must be 3.
        in_channels: input channels. Default 1.
        out_channels: classes. Default :data:`scripts.labels.NUM_CLASSES` (0 background, 1 vessel, 2 aneurysm).
        channels: features per level, finest first; the first three are the fused skips. Default
            ``(24, 48, 96, 320)``.
        act: U-Net activation spec. Default LeakyReLU(0.01).
        norm: U-Net normalisation spec. Default affine instance norm.
        use_dino: add the DINO path. Default True.
        use_room_lite: Room-Lite depth coherence on the DINO volumes. Default True.
        use_calibration: calibrated fusion (else additive). Default True.
        dino_model: encoder weights (hub id, local folder, Meta ``.pth``, ``random[:SEED]``).
        dino_image_size: encoder input size. Default 224.
        dino_chunk_size: slices per encoder call. Default 64.
        dino_config: architecture overrides for ``random`` / Meta weights (tests use tiny encoders).
        slice_axis: spatial axis the slices are taken across. Default 2 (axial for RAS volumes).
        roi_size: training patch size; sets Room-Lite's depth-bias length. Default ``(64, 64, 64)``.
        dino_act: activation of Room-Lite and fusion. Default ``"gelu"``.
        dino_groups: groups of the group norms of Room-Lite and fusion. Default 8.
        local_files_only: for hub ids, never go online (``None``: cache first, then the hub).
        dino_dtype: dtype the frozen encoder runs in, ``"float32"`` or ``"bfloat16"``. Default float32.
        deep_supervision: decoder levels below full resolution with their own heads, trained by deep
            supervision; 0 to ``len(channels) - 2``. Default 0.
        shape_prior_sigmas: Gaussian scales (voxels) of a fixed Hessian blobness channel
            (:class:`~scripts.networks.shape_prior.HessianBlobness`) that the U-Net reads beside each input
            channel; the DINO path sees the image alone. Default None: no shape prior, the paper's network.
        shape_prior_per_scale: the blobness as one channel per scale instead of their maximum. Default False.
        shape_prior_convexity_sigma: Gaussian scale (voxels) of a fixed surface-convexity channel
            (:class:`~scripts.networks.shape_prior.SurfaceConvexity`) read the same way. Default None: none.
        embedding_cache: cache of the slice encoder's embeddings
            (:class:`~scripts.embedding_cache.SliceEmbeddingCache`); unused without the DINO path, never in the
            state dict. Default None: every slice is encoded.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = NUM_CLASSES,
        channels: Sequence[int] = (24, 48, 96, 320),
        act: str | tuple = ("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
        norm: str | tuple = ("instance", {"affine": True}),
        use_dino: bool = True,
        use_room_lite: bool = True,
        use_calibration: bool = True,
        dino_model: str = DEFAULT_DINO_MODEL,
        dino_image_size: int = 224,
        dino_chunk_size: int = 64,
        dino_config: dict[str, Any] | None = None,
        slice_axis: int = 2,
        roi_size: Sequence[int] = (64, 64, 64),
        dino_act: str | tuple = "gelu",
        dino_groups: int = 8,
        local_files_only: bool | None = None,
        dino_dtype: str = "float32",
        deep_supervision: int = 0,
        shape_prior_sigmas: Sequence[float] | None = None,
        shape_prior_per_scale: bool = False,
        shape_prior_convexity_sigma: float | None = None,
        embedding_cache: EmbeddingCache | None = None,
    ) -> None:
        super().__init__()
        _check_arguments(
            spatial_dims,
            channels,
            roi_size,
            {
                "use_dino": use_dino,
                "use_room_lite": use_room_lite,
                "use_calibration": use_calibration,
                "shape_prior_per_scale": shape_prior_per_scale,
            },
            deep_supervision,
        )
        self.in_channels = in_channels
        self.shape_prior = (
            HessianBlobness(shape_prior_sigmas, shape_prior_per_scale)
            if shape_prior_sigmas is not None
            else None
        )
        self.convexity = (
            SurfaceConvexity(shape_prior_convexity_sigma) if shape_prior_convexity_sigma is not None else None
        )
        self.divisor = 2 ** (len(channels) - 1)
        self._warned_bf16 = False

        priors = [p for p in (self.shape_prior, self.convexity) if p is not None]
        prior_channels = sum(prior.channels_per_input for prior in priors)
        unet_in = (1 + prior_channels) * in_channels
        self.conv_0 = TwoConv(3, unet_in, channels[0], act, norm, True, 0.0)
        self.downs = nn.ModuleList(
            Down(3, channels[i - 1], channels[i], act, norm, True, 0.0) for i in range(1, len(channels))
        )
        self.ups = nn.ModuleList(
            UpCat(3, channels[i], channels[i - 1], channels[i - 1], act, norm, True, 0.0, "deconv")
            for i in range(len(channels) - 1, 0, -1)
        )
        self.final_conv = Conv[Conv.CONV, 3](channels[0], out_channels, kernel_size=1)
        # heads[i] reads the decoder output at level i + 1 (half the resolution of level i)
        self.heads = nn.ModuleList(
            Conv[Conv.CONV, 3](channels[level], out_channels, kernel_size=1)
            for level in range(1, deep_supervision + 1)
        )

        self.dino: DinoPath | None = None
        self.fusions = nn.ModuleList()
        if use_dino:
            encoder = SliceEncoder(
                dino_model,
                dino_image_size,
                slice_axis,
                dino_chunk_size,
                dino_config,
                local_files_only,
                dino_dtype,
                embedding_cache,
            )
            skips = channels[:NUM_DINO_SKIPS]
            self.dino = DinoPath(encoder, skips, roi_size[slice_axis], use_room_lite, dino_act, dino_groups)
            self.fusions.extend(
                CalibratedFusion(3, c, dino_act, dino_groups) if use_calibration else AdditiveFusion()
                for c in skips
            )

    @property
    def slice_encoder(self) -> SliceEncoder | None:
        """The frozen encoder, or None for the plain U-Net."""
        return self.dino.encoder if self.dino is not None else None

    def forward(
        self, x: torch.Tensor, slice_embeddings: torch.Tensor | None = None
    ) -> torch.Tensor | list[torch.Tensor]:
        """Segment a patch.

        Args:
            x: (B, in_channels, D, H, W), intensities in [0, 1]; D, H, W divisible by ``2**(levels-1)``.
            slice_embeddings: optional (B, n_slices, hidden) output of ``self.slice_encoder(x)`` computed
                earlier; the result is identical to computing it here.

        Returns:
            logits (B, out_channels, D, H, W); in training mode with deep supervision, a list of them
            followed by (B, out_channels, D / 2**l, H / 2**l, W / 2**l) for l = 1 .. ``deep_supervision``.
        """
        self._check_input(x)
        if self._cpu_bf16_unsafe(x):
            with torch.autocast("cpu", enabled=False):
                return self._forward(x, slice_embeddings)
        return self._forward(x, slice_embeddings)

    def _forward(
        self, x: torch.Tensor, slice_embeddings: torch.Tensor | None
    ) -> torch.Tensor | list[torch.Tensor]:
        priors = [prior(x) for prior in (self.shape_prior, self.convexity) if prior is not None]
        unet_in = torch.cat([x, *priors], dim=1) if priors else x
        skips = [self.conv_0(unet_in)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        if self.dino is not None:
            shapes = [s.shape[2:] for s in skips[:NUM_DINO_SKIPS]]
            volumes = self.dino(x, shapes, slice_embeddings)
            for level, (fusion, volume) in enumerate(zip(self.fusions, volumes, strict=True)):
                skips[level] = fusion(skips[level], volume)
        u = skips.pop()
        decoded = []  # decoder outputs, coarsest first
        for up in self.ups:
            u = up(u, skips.pop())
            decoded.append(u)
        logits = self.final_conv(u)
        if not (self.training and self.heads):
            return logits
        coarser = decoded[::-1][1:]  # level 1, 2, ...
        return [logits, *(head(level) for head, level in zip(self.heads, coarser, strict=False))]

    def _cpu_bf16_unsafe(self, x: torch.Tensor) -> bool:
        """Whether CPU bf16 autocast is on and a U-Net level of ``x`` is 2 voxels deep (D, the first axis).

        oneDNN's bf16 weight gradient of a 3x3x3 convolution over a 2-voxel-deep input is garbage (values up
        to 1e37 or NaN that change from call to call; measured with torch 2.13 on AVX-512 BF16, depth 1 and
        3 and 2-voxel H or W are right), so such inputs run in float32, with one warning. A 64^3 patch has
        levels 64 to 8 deep; a 16^3 one has a 2-deep bottleneck.
        """
        if not (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")):
            return False
        if torch.get_autocast_dtype("cpu") != torch.bfloat16:
            return False
        depths = [x.shape[2] // 2**level for level in range(len(self.downs) + 1)]
        if 2 not in depths:
            return False
        if not self._warned_bf16:
            logger.warning(
                "CPU bf16 autocast is off for inputs of depth %d: a U-Net level would be 2 voxels deep, where "
                "oneDNN's bf16 convolution gradients are wrong; this network runs them in float32.",
                x.shape[2],
            )
            self._warned_bf16 = True
        return True

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5:
            raise ValueError(f"Expected input of shape (B, C, D, H, W), got rank {x.ndim}: {tuple(x.shape)}.")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"Expected {self.in_channels} input channel(s), got {x.shape[1]}: {tuple(x.shape)}."
            )
        if any(s % self.divisor for s in x.shape[2:]):
            raise ValueError(
                f"Spatial size {tuple(x.shape[2:])} is not divisible by {self.divisor} in every dimension."
            )
        if not torch.isfinite(x).all():
            raise ValueError("Input contains NaN or infinite values.")


def _check_arguments(
    spatial_dims: int,
    channels: Sequence[int],
    roi_size: Sequence[int],
    switches: dict[str, Any],
    deep_supervision: int,
) -> None:
    """Raise ValueError naming the first argument of :class:`Dino3DRA` that it cannot be built with."""
    if spatial_dims != 3:
        raise ValueError(f"Dino3DRA is a 3D network, got spatial_dims={spatial_dims}.")
    if len(channels) < NUM_DINO_SKIPS + 1:
        raise ValueError(f"channels needs at least {NUM_DINO_SKIPS + 1} levels, got {tuple(channels)}.")
    if len(roi_size) != 3:
        raise ValueError(f"roi_size must have 3 entries, got {tuple(roi_size)}.")
    for name, value in switches.items():
        check_switch(name, value)
    levels_below = len(channels) - 2
    if isinstance(deep_supervision, bool) or deep_supervision not in range(levels_below + 1):
        raise ValueError(
            f"deep_supervision must be an int from 0 to {levels_below} (heads below full resolution for "
            f"{len(channels)} levels), got {deep_supervision!r}."
        )


def count_parameters(network: Dino3DRA) -> dict[str, int]:
    """Trainable parameters: ``total``, ``dino_path`` (projections + Room-Lite + fusion), ``room_lite``."""

    def n(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    dino = n(network.dino) + n(network.fusions) if network.dino is not None else 0
    room_lite = n(network.dino.coherence) if network.dino is not None and network.dino.coherence else 0
    return {"total": n(network), "dino_path": dino, "room_lite": room_lite}
