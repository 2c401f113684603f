"""Ignite handlers the configs attach: progress with ETA, cache hit rates, gradient norms, per-case evaluation,
resume."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers.checkpoint import BaseSaveHandler, Checkpoint
from monai.data.utils import set_rnd
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointLoader
from monai.transforms import LoadImage

from scripts.atomic_io import replace_atomically
from scripts.embedding_cache import SliceEmbeddingCache
from scripts.evaluation_report import CaseAneurysms, write_case_aneurysms, write_evaluation
from scripts.labels import ANEURYSM_LABEL
from scripts.metrics import DEFAULT_CLASSES, case_metrics
from scripts.switches import check_switch

__all__ = [
    "MODEL_SELECTIONS",
    "EmbeddingCacheStats",
    "FinalModelSaver",
    "FinalValidation",
    "GradientNorm",
    "ProgressLogger",
    "ResumableCheckpoint",
    "ResumeFrom",
    "SeedEachEpoch",
    "SegmentationMetricsWriter",
    "WeightAverage",
    "class_output",
    "model_filenames",
]

logger = logging.getLogger(__name__)


def class_output(index: int) -> Callable[[Any], tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """``output_transform`` for a metric of one class: one-hot ``pred``/``label`` -> that channel only."""

    def select(output: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        items = output if isinstance(output, list) else [output]
        # each item: (C, D, H, W) one-hot -> (1, D, H, W)
        return [i["pred"][index : index + 1] for i in items], [i["label"][index : index + 1] for i in items]

    return select


class ProgressLogger:
    """Log each finished epoch with its time, the running loss and an ETA for the whole run."""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _start(self, engine: Engine) -> None:
        self._started, self._first_epoch = time.perf_counter(), engine.state.epoch

    def _epoch_completed(self, engine: Engine) -> None:
        state = engine.state
        elapsed = time.perf_counter() - self._started
        done = state.epoch - self._first_epoch
        eta = elapsed / max(done, 1) * (state.max_epochs - state.epoch)
        loss = state.output[0]["loss"] if isinstance(state.output, list) else state.output["loss"]
        logger.info(
            "epoch %d/%d done: last loss %.4f, %.0f s elapsed, ETA %.0f s", state.epoch, state.max_epochs,
            float(loss), elapsed, eta,
        )  # fmt: skip


class EmbeddingCacheStats:
    """Log the slice-embedding cache's hit rate over each epoch of one engine.

    Lookups are counted per iteration of the engine it is attached to, so a validation run nested in a
    training epoch (sharing the cache) is not counted as training, and vice versa.

    Args:
        cache: the cache the network was built with (``Dino3DRA(embedding_cache=...)``). Default None:
            nothing is logged.
        name: what the log line calls the engine. Default ``"train"``.
    """

    def __init__(self, cache: SliceEmbeddingCache | None = None, name: str = "train") -> None:
        self.cache, self.name = cache, name

    def attach(self, engine: Engine) -> None:
        if self.cache is None:
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_STARTED, self._snapshot)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._report)

    def _reset(self, engine: Engine) -> None:
        self.counts = dict.fromkeys(self.cache.stats, 0)

    def _snapshot(self, engine: Engine) -> None:
        self.before = dict(self.cache.stats)

    def _accumulate(self, engine: Engine) -> None:
        for key, value in self.cache.stats.items():
            self.counts[key] += value - self.before[key]

    def _report(self, engine: Engine) -> None:
        hits = self.counts["memory_hits"] + self.counts["disk_hits"]
        total = hits + self.counts["misses"]
        rate = hits / total if total else 0.0
        engine.state.metrics[f"{self.name}_cache_hit_rate"] = rate
        logger.info(
            "%s epoch %d: slice-embedding cache hit rate %.1f%% (%d memory, %d disk hits, %d slices encoded)",
            self.name, engine.state.epoch, 100 * rate, self.counts["memory_hits"], self.counts["disk_hits"],
            self.counts["misses"],
        )  # fmt: skip


class GradientNorm:
    """Measure the gradient's norm at every training step and, with ``max_norm``, clip it there (nnU-Net: 12).

    Runs on MONAI's ``IterationEvents.BACKWARD_COMPLETED``, between the backward pass and the optimizer step,
    on the global L2 norm over the trained parameters (frozen ones have no gradient). Under CUDA amp the
    gradients are unscaled first (``GradScaler.unscale_``), so the norm and the bound are in the loss's own
    units; a step whose gradient is not finite is neither counted nor clipped (under amp the scaler skips
    it). Each epoch's median and largest norm and the share of steps clipped go into the engine's metrics
    (``grad_norm_median``, ``grad_norm_max``, ``grad_clipped``), so the stats handlers attached after it log
    them, and into rank 0's log. Under ``DistributedDataParallel`` the gradients are averaged over ranks
    before this runs, so every rank clips the same (attach it on every rank).

    Args:
        max_norm: the largest global gradient norm a step may take, or None to measure only.

    Raises:
        ValueError: ``max_norm`` is not None or a positive finite number; at attach, an engine accumulating
            gradients over several iterations (clipping there would need the norm of the sum).
    """

    def __init__(self, max_norm: float | None = None) -> None:
        if max_norm is not None and (
            isinstance(max_norm, bool)
            or not isinstance(max_norm, (int, float))
            or not 0 < max_norm < float("inf")
        ):
            raise ValueError(f"grad_clip_norm must be None or a positive finite number, got {max_norm!r}.")
        self.max_norm = max_norm

    def attach(self, engine: Engine) -> None:
        if getattr(engine, "accumulation_steps", 1) > 1:
            raise ValueError(
                f"GradientNorm measures and clips each iteration's gradient, but the trainer accumulates "
                f"{engine.accumulation_steps} iterations per step."
            )
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self._measure)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._report)

    def _reset(self, engine: Engine) -> None:
        self.norms: list[float] = []
        self.clipped = 0

    def _measure(self, engine: Engine) -> None:
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None:
            scaler.unscale_(engine.optimizer)
        parameters = [p for p in engine.network.parameters() if p.grad is not None]
        total = torch.nn.utils.get_total_norm([p.grad for p in parameters])
        norm = float(total)
        if not np.isfinite(norm):
            return
        self.norms.append(norm)
        if self.max_norm is not None and norm > self.max_norm:
            torch.nn.utils.clip_grads_with_norm_(parameters, self.max_norm, total)
            self.clipped += 1

    def _report(self, engine: Engine) -> None:
        if not self.norms:
            return
        median, largest = float(np.median(self.norms)), max(self.norms)
        share = self.clipped / len(self.norms)
        engine.state.metrics.update(grad_norm_median=median, grad_norm_max=largest, grad_clipped=share)
        if idist.get_rank() != 0:  # every rank clips; one logs
            return
        bound = (
            "not clipped" if self.max_norm is None else f"{share:.0%} of steps clipped to {self.max_norm:g}"
        )
        logger.info(
            "epoch %d gradient norm: median %.3g, max %.3g over %d steps, %s", engine.state.epoch, median,
            largest, len(self.norms), bound,
        )  # fmt: skip


class SegmentationMetricsWriter:
    """Score every evaluated case with :mod:`scripts.metrics`, measure its aneurysms, write the evaluation's files.

    Each prediction is compared with the label in the label's own geometry and spacing: ``pred_key`` must
    hold the discrete prediction inverted to that geometry (``Invertd`` + ``AsDiscreted(argmax=True)``).
    Per case, writes ``<case>_aneurysms.json`` (the true and predicted aneurysms measured on that grid with
    the label's affine, detected / false positive) and, with ``save_pictures``, ``<case>_mip.png`` (truth and
    prediction side by side over the MIPs of the image, read again from the file that ``image_key``'s meta
    names); on completion ``per_case.csv``, ``summary.json``, ``summary.md``, ``aneurysms.csv`` and
    ``report.md`` to ``output_dir`` (:mod:`scripts.evaluation_report`). Without the aneurysm class among
    ``classes`` only the first three are written.

    Args:
        output_dir: folder of the files.
        pred_key: key of the (1, D, H, W) discrete prediction. Default ``"pred"``.
        label_key: key of the (1, D, H, W) original label (with its ``pixdim`` meta and affine). Default
            ``"label"``.
        classes: label value -> class name. Default vessel and aneurysm.
        image_key: key of the image whose ``filename_or_obj`` the picture is drawn from; a case without it
            (or whose file does not have the label's shape) gets no picture and a warning. Default ``"image"``.
        save_pictures: write each case's picture and show the pictures in ``report.md``. Default True.

    Raises:
        ValueError: ``save_pictures`` is not a real bool (``--save_pictures false`` arrives as a string).
    """

    def __init__(
        self,
        output_dir: str,
        pred_key: str = "pred",
        label_key: str = "label",
        classes: dict[int, str] | None = None,
        image_key: str = "image",
        save_pictures: bool = True,
    ) -> None:
        check_switch("save_pictures", save_pictures)
        self.output_dir = Path(output_dir)
        self.pred_key, self.label_key, self.image_key = pred_key, label_key, image_key
        self.classes = classes or DEFAULT_CLASSES
        self.save_pictures = save_pictures
        self.records: list[dict[str, Any]] = []
        self.aneurysms: list[CaseAneurysms] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._clear)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._score)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _clear(self, engine: Engine) -> None:
        self.records.clear()
        self.aneurysms.clear()

    def _score(self, engine: Engine) -> None:
        for batch_item, output_item in zip(engine.state.batch, engine.state.output, strict=True):
            item = {**batch_item, **output_item}  # extra keys such as the original label stay in the batch
            label = item[self.label_key]
            case = Path(str(label.meta.get("filename_or_obj", f"case_{len(self.records)}"))).name
            spacing = tuple(float(s) for s in label.meta["pixdim"][1:4])
            pred = item[self.pred_key][0].detach().cpu().numpy().astype(np.int64)
            truth = label[0].cpu().numpy().astype(np.int64)
            record = {"case": case, **case_metrics(pred, truth, spacing, self.classes)}
            self.records.append(record)
            logger.info(
                "%s: %s",
                case,
                ", ".join(f"{n} Dice {record[f'{n}_dice']:.3f}" for n in self.classes.values()),
            )
            if ANEURYSM_LABEL in self.classes:
                self.aneurysms.append(self._measure(item, case, pred, truth, label))

    def _measure(
        self, item: Mapping[str, Any], case: str, pred: np.ndarray, truth: np.ndarray, label: torch.Tensor
    ) -> CaseAneurysms:
        """Write the case's aneurysm files; ``pred`` and ``truth`` (D, H, W), ``label`` (1, D, H, W)."""
        affine = np.asarray(label.affine.detach().cpu(), dtype=float)  # the label's file's grid
        image_file = self._image_file(item)
        image = self._image(case, image_file, truth.shape) if self.save_pictures else None
        files = {"label": str(label.meta.get("filename_or_obj", "")), "image": image_file}
        return write_case_aneurysms(self.output_dir, case, pred, truth, affine, image, extra=files)

    def _image_file(self, item: Mapping[str, Any]) -> str | None:
        meta = getattr(item.get(self.image_key), "meta", None) or {}
        return str(meta["filename_or_obj"]) if meta.get("filename_or_obj") else None

    def _image(self, case: str, image_file: str | None, shape: tuple[int, ...]) -> np.ndarray | None:
        """(D, H, W) image as read from its file, for the picture; None (and a warning) when there is none."""
        if image_file is None:
            logger.warning("%s: no %r with a file name in the batch, so no picture", case, self.image_key)
            return None
        volume = np.asarray(LoadImage(image_only=True)(image_file), dtype=np.float32)
        if volume.shape != shape:
            logger.warning(
                "%s: image %s has shape %s, the label %s, so no picture",
                case,
                image_file,
                volume.shape,
                shape,
            )
            return None
        return volume

    def _write(self, engine: Engine) -> None:
        records, aneurysms = gather_in_sampler_order(self.records), gather_in_sampler_order(self.aneurysms)
        if idist.get_rank() != 0:
            return  # rank 0 writes the run's files, with every rank's cases
        scored = aneurysms if ANEURYSM_LABEL in self.classes else None
        engine.state.metrics["summary"] = write_evaluation(records, self.output_dir, scored)


def gather_in_sampler_order(items: list[Any]) -> list[Any]:
    """Every rank's ``items`` (one per case, in the order the rank met them), in the cases' dataset order.

    Under ``torch.distributed`` with MONAI's ``DistributedSampler(shuffle=False)``, rank ``r`` of ``w`` meets
    the cases ``r, r + w, r + 2w, ...``, so interleaving the ranks' lists restores the order one process
    would have; without a process group ``items`` come back as they are.
    """
    world = idist.get_world_size()
    if world == 1:
        return list(items)
    ranks: list[Any] = [None] * world
    torch.distributed.all_gather_object(ranks, list(items))
    return [ranks[r][i] for i in range(max(map(len, ranks))) for r in range(world) if i < len(ranks[r])]


class FinalValidation:
    """Validate after the last epoch when ``interval`` did not land on it.

    Without this, training for a number of epochs that is not a multiple of ``val_interval`` never
    judges (nor saves as the best model) its last epochs, and a run shorter than ``val_interval`` writes
    no best model at all.

    Args:
        validator: the evaluator that ``ValidationHandler`` runs.
        interval: ``ValidationHandler``'s epoch interval.
    """

    def __init__(self, validator: Engine, interval: int) -> None:
        self.validator, self.interval = validator, interval

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self._validate)

    def _validate(self, engine: Engine) -> None:
        if engine.state.epoch % self.interval:
            self.validator.run(engine.state.epoch)


class SeedEachEpoch:
    """Reseed every random source of a training epoch from ``(seed, epoch, rank)`` as the epoch starts.

    What an epoch draws (its random crops and flips, the order of ``DataLoader(shuffle=True)``, the seeds of
    the loader's workers) then depends on the epoch alone, not on what the process ran before it, so a run
    resumed after epoch N draws in epoch N + 1 what the uninterrupted run drew. ``DistributedSampler``
    shuffles by epoch already. Each rank draws its own stream.

    Args:
        seed: base seed. Default None: ``torch.initial_seed()`` when attached, the seed that the configs'
            ``monai.utils.set_determinism(seed=@seed)`` set in ``initialize``.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def attach(self, engine: Engine) -> None:
        if self.seed is None:
            self.seed = torch.initial_seed()
        engine.add_event_handler(Events.EPOCH_STARTED, self._reseed)

    def _reseed(self, engine: Engine) -> None:
        entropy = [self.seed, engine.state.epoch, idist.get_rank()]
        seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])  # < 2**32, as numpy requires
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        # the transforms' own random states, used in this process when num_workers == 0 (workers are
        # seeded from torch's generator when the epoch's loader iterator starts, after this event)
        dataset = getattr(engine.state.dataloader, "dataset", None)
        if dataset is not None:
            set_rnd(dataset, seed)


class ResumeFrom:
    """Restore a resumable checkpoint into the trainer and ``load_dict`` when ``path`` is given.

    The engine it is attached to is restored as ``"trainer"`` (a config cannot name the trainer inside
    the trainer's own handler list). With :class:`SeedEachEpoch` attached as well, resuming after epoch N
    gives the model, optimizer and scheduler that an uninterrupted run has after every later epoch.

    Args:
        path: a checkpoint written by :class:`ResumableCheckpoint`, or None to start afresh.
        load_dict: the other objects to restore (network, optimizer, scheduler).
        map_location: as in ``torch.load``.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: as training starts, when the checkpoint lacks an object of ``load_dict`` (one written by an
            older version) or does not fit it; the message names the file.
    """

    def __init__(self, path: str | None, load_dict: dict[str, Any], map_location: Any = None) -> None:
        self.path, self.load_dict, self.map_location = path, load_dict, map_location

    def attach(self, engine: Engine) -> None:
        if not self.path:
            return
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"{self.path}: resume checkpoint not found.")
        logger.info("Resuming from %s", self.path)
        load_dict = {**self.load_dict, "trainer": engine}
        loader = CheckpointLoader(load_path=self.path, load_dict=load_dict, map_location=self.map_location)
        loader.logger = engine.logger
        engine.add_event_handler(Events.STARTED, self._load, loader)

    def _load(self, engine: Engine, loader: CheckpointLoader) -> None:
        try:
            loader(engine)
        except ValueError as error:  # ignite's messages name neither the file nor what to do
            raise ValueError(
                f"{self.path}: cannot resume from this checkpoint ({error}); it must hold "
                f"{sorted(loader.load_dict)}, as one written by this version's training does."
            ) from error


class AtomicDiskSaver(BaseSaveHandler):
    """ignite save handler that never leaves a run without a loadable checkpoint.

    Each file is written aside and renamed into place (:func:`scripts.atomic_io.replace_atomically`), and
    the files it supersedes are deleted only after that: ignite's ``Checkpoint`` asks for the old file's
    removal *before* writing the new one, and a run killed in between would have nothing to resume from.
    Only rank ``save_on_rank`` touches the disk.

    Args:
        dirname: folder of the checkpoints.
        save_on_rank: the rank that writes. Default 0.
    """

    def __init__(self, dirname: str | Path, save_on_rank: int = 0) -> None:
        self.dirname, self.save_on_rank = Path(dirname), save_on_rank
        self._superseded: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        superseded, self._superseded = self._superseded, []
        if idist.get_rank() != self.save_on_rank:
            return
        replace_atomically(self.dirname / filename, lambda tmp: torch.save(checkpoint, tmp))
        logger.info("Saved checkpoint %s", self.dirname / filename)
        for name in superseded:
            if name != filename:
                (self.dirname / name).unlink(missing_ok=True)

    def remove(self, filename: str) -> None:
        self._superseded.append(filename)


MODEL_SELECTIONS = ("final", "best")


def model_filenames(selection: str) -> dict[str, str]:
    """File names of the two models a training run writes, ``{"final": ..., "best": ...}``.

    The model at the end of training and the model of the best validation score are both kept; the
    ``selection`` of them is ``model.pt`` (what evaluation, inference and a release use), the other
    ``model_final.pt`` or ``model_best.pt``. nnU-Net ships the final model too: with few validation
    cases the best score is noisy, and it picked early, undertrained epochs here (docs/recipe.md).

    Raises:
        ValueError: ``selection`` is not one of :data:`MODEL_SELECTIONS`.
    """
    if selection not in MODEL_SELECTIONS:
        raise ValueError(f"model_selection must be one of {MODEL_SELECTIONS}, got {selection!r}.")
    other = "best" if selection == "final" else "final"
    return {selection: "model.pt", other: f"model_{other}.pt"}


class FinalModelSaver:
    """Save the network's state dict as ``filename`` once training completes, atomically, on rank 0.

    Only a run that completes writes it: a run stopped early leaves the previous file as it was.

    Args:
        save_dir: folder of the file.
        network: the network (a ``DistributedDataParallel`` wrapper is saved as the module inside).
        filename: for example ``model.pt``.
    """

    def __init__(self, save_dir: str, network: torch.nn.Module, filename: str) -> None:
        self.save_dir, self.network, self.filename = save_dir, network, filename

    def attach(self, engine: Engine) -> None:
        checkpoint = Checkpoint(
            to_save={"model": self.network},
            save_handler=AtomicDiskSaver(self.save_dir),
            filename_pattern=self.filename,
            n_saved=None,
        )
        engine.add_event_handler(Events.COMPLETED, checkpoint)


class ResumableCheckpoint:
    """Save ``save_dict`` plus the trainer's state every ``save_interval`` epochs (latest kept).

    ``checkpoint_epoch=N.pt`` is written by rank 0 only, atomically, and replaces the previous one only once
    it is complete (:class:`AtomicDiskSaver`): a run killed at any moment leaves a loadable checkpoint.

    Args:
        save_dir: folder of ``checkpoint_epoch=N.pt``.
        save_dict: objects to save besides the trainer (network, optimizer, scheduler).
        save_interval: epochs between saves. Default 1.
    """

    def __init__(self, save_dir: str, save_dict: dict[str, Any], save_interval: int = 1) -> None:
        self.save_dir, self.save_dict, self.save_interval = save_dir, save_dict, save_interval

    def attach(self, engine: Engine) -> None:
        checkpoint = Checkpoint(
            to_save={**self.save_dict, "trainer": engine},
            save_handler=AtomicDiskSaver(self.save_dir),
            score_function=lambda trainer: trainer.state.epoch,
            score_name="epoch",
            n_saved=1,
        )
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), checkpoint)


class WeightAverage:
    """Average the network's trainable weights over the last epochs, and end training with the average.

    From the first optimizer step of epoch ``start_epoch`` on, every step updates a running average of each
    trainable parameter: uniform over those steps (stochastic weight averaging) when ``decay`` is None, else
    exponential, ``average = decay * average + (1 - decay) * weight``. As the last epoch completes, the
    averages are copied into the network, so the handlers that run after this one then (validation,
    checkpoints, the final model's file) see the averaged model: attach it first. Frozen parameters (the
    slice encoder) and buffers stay the network's own. Its state goes into resumable checkpoints
    (``state_dict``), so a run resumed after a kill averages what the uninterrupted one does; the last
    epoch's checkpoint holds the averaged model.

    Args:
        network: the trained network (a ``DistributedDataParallel`` wrapper is averaged as the module inside;
            every rank holds the same weights after a step, so every rank averages the same).
        start_epoch: the first epoch whose steps are averaged, from 1; None averages nothing and leaves the
            network as trained.
        decay: None for a uniform average, or the exponential decay per step, in [0, 1).

    Raises:
        ValueError: ``start_epoch`` is not None or an int >= 1, or ``decay`` is not None or a number in [0, 1).
    """

    def __init__(
        self, network: torch.nn.Module, start_epoch: int | None = None, decay: float | None = None
    ) -> None:
        if start_epoch is not None and (
            isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 1
        ):
            raise ValueError(f"weight_average_start_epoch must be None or an int >= 1, got {start_epoch!r}.")
        if decay is not None and (
            isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1
        ):
            raise ValueError(f"weight_average_decay must be None or a number in [0, 1), got {decay!r}.")
        self.network, self.start_epoch, self.decay = network, start_epoch, decay
        self.count = 0
        self.average: dict[str, torch.Tensor] = {}

    def _parameters(self) -> dict[str, torch.nn.Parameter]:
        module = getattr(self.network, "module", self.network)
        return {name: p for name, p in module.named_parameters() if p.requires_grad}

    def attach(self, engine: Engine) -> None:
        if self.start_epoch is None:
            return
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._finish)

    @torch.no_grad()
    def _update(self, engine: Engine) -> None:
        if engine.state.epoch < self.start_epoch:
            return
        # uniform: step n (from 0) weighs 1 / (n + 1); exponential: every step weighs 1 - decay
        step_weight = 1.0 / (self.count + 1) if self.decay is None else 1.0 - self.decay
        for name, parameter in self._parameters().items():
            if self.count == 0:
                self.average[name] = parameter.detach().clone()
            else:
                self.average[name].lerp_(parameter.detach(), step_weight)
        self.count += 1

    @torch.no_grad()
    def _finish(self, engine: Engine) -> None:
        if engine.state.epoch != engine.state.max_epochs:
            return
        if not self.count:
            logger.warning(
                "Weight averaging from epoch %d: training ended at epoch %d before it began; the model is the "
                "last one trained.",
                self.start_epoch,
                engine.state.max_epochs,
            )
            return
        for name, parameter in self._parameters().items():
            parameter.copy_(self.average[name])
        kind = "uniform" if self.decay is None else f"exponential, decay {self.decay}"
        logger.info(
            "The model is the average (%s) of its weights over the %d steps since epoch %d.",
            kind,
            self.count,
            self.start_epoch,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "average": dict(self.average)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.count = int(state["count"])
        self.average = {name: tensor.clone() for name, tensor in state["average"].items()}
