"""Export the whole network, frozen slice encoder included, as one TorchScript file for deployment::

    python -m scripts.export_torchscript --ckpt_file models/model.pt --filepath models/model.ts

then segment with it (``configs/inference_ts.yaml``, stacked on ``configs/inference.yaml``)::

    python -m monai.bundle run --config_file "['configs/inference.yaml','configs/inference_ts.yaml']" \\
        --meta_file configs/metadata.json --logging_file configs/logging.conf --dataset_dir /path/to/niftis

**What is in the file.** ``network_def`` of ``configs/inference.yaml`` (with ``overrides``), built with the
encoder the checkpoint was trained with (its recorded ``dino_model``, see
:func:`~scripts.networks.checkpoint.recorded_encoder`), the checkpoint loaded strictly, in eval mode on
the CPU, without an embedding cache, traced with ``torch.jit.trace`` on one ``(1, in_channels, *roi_size)``
float32 window. The slice encoder is not a registered submodule (``SliceEncoder``), so its weights are baked
into the trace as constants: the file needs neither the DINOv3 weights nor ``transformers``. It also
contains them, so handing it on redistributes Meta's weights, which the DINOv3 License governs
(``metadata.json``'s ``license_notice``).

**Why a wrapper around the trace.** A trace records one call, and this network reads its input's shape in
Python (slice counts, pooled sizes, per-sample reshapes), so the batch size of the traced window is baked
in: a module traced on batch 2 fails on batch 3 ("Expected 1 elements in a list but found 2"). MONAI's
``ckpt_export --use_trace`` saves exactly such a trace, which breaks under ``SlidingWindowInferer``: it
calls the network on up to ``sw_batch_size`` windows and on fewer in the last call. So the trace is made
on a single window and wrapped in :class:`WindowByWindow`, a ``torch.jit.script`` module that runs it on
each window of any batch and concatenates the logits. What stays baked in: the spatial size (``roi_size``,
checked, and the only size ``SlidingWindowInferer`` sends), float32 input, the encoder's ``dino_dtype``
(bf16 by default, as in ``inference.yaml``), and the CPU as device (tensors made on the fly carry it), so
``inference_ts.yaml`` runs on the CPU without autocast. There is no embedding cache in the file: a slice
that overlapping windows share is encoded once per window, where ``inference.yaml``'s in-memory cache
encodes it once (the same logits up to float rounding, more encoder time).

**Checks.** Before the file is put in place the saved module is loaded back and its logits on two random
windows are compared with the eager network's; they must agree within :data:`EXPORT_RTOL` /
:data:`EXPORT_ATOL` (``torch.allclose``), or nothing is written. The file is written next to ``filepath``
and renamed into place (:func:`scripts.atomic_io.replace_atomically`), so a failed export leaves
``filepath`` as it was.

**Extra files** (``torch.jit.load(path, _extra_files={...})``, as MONAI's ``ckpt_export`` stores them):
``metadata.json`` (``configs/metadata.json``), ``inference.json`` (the config the network was built from,
overrides and ``dino_model`` applied) and ``encoder.json`` (the checkpoint's encoder record, ``null`` for the
plain U-Net).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from torch import nn

from scripts.atomic_io import replace_atomically
from scripts.networks.checkpoint import load_network_weights, recorded_encoder

__all__ = ["EXPORT_ATOL", "EXPORT_RTOL", "ExportMismatchError", "WindowByWindow", "export_torchscript"]

logger = logging.getLogger(__name__)

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
#: tolerance between the exported and the eager network's logits (``torch.allclose``). The trace runs the
#: same float32 kernels on the same values; the margin is for kernels that pick another reduction order.
EXPORT_RTOL = 1e-4
EXPORT_ATOL = 1e-4
#: random windows the export is checked on (2: the per-window loop runs more than once)
CHECK_WINDOWS = 2


class ExportMismatchError(RuntimeError):
    """The exported network's logits differ from the eager network's beyond the tolerance."""


class WindowByWindow(nn.Module):
    """Run a network traced on one ``(1, in_channels, *roi_size)`` window on every window of a batch.

    Meant for ``torch.jit.script``: the batch loop is scripted, so it runs for any batch size.

    Args:
        window_network: the traced network (one window in, its logits out).
        in_channels: input channels the trace was made with.
        roi_size: spatial size the trace was made with.
    """

    def __init__(self, window_network: nn.Module, in_channels: int, roi_size: Sequence[int]) -> None:
        super().__init__()
        self.window_network = window_network
        self.in_channels = int(in_channels)
        self.roi_size = [int(s) for s in roi_size]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment a batch of windows.

        Args:
            x: (B, in_channels, *roi_size), float32, finite; B >= 1.

        Returns:
            logits (B, out_channels, *roi_size).
        """
        expected = [self.in_channels] + self.roi_size
        if x.dim() != 5 or x.shape[0] < 1 or x.shape[1:] != expected:
            raise ValueError(
                f"The exported network takes (B, C, D, H, W) windows of (C, D, H, W) = {expected}, the shape it "
                f"was traced with; got {x.shape}."
            )
        if not bool(torch.isfinite(x).all()):  # the eager network's check, which the trace drops
            raise ValueError("Input contains NaN or infinite values.")
        logits = []
        for index in range(x.shape[0]):
            # (1, C, D, H, W) -> (1, out_channels, D, H, W)
            logits.append(self.window_network(x[index : index + 1]))
        return torch.cat(logits)


def export_torchscript(
    bundle_root: str | os.PathLike = ".",
    ckpt_file: str | os.PathLike | None = None,
    filepath: str | os.PathLike | None = None,
    dino_model: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Export ``network_def`` with the weights of ``ckpt_file`` as a TorchScript file (module docstring).

    Args:
        bundle_root: the bundle folder. Default the current one.
        ckpt_file: the network's state dict as training saves it (``models/model.pt``), or a training
            checkpoint holding it under ``"model"``. Default ``<bundle_root>/models/model.pt``.
        filepath: where to write. Default ``<bundle_root>/models/model.ts``.
        dino_model: the slice encoder's weights; None: the ones the checkpoint records. Another encoder than
            the recorded one is refused. Not needed for a checkpoint without encoder (``use_dino=False``).
        config_file: the config holding ``network_def`` and ``roi_size``. Default
            ``<bundle_root>/configs/inference.yaml``.
        overrides: config keys to set first, e.g. ``{"use_dino": False}``, or ``dino_config`` and
            ``dino_image_size`` for a tiny test encoder.

    Returns:
        the path written.

    Raises:
        FileNotFoundError: the checkpoint or ``configs/metadata.json`` does not exist.
        EncoderWeightsError: the checkpoint cannot be read (the message names it), or the encoder weights
            cannot be loaded.
        EncoderMismatchError: the checkpoint was trained with another encoder than ``dino_model``.
        ValueError: ``use_dino`` disagrees with the checkpoint, or its state dict does not fit ``network_def``.
        ExportMismatchError: the exported network computes other logits than the eager one.
    """
    root = Path(bundle_root)
    ckpt, target, config, meta_file = _resolve_files(root, ckpt_file, filepath, config_file)
    record = recorded_encoder(ckpt)

    parser = _network_config(config, root, record, dino_model, overrides or {}, ckpt)
    network = _load_network(parser, ckpt)
    roi_size = [int(s) for s in parser.get_parsed_content("roi_size")]
    in_channels = int(parser.get_parsed_content("network_def#in_channels"))
    exported = _trace_window_by_window(network, in_channels, roi_size)

    generator = torch.Generator().manual_seed(0)
    windows = torch.rand((CHECK_WINDOWS, in_channels, *roi_size), generator=generator)
    with torch.no_grad():
        expected = network(windows)
    extra_files = _extra_files(meta_file, parser, record)
    replace_atomically(
        target,
        lambda tmp: _save_and_check(exported, extra_files, windows, expected, tmp, target),
        suffix=".ts",
    )
    logger.info(
        "wrote %s (%.1f MiB): %s from %s, encoder %s, windows of %s; run it with configs/inference_ts.yaml",
        target,
        target.stat().st_size / 2**20,
        config,
        ckpt,
        record["source"] if record else "none (plain U-Net)",
        roi_size,
    )
    return target


def _resolve_files(
    root: Path,
    ckpt_file: str | os.PathLike | None,
    filepath: str | os.PathLike | None,
    config_file: str | os.PathLike | None,
) -> tuple[Path, Path, Path, Path]:
    """The checkpoint, target, config and metadata files, defaults filled in from ``root``; the checkpoint and
    the metadata must exist (``FileNotFoundError`` naming them)."""
    ckpt = Path(ckpt_file) if ckpt_file is not None else root / "models" / "model.pt"
    target = Path(filepath) if filepath is not None else root / "models" / "model.ts"
    config = Path(config_file) if config_file is not None else root / "configs" / "inference.yaml"
    meta_file = root / "configs" / "metadata.json"
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"Checkpoint {ckpt} not found: pass ckpt_file (training writes models/model.pt)."
        )
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file} not found: is {root} the bundle root?")
    return ckpt, target, config, meta_file


def _extra_files(meta_file: Path, parser: ConfigParser, record: dict[str, Any] | None) -> dict[str, str]:
    """The files the TorchScript archive carries: the metadata, the resolved config, the encoder record."""
    return {
        "metadata.json": json.dumps(json.loads(meta_file.read_text())),
        # the releasing machine's folder means nothing where the file is used: the bundle root is "."
        "inference.json": json.dumps(
            {**{k: v for k, v in parser.get().items() if k != parser.meta_key}, "bundle_root": "."},
            default=str,
        ),
        "encoder.json": json.dumps(record),
    }


def _save_and_check(
    exported: torch.jit.ScriptModule,
    extra_files: dict[str, str],
    windows: torch.Tensor,
    expected: torch.Tensor,
    tmp: str,
    target: Path,
) -> None:
    """Save ``exported`` to ``tmp``, load it back and check that it gives the eager network's logits on
    ``windows`` (``expected``), else ``ExportMismatchError`` (``target`` is not written)."""
    # saved through a buffer: torch.jit.save names the archive's top folder after a file's name, which
    # would put the random temporary name into the file and make two exports of one model differ
    buffer = io.BytesIO()
    torch.jit.save(exported, buffer, _extra_files=extra_files)
    Path(tmp).write_bytes(buffer.getvalue())
    with torch.no_grad():
        actual = torch.jit.load(tmp, map_location="cpu")(windows)
    if actual.shape != expected.shape:
        raise ExportMismatchError(
            f"The exported network returns logits of shape {tuple(actual.shape)}, the eager one "
            f"{tuple(expected.shape)}: {target} not written."
        )
    difference = (actual - expected).abs().max().item()
    if not torch.allclose(actual, expected, rtol=EXPORT_RTOL, atol=EXPORT_ATOL):
        raise ExportMismatchError(
            f"The exported network's logits differ from the eager network's by up to {difference:.3g} "
            f"(tolerance rtol {EXPORT_RTOL}, atol {EXPORT_ATOL}): {target} not written."
        )
    logger.info(
        "exported vs eager on %d random windows: max abs difference %.3g (logits up to %.3g)",
        CHECK_WINDOWS,
        difference,
        expected.abs().max().item(),
    )


def _network_config(
    config: Path,
    root: Path,
    record: Mapping[str, Any] | None,
    dino_model: str | None,
    overrides: Mapping[str, Any],
    ckpt: Path,
) -> ConfigParser:
    """The config with ``overrides``, and ``dino_model`` the requested or the recorded encoder."""
    parser = ConfigParser()
    parser.read_config(str(config))
    parser.update({"bundle_root": str(root), **overrides})
    use_dino = parser.get_parsed_content("use_dino")
    if record is None and use_dino is True:
        raise ValueError(
            f"{ckpt} holds a network without slice encoder (trained with use_dino False), but use_dino is "
            "True: pass overrides={'use_dino': False}."
        )
    if record is not None and use_dino is False:
        raise ValueError(
            f"{ckpt} holds a network with slice encoder {record.get('source')!r}, but use_dino is False."
        )
    if record is not None:
        parser["dino_model"] = dino_model if dino_model is not None else record["source"]
    return parser


def _load_network(parser: ConfigParser, ckpt: Path) -> nn.Module:
    """``network_def`` with the checkpoint's weights (strict), in eval mode on the CPU, without cache."""
    uncached = ConfigParser(copy.deepcopy(parser.get()))  # the inference.json written is the config as given
    uncached["embedding_cache"] = None  # a traced cache lookup would replay the embeddings of the trace
    network = load_network_weights(uncached.get_parsed_content("network_def"), ckpt, "network_def")
    return network.to("cpu").eval().requires_grad_(False)


def _trace_window_by_window(
    network: nn.Module, in_channels: int, roi_size: list[int]
) -> torch.jit.ScriptModule:
    """The network traced on one random float32 window, wrapped in a scripted :class:`WindowByWindow`."""
    window = torch.rand((1, in_channels, *roi_size), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(), torch.no_grad():
        # every shape the network reads in Python becomes a constant: what WindowByWindow is there for
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(network, window, check_trace=False)
    logger.info("traced %s on one window of %s", type(network).__name__, tuple(window.shape))
    return torch.jit.script(WindowByWindow(traced, in_channels, roi_size))


if __name__ == "__main__":
    import fire

    from scripts.cli import configure_logging

    configure_logging()
    fire.Fire(export_torchscript, serialize=lambda path: None)  # the log names the file
