"""Handlers on a tiny ignite engine: checkpoints that survive a kill, epochs that draw the same, cache hit rates."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader, Dataset
from monai.transforms import Randomizable

from scripts.embedding_cache import SliceEmbeddingCache
from scripts.handlers import (
    EmbeddingCacheStats,
    GradientNorm,
    ResumableCheckpoint,
    ResumeFrom,
    SeedEachEpoch,
    WeightAverage,
)


def linear_trainer(save_dir: Path) -> tuple[Engine, torch.nn.Module]:
    """An engine taking one SGD step of a 2 -> 1 linear model per item, checkpointing into ``save_dir``."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(engine: Engine, batch: torch.Tensor) -> float:
        optimizer.zero_grad()
        loss = model(batch).square().mean()
        loss.backward()
        optimizer.step()
        return float(loss)

    engine = Engine(step)
    ResumableCheckpoint(str(save_dir), {"model": model, "optimizer": optimizer}).attach(engine)
    return engine, model


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
def test_interrupted_checkpoint_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch, error):
    engine, model = linear_trainer(tmp_path)
    after_epoch_1 = {}
    engine.add_event_handler(
        Events.EPOCH_COMPLETED(once=1),
        lambda _: after_epoch_1.update({k: v.clone() for k, v in model.state_dict().items()}),
    )
    real_save = torch.save

    def fail_halfway(obj, f, *args, **kwargs):
        if "checkpoint_epoch=2" not in str(f):
            return real_save(obj, f, *args, **kwargs)
        with open(f, "wb") as handle:
            handle.write(b"the first bytes of a checkpoint")
        raise error

    monkeypatch.setattr(torch, "save", fail_halfway)
    with pytest.raises(type(error)):
        engine.run([torch.ones(2)], max_epochs=2)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_epoch=1.pt"]  # no half file, no temporary
    checkpoint = torch.load(tmp_path / "checkpoint_epoch=1.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == 1
    torch.testing.assert_close(checkpoint["model"], after_epoch_1, rtol=0, atol=0)


def test_checkpoint_replaces_the_previous_one(tmp_path):
    engine, _ = linear_trainer(tmp_path)
    engine.run([torch.ones(2)], max_epochs=3)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_epoch=3.pt"]


def test_checkpoint_is_written_by_rank_0_only(tmp_path, monkeypatch):
    monkeypatch.setattr(idist, "get_rank", lambda: 1)
    engine, _ = linear_trainer(tmp_path)
    engine.run([torch.ones(2)], max_epochs=2)
    assert list(tmp_path.iterdir()) == []


class RandomDraw(Randomizable):
    """A random transform as the crops are: it draws from its own ``self.R``."""

    def randomize(self, data: object = None) -> None:
        self.draw = self.R.rand()

    def __call__(self, item: int) -> tuple[int, float]:
        self.randomize()
        return item, self.draw


def epoch_draws(first_epoch: int, last_epoch: int) -> dict[int, list]:
    """What each epoch draws from a random transform, a shuffling loader, torch, numpy and random, with the
    engine started after ``first_epoch - 1`` epochs, as a resumed run is."""
    torch.manual_seed(1)
    loader = DataLoader(Dataset(list(range(4)), RandomDraw()), batch_size=1, shuffle=True)
    draws: dict[int, list] = {}

    def record(engine: Engine, batch: list) -> None:
        item, draw = batch
        sources = (item.item(), draw.item(), torch.rand(1).item(), np.random.rand(), random.random())
        draws.setdefault(engine.state.epoch, []).append(sources)

    engine = Engine(record)
    SeedEachEpoch(seed=3).attach(engine)
    engine.load_state_dict({"epoch": first_epoch - 1, "max_epochs": last_epoch, "epoch_length": len(loader)})
    engine.run(loader)
    assert sorted(draws) == list(range(first_epoch, last_epoch + 1))
    return draws


def test_an_epoch_draws_the_same_whether_or_not_the_run_was_resumed():
    straight, resumed = epoch_draws(1, 3), epoch_draws(3, 3)
    assert resumed[3] == straight[3]
    assert straight[2] != straight[3]  # still random from epoch to epoch


def test_cache_stats_report_the_hit_rate_of_the_engine_they_are_given_the_cache_of(caplog):
    cache = SliceEmbeddingCache()
    slices = torch.arange(4.0).reshape(4, 1, 1).expand(4, 2, 2)  # 4 distinct slices, each looked up twice

    def step(engine: Engine, batch: torch.Tensor) -> None:
        cache.encode(slices, lambda s: s.flatten(1), "namespace")

    engine = Engine(step)
    EmbeddingCacheStats(cache, name="train").attach(engine)
    cache.encode(slices[:1], lambda s: s.flatten(1), "namespace")  # outside the engine: not counted
    with caplog.at_level(logging.INFO, logger="scripts.handlers"):
        engine.run([0, 1], max_epochs=1)
    # slice 0 was seen before the run; the first iteration encodes the other 3, the second hits all 4
    assert engine.state.metrics["train_cache_hit_rate"] == pytest.approx(5 / 8)
    assert (
        "train epoch 1: slice-embedding cache hit rate 62.5% (5 memory, 0 disk hits, 3 slices" in caplog.text
    )


def test_cache_stats_without_a_cache_attach_nothing():
    engine = Engine(lambda engine, batch: None)
    EmbeddingCacheStats(None).attach(engine)
    engine.run([0], max_epochs=1)
    assert "train_cache_hit_rate" not in engine.state.metrics


def averaging_trainer(
    save_dir: Path, start_epoch: int | None, decay: float | None, resume: str | None = None
) -> tuple[Engine, torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """As :func:`linear_trainer`, with a frozen bias beside the trained layer, a :class:`WeightAverage`
    attached first and saved in the checkpoints; also the trained weights after every step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[1].bias.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trained, lr=0.1, momentum=0.9)

    def step(engine: Engine, batch: torch.Tensor) -> float:
        optimizer.zero_grad()
        loss = (model(batch) - 1).square().mean()
        loss.backward()
        optimizer.step()
        return float(loss)

    engine = Engine(step)
    average = WeightAverage(model, start_epoch=start_epoch, decay=decay)
    average.attach(engine)
    steps: list[dict[str, torch.Tensor]] = []
    engine.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda _: steps.append({k: v.clone() for k, v in model.state_dict().items()}),
    )
    to_save = {"model": model, "optimizer": optimizer, "weight_average": average}
    ResumeFrom(resume, to_save).attach(engine)
    ResumableCheckpoint(str(save_dir), to_save).attach(engine)
    return engine, model, steps


BATCHES = [torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 0.5]), torch.tensor([0.3, -2.0])]


@pytest.mark.parametrize("decay", [None, 0.5])
def test_weight_average_is_the_model_at_the_end_of_training(tmp_path, decay):
    engine, model, steps = averaging_trainer(tmp_path, start_epoch=3, decay=decay)
    seen_at_last_epoch = {}
    engine.add_event_handler(  # attached after it, as validation and the checkpoints are
        Events.EPOCH_COMPLETED(once=4),
        lambda _: seen_at_last_epoch.update({k: v.clone() for k, v in model.state_dict().items()}),
    )
    engine.run(BATCHES, max_epochs=4)
    averaged = steps[2 * len(BATCHES) :]  # the steps of epochs 3 and 4
    for name in ("0.weight", "0.bias", "1.weight"):
        expected = averaged[0][name]
        for index, weights in enumerate(averaged[1:], start=1):
            expected = expected + (weights[name] - expected) * (
                1 / (index + 1) if decay is None else 1 - decay
            )
        torch.testing.assert_close(model.state_dict()[name], expected)
        torch.testing.assert_close(seen_at_last_epoch[name], expected)
        assert not torch.allclose(expected, steps[-1][name])  # not the last step's weights
    checkpoint = torch.load(tmp_path / "checkpoint_epoch=4.pt", weights_only=True)
    assert checkpoint["weight_average"]["count"] == len(averaged)
    # frozen weights (the slice encoder's) are not averaged, nor stored twice in the checkpoint
    assert set(checkpoint["weight_average"]["average"]) == {"0.weight", "0.bias", "1.weight"}
    torch.testing.assert_close(checkpoint["model"]["0.weight"], model[0].weight)


def test_weight_average_resumed_averages_what_the_uninterrupted_run_does(tmp_path):
    engine, model, _ = averaging_trainer(tmp_path / "straight", start_epoch=2, decay=None)
    engine.run(BATCHES, max_epochs=4)
    first = tmp_path / "first"
    engine, _, _ = averaging_trainer(first, start_epoch=2, decay=None)

    def killed(_: Engine) -> None:
        raise KeyboardInterrupt

    engine.add_event_handler(Events.EPOCH_COMPLETED(once=3), killed)  # after the epoch-3 checkpoint
    with pytest.raises(KeyboardInterrupt):
        engine.run(BATCHES, max_epochs=4)
    resume = str(first / "checkpoint_epoch=3.pt")
    engine, resumed, _ = averaging_trainer(tmp_path / "resumed", start_epoch=2, decay=None, resume=resume)
    engine.run(BATCHES, max_epochs=4)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=1e-7)


def test_weight_average_off_or_not_reached_leaves_the_last_model(tmp_path, caplog):
    for start_epoch in (None, 5):
        engine, model, steps = averaging_trainer(
            tmp_path / str(start_epoch), start_epoch=start_epoch, decay=None
        )
        with caplog.at_level(logging.WARNING, logger="scripts.handlers"):
            engine.run(BATCHES, max_epochs=2)
        for name, value in steps[-1].items():
            torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)
    assert "Weight averaging from epoch 5: training ended at epoch 2 before it began" in caplog.text


@pytest.mark.parametrize(
    ("start_epoch", "decay", "key"),
    [
        (0, None, "weight_average_start_epoch"),
        (True, None, "weight_average_start_epoch"),
        ("10", None, "weight_average_start_epoch"),
        (2.0, None, "weight_average_start_epoch"),
        (1, 1.0, "weight_average_decay"),
        (1, -0.1, "weight_average_decay"),
        (1, "0.99", "weight_average_decay"),
        (1, True, "weight_average_decay"),
    ],
)
def test_weight_average_refuses_settings_it_cannot_use(start_epoch, decay, key):
    with pytest.raises(ValueError, match=f"{key} must be None or"):
        WeightAverage(torch.nn.Linear(2, 1), start_epoch=start_epoch, decay=decay)


def test_resume_from_a_checkpoint_without_the_weight_average_names_the_file_and_the_key(tmp_path):
    engine, _, _ = averaging_trainer(tmp_path / "new", start_epoch=None, decay=None)
    engine.run(BATCHES, max_epochs=1)
    checkpoint = torch.load(tmp_path / "new" / "checkpoint_epoch=1.pt", weights_only=True)
    del checkpoint["weight_average"]  # as versions before weight averaging wrote it
    old = tmp_path / "checkpoint_epoch=1.pt"
    torch.save(checkpoint, old)
    engine, _, _ = averaging_trainer(tmp_path / "resumed", start_epoch=1, decay=None, resume=str(old))
    with pytest.raises(
        ValueError, match=r"checkpoint_epoch=1\.pt: cannot resume from this checkpoint"
    ) as error:
        engine.run(BATCHES, max_epochs=2)
    assert "weight_average" in str(error.value)


LR = 0.1


def clipped_trainer(max_norm: float | None, accumulation_steps: int = 1, loss_scale: float | None = None):
    """A MONAI ``SupervisedTrainer`` taking plain SGD steps on a 3 -> 2 linear model with a frozen
    bias, a :class:`GradientNorm` attached; also the model and the raw gradients of each step. With
    ``loss_scale``, its amp path with a gradient scaler of that (fixed) scale, as on CUDA."""
    from monai.engines import SupervisedTrainer
    from monai.engines.utils import IterationEvents

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    # a small input, whose step stays under a bound the two large ones go over
    data = [{"image": torch.randn(4, 3) * scale, "label": torch.randn(4, 2)} for scale in (0.1, 3, 3)]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=data,
        network=model,
        optimizer=torch.optim.SGD([model.weight], lr=LR),
        loss_function=torch.nn.MSELoss(),
        accumulation_steps=accumulation_steps,
    )
    if loss_scale is not None:  # MONAI's Trainer.run makes its (CUDA) scaler: replaced as the run starts

        def cpu_scaler(engine) -> None:
            engine.scaler = torch.amp.GradScaler("cpu", init_scale=loss_scale, growth_interval=1000)

        trainer.amp = True
        trainer.add_event_handler(Events.STARTED, cpu_scaler)
    raw: list[torch.Tensor] = []
    # attached before the clipper, so it sees each step's gradient as the backward pass left it
    trainer.add_event_handler(
        IterationEvents.BACKWARD_COMPLETED, lambda _: raw.append(model.weight.grad.clone())
    )
    GradientNorm(max_norm).attach(trainer)
    return trainer, model, raw


def weights_each_step(trainer, model) -> list[torch.Tensor]:
    weights = [model.weight.detach().clone()]
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda _: weights.append(model.weight.detach().clone())
    )
    trainer.run()
    return weights


def bound_between_smallest_steps() -> float:
    """A gradient-norm bound between the two smallest unclipped steps of :func:`clipped_trainer`: some steps
    are clipped, some not."""
    trainer, model, raw = clipped_trainer(None)
    weights_each_step(trainer, model)
    norms = sorted(float(g.norm()) for g in raw)
    return (norms[0] + norms[1]) / 2


def test_gradient_norm_measured_only_leaves_the_steps_as_they_are(caplog):
    trainer, model, raw = clipped_trainer(None)
    with caplog.at_level(logging.INFO, logger="scripts.handlers"):
        weights = weights_each_step(trainer, model)
    norms = [float(g.norm()) for g in raw]
    for before, after, grad in zip(weights[:-1], weights[1:], raw, strict=True):
        torch.testing.assert_close(after, before.add(grad, alpha=-LR), rtol=0, atol=0)  # as SGD steps
    metrics = trainer.state.metrics
    assert metrics["grad_norm_median"] == pytest.approx(float(np.median(norms)))
    assert metrics["grad_norm_max"] == pytest.approx(max(norms))
    assert metrics["grad_clipped"] == 0
    assert "epoch 1 gradient norm: median" in caplog.text and "not clipped" in caplog.text


def test_gradient_norm_clips_each_step_above_the_bound_to_it():
    bound = bound_between_smallest_steps()
    trainer, model, raw = clipped_trainer(bound)
    weights = weights_each_step(trainer, model)
    for before, after, grad in zip(weights[:-1], weights[1:], raw, strict=True):
        scale = min(1.0, bound / float(grad.norm()))
        torch.testing.assert_close(after, before - LR * grad * scale, rtol=1e-5, atol=1e-6)
        assert float((before - after).norm()) <= LR * bound * (1 + 1e-5)
    clipped = [float(g.norm()) > bound for g in raw]
    assert 0 < sum(clipped) < len(clipped)  # both kinds of step happened
    assert trainer.state.metrics["grad_clipped"] == pytest.approx(sum(clipped) / len(clipped))
    largest = max(float(g.norm()) for g in raw)
    assert largest > bound
    assert trainer.state.metrics["grad_norm_max"] == pytest.approx(largest)  # the norm before clipping


@pytest.mark.parametrize("max_norm", [0, -1.0, float("inf"), float("nan"), "12", True])
def test_gradient_norm_refuses_a_bound_it_cannot_use(max_norm):
    with pytest.raises(ValueError, match="grad_clip_norm must be None or a positive finite number"):
        GradientNorm(max_norm)


def test_gradient_norm_refuses_accumulated_steps():
    with pytest.raises(ValueError, match="accumulates 2 iterations per step"):
        clipped_trainer(1.0, accumulation_steps=2)


@pytest.mark.filterwarnings("ignore:.*CUDA is not available:UserWarning", "ignore:.*GradScaler:FutureWarning")
def test_gradient_norm_under_a_gradient_scaler_measures_and_clips_the_unscaled_gradient():
    trainer, model, raw = clipped_trainer(None)
    plain = weights_each_step(trainer, model)
    bound = bound_between_smallest_steps()
    trainer, model, _ = clipped_trainer(bound)
    expected, expected_metrics = weights_each_step(trainer, model), dict(trainer.state.metrics)
    trainer, model, scaled = clipped_trainer(bound, loss_scale=2.0**10)
    weights = weights_each_step(trainer, model)
    scaled_by = float(scaled[0].norm()) / float(raw[0].norm())
    assert scaled_by == pytest.approx(2.0**10)  # the backward pass scaled
    for actual, wanted in zip(weights, expected, strict=True):
        torch.testing.assert_close(actual, wanted)
    assert not torch.allclose(weights[-1], plain[-1])  # clipped
    assert trainer.state.metrics == pytest.approx(expected_metrics)


def test_gradient_norm_is_logged_by_rank_0_only(monkeypatch, caplog):
    monkeypatch.setattr(idist, "get_rank", lambda: 1)
    trainer, model, _ = clipped_trainer(None)
    with caplog.at_level(logging.INFO, logger="scripts.handlers"):
        weights_each_step(trainer, model)
    assert "grad_norm_median" in trainer.state.metrics  # measured on every rank
    assert "gradient norm" not in caplog.text
