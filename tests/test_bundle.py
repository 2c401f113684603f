"""Every workflow of the bundle, run the way users run them, on tiny data and a tiny random encoder."""

from __future__ import annotations

import csv
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, TINY_DINOV3, TINY_IMAGE_SIZE, bundle_workflow, run_workflow, write_tiny_case
from monai.bundle import ConfigParser, ConfigWorkflow, verify_metadata, verify_net_in_out
from monai.transforms import Compose
from PIL import Image

from scripts.handlers import GradientNorm
from scripts.labels import LABEL_NAMES, NUM_CLASSES
from scripts.networks import AdditiveFusion, CalibratedFusion, EncoderMismatchError, RoomLite

CONFIGS = BUNDLE_ROOT / "configs"
META = str(CONFIGS / "metadata.json")
LOGGING = str(CONFIGS / "logging.conf")
TRAIN = str(CONFIGS / "train.yaml")
TINY = {
    "roi_size": [32, 32, 32],
    "dino_model": "random",
    "dino_config": TINY_DINOV3,
    "dino_image_size": TINY_IMAGE_SIZE,
    "crop_grid": 16,
}


def cli_overrides(overrides: dict) -> list[str]:
    """``--key value`` pairs as ``python -m monai.bundle run`` takes them: Python literals (``False``, ``None``;
    JSON's ``false`` would arrive as a string)."""
    return [arg for key, value in overrides.items() for arg in (f"--{key}", repr(value))]


def workflow(config_file, workflow_type: str, **overrides) -> ConfigWorkflow:
    return bundle_workflow(config_file, workflow_type, **{**TINY, **overrides})


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory) -> Path:
    """A bundle root holding a model trained for one epoch by the train config through ConfigWorkflow."""
    root = tmp_path_factory.mktemp("bundle")
    run_workflow(
        workflow(
            TRAIN, "train", bundle_root=str(root), dataset_dir=str(tiny_dataset), epochs=1, val_interval=1
        )
    )
    return root


def test_training_writes_final_best_and_resumable_checkpoints(trained):
    assert (trained / "models" / "model_best.pt").is_file()
    resumable = torch.load(trained / "models" / "checkpoint_epoch=1.pt", weights_only=False)
    assert {"model", "optimizer", "lr_scheduler", "trainer"} <= set(resumable)
    final = torch.load(trained / "models" / "model.pt", weights_only=False)
    assert final["dino.encoder._extra_state"]["source"] == "random:0"
    assert not any(k.startswith("dino.encoder.backbone") for k in final)
    assert list((trained / "outputs" / "tensorboard").iterdir())


def test_tensorboard_has_each_epochs_own_cache_hit_rates(trained):
    """The hit rates are in the epoch's metrics before the stats handlers write them: after one epoch (validated)
    TensorBoard holds both rates at step 1, not nothing (or, in later epochs, the epoch before's)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = {}
    for events in (trained / "outputs" / "tensorboard").iterdir():
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            steps.setdefault(tag, []).extend(event.step for event in accumulator.Scalars(tag))
    assert steps.get("train_cache_hit_rate") == [1]
    assert steps.get("validation_cache_hit_rate") == [1]
    assert steps.get("grad_norm_median") == [1]  # measured by default, nothing clipped
    assert steps.get("grad_clipped") == [1]


@pytest.mark.parametrize("value", [12, 0.5])
def test_grad_clip_norm_in_the_config_reaches_the_clipping_handler(value):
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({**TINY, "grad_clip_norm": value})
    (clipper,) = [h for h in parser.get_parsed_content("train#handlers") if isinstance(h, GradientNorm)]
    assert clipper.max_norm == value


# 16^3 windows for tests of what does not depend on the window (resuming, the network a command line builds):
# the U-Net and the shape prior cost about a quarter of what they do at 32^3
SMALL_ROI = [16, 16, 16]
# the resume tests' runs: two epochs, validated after each (at 16^3 the network trains in float32 even under
# CPU bf16 autocast, see Dino3DRA._cpu_bf16_unsafe; two bf16 runs at 32^3 were also identical bit for bit)
TWO_EPOCHS = {"epochs": 2, "val_interval": 1, "roi_size": SMALL_ROI}


def assert_same_state(actual, expected, where: str = "checkpoint") -> None:
    """Nested state dicts equal bit for bit: same keys, same tensors (dtype, shape, values), same numbers."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, where
        assert torch.equal(actual, expected), f"{where}: tensors differ"
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), f"{where}: keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            assert_same_state(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same_state(a, e, f"{where}[{index}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


@pytest.fixture(scope="module")
def two_case_dataset(tiny_dataset, tmp_path_factory) -> Path:
    """Two training cases (so shuffling matters, and each of two ranks trains on one) and two validation
    cases, one of them vessel-free (so the two score differently: a rank's case alone is not the mean)."""
    root = tmp_path_factory.mktemp("two_case_dataset")
    entries = json.loads((tiny_dataset / "dataset.json").read_text())
    for split in entries:
        entries[split] = [{k: str(tiny_dataset / v) for k, v in e.items()} for e in entries[split]]
    entries["training"].append(entries["test"][0])
    rng = np.random.default_rng(7)
    affine = np.diag([0.4, 0.4, 0.4, 1.0])
    image = (50.0 + rng.normal(0, 20, (40, 40, 40))).astype(np.float32)
    nib.save(nib.Nifti1Image(image, affine), root / "empty.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 40), np.uint8), affine), root / "empty_label.nii.gz")
    entries["validation"].append(
        {"image": str(root / "empty.nii.gz"), "label": str(root / "empty_label.nii.gz")}
    )
    (root / "dataset.json").write_text(json.dumps(entries))
    return root


@pytest.mark.parametrize(
    "averaging", [{}, {"weight_average_start_epoch": 1}], ids=["plain", "weight_average"]
)
def test_resumed_training_ends_with_the_model_of_an_uninterrupted_run(
    two_case_dataset, tmp_path, monkeypatch, averaging
):
    """Killed while writing the epoch-2 checkpoint, then resumed from epoch 1: the same weights, optimizer,
    scheduler, counters (and weight average) as two epochs straight, and the epoch-1 checkpoint survived
    the kill."""
    settings = {"dataset_dir": str(two_case_dataset), **TWO_EPOCHS, **averaging}
    run_workflow(workflow(TRAIN, "train", bundle_root=str(tmp_path / "straight"), **settings))
    straight = tmp_path / "straight" / "models"
    # model.pt is the model at the end of training (model_selection 'final')
    final = torch.load(straight / "checkpoint_epoch=2.pt", weights_only=True)
    assert_same_state(torch.load(straight / "model.pt", weights_only=True), final["model"])
    if averaging:  # the model at the end is the average over every step since epoch 1
        average = final["weight_average"]
        assert average["count"] == final["trainer"]["iteration"] == 4
        assert average["average"] and all(
            torch.equal(final["model"][k], v) for k, v in average["average"].items()
        )

    real_save = torch.save

    def killed_while_writing_epoch_2(obj, f, *args, **kwargs):
        if "checkpoint_epoch=2" in str(f):
            Path(f).write_bytes(b"the first bytes of a checkpoint")
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    root = tmp_path / "interrupted"
    interrupted = workflow(TRAIN, "train", bundle_root=str(root), **settings)
    interrupted.initialize()
    monkeypatch.setattr(torch, "save", killed_while_writing_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    monkeypatch.undo()
    models = root / "models"
    # a run that did not complete writes no final model.pt
    assert sorted(p.name for p in models.iterdir()) == ["checkpoint_epoch=1.pt", "model_best.pt"]
    assert torch.load(models / "checkpoint_epoch=1.pt", weights_only=True)["trainer"]["iteration"] == 2

    resume = str(models / "checkpoint_epoch=1.pt")
    run_workflow(workflow(TRAIN, "train", bundle_root=str(root), resume_checkpoint=resume, **settings))
    assert_same_state(
        torch.load(models / "checkpoint_epoch=2.pt", weights_only=True),
        torch.load(tmp_path / "straight" / "models" / "checkpoint_epoch=2.pt", weights_only=True),
    )


def test_evaluation_writes_per_case_and_summary(trained, tiny_dataset):
    evaluate = [TRAIN, str(CONFIGS / "evaluate.yaml")]
    run_workflow(workflow(evaluate, "train", bundle_root=str(trained), dataset_dir=str(tiny_dataset)))
    eval_dir = trained / "outputs" / "eval"
    rows = (eval_dir / "per_case.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("case_002.nii.gz")
    summary = json.loads((eval_dir / "summary.json").read_text())
    assert summary["n_cases"] == 1 and summary["failure"]["n"] == 1
    assert {"vessel", "aneurysm"} <= set(summary["classes"])
    assert "aneurysm" in (eval_dir / "summary.md").read_text()
    # the aneurysms of truth and prediction, in the label's geometry, and the picture of both
    case = json.loads((eval_dir / "case_002_aneurysms.json").read_text())
    assert len(case["truth"]) == 1 and case["picture"] == "case_002_mip.png"
    assert case["truth"][0]["volume_mm3"] == pytest.approx(case["truth"][0]["voxels"] * 0.4**3)
    # truth and prediction side by side, three square views each (one view alone is 3 heights wide)
    with Image.open(eval_dir / "case_002_mip.png") as picture:
        assert picture.width > 5 * picture.height
    (record,) = csv.DictReader((eval_dir / "per_case.csv").read_text().splitlines())
    aneurysms = list(csv.DictReader((eval_dir / "aneurysms.csv").read_text().splitlines()))
    assert [row["source"] for row in aneurysms].count("truth") == 1
    hits, false_positives = int(record["aneurysm_hits"]), int(record["aneurysm_false_positives"])
    assert [row["detected"] for row in aneurysms].count("True") == hits
    assert [row["false_positive"] for row in aneurysms].count("True") == false_positives
    report = (eval_dir / "report.md").read_text()
    assert (eval_dir / "summary.md").read_text().rstrip() in report and "](case_002_mip.png)" in report
    assert report.count("| case_002.nii.gz |") == len(aneurysms)


def inference_on_one_scan(bundle_root: Path, tmp_path: Path, affine=None, **overrides) -> ConfigWorkflow:
    """An initialised inference workflow over one tiny scan (of 37 x 42 x 23 voxels when ``affine`` is given)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    shape = (37, 42, 23) if affine is not None else (40, 40, 40)
    write_tiny_case(inputs / "scan.nii.gz", tmp_path / "label.nii.gz", seed=5, shape=shape)
    if affine is not None:
        image = nib.load(inputs / "scan.nii.gz")
        nib.save(nib.Nifti1Image(image.get_fdata().astype(np.float32), affine), inputs / "scan.nii.gz")
    infer = workflow(
        str(CONFIGS / "inference.yaml"),
        "infer",
        bundle_root=str(bundle_root),
        dataset_dir=str(inputs),
        output_dir=str(tmp_path / "out"),
        **overrides,
    )
    infer.initialize()
    return infer


def test_inference_output_matches_input_geometry(trained, tmp_path):
    # Anisotropic, not RAS, odd sizes: the label volume must come back on exactly this grid.
    affine = np.array([[-0.35, 0, 0, 12.0], [0, 0.4, 0, -3.0], [0, 0, 0.7, 5.0], [0, 0, 0, 1]])
    infer = inference_on_one_scan(trained, tmp_path, affine)
    assert infer.check_properties() == []
    infer.run()
    infer.finalize()
    result = nib.load(tmp_path / "out" / "scan_seg.nii.gz")
    assert result.shape == (37, 42, 23)
    np.testing.assert_allclose(result.affine, affine, atol=1e-5)
    assert set(np.unique(np.asarray(result.dataobj))) <= {0, 1, 2}
    assert result.get_data_dtype() == np.uint8


def test_inference_refuses_a_checkpoint_of_other_encoder_weights(trained, tmp_path):
    infer = inference_on_one_scan(trained, tmp_path, dino_model="random:1")
    with pytest.raises(RuntimeError) as error:  # the config expression wraps the network's own error
        infer.run()
    causes = []
    cause: BaseException | None = error.value
    while cause is not None:
        causes.append(cause)
        cause = cause.__cause__
    assert any(isinstance(c, EncoderMismatchError) and "dino_model='random:0'" in str(c) for c in causes)


def test_run_training_command_line(tiny_dataset, tmp_path):
    """The README's spelling: ``python -m monai.bundle run training ...``."""
    overrides = {**TINY, "bundle_root": str(tmp_path), "dataset_dir": str(tiny_dataset), "epochs": 1}
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", TRAIN]
    command += ["--meta_file", META, "--logging_file", LOGGING, *cli_overrides(overrides)]
    result = subprocess.run(command, cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "models" / "model.pt").is_file()
    assert "ETA" in result.stdout and "train_loss" in result.stdout


def _readme_ablation_overrides() -> dict[str, list[str]]:
    """The ablation table's rows that switch something off, as the README spells their overrides."""
    rows = {}
    for line in (BUNDLE_ROOT / "README.md").read_text().splitlines():
        cells = [c.strip(" `") for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[2].startswith("--use_"):
            rows[cells[0]] = cells[2].split()
    return rows


README_ABLATIONS = _readme_ablation_overrides()


def _train_as_typed(tmp_path, tiny_dataset, extra: list[str]) -> None:
    """One epoch of ``python -m monai.bundle run training ...`` on 16^3 windows, its words parsed by fire as on
    the command line, in this process (these tests look at the network a spelling builds or refuses; each
    process would pay MONAI's ~10 s import; test_run_training_command_line runs the command itself)."""
    overrides = {**TINY, "bundle_root": str(tmp_path), "dataset_dir": str(tiny_dataset), "epochs": 1}
    overrides["roi_size"] = SMALL_ROI
    words = ["run", "training", "--config_file", TRAIN, "--meta_file", META]
    words += [*cli_overrides(overrides), *extra]
    fire.Fire(importlib.import_module("monai.bundle.__main__"), command=words)


def _messages(error: BaseException) -> str:
    """An exception's message and those of its causes, as a traceback shows them."""
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(messages)


def test_readme_lists_the_three_switches():
    assert {args[0] for args in README_ABLATIONS.values()} == {
        "--use_dino",
        "--use_calibration",
        "--use_room_lite",
    }


@pytest.mark.parametrize("row", sorted(README_ABLATIONS))
def test_readme_ablation_overrides_train_that_row(row, tiny_dataset, tmp_path):
    """Each documented override, typed as the README spells it, trains the network it names."""
    key, value = README_ABLATIONS[row]
    _train_as_typed(tmp_path, tiny_dataset, [key, value])
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=False)
    names = " ".join(state)
    expected = {
        "--use_dino": "dino." not in names and "fusions." not in names,
        "--use_calibration": "fusions.0" not in names and "dino.coherence" in names,
        "--use_room_lite": "dino.coherence" not in names and "fusions.0" in names,
    }
    assert expected[key], names


@pytest.mark.parametrize("key", ["--use_dino", "--use_calibration", "--use_room_lite"])
def test_lower_case_false_on_the_command_line_is_refused(key, tiny_dataset, tmp_path):
    # fire parses 'false' as the string "false", which is truthy: it must not train the full model
    with pytest.raises(Exception) as refused:
        _train_as_typed(tmp_path, tiny_dataset, [key, "false"])
    assert f"{key[2:]} must be True or False, got 'false'" in _messages(refused.value)
    assert not (tmp_path / "models" / "model.pt").exists()


# A torchrun worker that runs ``python -m monai.bundle`` and records, per process, what it did: its output
# (rank<R>.log) and every file it wrote under RECORD_ROOT (rank<R>.json). With KILL_BEFORE_RENAME_TO set,
# rank 0 is killed (SIGKILL, nothing cleaned up) just before it renames a file of that name into place.
RANK_RECORDER = """
import json, os, runpy, signal, sys

rank, records, root = os.environ["RANK"], os.environ["RECORD_DIR"], os.path.realpath(os.environ["RECORD_ROOT"])
log = open(os.path.join(records, f"rank{rank}.log"), "w")
os.dup2(log.fileno(), 1)
os.dup2(log.fileno(), 2)
written = set()


def note(path):
    if not isinstance(path, int):
        path = os.path.realpath(os.fsdecode(path))
        if path.startswith(root + os.sep):
            written.add(os.path.relpath(path, root))


def audit(event, args):
    if event == "open" and args[0] is not None:
        mode, flags = args[1], args[2] or 0
        if any(c in mode for c in "wax+") if mode else flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            note(args[0])
    elif event == "os.rename":
        note(args[1])
        if os.path.basename(str(args[1])) == os.environ.get("KILL_BEFORE_RENAME_TO") and rank == "0":
            os.kill(os.getpid(), signal.SIGKILL)


sys.addaudithook(audit)
import torch

save = torch.save


def recorded_save(obj, f, *args, **kwargs):
    if isinstance(f, str | bytes | os.PathLike):
        note(f)
    return save(obj, f, *args, **kwargs)


torch.save = recorded_save
sys.path[0] = os.getcwd()  # as python -m does
sys.argv = ["monai.bundle", *sys.argv[1:]]
try:
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
finally:
    # written whole, then renamed: a rank stopped by the launcher while recording leaves no record, never half a one
    record = os.path.join(records, f"rank{rank}.json")
    with open(record + ".part", "w") as out:
        json.dump(sorted(written), out)
    os.replace(record + ".part", record)
"""


def torchrun_workflow(
    workflow: str | None,
    config_files: list[str],
    record_root: Path,
    settings: dict,
    kill_before_rename_to: str = "",
) -> dict:
    """Run ``python -m monai.bundle run [workflow]`` in two gloo processes under ``torchrun``, as the README's
    multi-GPU commands do. Returns the return code and, per rank, its output and the files it wrote under
    ``record_root``."""
    record_root.parent.mkdir(parents=True, exist_ok=True)
    records = Path(tempfile.mkdtemp(prefix=f"{record_root.name}_ranks_", dir=record_root.parent))
    (records / "worker.py").write_text(RANK_RECORDER)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        str(records / "worker.py"),
    ]
    command += ["run", *([workflow] if workflow else []), "--config_file", json.dumps(config_files)]
    command += ["--meta_file", META, "--logging_file", LOGGING]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "RECORD_DIR": str(records),
        "RECORD_ROOT": str(record_root),
        "KILL_BEFORE_RENAME_TO": kill_before_rename_to,
        "PYTHONPATH": os.pathsep.join([str(BUNDLE_ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        command + cli_overrides(settings),
        cwd=BUNDLE_ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    run = {"returncode": result.returncode, "launcher": result.stdout[-2000:] + result.stderr[-2000:]}
    for rank in (0, 1):
        log, written = records / f"rank{rank}.log", records / f"rank{rank}.json"
        run[f"log{rank}"] = log.read_text() if log.is_file() else ""
        run[f"wrote{rank}"] = set(json.loads(written.read_text())) if written.is_file() else None
    run["report"] = f"{run['launcher']}\nrank 0:\n{run['log0'][-3000:]}\nrank 1:\n{run['log1'][-3000:]}"
    return run


def torchrun_training(bundle_root: Path, dataset: Path, kill_before_rename_to: str = "", **overrides) -> dict:
    """Train with ``configs/multi_gpu_train.yaml`` in two gloo processes (:func:`torchrun_workflow`)."""
    settings = {**TINY, "bundle_root": str(bundle_root), "dataset_dir": str(dataset), **overrides}
    configs = [TRAIN, str(CONFIGS / "multi_gpu_train.yaml")]
    return torchrun_workflow("training", configs, bundle_root, settings, kill_before_rename_to)


@pytest.fixture(scope="module")
def ddp_trained(two_case_dataset, tmp_path_factory) -> tuple[Path, dict]:
    """A bundle root trained for two epochs by two gloo processes, and what each process did."""
    root = tmp_path_factory.mktemp("ddp") / "straight"
    run = torchrun_training(root, two_case_dataset, **TWO_EPOCHS)
    assert run["returncode"] == 0, run["report"]
    return root, run


def test_multi_gpu_training_writes_and_logs_from_rank_0_only(ddp_trained):
    """Rank 0 writes the checkpoints, TensorBoard and the progress logs; rank 1 only shares the embedding
    cache (content-addressed, written atomically)."""
    _, run = ddp_trained
    wrote0, wrote1 = run["wrote0"], run["wrote1"]
    models = {"models/checkpoint_epoch=2.pt", "models/model.pt", "models/model_best.pt"}
    assert models <= wrote0, sorted(wrote0)
    assert any(p.startswith("outputs/tensorboard/events.out.tfevents.") for p in wrote0), sorted(wrote0)
    assert wrote1 and all(p.startswith("outputs/embedding_cache/") for p in wrote1), sorted(wrote1)
    for line in ("ETA", "train_loss", "val_mean_dice", "Saved checkpoint", "cache hit rate"):
        assert line in run["log0"] and line not in run["log1"], line


def tensorboard_scalars(log_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, list[float]] = {}
    for events in sorted(log_dir.iterdir()):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            values.setdefault(tag, []).extend(e.value for e in accumulator.Scalars(tag))
    return values


def test_multi_gpu_training_saves_the_final_model_unwrapped(ddp_trained):
    """model.pt of a DistributedDataParallel run is the plain network's state at the end, loadable as is."""
    root, _ = ddp_trained
    final = torch.load(root / "models" / "model.pt", weights_only=True)
    last = torch.load(root / "models" / "checkpoint_epoch=2.pt", weights_only=True)["model"]
    assert_same_state(final, last)
    assert not any(key.startswith("module.") for key in final)


def test_multi_gpu_validation_scores_the_cases_of_both_ranks(ddp_trained, two_case_dataset, tmp_path):
    """Each rank validates one case; the logged scores are those of one process validating both."""
    root, _ = ddp_trained
    logged = tensorboard_scalars(root / "outputs" / "tensorboard")
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update(
        {
            **TINY,
            **TWO_EPOCHS,  # as the two ranks trained and validated
            "bundle_root": str(tmp_path),
            "dataset_dir": str(two_case_dataset),
            "embedding_cache_dir": str(root / "outputs" / "embedding_cache"),  # the very same slice features
            "is_main_process": False,  # write nothing
        }
    )
    checkpoint = torch.load(root / "models" / "checkpoint_epoch=2.pt", weights_only=True)
    parser.get_parsed_content("network").load_state_dict(checkpoint["model"])
    evaluator = parser.get_parsed_content("validate#evaluator")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank ran
    try:
        evaluator.run()
    finally:
        torch.set_num_threads(threads)
    per_case = evaluator.state.metric_details["val_score"].flatten().tolist()
    assert len(per_case) == 2 and per_case[0] != per_case[1]  # so one rank's case alone would show
    for name in ("val_score", "val_mean_dice", "val_vessel_dice", "val_aneurysm_dice"):
        assert logged[name][-1] == pytest.approx(evaluator.state.metrics[name], abs=1e-6), name


def test_multi_gpu_evaluation_writes_each_case_once_and_what_one_process_writes(
    ddp_trained, two_case_dataset, tmp_path
):
    """Two gloo processes evaluate three cases (rank 0 gets the first and the third): each case's files come
    from one rank, the run's files from rank 0 alone, and they are those of one process evaluating alone."""
    root, _ = ddp_trained
    entries = json.loads((two_case_dataset / "dataset.json").read_text())
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset.json").write_text(json.dumps({"test": entries["training"][:1] + entries["validation"]}))
    settings = {
        **TINY,
        "roi_size": SMALL_ROI,
        "dataset_dir": str(data),
        "model_path": str(root / "models" / "model.pt"),
    }
    configs = [TRAIN, str(CONFIGS / "evaluate.yaml")]
    run = torchrun_workflow(
        "evaluating",
        [*configs, str(CONFIGS / "multi_gpu_evaluate.yaml")],
        tmp_path / "two",
        {**settings, "bundle_root": str(tmp_path / "two")},
    )
    assert run["returncode"] == 0, run["report"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank ran
    try:
        alone = workflow(configs, "train", **{**settings, "bundle_root": str(tmp_path / "one")})
        run_workflow(alone, check_properties=False)  # a test-only datalist: no training list to check
    finally:
        torch.set_num_threads(threads)

    one, two = tmp_path / "one" / "outputs" / "eval", tmp_path / "two" / "outputs" / "eval"
    run_files = ["per_case.csv", "summary.json", "summary.md", "aneurysms.csv", "report.md"]
    for name in run_files:
        assert (two / name).read_text() == (one / name).read_text(), name
    assert [row.split(",")[0] for row in (two / "per_case.csv").read_text().splitlines()[1:]] == [
        "case_000.nii.gz", "case_001.nii.gz", "empty_label.nii.gz"
    ]  # fmt: skip
    wrote = [
        {p.removeprefix("outputs/eval/") for p in run[f"wrote{r}"] if p.startswith("outputs/eval/")}
        for r in (0, 1)
    ]
    assert set(run_files) <= wrote[0] and not set(run_files) & wrote[1]
    per_case = {p.name for p in one.iterdir()} - set(run_files)
    assert per_case == {
        f"{c}_{kind}"
        for c in ("case_000", "case_001", "empty_label")
        for kind in ("aneurysms.json", "mip.png")
    }
    assert all((name in wrote[0]) != (name in wrote[1]) for name in per_case), wrote
    assert {n for n in per_case if n.startswith("case_001")} <= wrote[1]


@pytest.mark.slow
def test_multi_gpu_training_killed_and_resumed_ends_with_the_uninterrupted_model(
    ddp_trained, two_case_dataset, tmp_path
):
    """Rank 0 killed while putting the epoch-2 checkpoint in place; resumed from epoch 1 by two processes,
    the run ends with the weights, optimizer, scheduler and counters of the uninterrupted one."""
    straight, _ = ddp_trained
    root = tmp_path / "interrupted"
    settings = TWO_EPOCHS
    killed = torchrun_training(
        root, two_case_dataset, kill_before_rename_to="checkpoint_epoch=2.pt", **settings
    )
    assert killed["returncode"] != 0, killed["report"]
    models = root / "models"
    assert not (models / "checkpoint_epoch=2.pt").exists()
    assert torch.load(models / "checkpoint_epoch=1.pt", weights_only=True)["trainer"]["iteration"] == 1

    resume = str(models / "checkpoint_epoch=1.pt")
    resumed = torchrun_training(root, two_case_dataset, resume_checkpoint=resume, **settings)
    assert resumed["returncode"] == 0, resumed["report"]
    assert_same_state(
        torch.load(models / "checkpoint_epoch=2.pt", weights_only=True),
        torch.load(straight / "models" / "checkpoint_epoch=2.pt", weights_only=True),
    )


def test_metadata_is_valid_for_the_model_zoo(tmp_path):
    schema = BUNDLE_ROOT / "bundle" / "schema" / "meta_schema_20240725.json"
    local = tmp_path / schema.name
    local.write_bytes(schema.read_bytes())  # present locally: verify_metadata does not download it
    verify_metadata(meta_file=META, filepath=str(local))
    meta = json.loads(Path(META).read_text())
    # the zoo's channel_def states scripts.labels, which every module and config uses
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert channel_def == {str(label): name for label, name in LABEL_NAMES.items()}
    assert LABEL_NAMES == {0: "background", 1: "vessel", 2: "aneurysm"}
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == NUM_CLASSES
    assert "not for diagnosis" in meta["intended_use"] and "DINOv3 License" in meta["license_notice"]


def test_network_input_and_output_match_the_metadata():
    verify_net_in_out(
        net_id="network_def",
        meta_file=META,
        config_file=str(CONFIGS / "inference.yaml"),
        n=4,
        **{k: v for k, v in TINY.items() if k != "crop_grid"},
    )


def test_inference_mirrors_the_training_model_and_preprocessing():
    """train.yaml takes these from inference.yaml by macro, or (network_def) spells them out: either way equal."""
    train, infer = ConfigParser(), ConfigParser()
    train.read_config(TRAIN)
    train.resolve_macro_and_relative_ids()
    infer.read_config(str(CONFIGS / "inference.yaml"))
    keys = ["network_def", "preparation", "clean_segmentation", "suppress_dark_foreground"]
    keys += [
        "roi_size",
        "spacing",
        "slice_axis",
        "dino_model",
        "dino_image_size",
        "dino_dtype",
        "dino_config",
    ]
    keys += [
        "use_dino",
        "use_room_lite",
        "use_calibration",
        "deep_supervision",
        "shape_prior_sigmas",
        "shape_prior_per_scale",
        "shape_prior_convexity_sigma",
        "intensity_upper_percentile",
        "intensity_noise_floor",
        "intensity_exclude_fill",
    ]
    keys += [
        "postprocess_min_component_mm3",
        "postprocess_min_aneurysm_mm3",
        "postprocess_detached_aneurysm_label",
        "postprocess_min_intensity",
        "postprocess_min_component_fraction",
        "postprocess_min_aneurysm_height_mm",
        "postprocess_min_aneurysm_aspect_ratio",
        "postprocess_lumen_fraction",
        "postprocess_lumen_steps",
        "postprocess_lumen_floor",
        "postprocess_lumen_vessel_steps",
        "postprocess_plate_sigmas_mm",
        "postprocess_plate_max_ratio",
        "postprocess_plate_min_strength",
        "postprocess_plate_min_mm3",
        "postprocess_plate_aneurysm_ratio",
        "grow_to_lumen",
        "remove_plates",
        "remove_fragments",
    ]
    assert [k for k in keys if train[k] != infer[k]] == []
    assert [t["_target_"] for t in train["loading"]] == [t["_target_"] for t in infer["loading"]]
    # validation, evaluation and inference post-process alike: the dark-voxel rule on the softmax, then the
    # clean-up of the labels
    evaluate = ConfigParser()
    evaluate.read_config([TRAIN, str(CONFIGS / "evaluate.yaml")])
    evaluate.resolve_macro_and_relative_ids()
    pipelines = {
        "validation": train["validate#postprocessing#transforms"],
        "evaluation": evaluate["validate#postprocessing#transforms"],
        "inference": infer["postprocessing#transforms"],
    }
    for name, transforms in pipelines.items():
        steps = [t if isinstance(t, str) else t["_target_"] for t in transforms]
        assert steps.index("@suppress_dark_foreground") < steps.index("@clean_segmentation"), name
        assert steps[steps.index("@suppress_dark_foreground") - 1] == "Activationsd", name
        # the labels grow to the lumen's edge, then lose what lies on bone plates
        assert steps.index("@clean_segmentation") < steps.index("@grow_to_lumen"), name
        assert steps[steps.index("@grow_to_lumen") + 1] == "@remove_plates", name
        # and the volume floor again on the pieces the plates leave
        assert steps[steps.index("@remove_plates") + 1] == "@remove_fragments", name
    assert infer["preprocessing"]["transforms"] == "$@loading + @preparation"
    assert train["validate"]["preprocessing"]["transforms"] == "$@loading + @preparation"
    assert "@clean_segmentation" in infer["postprocessing"]["transforms"]


def test_deep_supervision_key_trains_the_coarser_heads_through_the_configured_loss(tiny_dataset, tmp_path):
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update(
        {
            **TINY,
            "use_dino": False,
            "deep_supervision": 1,
            "bundle_root": str(tmp_path),
            "dataset_dir": str(tiny_dataset),
        }
    )
    network, loss = parser.get_parsed_content("network_def"), parser.get_parsed_content("loss")
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (2, 1, 32, 32, 32), dtype=torch.uint8)
    full, half = network.train()(torch.rand(2, 1, 32, 32, 32))
    assert half.shape == (2, 3, 16, 16, 16)
    halved = labels[:, :, 1::2, 1::2, 1::2]  # nearest-exact downsampling by 2 keeps the odd voxels
    expected = loss.loss(full, labels) + 0.5 * loss.loss(half, halved)
    torch.testing.assert_close(loss([full, half], labels), expected)
    assert parser.get_parsed_content("train#trainer").loss_function is not None


@pytest.mark.parametrize("files", [[TRAIN], [TRAIN, str(CONFIGS / "full_schedule.yaml")]])
def test_crop_weights_reach_the_training_crops(files):
    """``crop_empty_ratio``, ``crop_bright_ratio`` and ``crop_component_classes`` set the crops of the CPU default
    and of the GPU schedule, whose whole augmentation then runs on a case: crops of ``roi_size``, the image kept in
    [0, 1]."""
    parser = ConfigParser()
    parser.read_config(files)
    parser.update({"crop_empty_ratio": 0.25, "crop_bright_ratio": 1.5, "crop_component_classes": [2]})
    augmentation = parser.get_parsed_content("train#augmentation")
    crop = augmentation[0]
    assert (crop.empty_ratio, crop.bright_ratio, crop.component_classes) == (0.25, 1.5, {2})
    generator = torch.Generator().manual_seed(0)
    label = torch.zeros((1, 72, 72, 72), dtype=torch.uint8)
    label[:, 20:50, 30:36, 30:36], label[:, 30:36, 36:42, 30:36] = 1, 2
    image = (0.1 * torch.rand(label.shape, generator=generator) + 0.8 * (label > 0)).float()
    samples = Compose(augmentation).set_random_state(0)({"image": image, "label": label})
    assert len(samples) == parser.get_parsed_content("samples_per_case")
    for sample in samples:
        assert sample["image"].shape == sample["label"].shape == (1, *parser.get_parsed_content("roi_size"))
        assert 0.0 <= float(sample["image"].min()) <= float(sample["image"].max()) <= 1.0


def test_evaluation_infers_as_inference_does():
    evaluate, infer = ConfigParser(), ConfigParser()
    evaluate.read_config([TRAIN, str(CONFIGS / "evaluate.yaml")])
    infer.read_config(str(CONFIGS / "inference.yaml"))
    evaluating, inferring = (
        evaluate.get_parsed_content("validate#inferer"),
        infer.get_parsed_content("inferer"),
    )
    for setting in ("roi_size", "overlap", "mode", "sigma_scale", "padding_mode"):
        assert getattr(evaluating, setting) == getattr(inferring, setting), setting


def test_validation_dice_scores_empty_masks_instead_of_skipping_them():
    # the best model is chosen by this metric: a skipped empty-truth case would hide false positives
    parser = ConfigParser()
    parser.read_config(TRAIN)
    metrics = {
        name: parser.get_parsed_content(f"validate#{group}#{name}").metric_fn
        for group, name in [
            ("additional_metrics", "val_mean_dice"),
            ("additional_metrics", "val_vessel_dice"),
            ("additional_metrics", "val_aneurysm_dice"),
        ]
    }
    label = torch.zeros(2, 3, 4, 4, 4)
    pred = torch.zeros(2, 3, 4, 4, 4)
    label[0, 1, :2] = 1  # 32 voxels
    pred[0, 1, 1:3] = 1  # 32 voxels, overlap 16 -> Dice 0.5
    label[0, 2, 0, 0, 0] = 1  # aneurysm missed in sample 0 -> 0
    pred[1, 2, 0, 0, 0] = 1  # vessel both empty in sample 1 -> 1, aneurysm spurious -> 0
    torch.testing.assert_close(metrics["val_mean_dice"](pred, label), torch.tensor([[0.5, 0.0], [1.0, 0.0]]))
    torch.testing.assert_close(
        metrics["val_vessel_dice"](pred[:, 1:2], label[:, 1:2]), torch.tensor([[0.5], [1.0]])
    )
    torch.testing.assert_close(
        metrics["val_aneurysm_dice"](pred[:, 2:], label[:, 2:]), torch.tensor([[0.0], [0.0]])
    )


def test_model_selection_best_makes_the_best_validated_model_model_pt(tiny_dataset, tmp_path):
    run_workflow(
        workflow(
            TRAIN,
            "train",
            bundle_root=str(tmp_path),
            dataset_dir=str(tiny_dataset),
            epochs=1,
            model_selection="best",
        )
    )
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        "checkpoint_epoch=1.pt",
        "model.pt",
        "model_final.pt",
    ]


@pytest.mark.parametrize("selection", ["last", "Final", False, None])
def test_model_selection_refuses_anything_but_final_or_best(selection):
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({"model_selection": selection})
    with pytest.raises(RuntimeError) as error:  # the config expression wraps the function's own error
        parser.get_parsed_content("model_files")
    assert f"model_selection must be one of ('final', 'best'), got {selection!r}" in str(
        error.value.__cause__
    )


def test_model_selection_counts_false_aneurysm_components():
    """The best model is picked by a score that drops when a false aneurysm appears beside a perfect one."""
    parser = ConfigParser()
    parser.read_config(TRAIN)
    score = parser.get_parsed_content("validate#key_metric#val_score").metric_fn
    label = torch.zeros(1, 3, 16, 16, 16)
    label[:, 0] = 1
    label[0, :, 2:14, 7:9, 7:9] = torch.tensor([0.0, 1.0, 0.0])[:, None, None, None]
    label[0, :, 6:9, 9:12, 7:10] = torch.tensor([0.0, 0.0, 1.0])[:, None, None, None]
    perfect = score(label.clone(), label)
    extra = label.clone()
    extra[0, :, 12:14, 12:14, 12:14] = torch.tensor([0.0, 0.0, 1.0])[:, None, None, None]  # 8 false voxels
    score.reset()
    torch.testing.assert_close(perfect, torch.ones(1, 1))
    with_false_positive = score(extra, label)
    # aneurysm F1 2/3 and a slightly lower aneurysm Dice: the mean drops by more than 0.1
    assert float(with_false_positive) < 0.9


ABLATIONS = {
    "plain_unet": ({"use_dino": False}, lambda net: net.slice_encoder is None),
    "without_room_lite": (
        {"use_room_lite": False},
        lambda net: not any(isinstance(m, RoomLite) for m in net.modules()),
    ),
    "without_calibration": (
        {"use_calibration": False},
        lambda net: all(isinstance(f, AdditiveFusion) for f in net.fusions),
    ),
    "full": ({}, lambda net: all(isinstance(f, CalibratedFusion) for f in net.fusions)),
}


@pytest.mark.parametrize("settings, check", ABLATIONS.values(), ids=ABLATIONS.keys())
def test_ablation_rows_are_config_settings(settings, check):
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({**TINY, **settings})
    assert check(parser.get_parsed_content("network_def"))


def test_dino_model_key_selects_the_encoder_weights(tiny_dinov2_dir):
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({**TINY, "dino_model": str(tiny_dinov2_dir), "dino_config": None})
    assert parser.get_parsed_content("network_def").slice_encoder.provenance.source == str(tiny_dinov2_dir)
