"""Inference on a folder of volumes that goes on past bad cases, and what it leaves in ``output_dir``.

``configs/inference.yaml`` wires these pieces around MONAI's ``SupervisedEvaluator``:

1. :class:`InferenceRun` holds the run: its cases (numbered 1..N in input order), which of them are already
   complete in ``output_dir`` (skipped unless ``overwrite``), which failed and why, and the progress log.
2. :class:`CaseDataset` (a ``monai.data.Dataset``) turns a case whose loading or checks fail (unreadable
   file, NaN, wrong rank, ...: any exception of the preprocessing) into a failure record instead of an
   exception; :func:`collate_cases` and :class:`SkipFailedCases` take such records out of the batches and
   hand them to the run, so the evaluator only ever sees cases that loaded. This works in the loader's
   worker processes too: the records travel in the batches.
3. :class:`WriteCaseOutputsd`, the last post-processing transform, writes each case's files.
4. :meth:`InferenceRun.finish`, the config's last ``run`` step, writes the run's files and then, when a
   case failed, raises :class:`CasesFailed`: ``python -m monai.bundle run`` exits with status 1 and one line
   naming the failed files.

Past one process (``configs/multi_gpu_inference.yaml`` under ``torchrun``): rank ``r`` of ``w`` owns the
cases ``r, r + w, r + 2w, ...`` of the input order (skips, computes and writes them, and only them), and
:meth:`InferenceRun.finish` gathers every rank's records so that rank 0 writes the run's files once.

Per case, ``<case>`` being the input's file name without ``.nii.gz`` / ``.nii``, or the name of a folder holding one
DICOM series (read by :class:`scripts.data.dicom.VolumeReader`; its outputs are NIfTI too, in RAS):

* ``<case>_seg.nii.gz``: uint8 labels 0 background, 1 vessel, 2 aneurysm, in the input's own shape, affine and
  spacing (MONAI's ``NibabelWriter``, as ``SaveImaged`` writes it);
* ``<case>_aneurysms.json``: :func:`scripts.measurements.measure_aneurysms` of that label volume with its
  affine (volume, maximum diameter, neck, height, dome width and ratios, RAS centroid per aneurysm,
  numbered 1..N by size);
* ``<case>_mip.png`` (``save_pictures``, default on): axial, coronal and sagittal maximum-intensity
  projections of the input with the vessel (green) and each aneurysm (red, with its number) overlaid,
  in the input's own voxels (:func:`scripts.data.preview.save_oriented_preview`);
* ``<case>_prob.nii.gz`` (``save_probabilities``, default off): the softmax probabilities, (X, Y, Z, 3)
  float32, channels background, vessel, aneurysm, in the input's geometry (interpolated back from the
  working spacing, before the argmax and the post-processing). float32 because NIfTI has no float16.

Per run: ``measurements.csv`` (one row per aneurysm of every complete case, :func:`write_run_table`),
``report.md`` (that table, the failed cases and the pictures) and ``summary.json`` (``done``, ``skipped`` and
``failed`` cases, the latter with their problem).

**Nothing half-written**: every file goes through :func:`scripts.atomic_io.replace_atomically`, and a case
counts as complete only when all its files exist (and its JSON reads), so a run killed at any point redoes
exactly the unfinished cases when run again (as nnU-Net's ``--continue_prediction``).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import Dataset, NibabelWriter
from monai.data.utils import list_data_collate
from monai.transforms import MapTransform

from scripts.atomic_io import replace_atomically, write_atomically
from scripts.data.dicom import VolumeReader
from scripts.data.preview import save_oriented_preview
from scripts.measurements import (
    AneurysmMeasurement,
    measure_aneurysms,
    table_rows,
    write_case_measurements,
    write_run_table,
)
from scripts.switches import check_switch

__all__ = [
    "CaseDataset",
    "CasesFailed",
    "InferenceRun",
    "SkipFailedCases",
    "WriteCaseOutputsd",
    "case_name",
    "collate_cases",
]

logger = logging.getLogger(__name__)

OUTPUT_SUFFIXES = {
    "label": "_seg.nii.gz",
    "probabilities": "_prob.nii.gz",
    "picture": "_mip.png",
    "measurements": "_aneurysms.json",  # written last: the case is complete once it is there
}
SUMMARY_FILE, TABLE_FILE, REPORT_FILE = "summary.json", "measurements.csv", "report.md"
FAILURE_KEY = "case_failure"
"""Key of the failure record that :class:`CaseDataset` returns for a case that could not be loaded."""
_MAX_PROBLEM_CHARS = 300


class CasesFailed(SystemExit):
    """Raised by :meth:`InferenceRun.finish`, after every file is written, when a case failed.

    A ``SystemExit`` and not an ``Exception``: ``monai.bundle run`` evaluates the config's ``run`` steps inside
    ``except Exception`` blocks that wrap any error in "Failed to evaluate ...", and Python would print the
    whole chain of tracebacks; a ``SystemExit`` passes through them, and Python prints its one-line message
    to stderr and exits with status 1. In-process callers (``ConfigWorkflow.run()``) catch it by this class.

    Attributes:
        failed: one ``{"case", "image", "problem"}`` record per failed case.
    """

    def __init__(self, message: str, failed: Sequence[Mapping[str, str]]) -> None:
        super().__init__(message)
        self.failed = [dict(f) for f in failed]


def case_name(image: str | Path) -> str:
    """The name a case's outputs start with: the file name without ``.nii.gz`` or ``.nii``; a DICOM series
    folder's name."""
    name = Path(str(image)).name or Path(str(image)).resolve().name  # "." as dataset_dir holding a series
    for ending in (".nii.gz", ".nii"):
        if name.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)]
    return name


def describe_problem(error: BaseException, image: str) -> str:
    """One line saying what went wrong with a case, from the innermost error of MONAI's wrapped chain.

    ``apply_transform`` wraps a transform's error as ``RuntimeError("applying transform ...")``; the cause at
    the bottom of the chain says what is wrong (e.g. ``image contains NaN or infinite values``). A leading
    ``<image>: `` is dropped (the log line names the file already); errors other than ``ValueError`` keep
    their type (``ImageFileError: File x.nii.gz is not a gzip file``).
    """
    inner = error
    while inner.__cause__ is not None:
        inner = inner.__cause__
    text = " ".join(str(inner).split())  # one line
    for prefix in (f"{image}: ", f"{Path(image).name}: "):
        text = text.removeprefix(prefix)
    if not isinstance(inner, ValueError) or not text:
        text = f"{type(inner).__name__}: {text}" if text else type(inner).__name__
    return text if len(text) <= _MAX_PROBLEM_CHARS else text[: _MAX_PROBLEM_CHARS - 3] + "..."


def _duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _found(measurements: Sequence[AneurysmMeasurement]) -> str:
    """``no aneurysm`` or ``2 aneurysms, largest 5.31 mm``."""
    if not measurements:
        return "no aneurysm"
    largest = max(m.max_diameter_mm for m in measurements)
    plural = "s" if len(measurements) > 1 else ""
    return f"{len(measurements)} aneurysm{plural}, largest {largest:.2f} mm"


def _write_nifti(path: Path, image: torch.Tensor, dtype: type) -> None:
    """(C, X, Y, Z) MetaTensor -> NIfTI in its own geometry (no resampling), atomically.

    MONAI's ``NibabelWriter`` as ``SaveImaged(resample=False)`` drives it: channel last, one channel squeezed.
    """
    writer = NibabelWriter(output_dtype=dtype)
    writer.set_data_array(image, channel_dim=0, squeeze_end_dims=True)
    writer.set_metadata(image.meta, resample=False)
    replace_atomically(path, writer.write, suffix=".tmp.nii.gz")  # the suffix makes nibabel compress it


def _read_measurements(path: Path) -> list[AneurysmMeasurement] | None:
    """The aneurysms of a case file written by :func:`write_case_measurements`; None if it does not read."""
    try:
        document = json.loads(path.read_text())
        return [
            AneurysmMeasurement(**{**entry, "centroid_ras_mm": tuple(entry["centroid_ras_mm"])})
            for entry in document["aneurysms"]
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return None


class InferenceRun:
    """One inference run over many cases: what is left to do, what failed, the progress and the summary.

    Args:
        cases: the datalist, ``[{"image": path}, ...]`` (``scripts.data.datalist.inference_inputs``).
        output_dir: folder of every output; created when the first file is written.
        save_pictures: write ``<case>_mip.png`` and show it in ``report.md``. Default True.
        save_probabilities: write ``<case>_prob.nii.gz`` (the post-processing must keep the softmax under
            ``prob``; ``configs/inference.yaml`` does when this is True). Default False.
        overwrite: recompute cases whose outputs are already complete. Default False (they are skipped).
        image_key: the datalist's image key. Default ``"image"``.
        rank: this process's rank; it owns the cases whose index modulo ``world_size`` is ``rank``. Default 0.
        world_size: processes sharing the run (``torch.distributed``'s world when above 1). Default 1.

    Raises:
        ValueError: a switch is not a real bool (``--overwrite false`` arrives as a string), a case has no
            image, two cases would write the same output names, or ``rank`` is not in ``range(world_size)``.
    """

    def __init__(
        self,
        cases: Sequence[Mapping[str, Any]],
        output_dir: str | Path,
        save_pictures: bool = True,
        save_probabilities: bool = False,
        overwrite: bool = False,
        image_key: str = "image",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not (
            isinstance(world_size, int)
            and world_size >= 1
            and isinstance(rank, int)
            and 0 <= rank < world_size
        ):
            raise ValueError(
                f"rank must be in range(world_size), got rank={rank!r}, world_size={world_size!r}"
            )
        self.rank, self.world_size = rank, world_size
        for key, value in (
            ("save_pictures", save_pictures),
            ("save_probabilities", save_probabilities),
            ("overwrite", overwrite),
        ):
            check_switch(key, value)
        self.output_dir = Path(output_dir)
        self.save_pictures, self.save_probabilities, self.overwrite = (
            save_pictures,
            save_probabilities,
            overwrite,
        )
        self.image_key = image_key
        self.cases = [dict(case) for case in cases]
        if any(image_key not in case for case in self.cases):
            raise ValueError(f"every case needs an '{image_key}' entry, got {self.cases}")
        images = [str(case[image_key]) for case in self.cases]
        names = [case_name(image) for image in images]
        shared = {name for name, count in Counter(names).items() if count > 1}
        if shared:
            clashes = [image for image, name in zip(images, names, strict=True) if name in shared]
            raise ValueError(
                f"these inputs would write outputs of the same name into {self.output_dir}: {clashes}; "
                "segment them in separate runs with different output_dir"
            )
        self.images = dict(zip(names, images, strict=True))
        self.number = {name: index for index, name in enumerate(names, start=1)}
        self.done: dict[str, dict[str, Any]] = {}
        self.skipped: dict[str, dict[str, Any]] = {}
        self.failed: dict[str, dict[str, Any]] = {}
        self.measurements: dict[str, list[AneurysmMeasurement]] = {}
        self._pending: list[dict[str, Any]] | None = None
        self._started: float | None = None
        self._last: float | None = None

    # ----------------------------------------------------------------------------------------------------
    # which cases to compute

    def outputs(self, name: str) -> dict[str, Path]:
        """The files a complete case ``name`` has, by kind (``label``, ``measurements``, ...)."""
        kinds = ["label", "measurements"]
        kinds += ["picture"] if self.save_pictures else []
        kinds += ["probabilities"] if self.save_probabilities else []
        return {kind: self.output_dir / f"{name}{OUTPUT_SUFFIXES[kind]}" for kind in kinds}

    def _complete(self, name: str) -> list[AneurysmMeasurement] | None:
        """The measurements of a case whose outputs are all there; None when one is missing."""
        if not all(path.is_file() for path in self.outputs(name).values()):
            return None
        return _read_measurements(self.outputs(name)["measurements"])

    def pending(self) -> list[dict[str, Any]]:
        """This rank's cases to compute, in input order: all with ``overwrite``, else those not complete yet.

        Decided once per run (complete cases are logged as skipped then); later calls return the same list.
        """
        if self._pending is None:
            self._pending = []
            for case in self.cases[self.rank :: self.world_size]:
                name = case_name(case[self.image_key])
                measurements = None if self.overwrite else self._complete(name)
                if measurements is None:
                    self._pending.append(case)
                    continue
                self.measurements[name] = measurements
                self.skipped[name] = self._record(name, measurements)
                logger.info(
                    "case %d of %d %s: outputs complete in %s (%s), skipped; --overwrite True recomputes it",
                    self.number[name], len(self.cases), name, self.output_dir, _found(measurements),
                )  # fmt: skip
        return list(self._pending)

    def _record(self, name: str, measurements: Sequence[AneurysmMeasurement]) -> dict[str, Any]:
        return {
            "case": name,
            "image": self.images[name],
            "aneurysms": len(measurements),
            "largest_diameter_mm": max((m.max_diameter_mm for m in measurements), default=None),
        }

    # ----------------------------------------------------------------------------------------------------
    # progress

    def start(self) -> None:
        """Start the clock of the ETA (when the loader starts; the first call counts)."""
        if self._started is None:
            self._started = self._last = time.perf_counter()
            total = len(self._pending if self._pending is not None else self.cases)
            shared = f" (process {self.rank} of {self.world_size})" if self.world_size > 1 else ""
            logger.info(
                "segmenting %d of %d cases into %s%s", total, len(self.cases), self.output_dir, shared
            )

    def _eta(self) -> str:
        now = time.perf_counter()
        elapsed = now - (self._started if self._started is not None else now)
        pending = len(self._pending if self._pending is not None else self.cases)
        remaining = max(pending - len(self.done) - len(self.failed), 0)
        per_case = elapsed / max(len(self.done), 1)
        return f"{_duration(elapsed)} elapsed, ETA {_duration(per_case * remaining)}"

    def _number_of(self, image: str) -> tuple[str, int]:
        """Name and number of a case; one that is not in the datalist (a dataset set by hand) is added."""
        name = case_name(image)
        if name not in self.number:
            self.number[name], self.images[name] = len(self.cases) + 1, image
            self.cases.append({self.image_key: image})
        return name, self.number[name]

    def fail(self, image: str, problem: str) -> None:
        """Record a case that could not be segmented and log it in one line (no traceback)."""
        name, number = self._number_of(image)
        self.failed[name] = {"case": name, "image": image, "problem": problem}
        logger.error("case %d of %d failed, %s: %s", number, len(self.cases), image, problem)

    # ----------------------------------------------------------------------------------------------------
    # per-case outputs

    def write_case(self, label: torch.Tensor, probabilities: torch.Tensor | None = None) -> dict[str, Path]:
        """Write one case's files (see the module docstring), each atomically, the measurements last.

        Args:
            label: (1, X, Y, Z) final labels as a MetaTensor in the input's geometry (after ``Invertd`` and
                the post-processing), whose ``filename_or_obj`` names the input.
            probabilities: (3, X, Y, Z) softmax MetaTensor in the same geometry; needed when
                ``save_probabilities``.

        Returns:
            the files written, by kind.
        """
        image = str(label.meta.get("filename_or_obj", ""))
        name, number = self._number_of(image)
        if label.ndim != 4 or label.shape[0] != 1:
            raise ValueError(f"{image}: expected (1, X, Y, Z) labels, got shape {tuple(label.shape)}")
        if self.save_probabilities and probabilities is None:
            raise ValueError(
                f"{image}: save_probabilities is True but the post-processing kept no probabilities "
                "(configs/inference.yaml copies them to 'prob' after Invertd)"
            )
        paths = self.outputs(name)
        array = label[0].detach().cpu().numpy().astype(np.uint8)
        affine = np.asarray(label.affine.detach().cpu(), dtype=float)  # the written file's affine
        measurements = measure_aneurysms(array, affine)
        if self.save_probabilities:
            _write_nifti(paths["probabilities"], probabilities, np.float32)
        _write_nifti(paths["label"], label, np.uint8)
        if self.save_pictures:
            self._write_picture(paths["picture"], image, array, affine, measurements)
        files = {kind: path.name for kind, path in paths.items()}
        write_case_measurements(
            paths["measurements"], name, measurements, extra={"image": image, "files": files}
        )
        now = time.perf_counter()
        seconds = now - (self._last if self._last is not None else now)
        self._last = now
        self.measurements[name] = measurements
        self.done[name] = {**self._record(name, measurements), "seconds": round(seconds, 2)}
        logger.info(
            "case %d of %d %s: %s -> %s; %s",
            number, len(self.cases), name, _found(measurements), paths["label"].name, self._eta(),
        )  # fmt: skip
        return paths

    def _write_picture(
        self,
        path: Path,
        image: str,
        label: np.ndarray,
        affine: np.ndarray,
        measurements: Sequence[AneurysmMeasurement],
    ) -> None:
        """MIPs of the input as read from its file, the labels overlaid, each aneurysm numbered."""
        reader = VolumeReader()  # NIfTI or DICOM series, as configs/inference.yaml loads it
        volume = np.asarray(reader.get_data(reader.read(image))[0], dtype=np.float32)  # (X, Y, Z)
        title = f"{case_name(image)}: {_found(measurements)}"
        numbers = [(m.centroid_ras_mm, str(m.index)) for m in measurements]
        replace_atomically(
            path,
            lambda tmp: save_oriented_preview(
                volume,
                label,
                affine,
                tmp,
                world_numbers=numbers,
                slices=False,
                vessel_alpha=0.35,
                title=title,
            ),
            suffix=".tmp.png",
        )

    # ----------------------------------------------------------------------------------------------------
    # the run's files

    def finish(self) -> dict[str, Any]:
        """Write ``measurements.csv``, ``report.md`` and ``summary.json``; raise :class:`CasesFailed` if a case
        failed.

        A case that was to be computed but produced no outputs (a post-processing without
        :class:`WriteCaseOutputsd`) counts as failed. With ``world_size`` above 1 every rank must call this
        (it gathers all ranks' records); rank 0 writes the files and raises, the others return the summary.

        Returns:
            the summary (what ``summary.json`` holds) when no case failed, or on ranks other than 0.
        """
        for case in self._pending or []:
            name = case_name(case[self.image_key])
            if name not in self.done and name not in self.failed:
                self.failed[name] = {
                    "case": name,
                    "image": self.images[name],
                    "problem": "no outputs were written for it",
                }
        if self.world_size > 1:
            self._gather()
        order = sorted(self.number, key=self.number.get)
        complete = [name for name in order if name in self.done or name in self.skipped]
        rows = [row for name in complete for row in table_rows(name, self.measurements[name])]
        summary = {
            "output_dir": str(self.output_dir),
            "cases": len(order),
            "settings": {
                "save_pictures": self.save_pictures,
                "save_probabilities": self.save_probabilities,
                "overwrite": self.overwrite,
            },
            "aneurysms": len(rows),
            "done": [self.done[n] for n in order if n in self.done],
            "skipped": [self.skipped[n] for n in order if n in self.skipped],
            "failed": [self.failed[n] for n in order if n in self.failed],
        }
        if self.rank != 0:
            return summary
        write_run_table(self.output_dir / TABLE_FILE, rows)
        write_atomically(self.output_dir / REPORT_FILE, self._report(summary, complete, rows))
        write_atomically(
            self.output_dir / SUMMARY_FILE, json.dumps(summary, indent=2, allow_nan=False) + "\n"
        )
        logger.info(
            "inference: %d cases, %d segmented, %d skipped (complete), %d failed; %d aneurysms; %s, %s and %s "
            "in %s",
            len(order), len(summary["done"]), len(summary["skipped"]), len(summary["failed"]), len(rows),
            SUMMARY_FILE, TABLE_FILE, REPORT_FILE, self.output_dir,
        )  # fmt: skip
        if summary["failed"]:
            listed = "; ".join(f"{f['image']} ({f['problem']})" for f in summary["failed"])
            raise CasesFailed(
                f"inference: {len(summary['failed'])} of {len(order)} cases failed: {listed}. The others are in "
                f"{self.output_dir} ({SUMMARY_FILE}).",
                summary["failed"],
            )
        return summary

    def _gather(self) -> None:
        """Merge every rank's done, skipped and failed records and measurements into this one."""
        mine = (self.done, self.skipped, self.failed, self.measurements)
        ranks: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(ranks, mine)
        for done, skipped, failed, measurements in ranks:
            self.done.update(done)
            self.skipped.update(skipped)
            self.failed.update(failed)
            self.measurements.update(measurements)

    def _report(self, summary: Mapping[str, Any], complete: Sequence[str], rows: Sequence[dict]) -> str:
        """``report.md``: counts, the aneurysm table, the failed cases and the pictures."""

        def number(value: Any) -> str:
            return "" if value is None else f"{value:.2f}"

        lines = [
            "# Inference report",
            "",
            f"{summary['cases']} cases: {len(summary['done'])} segmented now, {len(summary['skipped'])} "
            f"complete from an earlier run, {len(summary['failed'])} failed; {summary['aneurysms']} "
            "aneurysms. Research use only, not for diagnosis.",
            "",
            "## Aneurysms",
            "",
            "Numbered per case by size, as in the pictures; millimetres in the label's RAS world coordinates "
            f"(details in `<case>{OUTPUT_SUFFIXES['measurements']}`, all rows in `{TABLE_FILE}`).",
            "",
            "| case | # | volume (mm³) | max diameter | neck | height | dome width | dome/neck | aspect "
            "| centroid RAS (x, y, z) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            centroid = ", ".join(f"{row[f'centroid_{a}_ras_mm']:.1f}" for a in "xyz")
            cells = [row["case"], str(row["index"]), f"{row['volume_mm3']:.1f}"]
            cells += [
                number(row[k]) for k in ("max_diameter_mm", "neck_width_mm", "height_mm", "dome_width_mm")
            ]
            cells += [number(row["dome_neck_ratio"]), number(row["aspect_ratio"]), centroid]
            lines.append("| " + " | ".join(cells) + " |")
        without = [name for name in complete if not self.measurements[name]]
        if without:
            lines += ["", "No aneurysm found in: " + ", ".join(without) + "."]
        if summary["failed"]:
            lines += ["", "## Failed", ""]
            lines += [f"- `{f['image']}`: {f['problem']}" for f in summary["failed"]]
        if self.save_pictures:
            lines += ["", "## Pictures", ""]
            lines += ["Maximum-intensity projections: vessel green, aneurysms red with their numbers.", ""]
            for name in complete:
                picture = self.outputs(name)["picture"].name
                lines += [f"### {name}: {_found(self.measurements[name])}", "", f"![{name}]({picture})", ""]
        return "\n".join(lines).rstrip("\n") + "\n"


class CaseDataset(Dataset):
    """``monai.data.Dataset`` whose cases that fail to load or pass their checks become failure records.

    Any exception of ``transform`` for an item (an unreadable file, NaN, wrong rank, unknown labels, ...)
    returns ``{FAILURE_KEY: {"image": <path>, "problem": <one line>}}`` instead of propagating, so one bad
    case does not end the run; :func:`collate_cases` and :class:`SkipFailedCases` take it from there.

    Args:
        data: the cases, ``[{"image": path}, ...]``.
        transform: the preprocessing.
        image_key: the key naming the file in a failure record. Default ``"image"``.
    """

    def __init__(self, data: Sequence, transform: Any = None, image_key: str = "image") -> None:
        super().__init__(data=data, transform=transform)
        self.image_key = image_key

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as error:  # any problem of this case; the next case still runs
            image = str(self.data[index].get(self.image_key, f"case {index}"))
            return {FAILURE_KEY: {"image": image, "problem": describe_problem(error, image)}}


def collate_cases(items: Sequence[Mapping[Hashable, Any]]) -> dict[Hashable, Any]:
    """``list_data_collate`` of the cases that loaded, with the failure records under :data:`FAILURE_KEY`.

    A batch of failures only is ``{FAILURE_KEY: [...]}``.
    """
    failures = [item[FAILURE_KEY] for item in items if FAILURE_KEY in item]
    loaded = [item for item in items if FAILURE_KEY not in item]
    batch = list_data_collate(loaded) if loaded else {}
    if failures:
        batch[FAILURE_KEY] = failures
    return batch


class SkipFailedCases:
    """Iterate a loader, hand its failure records to ``run`` and yield only batches that hold a case.

    It has no length, so the evaluator's epoch ends when the loader does (however many cases failed).
    Iterating starts the run's clock (:meth:`InferenceRun.start`).

    Args:
        loader: a ``DataLoader`` of :class:`CaseDataset` with ``collate_fn=collate_cases``.
        run: the :class:`InferenceRun` that records the failures.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, run: InferenceRun) -> None:
        self.loader, self.run = loader, run

    def __iter__(self):
        self.run.start()
        for batch in self.loader:
            for failure in batch.pop(FAILURE_KEY, ()):
                self.run.fail(failure["image"], failure["problem"])
            if batch:
                yield batch


class WriteCaseOutputsd(MapTransform):
    """Post-processing's last step: :meth:`InferenceRun.write_case` for each case, then drop the probabilities.

    Args:
        keys: the final (1, X, Y, Z) label key, after ``Invertd`` and the clean-up. Default ``"pred"``.
        run: the :class:`InferenceRun`.
        probabilities_key: the (3, X, Y, Z) softmax copied after ``Invertd``, present when
            ``save_probabilities``. Default ``"prob"``.
    """

    def __init__(self, keys: KeysCollection, run: InferenceRun, probabilities_key: str = "prob") -> None:
        super().__init__(keys)
        self.run, self.probabilities_key = run, probabilities_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            self.run.write_case(d[key], d.get(self.probabilities_key))
        d.pop(self.probabilities_key, None)  # written: no need to hold 3 volumes until the next case
        return d
