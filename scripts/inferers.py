"""Mixed precision on the CPU: MONAI's engines autocast on CUDA only, this wraps any inferer instead."""

from __future__ import annotations

import logging
from typing import Any

import torch
from monai.inferers import Inferer

__all__ = ["AutocastInferer", "cpu_bf16_supported", "encoder_dtype"]

logger = logging.getLogger(__name__)


def cpu_bf16_supported() -> bool:
    """Whether this CPU runs bfloat16 matrix and convolution kernels natively (AVX-512 BF16 or AMX).

    Without them bf16 is emulated and slower than float32, so configs autocast only where this holds.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # builds without oneDNN
        return False


def encoder_dtype(device: torch.device | str) -> str:
    """The dtype the frozen slice encoder runs in on ``device``: bf16 only where it is native.

    ``"bfloat16"`` on a CUDA GPU with bf16 and on a CPU with native bf16 kernels, else ``"float32"``: emulated
    bf16 made the ViT-S/16 about 6x slower than float32 on an AVX2-only CPU (46 s against 7.3 s for 64 slices).
    """
    device = torch.device(device)
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = device.type == "cpu" and cpu_bf16_supported()
    return "bfloat16" if native else "float32"


class AutocastInferer(Inferer):
    """Run ``inferer`` under ``torch.autocast(device_type, dtype)`` and return float32 logits.

    Convolutions and matrix products run in ``dtype``; norms, softmax and the loss (computed by the
    engine on the returned float32 logits) stay in float32, as PyTorch's autocast lists decide.
    On a CPU with native bf16 a training step of the U-Net takes about half the time.

    Args:
        inferer: the wrapped inferer (``SimpleInferer``, ``SlidingWindowInferer``, ...).
        enabled: autocast at all; False makes this a transparent wrapper. Default True.
        device_type: ``"cpu"`` or ``"cuda"``. Default ``"cpu"``.
        dtype: ``"bfloat16"`` or ``"float16"``. Default ``"bfloat16"``.
    """

    def __init__(
        self, inferer: Inferer, enabled: bool = True, device_type: str = "cpu", dtype: str = "bfloat16"
    ) -> None:
        super().__init__()
        if not isinstance(enabled, bool):
            raise ValueError(f"enabled must be True or False, got {enabled!r}.")
        if dtype not in ("bfloat16", "float16"):
            raise ValueError(f"dtype must be 'bfloat16' or 'float16', got {dtype!r}.")
        self.inferer = inferer
        self.enabled = enabled
        self.device_type = device_type
        self.dtype = getattr(torch, dtype)
        logger.info("autocast %s on %s: %s", dtype, device_type, "on" if enabled else "off")

    def __getattr__(self, name: str) -> Any:
        # settings such as roi_size and overlap read through to the wrapped inferer
        if name == "inferer":
            raise AttributeError(name)
        return getattr(self.inferer, name)

    def __call__(
        self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any
    ) -> torch.Tensor | list[torch.Tensor]:
        """``inputs``: (B, C, D, H, W) -> float32 logits as the wrapped inferer shapes them (a list of them
        for a deeply supervised network in training mode)."""
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled):
            out = self.inferer(inputs, network, *args, **kwargs)
        if not self.enabled:
            return out
        return [o.float() for o in out] if isinstance(out, (list, tuple)) else out.float()
