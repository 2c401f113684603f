"""Choose the post-processing settings on validation predictions, as nnU-Net does after training.

Every combination of ``GRID`` is applied to the saved raw predictions (``save_predictions: True`` in
``configs/evaluate.yaml``, with post-processing off) and scored against the labels with
:func:`scripts.selection_metric.case_score` (mean of vessel Dice, aneurysm Dice and aneurysm detection
F1); then, on top of the best of them, every combination of ``SHAPE_GRID`` (the flat-aneurysm rule, which
measures each aneurysm and so costs more); then, on top of the best so far, every setting of ``LUMEN_GRID``
(the growth to the lumen's edge, read on each case's image scaled as the preprocessing scales it, its floor
fixed: phantoms prefer none, background-only volumes need one); then, where the growth is on, every cap of
``VESSEL_GRID`` below its steps (how many of those layers vessel grows); then every setting of ``PLATE_GRID``
(vessel labels on bone plates set to background, :mod:`scripts.plates`), as nnU-Net decides its rules one after
the other. The best mean wins, ties going to the mildest setting. Run from the bundle root::

    python -m monai.bundle run evaluating --config_file "['configs/train.yaml','configs/evaluate.yaml']" \\
        --meta_file configs/metadata.json --logging_file configs/logging.conf --eval_seed 2000 \\
        --eval_cases 10 --eval_dir outputs/tune --save_predictions True \\
        --postprocess_min_component_mm3 0 --postprocess_min_aneurysm_mm3 0 \\
        --postprocess_detached_aneurysm_label None --postprocess_min_component_fraction 0.0 \\
        --postprocess_min_aneurysm_height_mm 0.0 --postprocess_min_aneurysm_aspect_ratio 0.0
    python -m scripts.tune_postprocessing --pred_dir outputs/tune/predictions \\
        --datalist data/synthetic_test_A_seed2000/dataset.json --split test

It logs the best settings, the flat-aneurysm rule's trade-off and the overrides to use, and writes
``postprocessing.json`` (the best setting, no post-processing, and every row scored) beside the predictions.
The dark-voxel rule (``postprocess_min_intensity``) works on the softmax before the predictions are saved,
so it stays on in them and is not tuned here. Nor is the volume floor of foreground components
(``--min_component_mm3``, the configs' ``postprocess_min_component_mm3``, 20 mm^3): on phantoms, whose vessel
trees make the fraction rule remove every speck, no floor up to 20 mm^3 changes a score, while a volume with
no vessels keeps its specks without it (docs/recipe.md, 0.9.11). It is applied in every row, as the growth's
floor is, and again after the plate rule to the pieces that rule leaves (the configs' ``remove_fragments``).
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from scripts.atomic_io import write_atomically
from scripts.data.datalist import load_split
from scripts.data.intensity import robust_scale
from scripts.plates import PlateMeasure
from scripts.postprocessing import clean_segmentation, grow_to_lumen
from scripts.selection_metric import case_score

__all__ = ["GRID", "LUMEN_GRID", "PLATE_GRID", "SHAPE_GRID", "VESSEL_GRID", "main", "tune"]

logger = logging.getLogger(__name__)

GRID = {
    "min_aneurysm_mm3": [0.0, 0.5, 1.0, 2.0, 4.0],
    "detached_aneurysm_label": [None, 0, 1],
    "min_component_fraction": [0.0, 0.02, 0.05, 0.1],
}
SHAPE_GRID = {
    "min_aneurysm_height_mm": [0.0, 1.0, 1.5, 2.0, 2.5, 3.0],
    "min_aneurysm_aspect_ratio": [0.0, 0.2, 0.3, 0.4, 0.5],
}
# (fraction, steps) of the growth to the lumen's edge; (0, 0) is off
LUMEN_GRID = {"lumen_fraction": [0.3, 0.4, 0.5, 0.6], "lumen_steps": [1, 2, 4, 6, 10]}
_LUMEN_OFF = {"lumen_fraction": 0.0, "lumen_steps": 0, "lumen_vessel_steps": None}
# how many of the growth's layers vessel grows (None: all of them), tried below the best growth's steps
VESSEL_GRID = {"lumen_vessel_steps": [0, 1, 2, 4, 6]}
# vessel labels on bone plates (scripts/plates.py) at the configs' two scales; an empty list of scales is off
PLATE_GRID = {
    "plate_sigmas_mm": [[2.0, 3.0]],
    "plate_max_ratio": [0.3, 0.4, 0.5],
    "plate_min_strength": [0.03],
    "plate_min_mm3": [100.0, 200.0, 400.0],
    # aneurysm components on the removed plate more than on vessel (1) or half as much (0.5) go too; 0 is off
    "plate_aneurysm_ratio": [0.0, 1.0, 0.5],
}
_PLATE_OFF = {
    "plate_sigmas_mm": [],
    "plate_max_ratio": 0.5,
    "plate_min_strength": 0.03,
    "plate_min_mm3": 200.0,
    "plate_aneurysm_ratio": 0.0,
}
# the first stage's settings: the volume floor (fixed, not tuned) and GRID's
_FIRST = ["min_component_mm3", *GRID]
# the settings of the stages before the plate rule's
_GROWN = [*_FIRST, *SHAPE_GRID, *LUMEN_GRID, *VESSEL_GRID]


def _prediction_for(pred_dir: Path, image: str) -> Path:
    name = Path(image).name.removesuffix(".gz").removesuffix(".nii")
    path = pred_dir / f"{name}_seg.nii.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no saved prediction for {image}.")
    return path


def tune(
    cases: list[tuple[np.ndarray, np.ndarray, tuple[float, float, float]]],
    images: list[np.ndarray] | None = None,
    lumen_floor: float = 0.2,
    min_component_mm3: float = 20.0,
) -> list[dict]:
    """Score every ``GRID`` setting (components under ``min_component_mm3`` removed in all of them), then every
    ``SHAPE_GRID`` setting on top of the best, then, given the cases' ``images`` (scaled, on the predictions'
    grid), every ``LUMEN_GRID`` setting on top of the best of those with the growth's floor at
    ``lumen_floor``, then every ``VESSEL_GRID`` cap below the best growth's steps, then every ``PLATE_GRID``
    setting, on ``(pred, label, spacing)`` cases; rows of all stages sorted best first.

    Each row: the fourteen settings (the growth and the plate rule off where not tried, vessel uncapped),
    ``score`` (mean over cases) and the means of its three parts.
    """
    off = {**dict.fromkeys(SHAPE_GRID, 0.0), **_LUMEN_OFF, **_PLATE_OFF}
    volume_floor = {"min_component_mm3": float(min_component_mm3)}
    rows = _score_grid(cases, [{**volume_floor, **settings, **off} for settings in _combinations(GRID)])
    best = {k: v for k, v in rows[0].items() if k in _FIRST}
    shapes = [{**best, **shape, **_LUMEN_OFF, **_PLATE_OFF} for shape in _combinations(SHAPE_GRID)]
    rows += _score_grid(cases, shapes, start=len(rows))
    if images is not None:
        rows.sort(key=lambda r: (-round(r["score"], 6), r["_order"]))
        best = {k: v for k, v in rows[0].items() if k in _FIRST or k in SHAPE_GRID}
        lumens = [
            {**best, **lumen, "lumen_vessel_steps": None, **_PLATE_OFF} for lumen in _combinations(LUMEN_GRID)
        ]
        rows += _score_grid(cases, lumens, start=len(rows), images=images, floor=lumen_floor)
        rows.sort(key=lambda r: (-round(r["score"], 6), r["_order"]))
        best = {k: v for k, v in rows[0].items() if k in _FIRST or k in SHAPE_GRID or k in LUMEN_GRID}
        caps = [
            {**best, **cap, **_PLATE_OFF}
            for cap in _combinations(VESSEL_GRID)
            if cap["lumen_vessel_steps"] < best["lumen_steps"]
        ]
        rows += _score_grid(cases, caps, start=len(rows), images=images, floor=lumen_floor)
        rows.sort(key=lambda r: (-round(r["score"], 6), r["_order"]))
        best = {k: v for k, v in rows[0].items() if k in _GROWN}
        plates = [{**best, **plate} for plate in _combinations(PLATE_GRID)]
        rows += _score_grid(cases, plates, start=len(rows), images=images, floor=lumen_floor)
    rows.sort(key=lambda r: (-round(r["score"], 6), r["_order"]))
    return [{k: v for k, v in r.items() if k != "_order"} for r in rows]


def _combinations(grid: dict[str, list]) -> list[dict]:
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def _score_grid(
    cases: list,
    settings_list: list[dict],
    start: int = 0,
    images: list[np.ndarray] | None = None,
    floor: float = 0.0,
) -> list[dict]:
    """Rows of ``settings_list`` scored on ``cases``, best first; ``_order`` (from ``start``) breaks ties."""
    parts: list[list[dict]] = [[] for _ in settings_list]
    for index, (pred, truth, spacing) in enumerate(cases):
        # settings that differ only in the plate rule's thresholds (the fifth stage) share their labels
        # before it and its Hessian, computed once per case
        grown_for, grown, measures = None, None, {}
        for settings, scores in zip(settings_list, parts, strict=True):
            clean = {k: v for k, v in settings.items() if k not in _LUMEN_OFF and k not in _PLATE_OFF}
            lumen = {k: settings[k] for k in _LUMEN_OFF}
            if (clean, lumen) != grown_for:
                grown_for, measures = (clean, lumen), {}
                grown = clean_segmentation(pred, spacing, **clean)
                if lumen["lumen_steps"]:
                    grown = grow_to_lumen(
                        grown,
                        images[index],
                        lumen["lumen_fraction"],
                        lumen["lumen_steps"],
                        floor,
                        lumen["lumen_vessel_steps"],
                    )
            out = grown
            sigmas = tuple(settings["plate_sigmas_mm"])
            if sigmas:
                if sigmas not in measures:
                    measures[sigmas] = PlateMeasure(grown, images[index], spacing, sigmas)
                out = measures[sigmas].remove(
                    settings["plate_max_ratio"],
                    settings["plate_min_strength"],
                    settings["plate_min_mm3"],
                    settings["plate_aneurysm_ratio"],
                )
                # the volume floor again on the pieces the plate leaves, as the configs' remove_fragments
                out = clean_segmentation(out, spacing, min_component_mm3=settings["min_component_mm3"])
            scores.append(case_score(out, truth))
    rows = []
    for order, (settings, scores) in enumerate(zip(settings_list, parts, strict=True), start=start):
        means = {k: float(np.mean([c[k] for c in scores])) for k in scores[0]}
        rows.append({**settings, **means, "_order": order})
    rows.sort(key=lambda r: (-round(r["score"], 6), r["_order"]))
    return rows


def _stage_rows(rows: list[dict], fixed: dict, grid: dict[str, list]) -> list[dict]:
    """The rows (best first) that hold ``fixed``, one per distinct setting of ``grid``'s keys."""
    selected, seen = [], set()
    for r in rows:
        setting = repr([r[k] for k in grid])  # lists (the plate scales) included
        if all(r[k] == v for k, v in fixed.items()) and setting not in seen:
            seen.add(setting)
            selected.append(r)
    return selected


def main(
    pred_dir: str,
    datalist: str,
    split: str = "validation",
    lumen_floor: float = 0.2,
    min_component_mm3: float = 20.0,
) -> dict:
    """Tune on the saved predictions of ``split`` of ``datalist``, the growth's floor at ``lumen_floor`` and the
    volume floor of foreground components at ``min_component_mm3`` (the configs' ``postprocess_lumen_floor``
    and ``postprocess_min_component_mm3``); returns the best row."""
    folder = Path(pred_dir)
    cases, images = [], []
    for entry in load_split(datalist, split):
        pred = nib.load(_prediction_for(folder, entry["image"]))
        label = nib.load(entry["label"])
        if pred.shape[:3] != label.shape[:3]:
            raise ValueError(
                f"{entry['image']}: prediction shape {pred.shape} differs from label {label.shape}."
            )
        spacing = tuple(float(s) for s in label.header.get_zooms()[:3])
        cases.append(
            (
                np.asarray(pred.dataobj)[..., 0] if pred.ndim == 4 else np.asarray(pred.dataobj),
                np.asarray(label.dataobj),
                spacing,
            )
        )
        image = nib.load(entry["image"])
        if image.shape[:3] != label.shape[:3]:
            raise ValueError(f"{entry['image']}: image shape {image.shape} differs from label {label.shape}.")
        images.append(robust_scale(torch.as_tensor(np.asarray(image.dataobj, dtype=np.float32))).numpy())
    rows = tune(cases, images, lumen_floor, min_component_mm3)
    header = (
        f"{'min_component_mm3':>18} {'min_aneurysm_mm3':>17} {'detached->':>10} {'fraction':>8} "
        f"{'height':>6} {'aspect':>6} {'lumen':>5} {'steps':>5} {'vessel steps':>12} {'plates':>6} {'ratio':>5} "
        f"{'mm3':>5} {'on plate':>8} {'score':>7} {'vessel':>7} {'aneur.':>7} {'F1':>7}"
    )

    def table(selected: list[dict]) -> str:
        return "\n".join(
            [header]
            + [
                f"{r['min_component_mm3']:18.1f} {r['min_aneurysm_mm3']:17.1f} "
                f"{r['detached_aneurysm_label']!s:>10} {r['min_component_fraction']:8.2f} "
                f"{r['min_aneurysm_height_mm']:6.1f} {r['min_aneurysm_aspect_ratio']:6.2f} "
                f"{r['lumen_fraction']:5.2f} {r['lumen_steps']:5d} {r['lumen_vessel_steps']!s:>12} "
                f"{'on' if r['plate_sigmas_mm'] else 'off':>6} {r['plate_max_ratio']:5.2f} {r['plate_min_mm3']:5.0f} {r['plate_aneurysm_ratio']:8.2f} "
                f"{r['score']:7.4f} {r['vessel_dice']:7.4f} {r['aneurysm_dice']:7.4f} {r['aneurysm_f1']:7.4f}"
                for r in selected
            ]
        )

    none = next(
        r
        for r in rows
        if r["min_aneurysm_mm3"] == 0
        and r["detached_aneurysm_label"] is None
        and r["min_component_fraction"] == 0
        and r["min_aneurysm_height_mm"] == 0
        and r["min_aneurysm_aspect_ratio"] == 0
        and r["lumen_steps"] == 0
        and not r["plate_sigmas_mm"]
    )
    best = rows[0]
    # the second to fifth stages, best first; each one's off row is the best of the stages before it
    off = {"plate_sigmas_mm": []}
    shape_rows = _stage_rows(rows, {**{k: best[k] for k in _FIRST}, "lumen_steps": 0, **off}, SHAPE_GRID)
    lumen_rows = _stage_rows(
        rows, {**{k: best[k] for k in [*_FIRST, *SHAPE_GRID]}, "lumen_vessel_steps": None, **off}, LUMEN_GRID
    )
    cap_rows = _stage_rows(
        rows, {**{k: best[k] for k in [*_FIRST, *SHAPE_GRID, *LUMEN_GRID]}, **off}, VESSEL_GRID
    )
    plate_rows = _stage_rows(rows, {k: best[k] for k in _GROWN}, PLATE_GRID)
    logger.info("%d cases; best 10 of %d settings:\n%s", len(cases), len(rows), table(rows[:10]))
    logger.info("the flat-aneurysm rule on top of the best of the first stage:\n%s", table(shape_rows))
    logger.info("the growth to the lumen's edge on top of the best clean-up:\n%s", table(lumen_rows))
    logger.info("vessel's share of the best growth:\n%s", table(cap_rows))
    logger.info("vessel labels on bone plates, on top of the best growth:\n%s", table(plate_rows))
    logger.info(
        "without post-processing (but the %s mm3 volume floor): score %.4f; best: %.4f",
        min_component_mm3,
        none["score"],
        best["score"],
    )
    keys = [*_GROWN, *PLATE_GRID]
    use = " ".join(f"--postprocess_{k} {str(best[k]).replace(' ', '')}" for k in keys)
    logger.info("use: %s --postprocess_lumen_floor %s", use, lumen_floor)
    write_atomically(
        str(folder / "postprocessing.json"),
        json.dumps(
            {
                "best": best,
                "none": none,
                "lumen_floor": lumen_floor,
                "min_component_mm3": min_component_mm3,
                "cases": len(cases),
                "rows": rows,
            },
            indent=2,
        )
        + "\n",
    )
    return best


if __name__ == "__main__":
    import fire

    from scripts.cli import configure_logging

    configure_logging()
    fire.Fire(main)
