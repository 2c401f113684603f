"""Label-balanced training crops whose in-plane windows repeat, so slice embeddings can be reused."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, SpatialCrop
from monai.transforms.traits import MultiSampleTrait
from monai.utils import convert_to_numpy
from nibabel.affines import apply_affine
from scipy import ndimage

from scripts.labels import COMPONENT_CONNECTIVITY

__all__ = [
    "CacheAlignedRandCropByLabelClassesd",
    "aligned_starts",
    "bright_background_voxels",
    "empty_window_starts",
    "prepared_voxels",
]


def aligned_starts(size: int, roi: int, grid: int) -> np.ndarray:
    """Allowed crop starts along one axis: multiples of ``grid`` plus the last valid start ``size - roi``."""
    if roi > size:
        raise ValueError(f"Crop of {roi} voxels does not fit an axis of {size} voxels: pad the volume first.")
    return np.union1d(np.arange(0, size - roi + 1, grid), [size - roi])


def empty_window_starts(
    foreground: np.ndarray, spatial_size: Sequence[int], grid: int, slice_axis: int
) -> np.ndarray:
    """Crop starts whose window holds no foreground voxel, in-plane starts on the grid.

    Args:
        foreground: (D, H, W) bool mask of every labelled structure.
        spatial_size: the crop size.
        grid: in-plane start grid (see :func:`aligned_starts`); the slice-axis start is free.
        slice_axis: the spatial axis whose start is free.

    Returns:
        (K, 3) int array of starts, K = 0 when every window touches the foreground.
    """
    shape = foreground.shape
    # summed-area table with a leading zero plane per axis: box sums by inclusion-exclusion
    table = np.zeros(tuple(n + 1 for n in shape), dtype=np.int64)
    table[1:, 1:, 1:] = foreground.astype(np.int64).cumsum(0).cumsum(1).cumsum(2)
    starts = [
        np.arange(size - roi + 1) if axis == slice_axis else aligned_starts(size, roi, grid)
        for axis, (size, roi) in enumerate(zip(shape, spatial_size, strict=True))
    ]
    a, b, c = np.meshgrid(*starts, indexing="ij")
    ra, rb, rc = (int(r) for r in spatial_size)
    count = (
        table[a + ra, b + rb, c + rc]
        - table[a, b + rb, c + rc]
        - table[a + ra, b, c + rc]
        - table[a + ra, b + rb, c]
        + table[a, b, c + rc]
        + table[a, b + rb, c]
        + table[a + ra, b, c]
        - table[a, b, c]
    )
    empty = count == 0
    return np.stack([a[empty], b[empty], c[empty]], axis=1)


def bright_background_voxels(image: np.ndarray, label: np.ndarray, margin: int = 2) -> np.ndarray:
    """Flat indices of unlabelled voxels as bright as the labelled lumen: bone, metal, bright streaks.

    A voxel qualifies when it is more than ``margin`` voxels from every labelled voxel (so the partial-volume
    rim of a vessel does not) and at least as bright as the median labelled voxel. A case with no labelled
    voxel has none: its crops are all background anyway.

    Args:
        image: (D, H, W) intensities.
        label: (D, H, W) integer classes, 0 background.
        margin: voxels around the labels left out. Default 2.

    Returns:
        (K,) int array of flat indices into ``label``; K = 0 when none qualifies.
    """
    labelled = label > 0
    if not labelled.any():
        return np.zeros(0, dtype=np.int64)
    near = ndimage.binary_dilation(labelled, iterations=margin) if margin > 0 else labelled
    return np.flatnonzero((image >= np.median(image[labelled])) & ~near)


def prepared_voxels(voxels: Any, label: Any) -> np.ndarray:
    """Voxel positions given in the label file's grid, mapped onto ``label``'s grid after preprocessing.

    Reorientation and resampling move every voxel; a position is carried through the world coordinates of
    the label as loaded (``original_affine`` in its metadata) and the label's current affine. Positions that
    land outside the volume are dropped. A label without that metadata (a plain array) is taken as the
    file's own grid.

    Args:
        voxels: (K, 3) voxel indices in the label file's grid; K may be 0.
        label: (1, D, H, W) the preprocessed label, a MetaTensor when it was loaded from a file.

    Returns:
        (K', 3) int array of voxel indices into ``label[0]``, K' <= K.
    """
    points = np.asarray(voxels, dtype=float).reshape(-1, 3)
    meta = getattr(label, "meta", {})
    if "original_affine" in meta and len(points):
        to_world = convert_to_numpy(meta["original_affine"]).astype(float)
        to_voxel = np.linalg.inv(convert_to_numpy(label.affine).astype(float))
        points = apply_affine(to_voxel @ to_world, points)
    points = np.rint(points).astype(int)
    inside = np.all((points >= 0) & (points < np.asarray(label.shape[1:])), axis=1)
    return points[inside]


class CacheAlignedRandCropByLabelClassesd(Randomizable, MapTransform, MultiSampleTrait):
    """Random crops centred on a voxel of a class drawn with ``ratios``, with in-plane starts on a grid.

    A slice embedding depends on the slice's in-plane window only, not on where along the slice axis the
    crop starts. Snapping the two in-plane starts to multiples of ``grid`` (and the last valid start)
    bounds the distinct windows of a ``S x S`` slice to ``(ceil((S - roi) / grid) + 1) ** 2``, so after the
    first epoch nearly every slice of every crop is an embedding-cache hit, while the start along the slice
    axis stays free. A crop centre moves by at most ``grid / 2`` voxels in-plane.

    Args:
        keys: keys to crop (image and label).
        label_key: the label used to pick centres, (1, D, H, W).
        spatial_size: crop size.
        ratios: sampling weight of each class 0..len(ratios)-1; classes absent from a case are skipped.
        num_samples: crops per case. Default 1.
        empty_ratio: sampling weight, beside ``ratios``, of a window with no labelled voxel at all (plain
            background; cases without such a window skip it). Without it a model never sees a window of
            background only, and at inference the per-window instance norm stretches such a window's
            noise into what it learnt as structure. Default 0.
        bright_ratio: sampling weight, beside ``ratios``, of a crop centred on unlabelled background as bright
            as the lumen (:func:`bright_background_voxels`: bone, metal; cases without any skip it). These
            hard negatives are rare among crops centred by class, and a model that has seen few calls bone
            vessel. Needs ``image_key``. Default 0.
        hard_negative_ratio: sampling weight, beside ``ratios``, of a crop centred on one of the case's hard
            negatives, each equally likely: structures that look like the class to learn but are not (on the
            phantoms a vessel loop crossing itself, a fusiform bulge, an infundibulum; see
            :func:`scripts.data.datalist.load_split`). Crops centred by class rarely fall on them, as they are
            few voxels of a common class. Cases without any skip it. Default 0.
        hard_negative_key: the key of the hard negatives, (K, 3) voxel indices in the label file's grid
            (:func:`prepared_voxels`); it is dropped from the crops. Default ``"hard_negatives"``.
        image_key: the image the bright voxels are found in, (1, D, H, W). Default ``"image"``.
        component_classes: classes whose crops are centred per connected component (26-connected): one of
            the case's components of that class, each equally likely, then a voxel of it. Otherwise a centre
            is a voxel of the class, each equally likely, and a case's largest aneurysm gets most of its
            class's crops (a 2 mm sac beside a 6 mm one about one in 27). Default none.
        grid: in-plane start grid in voxels. Default 32; 1 disables alignment.
        slice_axis: the spatial axis slices are taken across (free start). Default 2.
        allow_missing_keys: as in MONAI.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str,
        spatial_size: Sequence[int],
        ratios: Sequence[float],
        num_samples: int = 1,
        empty_ratio: float = 0.0,
        bright_ratio: float = 0.0,
        hard_negative_ratio: float = 0.0,
        hard_negative_key: str = "hard_negatives",
        image_key: str = "image",
        component_classes: Sequence[int] = (),
        grid: int = 32,
        slice_axis: int = 2,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if len(spatial_size) != 3 or min(spatial_size) < 1:
            raise ValueError(f"spatial_size must be 3 positive sizes, got {spatial_size}.")
        if not ratios or min(ratios) < 0 or sum(ratios) <= 0:
            raise ValueError(f"ratios must be non-negative with a positive sum, got {ratios}.")
        if grid < 1 or num_samples < 1 or slice_axis not in (0, 1, 2):
            raise ValueError(f"Invalid grid={grid}, num_samples={num_samples} or slice_axis={slice_axis}.")
        self.label_key = label_key
        self.spatial_size = tuple(int(s) for s in spatial_size)
        weights = {
            "empty_ratio": empty_ratio,
            "bright_ratio": bright_ratio,
            "hard_negative_ratio": hard_negative_ratio,
        }
        for name, value in weights.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}.")
        self.ratios = np.asarray(ratios, dtype=float)
        if (
            not isinstance(component_classes, Sequence)
            or isinstance(component_classes, (str, bytes))
            or not all(
                isinstance(c, int) and not isinstance(c, bool) and 0 <= c < len(self.ratios)
                for c in component_classes
            )
        ):
            raise ValueError(
                f"component_classes must be a list of class indices below {len(self.ratios)}, "
                f"got {component_classes!r}."
            )
        self.component_classes = frozenset(component_classes)
        self.empty_ratio = float(empty_ratio)
        self.bright_ratio = float(bright_ratio)
        self.hard_negative_ratio = float(hard_negative_ratio)
        self.hard_negative_key = hard_negative_key
        self.image_key = image_key
        self.num_samples = num_samples
        self.grid = grid
        self.slice_axis = slice_axis

    def randomize(
        self, label: np.ndarray, image: np.ndarray | None = None, hard_negatives: np.ndarray | None = None
    ) -> list[tuple[int, int, int]]:
        """Crop starts for one case. ``label``: (D, H, W) integer classes; ``image``: (D, H, W), needed when
        ``bright_ratio > 0``; ``hard_negatives``: (K, 3) voxel indices into ``label``, used when
        ``hard_negative_ratio > 0``."""
        shape = label.shape
        flat = label.reshape(-1)
        # one pass per weighted class: its voxels, and whether it is present at all
        members = [np.flatnonzero(flat == c) if r > 0 else None for c, r in enumerate(self.ratios)]
        weights = [r if m is not None and m.size else 0.0 for r, m in zip(self.ratios, members, strict=True)]
        # per voxel of a class centred per component: the chance to be the centre, 1 / (components x size)
        chances: dict[int, np.ndarray] = {}
        for c in self.component_classes:
            if members[c] is not None and members[c].size:
                components, count = ndimage.label(label == c, structure=COMPONENT_CONNECTIVITY)
                ids = components.reshape(-1)[members[c]]
                chances[c] = 1.0 / (count * np.bincount(ids)[ids])
        if self.bright_ratio > 0:  # the hard negatives, centred like one more class
            if image is None:
                raise ValueError("bright_ratio > 0 needs the image to find bright background in.")
            members.append(bright_background_voxels(image, label))
            weights.append(self.bright_ratio if members[-1].size else 0.0)
        if self.hard_negative_ratio > 0:  # each hard negative one candidate centre
            points = np.zeros((0, 3), dtype=int) if hard_negatives is None else np.asarray(hard_negatives)
            members.append(np.ravel_multi_index(tuple(points.T), shape) if len(points) else np.zeros(0, int))
            weights.append(self.hard_negative_ratio if len(points) else 0.0)
        weights = np.array(weights)
        empty = (
            empty_window_starts(label > 0, self.spatial_size, self.grid, self.slice_axis)
            if self.empty_ratio > 0
            else np.zeros((0, 3), dtype=int)
        )
        weights = np.append(weights, self.empty_ratio if len(empty) else 0.0)
        if weights.sum() == 0:  # none of the weighted classes present: centre anywhere
            weights = np.ones(1)
            members = [np.arange(flat.size)]
        starts = []
        for _ in range(self.num_samples):
            cls = self.R.choice(len(weights), p=weights / weights.sum())
            if cls == len(members):  # a window of background only
                starts.append(tuple(int(v) for v in empty[self.R.randint(len(empty))]))
                continue
            centre = np.unravel_index(self.R.choice(members[cls], p=chances.get(cls)), shape)
            start = []
            for axis, (c, size, roi) in enumerate(zip(centre, shape, self.spatial_size, strict=True)):
                wanted = int(np.clip(c - roi // 2, 0, size - roi))
                if axis != self.slice_axis:
                    allowed = aligned_starts(size, roi, self.grid)
                    wanted = int(allowed[np.argmin(np.abs(allowed - wanted))])
                start.append(wanted)
            starts.append(tuple(start))
        return starts

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        label = convert_to_numpy(data[self.label_key])
        if any(s < r for s, r in zip(label.shape[1:], self.spatial_size, strict=True)):
            raise ValueError(
                f"Case of spatial shape {label.shape[1:]} is smaller than the crop {self.spatial_size}: "
                "pad it first."
            )
        image = convert_to_numpy(data[self.image_key])[0] if self.bright_ratio > 0 else None
        hard_negatives = None
        if self.hard_negative_ratio > 0:
            if self.hard_negative_key not in data:
                raise ValueError(
                    f"hard_negative_ratio > 0 needs the case's '{self.hard_negative_key}' (load_split's "
                    "hard_negatives=True); this case has none."
                )
            hard_negatives = prepared_voxels(data[self.hard_negative_key], data[self.label_key])
        samples = []
        for start in self.randomize(label[0], image, hard_negatives):
            crop = SpatialCrop(
                roi_start=start, roi_end=[s + r for s, r in zip(start, self.spatial_size, strict=True)]
            )
            sample = {k: v for k, v in data.items() if k != self.hard_negative_key}  # ragged: not batchable
            for key in self.key_iterator(sample):
                sample[key] = crop(sample[key])
            samples.append(sample)
        return samples
