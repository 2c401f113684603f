"""PNG previews of a 3DRA volume: maximum-intensity projections with the labels drawn on top (Pillow only)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from scripts.labels import ANEURYSM_LABEL, COMPONENT_CONNECTIVITY, VESSEL_LABEL

__all__ = [
    "COMPARISON_GAP",
    "render_oriented_preview",
    "save_oriented_comparison",
    "save_oriented_preview",
    "save_preview",
]

COMPARISON_GAP = 16
"""Pixels between the pictures of :func:`save_oriented_comparison` (the panels of one are 4 apart)."""
_PANEL_GAP = 4
_BACKGROUND_RGB = (30, 30, 30)
_ANEURYSM_RGB = np.array([255, 40, 40], dtype=np.float32)
_VESSEL_RGB = np.array([40, 220, 90], dtype=np.float32)


def _window(mip: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip((mip - low) / max(high - low, 1e-6), 0.0, 1.0)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _panel(
    gray: np.ndarray,
    aneurysm: np.ndarray,
    vessel: np.ndarray | None,
    pixel_mm: tuple[float, float],
    scale: float,
    alpha: float,
    vessel_alpha: float = 0.0,
) -> Image.Image:
    """One (rows, cols) panel -> RGB image resampled to square pixels of ``scale`` px/mm."""
    rgb = np.repeat(gray[..., None] * 255.0, 3, axis=-1)
    if vessel is not None:
        if vessel_alpha > 0:
            rgb[vessel] = (1 - vessel_alpha) * rgb[vessel] + vessel_alpha * _VESSEL_RGB
        edge = _outline(vessel)
        rgb[edge] = 0.65 * rgb[edge] + 0.35 * _VESSEL_RGB
    rgb[aneurysm] = (1 - alpha) * rgb[aneurysm] + alpha * _ANEURYSM_RGB
    edge = _outline(aneurysm)
    rgb[edge] = _ANEURYSM_RGB
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB")
    size = (
        max(1, round(gray.shape[1] * pixel_mm[1] * scale)),
        max(1, round(gray.shape[0] * pixel_mm[0] * scale)),
    )
    return image.resize(size, Image.Resampling.NEAREST)


def _views(volume: np.ndarray, reduce) -> list[np.ndarray]:
    """Axial (over Z), coronal (over Y), sagittal (over X) 2D views as (rows, cols) display arrays.

    Display conventions (radiological-ish, RAS array): axial rows = Y with anterior up, cols = X;
    coronal rows = Z with superior up, cols = X; sagittal rows = Z with superior up, cols = Y.
    """
    axial = reduce(volume, 2).T[::-1, :]  # (X, Y) -> (Y, X), anterior at the top
    coronal = reduce(volume, 1).T[::-1, :]  # (X, Z) -> (Z, X), superior at the top
    sagittal = reduce(volume, 0).T[::-1, :]  # (Y, Z) -> (Z, Y), superior at the top
    return [axial, coronal, sagittal]


def save_preview(
    image: np.ndarray, label: np.ndarray, spacing: Sequence[float], path: str | os.PathLike, **kwargs
) -> str:
    """Write :func:`render_preview` of a volume as a PNG (parent folders created); return the path."""
    return _save(render_preview(image, label, spacing, **kwargs), path)


def render_preview(
    image: np.ndarray,
    label: np.ndarray,
    spacing: Sequence[float],
    *,
    vessel_outline: bool = True,
    slices: bool = True,
    scale: float = 5.0,
    alpha: float = 0.45,
    title: str | None = None,
    focus: Sequence[int] | None = None,
    markers: Sequence[tuple[Sequence[float], float]] = (),
    vessel_alpha: float = 0.0,
    numbers: Sequence[tuple[Sequence[float], str]] = (),
) -> Image.Image:
    """MIPs along Z, Y and X side by side, aneurysm (label 2) overlaid in red, as an RGB image.

    Args:
        image: (X, Y, Z) intensities.
        label: (X, Y, Z) labels, 0 background, 1 vessel, 2 aneurysm.
        spacing: voxel spacing (mm) along (X, Y, Z); panels are resampled to square millimetres.
        vessel_outline: draw the outline of the projected vessel label in green. Default True.
        slices: add a second row with the axial, coronal and sagittal slices through the largest
            aneurysm's centroid (the volume centre without aneurysm), to show the slice appearance.
            Default True.
        scale: output pixels per millimetre. Default 5.
        alpha: opacity of the aneurysm fill. Default 0.45.
        title: optional text drawn in the top-left corner.
        focus: voxel (X, Y, Z) the slices go through, instead of the aneurysm centroid.
        markers: ``(voxel, radius_mm)`` circles drawn in yellow on the MIPs (e.g. hard negatives).
        vessel_alpha: opacity of a green fill of the projected vessel label (0: outline only). Default 0.
        numbers: ``(voxel, text)`` labels drawn in white beside each voxel's projection on every MIP (e.g.
            each aneurysm's number at its centroid).

    Returns:
        the picture, panels on a dark grey canvas 4 pixels apart.
    """
    image, label = _check_volumes(image, label)
    if len(spacing) != 3:
        raise ValueError(f"spacing must have 3 entries, got {spacing}.")
    sx, sy, sz = (float(s) for s in spacing)
    pixel_mm = [(sy, sx), (sz, sx), (sz, sy)]
    window = tuple(np.percentile(image, [1.0, 99.95]))
    rows = [_mip_row(image, label, window, pixel_mm, scale, alpha, vessel_outline, vessel_alpha)]
    if slices:
        centre = tuple(int(c) for c in focus) if focus is not None else _focus(label)
        rows.append(_slice_row(image, label, centre, window, pixel_mm, scale, vessel_outline))
    canvas = _arrange(rows, _PANEL_GAP)
    _annotate(ImageDraw.Draw(canvas), rows[0], (sx, sy, sz), label.shape, scale, markers, numbers, title)
    return canvas


def _check_volumes(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``image`` and ``label`` as arrays; a ``ValueError`` unless both are 3D of one shape."""
    image, label = np.asarray(image), np.asarray(label)
    if image.ndim != 3 or image.shape != label.shape:
        raise ValueError(f"image and label must be 3D of equal shape, got {image.shape} and {label.shape}.")
    return image, label


def _mip_row(
    image: np.ndarray,
    label: np.ndarray,
    window: tuple[float, float],
    pixel_mm: Sequence[tuple[float, float]],
    scale: float,
    alpha: float,
    vessel_outline: bool,
    vessel_alpha: float,
) -> list[Image.Image]:
    """Axial, coronal and sagittal MIPs of (X, Y, Z) ``image`` with the projected labels drawn on top."""
    mips = _views(image, lambda v, axis: v.max(axis=axis))
    aneurysm_proj = _views(label == ANEURYSM_LABEL, lambda v, axis: v.any(axis=axis))
    vessel_proj = (
        _views(label == VESSEL_LABEL, lambda v, axis: v.any(axis=axis)) if vessel_outline else [None] * 3
    )
    return [
        _panel(_window(m, *window), a, v, px, scale, alpha, vessel_alpha)
        for m, a, v, px in zip(mips, aneurysm_proj, vessel_proj, pixel_mm, strict=True)
    ]


def _annotate(
    draw: ImageDraw.ImageDraw,
    panels: Sequence[Image.Image],
    spacing: tuple[float, float, float],
    shape: Sequence[int],
    scale: float,
    markers: Sequence[tuple[Sequence[float], float]],
    numbers: Sequence[tuple[Sequence[float], str]],
    title: str | None,
) -> None:
    """Name the MIP ``panels`` and draw the markers, numbers and title (see :func:`render_preview`)."""
    x = 0
    for panel, name in zip(panels, ["axial MIP", "coronal MIP", "sagittal MIP"], strict=True):
        draw.text((x + 4, panels[0].height - 14), name, fill=(255, 255, 0))
        x += panel.width + _PANEL_GAP
    for voxel, radius in markers:
        _draw_marker(draw, voxel, radius, spacing, shape, panels, _PANEL_GAP, scale)
    for voxel, text in numbers:
        _draw_number(draw, voxel, text, spacing, shape, panels, _PANEL_GAP, scale)
    if title:
        draw.text((4, 4), title, fill=(255, 255, 0))


def _slice_row(
    image: np.ndarray,
    label: np.ndarray,
    centre: Sequence[int],
    window: tuple[float, float],
    pixel_mm: Sequence[tuple[float, float]],
    scale: float,
    vessel_outline: bool,
) -> list[Image.Image]:
    """Axial, coronal and sagittal slices of (X, Y, Z) ``image`` and ``label`` through voxel ``centre``."""
    cuts = [
        (image[:, :, centre[2]].T[::-1, :], label[:, :, centre[2]].T[::-1, :]),
        (image[:, centre[1], :].T[::-1, :], label[:, centre[1], :].T[::-1, :]),
        (image[centre[0], :, :].T[::-1, :], label[centre[0], :, :].T[::-1, :]),
    ]
    return [
        _panel(
            _window(img, *window),
            lab == ANEURYSM_LABEL,
            (lab == VESSEL_LABEL) if vessel_outline else None,
            px,
            scale,
            0.25,
        )
        for (img, lab), px in zip(cuts, pixel_mm, strict=True)
    ]


def _arrange(rows: Sequence[Sequence[Image.Image]], gap: int) -> Image.Image:
    """Rows of pictures, left to right and top to bottom, ``gap`` pixels apart on a dark grey canvas."""
    width = max(sum(p.width for p in row) + gap * (len(row) - 1) for row in rows)
    height = sum(max(p.height for p in row) for row in rows) + gap * (len(rows) - 1)
    canvas = Image.new("RGB", (width, height), _BACKGROUND_RGB)
    y = 0
    for row in rows:
        x = 0
        for panel in row:
            canvas.paste(panel, (x, y))
            x += panel.width + gap
        y += max(p.height for p in row) + gap
    return canvas


def _save(picture: Image.Image, path: str | os.PathLike) -> str:
    """Write ``picture`` to ``path`` (format from its ending), creating the parent folders."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    picture.save(path)
    return path


def save_oriented_preview(
    image: np.ndarray, label: np.ndarray, affine: np.ndarray, path: str | os.PathLike, **kwargs
) -> str:
    """Write :func:`render_oriented_preview` as a PNG (parent folders created); return the path."""
    return _save(render_oriented_preview(image, label, affine, **kwargs), path)


def render_oriented_preview(
    image: np.ndarray,
    label: np.ndarray,
    affine: np.ndarray,
    *,
    world_numbers: Sequence[tuple[Sequence[float], str]] = (),
    panel_pixels: int = 320,
    **kwargs,
) -> Image.Image:
    """:func:`render_preview` of a volume in its file's own voxel axes, whatever its orientation.

    The arrays are reordered (axes permuted and flipped, never resampled: every voxel is shown as it is)
    to the closest RAS axes (``nibabel.orientations.io_orientation``), so that the panels are axial,
    coronal and sagittal views with anterior and superior at the top.

    Args:
        image: (D, H, W) intensities in the file's voxel axes.
        label: (D, H, W) labels 0/1/2 on the same grid.
        affine: (4, 4) voxel-to-world (RAS mm) matrix of that grid.
        world_numbers: ``(point, text)`` labels at world (RAS mm) points, e.g. each aneurysm's number at its
            centroid; drawn on every MIP.
        panel_pixels: size in pixels of the volume's longest side (in mm) on its panels. Default 320.
        **kwargs: further :func:`render_preview` arguments (``slices``, ``title``, ``vessel_alpha``, ...).

    Returns:
        the picture.
    """
    image, label = _check_volumes(image, label)
    affine = np.asarray(affine, dtype=float)
    orientation = nib.orientations.io_orientation(affine)
    # voxel-to-world of the reordered arrays (from the shape before reordering)
    ras_affine = affine @ nib.orientations.inv_ornt_aff(orientation, label.shape)
    image = nib.orientations.apply_orientation(image, orientation)
    label = nib.orientations.apply_orientation(label, orientation)
    spacing = np.linalg.norm(ras_affine[:3, :3], axis=0)
    to_voxel = np.linalg.inv(ras_affine)
    numbers = [((to_voxel @ [*point, 1.0])[:3], text) for point, text in world_numbers]
    scale = panel_pixels / float(np.max(np.asarray(label.shape) * spacing))
    return render_preview(image, label, spacing, scale=scale, numbers=numbers, **kwargs)


def save_oriented_comparison(
    image: np.ndarray,
    labels: Sequence[np.ndarray],
    affine: np.ndarray,
    path: str | os.PathLike,
    *,
    titles: Sequence[str | None] | None = None,
    world_numbers: Sequence[Sequence[tuple[Sequence[float], str]]] | None = None,
    **kwargs,
) -> str:
    """Write one image with several label volumes (e.g. truth and prediction) side by side as a PNG.

    Each label volume gets its own :func:`render_oriented_preview` of the same image (same window, same
    scale), left to right in the order given, :data:`COMPARISON_GAP` pixels apart.

    Args:
        image: (D, H, W) intensities in the file's voxel axes.
        labels: one or more (D, H, W) label volumes 0/1/2 on the image's grid.
        affine: (4, 4) voxel-to-world (RAS mm) matrix of that grid.
        path: output ``.png`` path; parent folders are created.
        titles: one title (or None) per label volume. Default none.
        world_numbers: one ``[(point, text), ...]`` per label volume, as for :func:`render_oriented_preview`.
            Default none.
        **kwargs: further :func:`render_oriented_preview` arguments, the same for every picture.

    Returns:
        the path written.
    """
    if len(labels) == 0:
        raise ValueError("labels must hold at least one label volume, got none.")
    titles = list(titles) if titles is not None else [None] * len(labels)
    world_numbers = list(world_numbers) if world_numbers is not None else [()] * len(labels)
    if not len(titles) == len(world_numbers) == len(labels):
        raise ValueError(
            f"one title and one list of numbers per label volume: {len(labels)} labels, {len(titles)} titles, "
            f"{len(world_numbers)} lists of numbers."
        )
    pictures = [
        render_oriented_preview(image, label, affine, title=title, world_numbers=numbers, **kwargs)
        for label, title, numbers in zip(labels, titles, world_numbers, strict=True)
    ]
    return _save(_arrange([pictures], COMPARISON_GAP), path)


def _mip_spots(voxel, spacing, shape, panels, gap, scale) -> list[tuple[float, float]]:
    """Canvas pixel (x, y) of ``voxel``'s centre on each MIP panel (same flips as :func:`_views`)."""
    sx, sy, sz = spacing
    x, y, z = (float(v) for v in voxel)
    # (col_mm, row_mm) of the voxel in each panel, rows flipped so that anterior / superior are up
    spots = [
        (x * sx, (shape[1] - 1 - y) * sy),
        (x * sx, (shape[2] - 1 - z) * sz),
        (y * sy, (shape[2] - 1 - z) * sz),
    ]
    out, left = [], 0
    for panel, (col, row) in zip(panels, spots, strict=True):
        out.append((left + (col + 0.5) * scale, (row + 0.5) * scale))
        left += panel.width + gap
    return out


def _draw_marker(draw, voxel, radius, spacing, shape, panels, gap, scale) -> None:
    """Yellow circle of ``radius`` mm around ``voxel`` on each MIP panel."""
    r = max(radius * scale, 3)
    for cx, cy in _mip_spots(voxel, spacing, shape, panels, gap, scale):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(255, 230, 0))


def _draw_number(draw, voxel, text, spacing, shape, panels, gap, scale) -> None:
    """``text`` in white with a black edge just right of and above ``voxel`` on each MIP panel."""
    font = ImageFont.load_default(size=14)
    for cx, cy in _mip_spots(voxel, spacing, shape, panels, gap, scale):
        # whole pixels, so that a point computed through another affine (1e-12 off) lands on the same pixel
        position = (round(cx) + 4, round(cy) - 4)
        draw.text(
            position,
            text,
            fill=(255, 255, 255),
            font=font,
            anchor="lb",
            stroke_width=2,
            stroke_fill=(0, 0, 0),
        )


def _focus(label: np.ndarray) -> tuple[int, int, int]:
    """Voxel index of the centroid of the largest aneurysm component, else the volume centre."""
    components, count = ndimage.label(label == ANEURYSM_LABEL, structure=COMPONENT_CONNECTIVITY)
    if count == 0:
        return tuple(int(n // 2) for n in label.shape)
    sizes = np.bincount(components.ravel())[1:]
    coords = np.argwhere(components == int(np.argmax(sizes)) + 1)
    return tuple(int(c) for c in np.round(coords.mean(axis=0)))
