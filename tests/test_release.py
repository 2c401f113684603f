"""``scripts.release``: the model zoo's checks, each failing on its own broken precondition, and a deterministic
release that ``monai.bundle download`` and ``download_large_files`` take back offline.

Every test releases a copy of the bundle (its allow-listed files and the schema) holding the checkpoint of a
tiny network (random encoder ``random:3``, 8-64 channels, 32^3 patches); ``TINY`` gives the checks the same
settings. ``scripts.export_torchscript`` is replaced by a stand-in that writes a small TorchScript module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import types
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from conftest import BUNDLE_ROOT, TINY_DINOV3, TINY_IMAGE_SIZE, write_tiny_case
from monai.apps.utils import HashCheckError
from monai.bundle import ConfigParser, download
from monai.bundle.scripts import download_large_files

from scripts.networks import Dino3DRA
from scripts.release import BUNDLE_NAME, ReleaseCheckError, bundle_files, release, releases_torchscript

CHANNELS = [8, 16, 32, 64]
TINY = {
    "roi_size": [32, 32, 32],
    "dino_config": TINY_DINOV3,
    "dino_image_size": TINY_IMAGE_SIZE,
    "network_def#channels": CHANNELS,
}
SOURCE = "random:3"
VERSION = json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text())["version"]
ZIP_NAME = f"{BUNDLE_NAME}_v{VERSION}.zip"


def tiny_checkpoint(path: Path, dino_model: str = SOURCE) -> None:
    """A tiny network as the bundle's configs build it (with their shape prior), saved to ``path``."""
    inference = yaml.safe_load((BUNDLE_ROOT / "configs" / "inference.yaml").read_text())
    network = Dino3DRA(
        channels=CHANNELS,
        dino_model=dino_model,
        dino_config=TINY_DINOV3,
        dino_image_size=TINY_IMAGE_SIZE,
        dino_dtype="bfloat16",
        roi_size=TINY["roi_size"],
        **{key: value for key, value in inference.items() if key.startswith("shape_prior_")},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), path)


def edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=4))


def edit_yaml(path: Path, edit: Callable[[dict], object]) -> None:
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def set_spatial_shape(meta: dict, shape: list[str]) -> None:
    for side, key in (("inputs", "image"), ("outputs", "pred")):
        meta["network_data_format"][side][key]["spatial_shape"] = shape


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("checkpoint") / "model.pt"
    tiny_checkpoint(path)
    return path


@pytest.fixture
def bundle(tmp_path, checkpoint) -> Path:
    """A releasable copy of the bundle with the tiny checkpoint as ``models/model.pt``."""
    root = tmp_path / "bundle"
    schemas = [p.relative_to(BUNDLE_ROOT).as_posix() for p in (BUNDLE_ROOT / "bundle" / "schema").iterdir()]
    for name in [*bundle_files(BUNDLE_ROOT), *schemas]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(BUNDLE_ROOT / name, root / name)
    (root / "models").mkdir()
    shutil.copyfile(checkpoint, root / "models" / "model.pt")
    return root


def fake_export_module(calls: list[dict], fail: str | None = None) -> types.ModuleType:
    """Stands in for ``scripts.export_torchscript``: a small scripted module, fast and the same every time."""

    def export_torchscript(
        bundle_root=".", ckpt_file=None, filepath=None, dino_model=None, config_file=None, overrides=None
    ) -> Path:
        calls.append({"ckpt_file": ckpt_file, "dino_model": dino_model, "config_file": config_file})
        if fail:
            raise RuntimeError(fail)
        torch.manual_seed(0)
        torch.jit.script(torch.nn.Linear(2, 2)).save(filepath)
        return Path(filepath)

    module = types.ModuleType("scripts.export_torchscript")
    module.export_torchscript = export_torchscript
    return module


@pytest.fixture
def export_calls(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    monkeypatch.setitem(sys.modules, "scripts.export_torchscript", fake_export_module(calls))
    return calls


def run_release(bundle: Path, dist: Path, **kwargs) -> Path:
    return release(output_dir=str(dist), bundle_root=str(bundle), overrides=TINY, **kwargs)


def sha(path: Path, kind: str = "sha256") -> str:
    return hashlib.new(kind, path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# a release


def test_bundle_name_follows_the_model_zoo_naming():
    # lower-case words joined by underscores, ending in the task; no "_v", which the zoo splits versions at
    assert BUNDLE_NAME.replace("_", "").isalnum() and BUNDLE_NAME.lower() == BUNDLE_NAME
    assert BUNDLE_NAME.endswith("_segmentation") and "_v" not in BUNDLE_NAME


def test_release_writes_zip_assets_large_files_and_model_info(bundle, tmp_path, export_calls):
    for junk in ("outputs/log.txt", "data/case.nii.gz", "models/checkpoint_epoch=1.pt", "tests/test_x.py"):
        (bundle / junk).parent.mkdir(parents=True, exist_ok=True)
        (bundle / junk).write_text("junk")
    for junk in ("scripts/__pycache__/release.cpython-311.pyc", "configs/.release.yaml.swp", "scripts/a.pyc"):
        (bundle / junk).parent.mkdir(parents=True, exist_ok=True)
        (bundle / junk).write_bytes(b"junk")
    dist = tmp_path / "dist"
    url = "https://example.org/dino_3dra/v0.2.0/"
    zip_path = run_release(bundle, dist, model_url=url)

    assert zip_path == dist / ZIP_NAME
    assert sorted(p.name for p in dist.iterdir()) == sorted(
        ["large_files.yml", "model.pt", "model.ts", "model_info.json", ZIP_NAME]
    )
    assert (dist / "model.pt").read_bytes() == (bundle / "models" / "model.pt").read_bytes()
    large_files = yaml.safe_load((dist / "large_files.yml").read_text())["large_files"]
    assert large_files == [
        {
            "path": f"models/{name}",
            "url": f"https://example.org/dino_3dra/v0.2.0/{name}",
            "hash_val": sha(dist / name),
            "hash_type": "sha256",
        }
        for name in ("model.pt", "model.ts")
    ]
    assert json.loads((dist / "model_info.json").read_text()) == {
        f"{BUNDLE_NAME}_v{VERSION}": {
            "checksum": sha(zip_path, "sha1"),
            "source": f"https://example.org/dino_3dra/v0.2.0/{ZIP_NAME}",
        }
    }
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
        assert {name.split("/")[0] for name in names} == {BUNDLE_NAME}
        inside = sorted(name.split("/", 1)[1] for name in names)
        assert inside == sorted([*bundle_files(BUNDLE_ROOT), "large_files.yml"])
        assert archive.read(f"{BUNDLE_NAME}/large_files.yml") == (dist / "large_files.yml").read_bytes()
        for folder in ("outputs/", "data/", "models/", "tests/"):
            assert not any(name.startswith(folder) for name in inside), folder
        assert not any("__pycache__" in name or name.endswith((".pyc", ".swp")) for name in inside)
    assert export_calls and export_calls[0]["dino_model"] == SOURCE


def test_packaged_configs_name_the_checkpoints_encoder(bundle, tmp_path, export_calls):
    """The released configs run the released model without --dino_model: their dino_model is its record."""
    zip_path = run_release(bundle, tmp_path / "dist")
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(tmp_path / "unzipped")
    configs = tmp_path / "unzipped" / BUNDLE_NAME / "configs"
    for name in ("inference.yaml", "train.yaml"):
        assert ConfigParser.load_config_file(str(configs / name))["dino_model"] == SOURCE, name
    assert (bundle / "configs" / "inference.yaml").read_text() == (
        BUNDLE_ROOT / "configs" / "inference.yaml"
    ).read_text()  # the bundle itself is left as it was


def test_two_builds_give_byte_identical_zips(bundle, tmp_path, export_calls):
    first = run_release(bundle, tmp_path / "first").read_bytes()
    for path in bundle.rglob("*"):  # other dates and modes must not reach the zip
        os.utime(path, (1_700_000_000, 1_700_000_000))
    (bundle / "LICENSE").chmod(0o600)
    second = run_release(bundle, tmp_path / "second", model_url=(tmp_path / "first").as_uri())
    assert second.read_bytes() == first
    with zipfile.ZipFile(second) as archive:
        infos = archive.infolist()
    assert [i.filename for i in infos] == sorted(i.filename for i in infos)
    assert {(i.date_time, i.external_attr >> 16, i.compress_type) for i in infos} == {
        ((1980, 1, 1, 0, 0, 0), 0o644, zipfile.ZIP_DEFLATED)
    }


def test_monai_downloads_the_release_and_its_large_files(bundle, tmp_path, export_calls):
    """The round trip a user makes: ``monai.bundle download --url``, then ``download_large_files``."""
    dist = tmp_path / "dist"
    zip_path = run_release(bundle, dist)  # model_url: dist's file:// URL
    downloads = tmp_path / "downloads"
    download(name=BUNDLE_NAME, url=zip_path.as_uri(), bundle_dir=str(downloads), progress=False)
    downloaded = downloads / BUNDLE_NAME
    assert (downloaded / "configs" / "metadata.json").is_file()
    download_large_files(bundle_path=str(downloaded))
    for name in ("model.pt", "model.ts"):
        assert (downloaded / "models" / name).read_bytes() == (dist / name).read_bytes()


def test_release_without_export_lists_model_pt_alone(bundle, tmp_path, export_calls):
    dist = tmp_path / "dist"
    run_release(bundle, dist)
    run_release(bundle, dist, export=False)  # over a release with model.ts: no stale model.ts is left
    large_files = yaml.safe_load((dist / "large_files.yml").read_text())["large_files"]
    assert [entry["path"] for entry in large_files] == ["models/model.pt"]
    assert not (dist / "model.ts").exists() and len(export_calls) == 1
    assert {path.stat().st_mode & 0o777 for path in dist.iterdir()} == {0o644}


def test_release_with_the_real_export(bundle, tmp_path):
    """``scripts.export_torchscript`` itself: model.ts of the packaged config, listed, loadable."""
    dist = tmp_path / "dist"
    run_release(bundle, dist)
    large_files = yaml.safe_load((dist / "large_files.yml").read_text())["large_files"]
    assert large_files[1] == {
        "path": "models/model.ts",
        "url": f"{dist.as_uri()}/model.ts",
        "hash_val": sha(dist / "model.ts"),
        "hash_type": "sha256",
    }
    extra = {"inference.json": ""}
    torch.jit.load(dist / "model.ts", _extra_files=extra)
    recorded = json.loads(extra["inference.json"])
    assert recorded["dino_model"] == SOURCE
    # no folder of the releasing machine, which would change model.ts from build to build
    assert recorded["bundle_root"] == "."


# ---------------------------------------------------------------------------------------------------------
# each check fails on its own broken precondition, before anything is written


def _drop_inferer(config: dict) -> None:
    del config["inferer"]
    config["evaluator"]["inferer"] = "$None"


BROKEN = {
    "no LICENSE": (lambda root: (root / "LICENSE").unlink(), "required file(s) missing: LICENSE"),
    "no docs/README.md": (
        lambda root: (root / "docs" / "README.md").unlink(),
        "required file(s) missing: docs/README.md",
    ),
    "no metadata": (
        lambda root: (root / "configs" / "metadata.json").unlink(),
        "required file(s) missing: configs/metadata.json",
    ),
    "no inference config": (
        lambda root: (root / "configs" / "inference.yaml").unlink(),
        "required file(s) missing: configs/inference.{json,yaml,yml}",
    ),
    "no model": (
        lambda root: (root / "models" / "model.pt").unlink(),
        "required file(s) missing: models/model.pt",
    ),
    "version not in changelog": (
        lambda root: edit_json(root / "configs" / "metadata.json", lambda m: m.update(version="9.9.9")),
        "metadata.json: version 9.9.9 is not in its 'changelog'",
    ),
    "metadata invalid against the schema": (
        lambda root: edit_json(root / "configs" / "metadata.json", lambda m: m.pop("network_data_format")),
        "metadata.json: not valid against the schema meta_schema_20240725.json",
    ),
    "schema not available offline": (
        lambda root: shutil.rmtree(root / "bundle" / "schema"),
        "has no local copy",
    ),
    "network output against the metadata": (
        lambda root: edit_json(
            root / "configs" / "metadata.json",
            lambda m: m["network_data_format"]["outputs"]["pred"].update(num_channels=4),
        ),
        "verify_net_in_out failed",
    ),
    "metadata allowing an input the network refuses": (
        lambda root: edit_json(
            root / "configs" / "metadata.json", lambda m: set_spatial_shape(m, ["8*n"] * 3)
        ),
        "verify_net_in_out failed",
    ),
    "inference property missing": (
        lambda root: edit_yaml(root / "configs" / "inference.yaml", _drop_inferer),
        "lacks required properties: inferer",
    ),
    "no dino_model line to set": (
        lambda root: edit_yaml(root / "configs" / "inference.yaml", lambda c: c.pop("dino_model")),
        "needs exactly one top-level 'dino_model:' line",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_each_check_fails_on_its_broken_precondition(case, bundle, tmp_path, export_calls):
    breaks, message = BROKEN[case]
    breaks(bundle)
    dist = tmp_path / "dist"
    with pytest.raises(ReleaseCheckError) as error:
        run_release(bundle, dist)
    assert message in str(error.value)
    assert not dist.exists() and not export_calls


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"output_dir": "docs/dist"}, "is inside docs/, which the zip holds"),
        ({"model_url": "example.org/models"}, "is not a URL"),
        ({"overrides": {**TINY, "dino_model": "random:1"}}, "overrides may not set ['dino_model']"),
        ({"export": "false"}, "spell it False"),
    ],
)
def test_bad_arguments_are_refused(arguments, message, bundle, tmp_path, export_calls):
    arguments = {"output_dir": "dist", "overrides": TINY, **arguments}
    arguments["output_dir"] = str(bundle / arguments["output_dir"])
    with pytest.raises(ReleaseCheckError) as error:
        release(bundle_root=str(bundle), **arguments)
    assert message in str(error.value)
    assert not Path(arguments["output_dir"]).exists()


def test_a_failing_export_stops_the_release(bundle, tmp_path, monkeypatch):
    calls: list[dict] = []
    monkeypatch.setitem(sys.modules, "scripts.export_torchscript", fake_export_module(calls, "no scripting"))
    dist = tmp_path / "dist"
    with pytest.raises(ReleaseCheckError, match="TorchScript export failed: no scripting"):
        run_release(bundle, dist)
    assert calls and not dist.exists()


def test_a_local_encoder_path_is_refused(bundle, tmp_path, tiny_dinov3_dir, export_calls):
    tiny_checkpoint(bundle / "models" / "model.pt", dino_model=str(tiny_dinov3_dir))
    dist = tmp_path / "dist"
    with pytest.raises(ReleaseCheckError) as error:
        run_release(bundle, dist)
    assert f"local path {str(tiny_dinov3_dir)!r}" in str(error.value)
    assert "means nothing to whoever downloads the bundle" in str(error.value)
    with pytest.raises(ReleaseCheckError, match="is a local path"):
        run_release(bundle, dist, dino_model=str(tiny_dinov3_dir))
    assert not dist.exists() and not export_calls


def test_an_explicit_encoder_must_be_the_checkpoints(bundle, tmp_path, tiny_dinov3_dir, export_calls):
    """--dino_model names the checkpoint's encoder for downloaders; other weights are refused.

    ``tiny_dinov3_dir`` holds the weights ``random:0`` builds with ``TINY_DINOV3`` (same seed, same config).
    """
    tiny_checkpoint(bundle / "models" / "model.pt", dino_model=str(tiny_dinov3_dir))
    refused = tmp_path / "refused"
    with pytest.raises(ReleaseCheckError) as error:
        run_release(bundle, refused, dino_model="random:1")
    assert "does not load into the packaged configs/inference.yaml" in str(error.value)
    assert "the encoder weights differ" in str(error.value)
    assert not refused.exists() and not export_calls

    zip_path = run_release(bundle, tmp_path / "dist", dino_model="random")
    with zipfile.ZipFile(zip_path) as archive:
        inference = yaml.safe_load(archive.read(f"{BUNDLE_NAME}/configs/inference.yaml"))
    assert inference["dino_model"] == "random:0"


@pytest.mark.parametrize(
    "export, source, released",
    [
        (None, "random:0", True),
        (None, "facebook/dinov3-vits16-pretrain-lvd1689m", False),  # Meta's weights would be inside
        (True, "facebook/dinov3-vits16-pretrain-lvd1689m", True),
        (False, "random:0", False),
    ],
)
def test_torchscript_holding_pretrained_weights_is_released_only_when_asked(export, source, released, caplog):
    assert releases_torchscript(export, source) is released
    if source.startswith("facebook/"):
        assert "licence" in caplog.text


def segment_from(bundle_root: Path, volume: Path, *overrides: str) -> np.ndarray:
    """The README's inference command run from ``bundle_root`` on ``volume``; the label volume it writes."""
    command = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", "configs/inference.yaml",
        "--meta_file", "configs/metadata.json",
        "--logging_file", "configs/logging.conf",
        "--input_files", repr([str(volume)]),
        "--roi_size", repr(TINY["roi_size"]),
        "--dino_config", repr(TINY_DINOV3),
        "--dino_image_size", str(TINY_IMAGE_SIZE),
        "--network_def#channels", repr(CHANNELS),
        *overrides,
    ]  # fmt: skip
    subprocess.run(command, cwd=bundle_root, check=True, capture_output=True, timeout=300)
    (written,) = (bundle_root / "outputs" / "inference").glob("*_seg.nii.gz")
    return np.asarray(nib.load(written).dataobj)


def test_a_downloaded_release_segments_exactly_as_the_source_tree(bundle, tmp_path, export_calls):
    """Release, ``monai.bundle download`` from a file:// URL, ``download_large_files``, then the README's
    inference command from the downloaded folder, which names no encoder: the source tree's labels."""
    zip_path = run_release(bundle, tmp_path / "dist")
    downloads = tmp_path / "downloads"
    download(
        name=BUNDLE_NAME, version=VERSION, url=zip_path.as_uri(), bundle_dir=str(downloads), progress=False
    )
    downloaded = downloads / BUNDLE_NAME
    download_large_files(bundle_path=str(downloaded))
    volume = tmp_path / "new_case.nii.gz"
    write_tiny_case(volume, tmp_path / "new_case_label.nii.gz", seed=11, shape=(44, 40, 36))

    with ThreadPoolExecutor(2) as pool:  # two commands side by side, each paying MONAI's ~10 s import
        source_tree = pool.submit(segment_from, bundle, volume, "--dino_model", SOURCE)
        actual = segment_from(downloaded, volume)
        expected = source_tree.result()
    assert actual.shape == (44, 40, 36) and set(np.unique(expected)) <= {0, 1, 2}
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_a_damaged_weight_file_is_refused_naming_it(damage, bundle, tmp_path, export_calls):
    dist = tmp_path / "dist"
    zip_path = run_release(bundle, dist)
    weights = dist / "model.pt"
    data = weights.read_bytes()
    weights.write_bytes(
        data[: len(data) // 2] if damage == "truncated" else data[:-1] + bytes([data[-1] ^ 1])
    )
    download(name=BUNDLE_NAME, url=zip_path.as_uri(), bundle_dir=str(tmp_path / "downloads"), progress=False)
    downloaded = tmp_path / "downloads" / BUNDLE_NAME
    with pytest.raises(HashCheckError, match="model.pt"):
        download_large_files(bundle_path=str(downloaded))
    assert not (downloaded / "models" / "model.pt").exists()  # nothing half-downloaded is left in the bundle

    # a damaged copy already in the bundle is refused too, not silently used
    (downloaded / "models").mkdir(exist_ok=True)
    (downloaded / "models" / "model.pt").write_bytes(weights.read_bytes())
    with pytest.raises(HashCheckError, match="existing file failed.*model.pt"):
        download_large_files(bundle_path=str(downloaded))
