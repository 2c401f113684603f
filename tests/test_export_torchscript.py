"""``scripts.export_torchscript``: the whole network in one TorchScript file, and ``configs/inference_ts.yaml``
that segments with it, on a tiny random encoder."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, TINY_DINOV3, TINY_IMAGE_SIZE, bundle_workflow, run_workflow, write_tiny_case
from monai.bundle import ConfigParser
from monai.inferers import SlidingWindowInferer

from scripts.export_torchscript import EXPORT_ATOL, EXPORT_RTOL, ExportMismatchError, export_torchscript
from scripts.networks import EncoderMismatchError, EncoderWeightsError

CONFIGS = BUNDLE_ROOT / "configs"
INFERENCE = str(CONFIGS / "inference.yaml")
INFERENCE_TS = [INFERENCE, str(CONFIGS / "inference_ts.yaml")]
ROI = [32, 32, 32]
# what the network is built with: tiny encoder and U-Net
TINY = {
    "roi_size": ROI,
    "dino_config": TINY_DINOV3,
    "dino_image_size": TINY_IMAGE_SIZE,
    "network_def#channels": [8, 16, 32, 64],
}
ENCODER = "random:0"
# a scan that takes several windows of ROI: 2 x 2 x 1 at overlap 0.25, run 3 and 1 at a time
SHAPE = (56, 48, 32)
SLIDING = {"sw_batch_size": 3, "sw_overlap": 0.25}
# a scan for the workflows: padded to 36 x 32 x 32, two windows
SCAN_SHAPE = (36, 32, 28)


def tiny_network(**overrides) -> torch.nn.Module:
    """``network_def`` of inference.yaml with the tiny settings, the encoder ENCODER and ``overrides``."""
    parser = ConfigParser()
    parser.read_config(INFERENCE)
    parser.update({**TINY, "dino_model": ENCODER, **overrides})
    return parser.get_parsed_content("network_def").eval()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A bundle root whose models/ holds a checkpoint of a tiny network and its export; and the network."""
    root = tmp_path_factory.mktemp("bundle")
    (root / "models").mkdir()
    torch.manual_seed(0)
    network = tiny_network()
    torch.save(network.state_dict(), root / "models" / "model.pt")
    written = export_torchscript(
        BUNDLE_ROOT, root / "models" / "model.pt", root / "models" / "model.ts", overrides=TINY
    )
    assert written == root / "models" / "model.ts"
    return root, network


def test_exported_network_matches_eager_pytorch_under_sliding_windows(bundle):
    root, network = bundle
    exported = torch.jit.load(root / "models" / "model.ts")
    batches = []

    def recorded(windows: torch.Tensor) -> torch.Tensor:
        batches.append(windows.shape[0])
        return exported(windows)

    inferer = SlidingWindowInferer(ROI, SLIDING["sw_batch_size"], SLIDING["sw_overlap"], mode="gaussian")
    volume = torch.rand((1, 1, *SHAPE), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        actual, expected = inferer(volume, recorded), inferer(volume, network)
    assert batches == [3, 1]  # a smaller last batch than the traced one
    assert actual.shape == expected.shape == (1, 3, *SHAPE)
    torch.testing.assert_close(actual, expected, rtol=EXPORT_RTOL, atol=EXPORT_ATOL)
    # what the eager network refuses, the export refuses too: the trace alone would drop these checks
    with pytest.raises(torch.jit.Error, match=r"windows of \(C, D, H, W\) = \[1, 32, 32, 32\]"):
        exported(torch.rand(1, 1, 32, 32, 16))
    with pytest.raises(torch.jit.Error, match="NaN"):
        exported(torch.full((1, 1, *ROI), float("nan")))

    extra = {"metadata.json": "", "encoder.json": "", "inference.json": ""}
    torch.jit.load(root / "models" / "model.ts", _extra_files=extra)
    assert json.loads(extra["metadata.json"]) == json.loads((CONFIGS / "metadata.json").read_text())
    assert json.loads(extra["encoder.json"]) == network.slice_encoder.provenance.record()
    assert json.loads(extra["inference.json"])["dino_model"] == ENCODER
    assert json.loads(extra["inference.json"])["bundle_root"] == "."  # not the exporting machine's folder


def test_the_export_holds_no_temporary_file_name(bundle):
    """torch.jit.save names the archive's folder after the file: a temporary name would make exports differ."""
    root, _ = bundle
    with zipfile.ZipFile(root / "models" / "model.ts") as archive:
        assert {name.split("/")[0] for name in archive.namelist()} == {"archive"}


def test_the_export_gets_the_permissions_of_a_new_file(bundle, tmp_path):
    root, _ = bundle
    (tmp_path / "new").write_bytes(b"")
    mode = (root / "models" / "model.ts").stat().st_mode & 0o777
    assert mode == (tmp_path / "new").stat().st_mode & 0o777  # not the temporary file's 0o600


def segment(config_file, bundle_root: Path, inputs: Path, output_dir: Path, **overrides) -> np.ndarray:
    """Run the inference workflow as ``python -m monai.bundle run`` does; the label volume it writes."""
    settings = {"roi_size": ROI, "cpu_autocast": False, **SLIDING, **overrides}
    run_workflow(
        bundle_workflow(
            config_file,
            "infer",
            bundle_root=str(bundle_root),
            dataset_dir=str(inputs),
            output_dir=str(output_dir),
            **settings,
        )
    )
    return np.asarray(nib.load(output_dir / "scan_seg.nii.gz").dataobj)


def test_inference_ts_segments_as_inference_with_the_checkpoint(bundle, tmp_path):
    """Label volumes equal voxel for voxel (the logits agree to ~3e-6; a near-tie could in principle flip one
    voxel, which this tiny seeded case does not have). ``inference_ts.yaml`` builds no encoder: the
    dino_model it is given does not exist."""
    root, _ = bundle
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_tiny_case(inputs / "scan.nii.gz", tmp_path / "label.nii.gz", seed=5, shape=SCAN_SHAPE)
    eager = segment(INFERENCE, root, inputs, tmp_path / "eager", **TINY, dino_model=ENCODER)
    exported = segment(INFERENCE_TS, root, inputs, tmp_path / "ts", dino_model=str(tmp_path / "no_encoder"))
    assert eager.shape == SCAN_SHAPE and set(np.unique(eager)) > {0}  # something was segmented
    np.testing.assert_array_equal(exported, eager)


def test_inference_ts_runs_the_float32_cpu_export_without_checkpoint_loader(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the CPU even where CUDA is there
    parser = ConfigParser()
    parser.read_config(INFERENCE_TS)
    assert parser.get_parsed_content("device") == torch.device("cpu")
    assert parser.get_parsed_content("cpu_autocast") is False and parser["evaluator"]["amp"] is False
    assert (
        parser.get_parsed_content("model_path").endswith("/models/model.ts")
        and parser["network"] == "@network_def"
    )
    assert [h["_target_"] for h in parser["handlers"]] == ["StatsHandler"]


def test_a_checkpoint_of_other_encoder_weights_is_refused(bundle, tmp_path):
    root, _ = bundle
    target = tmp_path / "model.ts"
    with pytest.raises(EncoderMismatchError, match=repr(ENCODER)):
        export_torchscript(
            BUNDLE_ROOT, root / "models" / "model.pt", target, dino_model="random:1", overrides=TINY
        )
    assert list(tmp_path.iterdir()) == []


def test_an_export_that_computes_otherwise_is_not_put_in_place(tmp_path, monkeypatch):
    """The saved file is loaded back and checked before it replaces the previous export. On the plain U-Net
    (cheaper to trace), whose checkpoint needs no encoder: the dino_model given does not exist."""
    plain = {**TINY, "use_dino": False, "dino_model": str(tmp_path / "no_encoder")}
    torch.save(tiny_network(**plain).state_dict(), tmp_path / "plain.pt")
    target = tmp_path / "model.ts"
    target.write_bytes(b"the previous export")
    load = torch.jit.load

    def off_by_1e_3(*args, **kwargs):
        loaded = load(*args, **kwargs)
        return lambda windows: loaded(windows) + 1e-3

    monkeypatch.setattr(torch.jit, "load", off_by_1e_3)
    with pytest.raises(ExportMismatchError, match="not written"):
        export_torchscript(BUNDLE_ROOT, tmp_path / "plain.pt", target, overrides=plain)
    assert sorted(tmp_path.iterdir()) == [target, tmp_path / "plain.pt"]
    assert target.read_bytes() == b"the previous export"


def test_a_checkpoint_of_another_network_is_refused_naming_it(tmp_path):
    torch.save(tiny_network(use_room_lite=False).state_dict(), tmp_path / "other.pt")
    with pytest.raises(
        ValueError, match=r"(?s)other\.pt does not fit network_def.*Missing key.*dino\.coherence"
    ):
        export_torchscript(BUNDLE_ROOT, tmp_path / "other.pt", tmp_path / "model.ts", overrides=TINY)
    torch.save(tiny_network(use_dino=False).state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"plain\.pt holds a network without slice encoder"):
        export_torchscript(BUNDLE_ROOT, tmp_path / "plain.pt", tmp_path / "model.ts", overrides=TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.pt", "plain.pt"]


def test_a_missing_or_unreadable_checkpoint_is_named(tmp_path):
    missing = tmp_path / "models" / "missing.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        export_torchscript(BUNDLE_ROOT, missing, tmp_path / "model.ts", overrides=TINY)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderWeightsError, match=re.escape(str(broken))):
        export_torchscript(BUNDLE_ROOT, broken, tmp_path / "model.ts", overrides=TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pt"]
