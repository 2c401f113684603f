"""The nnU-Net side-by-side runner, without nnunetv2: install message, test-case naming, the budget loop."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scripts import nnunet_baseline
from scripts.score import find_cases, match_predictions


def test_missing_nnunet_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "nnunetv2", None)
    with pytest.raises(ImportError, match="pip install"):
        nnunet_baseline.require_nnunet()


def test_use_mirroring_must_be_a_real_bool(tmp_path):
    with pytest.raises(ValueError, match="use_mirroring"):
        nnunet_baseline.run_nnunet(tmp_path, None, {}, use_mirroring="false")


def _case(folder: Path, name: str, value: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full((4, 3, 2), value, np.uint8), np.eye(4)), folder / f"{name}.nii.gz")
    return f"{folder.name}/{name}.nii.gz"


def test_test_cases_are_linked_under_names_nnunet_and_the_scorer_agree_on(tmp_path):
    data = tmp_path / "data"
    test = [
        {"image": _case(data / "imagesTs", n, 1), "label": _case(data / "labelsTs", n, 2)} for n in ("a", "b")
    ]
    (data / "dataset.json").write_text(json.dumps({"training": [], "validation": [], "test": test}))
    images, labels = tmp_path / "in", tmp_path / "truth"
    nnunet_baseline.link_test_cases(str(data / "dataset.json"), images, labels)
    assert sorted(p.name for p in images.iterdir()) == ["a_0000.nii.gz", "b_0000.nii.gz"]
    assert (images / "a_0000.nii.gz").resolve() == (data / "imagesTs" / "a.nii.gz").resolve()
    assert (labels / "b.nii.gz").resolve() == (data / "labelsTs" / "b.nii.gz").resolve()
    # nnU-Net writes <case>.nii.gz for <case>_0000.nii.gz: the scorer must pair it with the truth
    predictions = tmp_path / "pred"
    _case(predictions, "a", 2)
    _case(predictions, "b", 2)
    matched, _ = match_predictions(find_cases(labels), predictions)
    assert {case: path.name for case, path in matched.items()} == {"a": "a.nii.gz", "b": "b.nii.gz"}


class _FakeTrainer:
    """Stands in for nnUNetTrainer: records the loop the runner drives."""

    def __init__(self) -> None:
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1000, 250, 50
        self.lr_scheduler = types.SimpleNamespace(max_steps=1000)
        self.dataloader_train = self.dataloader_val = iter(range(10**6))
        self.steps, self.epochs_ended, self.ended = 0, 0, False

    def train_step(self, batch):
        self.steps += 1
        nnunet_baseline.time.perf_counter.advance(1.0)  # one simulated second per iteration

    def validation_step(self, batch):
        pass

    def on_epoch_end(self):
        self.epochs_ended += 1

    def on_train_end(self):
        self.ended = True

    def __getattr__(self, name):  # on_train_start, on_epoch_start, ...: nothing to do
        return lambda *args: None


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_training_fills_the_budget_and_stretches_the_schedule(monkeypatch):
    trainer = _FakeTrainer()
    fake = types.ModuleType("nnunetv2.run.run_training")
    fake.get_trainer_from_args = lambda *args, **kwargs: trainer
    for name in ("nnunetv2", "nnunetv2.run"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "nnunetv2.run.run_training", fake)
    monkeypatch.setattr(nnunet_baseline.time, "perf_counter", _Clock())

    got = nnunet_baseline.train_for(1, budget_s=100.0, iterations_per_epoch=10)  # 10 s per epoch

    assert trainer.num_iterations_per_epoch == 10
    assert trainer.num_epochs == trainer.lr_scheduler.max_steps == 10  # the poly schedule ends at the budget
    assert got == {"epochs": 10, "iterations": 100, "seconds": 100.0}
    assert trainer.steps == 100 and trainer.epochs_ended == 10 and trainer.ended
