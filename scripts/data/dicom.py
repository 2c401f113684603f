"""DICOM input: a folder holding one DICOM series reads as one volume, in RAS world coordinates as a NIfTI does.

Reading is MONAI's ``PydicomReader``: it needs only ``pydicom`` (pure Python), where MONAI's other series
reader, ``ITKReader``, needs the large ``itk`` binaries, which this bundle does not otherwise use. Given a folder,
it reads every DICOM file in it, stacks the slices in ``InstanceNumber`` order and builds the affine from the
first slice's ``ImageOrientationPatient``, ``ImagePositionPatient`` and ``PixelSpacing`` and from the first and
last slices' positions, converted from DICOM's LPS to RAS (``affine_lps_to_ras=True``, as ``NibabelReader``
gives it). The array is (X, Y, Z): along a row, down the columns, across the slices. The reader only warns
about slices of different spacing or shape and does not look for a missing slice, so
:class:`DicomSeriesReader` first refuses the folders that it would stack wrongly (more than one series, a
missing slice, uneven spacing, slices of other orientations), naming the folder and the problem.

:class:`VolumeReader` is the reader of ``configs/inference.yaml``'s ``LoadImaged``: a folder through
:class:`DicomSeriesReader`, a file through ``NibabelReader``. The outputs of a DICOM case are NIfTI in that RAS
geometry; DICOM-SEG output would need ``highdicom`` as well, and is not written.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ImageReader, NibabelReader, PydicomReader
from monai.utils import ensure_tuple
from pydicom.misc import is_dicom

__all__ = ["DicomSeriesReader", "VolumeReader", "dicom_files"]

logger = logging.getLogger(__name__)

Paths = Sequence[str | Path] | str | Path
"""What ``LoadImage`` hands a reader: one path, or several."""

GAP_RTOL = 0.01
"""Slices may lie this fraction of their spacing off the evenly spaced line PydicomReader assumes."""
_REQUIRED = (
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
)
_SAME_IN_EVERY_SLICE = ("ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")


def dicom_files(folder: str | Path) -> list[Path]:
    """The DICOM files directly in ``folder``, by content (the ``DICM`` preamble; any extension or none), as
    ``PydicomReader(fname_regex=None)`` selects them; hidden files are left out, and so is a ``DICOMDIR`` (the
    index at the top of a DICOM export, beside its series folders)."""
    return [
        path
        for path in sorted(Path(folder).iterdir())
        if path.is_file()
        and not path.name.startswith(".")
        and path.name.upper() != "DICOMDIR"
        and is_dicom(path)
    ]


def _absent(value: Any) -> bool:
    """An element that is missing or empty (DICOM type 2 elements may be present without a value)."""
    return value is None or (not isinstance(value, int | float) and len(value) == 0)


def check_series(folder: str | Path, slices: Sequence[Any]) -> None:
    """Refuse slices that do not form one evenly spaced series, as ``PydicomReader`` would stack them.

    Args:
        folder: the series folder, named in the errors.
        slices: its pydicom datasets, any order.

    Raises:
        ValueError: fewer than two slices, more than one ``SeriesInstanceUID``, a multi-frame file, a slice
            without position, orientation, spacing, size or instance number, slices of different
            orientation, spacing or size, or positions (in ``InstanceNumber`` order) not evenly spaced along
            one line, as with a missing slice or varying slice spacing.
    """
    if len(slices) < 2:
        raise ValueError(
            f"{folder}: {len(slices)} DICOM slice(s); a series needs one file per slice, at least 2."
        )
    series = Counter(str(s.get("SeriesInstanceUID", "no SeriesInstanceUID")) for s in slices)
    if len(series) > 1:
        counts = " and ".join(str(n) for n in series.values())
        raise ValueError(
            f"{folder}: holds {len(series)} DICOM series ({counts} files by SeriesInstanceUID); put each in a "
            "folder of its own."
        )
    _check_alike(folder, slices)
    _check_evenly_spaced(folder, sorted(slices, key=lambda s: int(s.InstanceNumber)))


def _check_alike(folder: str | Path, slices: Sequence[Any]) -> None:
    """Every slice a single frame with the tags of its geometry, all of the same orientation, spacing and size."""
    for s in slices:
        if int(s.get("NumberOfFrames") or 1) > 1:
            raise ValueError(
                f"{folder}: {Path(s.filename).name} is multi-frame; expected one file per slice."
            )
        missing = [name for name in _REQUIRED if _absent(s.get(name))]
        if missing:
            raise ValueError(f"{folder}: {Path(s.filename).name} has no {', '.join(missing)}.")
    first = slices[0]
    for name in _SAME_IN_EVERY_SLICE:
        for s in slices[1:]:
            if not np.allclose(np.asarray(s.get(name), float), np.asarray(first.get(name), float), atol=1e-4):
                raise ValueError(
                    f"{folder}: slices differ in {name}: {first.get(name)} in {Path(first.filename).name}, "
                    f"{s.get(name)} in {Path(s.filename).name}."
                )


def _check_evenly_spaced(folder: str | Path, ordered: Sequence[Any]) -> None:
    """Slices in stacking order (``InstanceNumber``) at evenly spaced positions on one line, as the affine's
    third column, (last position - first position) / (N - 1), assumes."""
    numbers = [int(s.InstanceNumber) for s in ordered]
    if len(set(numbers)) < len(numbers):
        twice = sorted(n for n, count in Counter(numbers).items() if count > 1)
        raise ValueError(f"{folder}: InstanceNumber {twice} appears in more than one slice.")
    positions = np.array([[float(v) for v in s.ImagePositionPatient] for s in ordered])  # (N, 3) LPS mm
    gaps = np.linalg.norm(np.diff(positions, axis=0), axis=1)  # (N - 1,)
    typical = float(np.median(gaps))
    if typical < 1e-3:
        raise ValueError(
            f"{folder}: slices share their ImagePositionPatient; they do not stack into a volume."
        )
    uneven = np.flatnonzero(np.abs(gaps - typical) > GAP_RTOL * typical)
    if uneven.size:
        i = int(uneven[0])
        raise ValueError(
            f"{folder}: slices are {typical:.4g} mm apart but {gaps[i]:.4g} mm between instances {numbers[i]} "
            f"and {numbers[i + 1]} (a missing slice or varying slice spacing); the series cannot be one "
            "evenly spaced volume."
        )
    step = (positions[-1] - positions[0]) / (len(ordered) - 1)  # (3,)
    line = positions[0] + np.arange(len(ordered))[:, None] * step  # (N, 3)
    if np.linalg.norm(positions - line, axis=1).max() > GAP_RTOL * typical:
        raise ValueError(f"{folder}: slice positions in InstanceNumber order do not lie on one line.")


class DicomSeriesReader(PydicomReader):
    """MONAI's ``PydicomReader`` for a folder holding one DICOM series, refusing one it would stack wrongly.

    The folder's DICOM files are recognised by content (``fname_regex=None``), other files are ignored;
    the affine is in RAS (``affine_lps_to_ras=True``) and the array (X, Y, Z) as ``NibabelReader`` gives it.

    Args:
        kwargs: more arguments of ``PydicomReader``.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{"fname_regex": None, "affine_lps_to_ras": True, **kwargs})

    def verify_suffix(self, filename: Paths) -> bool:
        """Folders only."""
        return all(Path(str(name)).is_dir() for name in ensure_tuple(filename))

    def read(self, data: Paths, **kwargs: Any) -> Any:
        """The pydicom datasets of each folder's series, after :func:`check_series`.

        Raises:
            ValueError: ``data`` names a file, a folder holds sub-folders or no DICOM file, or the
                :func:`check_series` problems; each naming the folder.
        """
        folders = [Path(str(name)) for name in ensure_tuple(data)]
        for folder in folders:
            if not folder.is_dir():
                raise ValueError(
                    f"{folder}: not a folder; a DICOM series is read from the folder of its slices."
                )
            inner = sorted(p.name for p in folder.iterdir() if p.is_dir())
            if inner:  # PydicomReader would try to read them as slices
                raise ValueError(
                    f"{folder}: holds sub-folders {inner}; a series folder holds only its slices."
                )
            if not dicom_files(folder):
                raise ValueError(f"{folder}: no DICOM files in this folder.")
        images = super().read(data, **kwargs)  # one folder: its datasets; several: a list of those
        for folder, slices in zip(folders, [images] if len(folders) == 1 else images, strict=True):
            check_series(folder, ensure_tuple(slices))
            logger.debug("%s: one DICOM series of %d slices", folder, len(ensure_tuple(slices)))
        return images


class VolumeReader(ImageReader):
    """A folder as one DICOM series (:class:`DicomSeriesReader`), a file as NIfTI (``NibabelReader``).

    ``read`` only notes the path and ``get_data`` reads it: ``LoadImage`` with a designated reader catches any
    error of ``read`` and tries all its default readers in turn, so a refused series would be read anyway by
    the unchecked default ``PydicomReader`` and a damaged NIfTI would end in a list of every reader's
    traceback; an error of ``get_data`` reaches the caller as it is (``CaseDataset`` reports it in one line).
    """

    def __init__(self) -> None:
        super().__init__()
        self.dicom, self.nifti = DicomSeriesReader(), NibabelReader()

    def verify_suffix(self, filename: Paths) -> bool:
        """A folder, or a file that ``NibabelReader`` reads."""
        return self.dicom.verify_suffix(filename) or self.nifti.verify_suffix(filename)

    def read(self, data: Paths, **kwargs: Any) -> Paths:
        """The path(s) to read, for :meth:`get_data`."""
        return data

    def get_data(self, img: Paths) -> tuple[np.ndarray, dict]:
        """Read with the folder's or the file's reader: array (X, Y, Z) and metadata, the affine in RAS."""
        reader = self.dicom if Path(str(ensure_tuple(img)[0])).is_dir() else self.nifti
        return reader.get_data(reader.read(img))
