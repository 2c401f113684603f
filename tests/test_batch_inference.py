"""``configs/inference.yaml`` on a folder of volumes (``scripts.batch_inference``): bad cases fail alone, complete
cases are skipped, every case gets its label volume, measurements and picture, the run its summary.

Most tests run the workflow around the stand-in network of ``test_geometry`` (a fixed intensity threshold), on
volumes of 0.8 mm voxels (a multiple of the 0.4 mm working spacing, so the labels come back exactly): the
vessel and aneurysm boxes put into a volume are the labels the run must write and measure. One test runs
the README's command line on the real network (tiny random encoder and U-Net).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, TINY_DINOV3, TINY_IMAGE_SIZE, bundle_workflow
from monai.bundle import ConfigParser
from PIL import Image
from test_geometry import IntensityThreshold

from scripts.batch_inference import CasesFailed
from scripts.data.preview import save_oriented_preview
from scripts.measurements import measure_aneurysms

CONFIGS = BUNDLE_ROOT / "configs"
SHAPE = (24, 20, 16)
AFFINE = np.diag([0.8, 0.8, 0.8, 1.0])
VESSEL, ANEURYSM = 500.0, 1000.0  # the stand-in network's vessel and aneurysm levels
SPECK = (20, 16, 13)  # one aneurysm-bright voxel, away from everything: the post-processing removes it
# case name -> (box, level) drawn on a zero background; aneurysms of 4^3 and 3^3 voxels, on their vessel
GOOD_CASES = {
    "a": [
        ((slice(4, 20), slice(8, 12), slice(6, 10)), VESSEL),
        ((slice(10, 14), slice(12, 16), slice(6, 10)), ANEURYSM),
    ],
    "d": [
        ((slice(2, 22), slice(4, 8), slice(4, 12)), VESSEL),
        ((slice(6, 9), slice(8, 11), slice(5, 8)), ANEURYSM),
        ((slice(15, 19), slice(8, 12), slice(6, 10)), ANEURYSM),
        (SPECK, ANEURYSM),
    ],
}
ANEURYSM_VOXELS = {"a": [64], "d": [64, 27]}  # by size, as the outputs number them
OVERRIDES = {
    "network_def": {"_target_": f"test_geometry.{IntensityThreshold.__name__}"},
    "spacing": [0.4, 0.4, 0.4],
}


def volume_of(boxes) -> np.ndarray:
    volume = np.zeros(SHAPE, np.float32)
    for box, level in boxes:
        volume[box] = level
    return volume


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """a (good), b (NaN), c (not a NIfTI file), d (good), and model.pt of the stand-in network beside them."""
    root = tmp_path_factory.mktemp("batch")
    folder = root / "in"
    folder.mkdir()
    for name, boxes in GOOD_CASES.items():
        nib.save(nib.Nifti1Image(volume_of(boxes), AFFINE), folder / f"{name}.nii.gz")
    bad = volume_of(GOOD_CASES["a"])
    bad[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(bad, AFFINE), folder / "b.nii.gz")
    (folder / "c.nii.gz").write_bytes(b"the first bytes of a volume")
    torch.save(IntensityThreshold().state_dict(), root / "model.pt")
    return folder


def infer(inputs: Path, output_dir: Path, **overrides) -> CasesFailed | None:
    """Run the inference workflow as ``python -m monai.bundle run`` does; what it exits with, if anything."""
    workflow = bundle_workflow(
        str(CONFIGS / "inference.yaml"),
        "infer",
        **{
            "dataset_dir": str(inputs),
            "model_path": str(inputs.parent / "model.pt"),
            "output_dir": str(output_dir),
            **OVERRIDES,
            **overrides,
        },
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    try:
        workflow.run()
    except CasesFailed as failed:
        return failed
    workflow.finalize()
    return None


def case_files(name: str) -> list[str]:
    return [f"{name}_seg.nii.gz", f"{name}_aneurysms.json", f"{name}_mip.png"]


@pytest.mark.parametrize("workers", [0, 1], ids=["in_process", "worker_process"])
def test_a_bad_case_fails_alone_and_the_run_exits_naming_it(workers, inputs, tmp_path, capsys):
    """With a loader worker too: the failure records travel to the main process in the batches."""
    out = tmp_path / "out"
    failed = infer(inputs, out, **{"dataloader#loader#num_workers": workers})
    log = capsys.readouterr().out  # configs/logging.conf logs to stdout

    # every good case written, before and after the bad ones; nothing else, no temporary file left
    run_files = ["measurements.csv", "report.md", "summary.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(case_files("a") + case_files("d") + run_files)
    summary = json.loads((out / "summary.json").read_text())
    assert [c["case"] for c in summary["done"]] == ["a", "d"] and summary["skipped"] == []
    problems = {Path(f["image"]).name: f["problem"] for f in summary["failed"]}
    assert problems == {
        "b.nii.gz": "image contains NaN or infinite values.",
        "c.nii.gz": f"ImageFileError: File {inputs / 'c.nii.gz'} is not a gzip file",
    }

    # one log line per failed case, naming the file and the problem, without traceback
    for name, problem in problems.items():
        lines = [line for line in log.splitlines() if str(inputs / name) in line]
        assert len(lines) == 1, lines
        assert f" - ERROR - case {'2' if name == 'b.nii.gz' else '3'} of 4 failed, " in lines[0]
        assert problem in lines[0]
    assert all(
        re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ - ", line) for line in log.splitlines()
    )  # no traceback
    # progress, and what was found, per case
    assert "case 1 of 4 a: 1 aneurysm, largest 4.16 mm -> a_seg.nii.gz" in log
    assert "case 4 of 4 d: 2 aneurysms, largest 4.16 mm" in log and "ETA" in log

    # and only then the run ends, non-zero (SystemExit), in one line naming the failed files
    assert isinstance(failed, CasesFailed) and failed.code != 0
    assert "\n" not in str(failed) and str(failed).startswith("inference: 2 of 4 cases failed:")
    assert str(inputs / "b.nii.gz") in str(failed) and str(inputs / "c.nii.gz") in str(failed)
    assert [f["case"] for f in failed.failed] == ["b", "c"]


def test_labels_and_measurements_are_written_in_the_input_geometry(inputs, tmp_path):
    out = tmp_path / "out"
    infer(inputs, out)
    rows = (out / "measurements.csv").read_text().splitlines()
    header, rows = (
        rows[0].split(","),
        [dict(zip(rows[0].split(","), r.split(","), strict=True)) for r in rows[1:]],
    )
    assert header[:2] == ["case", "index"]
    for name, boxes in GOOD_CASES.items():
        label = nib.load(out / f"{name}_seg.nii.gz")
        np.testing.assert_allclose(label.affine, AFFINE, atol=1e-6)
        expected = np.digitize(volume_of(boxes), [VESSEL / 2, (VESSEL + ANEURYSM) / 2]).astype(np.uint8)
        expected[SPECK] = 0  # the final labels, post-processed, are what is written and measured
        np.testing.assert_array_equal(np.asarray(label.dataobj), expected)

        document = json.loads((out / f"{name}_aneurysms.json").read_text())
        assert document["image"] == str(inputs / f"{name}.nii.gz")
        assert [a["voxels"] for a in document["aneurysms"]] == ANEURYSM_VOXELS[name]
        # measured on the written label volume with its affine
        measured = measure_aneurysms(np.asarray(label.dataobj), label.affine)
        assert document["aneurysms"] == json.loads(json.dumps([m.as_dict() for m in measured]))
        # the run table holds the same aneurysms, in the same order
        table = [r for r in rows if r["case"] == name]
        assert len(table) == len(document["aneurysms"])
        for row, aneurysm in zip(table, document["aneurysms"], strict=True):
            assert int(row["index"]) == aneurysm["index"]
            for key in ("volume_mm3", "max_diameter_mm", "neck_width_mm", "height_mm", "aspect_ratio"):
                assert float(row[key]) == pytest.approx(aneurysm[key], rel=1e-12)
            assert [float(row[f"centroid_{a}_ras_mm"]) for a in "xyz"] == pytest.approx(
                aneurysm["centroid_ras_mm"]
            )
    report = (out / "report.md").read_text()
    assert "| d | 2 | 13.8 | 2.77 |" in report and "![a](a_mip.png)" in report and "b.nii.gz" in report


def test_no_foreground_where_the_image_is_dark_even_from_a_model_that_sees_lumen_everywhere(tmp_path):
    """A blank volume gets no label and a vessel keeps only its bright voxels, whatever the model says: the
    stand-in here calls every voxel at least vessel. With the dark-voxel rule off, the blank volume is all
    vessel: the rule is what keeps it clean."""
    folder = tmp_path / "in"
    folder.mkdir()
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), AFFINE), folder / "blank.nii.gz")
    nib.save(nib.Nifti1Image(volume_of(GOOD_CASES["a"]), AFFINE), folder / "a.nii.gz")
    torch.save(IntensityThreshold(low=-1.0).state_dict(), tmp_path / "model.pt")

    assert infer(folder, tmp_path / "on") is None
    assert not np.asarray(nib.load(tmp_path / "on" / "blank_seg.nii.gz").dataobj).any()
    bright = volume_of(GOOD_CASES["a"]) > 0
    labelled = np.asarray(nib.load(tmp_path / "on" / "a_seg.nii.gz").dataobj) > 0
    assert labelled[bright].all() and labelled.sum() < 2 * bright.sum()  # the lumen and a rim of its edge

    assert infer(folder, tmp_path / "off", postprocess_min_intensity=0.0) is None
    assert (np.asarray(nib.load(tmp_path / "off" / "blank_seg.nii.gz").dataobj) == 1).all()


def panel_runs(pixels: np.ndarray, axis: int) -> list[tuple[int, int]]:
    """(start, stop) of a picture's panels along ``axis`` (0: rows, 1: columns): the runs between the
    canvas's gaps (lines of the background colour across the whole picture)."""
    gap = (pixels == (30, 30, 30)).all(axis=(1 - axis, 2))
    edges = np.flatnonzero(np.diff(np.concatenate([[True], gap, [True]]).astype(int)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def test_each_case_gets_a_picture_of_three_projections_with_its_labels(inputs, tmp_path):
    out = tmp_path / "out"
    infer(inputs, out)
    for name in GOOD_CASES:
        picture = out / f"{name}_mip.png"
        with Image.open(picture) as image:
            image.verify()  # a whole PNG
        pixels = np.asarray(Image.open(picture).convert("RGB"))
        assert len(panel_runs(pixels, 0)) == 1 and len(panel_runs(pixels, 1)) == 3  # three projections
        pixels = pixels.reshape(-1, 3)
        assert (pixels == (255, 40, 40)).all(axis=1).any()  # aneurysm outline, red
        assert ((pixels[:, 1] > 150) & (pixels[:, 0] < 150)).any()  # vessel, green


def test_numbers_are_drawn_on_every_projection_and_pictures_do_not_depend_on_the_file_axes(tmp_path):
    """The same world content stored in RAS and in PSL voxel order gives the same picture, number included."""
    image = volume_of(GOOD_CASES["d"])
    label = np.digitize(image, [VESSEL / 2, (VESSEL + ANEURYSM) / 2]).astype(np.uint8)
    centroid = AFFINE @ [16.5, 9.5, 7.5, 1.0]  # the larger aneurysm
    numbers = [(centroid[:3], "1")]
    plain = save_oriented_preview(image, label, AFFINE, tmp_path / "plain.png", slices=False)
    ras = save_oriented_preview(
        image, label, AFFINE, tmp_path / "ras.png", slices=False, world_numbers=numbers
    )
    to_psl = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt("PSL")
    )
    psl_affine = AFFINE @ nib.orientations.inv_ornt_aff(to_psl, SHAPE)
    psl_image = nib.orientations.apply_orientation(image, to_psl)
    psl_label = nib.orientations.apply_orientation(label, to_psl)
    assert psl_image.shape == (SHAPE[1], SHAPE[2], SHAPE[0])
    psl = save_oriented_preview(
        psl_image, psl_label, psl_affine, tmp_path / "psl.png", slices=False, world_numbers=numbers
    )
    ras_pixels, psl_pixels = np.asarray(Image.open(ras)), np.asarray(Image.open(psl))
    np.testing.assert_array_equal(psl_pixels, ras_pixels)
    drawn = (np.asarray(Image.open(plain)) != ras_pixels).any(axis=(0, 2))
    columns = panel_runs(ras_pixels, 1)
    assert len(columns) == 3 and all(drawn[start:stop].any() for start, stop in columns)


def test_a_second_run_skips_complete_cases_and_redoes_unfinished_ones(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    infer(inputs, out)
    (out / "d_aneurysms.json").unlink()  # a run killed after d's label volume, before its measurements
    for path in out.iterdir():
        os.utime(path, (0, 0))  # anything rewritten gets a new time

    capsys.readouterr()
    failed = infer(inputs, out)
    log = capsys.readouterr().out
    assert [f["case"] for f in failed.failed] == ["b", "c"]  # still failing, still reported
    untouched = {p.name for p in out.iterdir() if p.stat().st_mtime == 0}
    assert untouched == set(case_files("a"))
    assert (out / "d_aneurysms.json").is_file()
    assert "case 1 of 4 a: outputs complete" in log and "skipped" in log
    summary = json.loads((out / "summary.json").read_text())
    assert [c["case"] for c in summary["skipped"]] == ["a"] and [c["case"] for c in summary["done"]] == ["d"]
    assert len((out / "measurements.csv").read_text().splitlines()) == 1 + 3  # the skipped case's too

    # all complete and nothing to fail: nothing computed, the run ends normally
    assert infer(inputs, out, dataset_dir=None, input_files=[str(inputs / "a.nii.gz")]) is None
    assert (out / "a_seg.nii.gz").stat().st_mtime == 0
    # overwrite recomputes
    infer(inputs, out, dataset_dir=None, input_files=[str(inputs / "a.nii.gz")], overwrite=True)
    assert (out / "a_seg.nii.gz").stat().st_mtime > 0


def test_probabilities_on_request_in_the_input_geometry(inputs, tmp_path):
    out = tmp_path / "out"
    files = {"dataset_dir": None, "input_files": [str(inputs / "a.nii.gz")]}
    infer(inputs, out, **files)
    assert not (out / "a_prob.nii.gz").exists()  # off by default
    infer(inputs, out, save_probabilities=True, **files)  # a was complete, but without its probabilities
    probabilities = nib.load(out / "a_prob.nii.gz")
    assert probabilities.shape == (*SHAPE, 3) and probabilities.get_data_dtype() == np.float32
    np.testing.assert_allclose(probabilities.affine, AFFINE, atol=1e-6)
    maps = probabilities.get_fdata(dtype=np.float32)
    np.testing.assert_allclose(maps.sum(axis=-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(maps.argmax(axis=-1), np.asarray(nib.load(out / "a_seg.nii.gz").dataobj))


@pytest.mark.parametrize("key", ["save_pictures", "save_probabilities", "overwrite"])
def test_lower_case_false_is_refused_naming_the_key(key, inputs, tmp_path):
    with pytest.raises(Exception) as error:  # noqa: B017 (the config wraps the ValueError)
        infer(inputs, tmp_path / "out", **{key: "false"})
    causes = []
    cause: BaseException | None = error.value
    while cause is not None:
        causes.append(str(cause))
        cause = cause.__cause__
    assert any(f"{key} must be True or False, got 'false'" in c for c in causes), causes
    assert not (tmp_path / "out").exists()


def test_readme_command_on_a_folder_with_a_bad_case(inputs, tmp_path):
    """The README's command, the real network (tiny random encoder): the good cases written, one line on the
    bad one in the log, exit status 1 with one line on stderr, no traceback."""
    tiny = {
        "roi_size": [32, 32, 32],
        "dino_model": "random:0",
        "dino_config": TINY_DINOV3,
        "dino_image_size": TINY_IMAGE_SIZE,
        "network_def#channels": [8, 16, 32, 64],
    }
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.yaml"))
    parser.update(tiny)
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "model.pt")
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b", "d"):
        os.symlink(inputs / f"{name}.nii.gz", folder / f"{name}.nii.gz")
    out = tmp_path / "out"
    overrides = {**tiny, "model_path": str(tmp_path / "model.pt"), "output_dir": str(out)}
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml"]
    command += ["--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf"]
    command += ["--dataset_dir", str(folder)]
    command += [arg for key, value in overrides.items() for arg in (f"--{key}", json.dumps(value))]
    result = subprocess.run(command, cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=300)

    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("inference: 1 of 3 cases failed: ") and str(folder / "b.nii.gz") in last
    logged = [line for line in result.stdout.splitlines() if str(folder / "b.nii.gz") in line]
    assert len(logged) == 1 and "image contains NaN" in logged[0]
    assert all((out / f).is_file() for f in case_files("a") + case_files("d"))


def test_two_processes_share_the_cases_and_write_each_file_once(inputs, tmp_path):
    """``torchrun`` with configs/multi_gpu_inference.yaml, two gloo processes on a, b (NaN), c (unreadable)
    and d: rank 0 owns a and c, rank 1 owns b and d. Each case's files come from its owner, the run's files
    from rank 0 with all four cases, the labels are those of one process, and the run exits non-zero."""
    from test_bundle import torchrun_workflow

    out = tmp_path / "out"
    settings = {
        "dataset_dir": str(inputs),
        "model_path": str(inputs.parent / "model.pt"),
        "output_dir": str(out),
        **OVERRIDES,
    }
    configs = [str(CONFIGS / "inference.yaml"), str(CONFIGS / "multi_gpu_inference.yaml")]
    run = torchrun_workflow(None, configs, out, settings)

    assert run["returncode"] != 0, run["report"]
    summary = json.loads((out / "summary.json").read_text())
    assert [case["case"] for case in summary["done"]] == ["a", "d"], run["report"]
    assert [case["case"] for case in summary["failed"]] == ["b", "c"]
    assert "inference: 2 of 4 cases failed" in run["log0"] and "cases failed" not in run["log1"]
    run_files = {"summary.json", "measurements.csv", "report.md"}
    assert set(case_files("a")) | run_files <= run["wrote0"], run["wrote0"]
    assert set(case_files("d")) <= run["wrote1"], run["wrote1"]
    assert not set(case_files("d")) & run["wrote0"]
    assert not (set(case_files("a")) | run_files) & run["wrote1"]

    assert isinstance(infer(inputs, tmp_path / "one"), CasesFailed)
    assert (out / "measurements.csv").read_text() == (tmp_path / "one" / "measurements.csv").read_text()
    for name in ("a", "d"):
        shared, alone = (nib.load(d / f"{name}_seg.nii.gz") for d in (out, tmp_path / "one"))
        assert np.array_equal(shared.get_fdata(), alone.get_fdata()) and np.allclose(
            shared.affine, alone.affine
        )
