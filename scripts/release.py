"""Release the bundle the way the MONAI model zoo's CI checks and packs one::

    python -m scripts.release --output_dir DIST [--model_url URL] [--dino_model ID] [--export True|False]

writes, into ``DIST``:

* ``dino_3dra_aneurysm_segmentation_v<version>.zip``: the bundle, under one top folder named
  :data:`BUNDLE_NAME`, as ``python -m monai.bundle download --name ... --url ...`` expects it (it saves
  ``<name>.zip`` and extracts it with ``has_base=True``);
* ``model.pt`` and ``model.ts`` (the TorchScript export): the large files, to be uploaded to ``--model_url``;
  they are not in the zip;
* ``large_files.yml`` (also at the zip's top folder): for each large file its ``path`` in the bundle, its
  ``url`` (``<model_url>/<file>``), ``hash_val`` and ``hash_type`` (sha256), as
  ``python -m monai.bundle download_large_files`` reads it;
* ``model_info.json``: ``{"<name>_v<version>": {"checksum": <SHA-1 of the zip>, "source": <model_url>/<zip>}}``,
  the entry the zoo's ``models/model_info.json`` holds for a release (its CI hashes the zip with SHA-1 and
  checks that hash when it downloads the zip again).

``--model_url`` is the folder URL the assets will be served from (default: ``DIST``'s own ``file://`` URL,
so that the release can be downloaded and checked offline). The version is ``configs/metadata.json``'s.

**Checks** (what the zoo's ``ci/verify_bundle.py`` checks, each a :class:`ReleaseCheckError` naming the file
and the problem), all done before anything is written to ``DIST``:

1. required files: ``configs/metadata.json``, one ``configs/inference.{json,yaml,yml}``, ``LICENSE``,
   ``docs/README.md`` and the model to release, ``models/model.pt``;
2. the metadata's ``version`` (``X.Y.Z``) is a key of its ``changelog``;
3. the metadata is valid against its schema, read offline from ``bundle/schema/`` (the file named as the
   last part of the metadata's ``schema`` URL);
4. the encoder: the packaged configs must run the released model without ``--dino_model``, so their top-level
   ``dino_model:`` line is set to the source the checkpoint records (``random:SEED`` or a hub id). A local
   path is refused (it names a file on the releasing machine, which means nothing to whoever downloads the
   bundle) unless ``--dino_model`` names the same weights by hub id; the checkpoint is then loaded into the
   packaged network, which refuses other encoder weights or settings;
5. ``monai.bundle.verify_net_in_out`` on the packaged inference config, as the zoo's CI calls it (``n=1``:
   the smallest input ``spatial_shape`` allows);
6. the inference workflow's properties: ``ConfigWorkflow(workflow_type="infer")`` has every required
   property and ``check_properties()`` returns nothing (its datalist replaced by an empty list: the inputs
   are the user's);
7. the TorchScript export (``scripts.export_torchscript``), loaded back with ``torch.jit.load`` as the zoo's
   CI does; ``--export False`` releases ``model.pt`` alone. ``model.ts`` holds the encoder's weights, so by
   default it is released only for a random encoder; pretrained weights (DINOv3's licence) need
   ``--export True``.

**What goes in the zip** is an allow-list of the bundle root: ``LICENSE``, ``configs/**``, ``docs/**``,
``scripts/**/*.py``, ``requirements.txt`` and the generated ``large_files.yml``; never ``models/``,
``outputs/``, ``data/``, ``tests/``, ``__pycache__``, hidden files or symbolic links. The zip is
deterministic: entries sorted, every date 1980-01-01 00:00, mode 0644, deflate level 9, no directory
entries, so two builds of the same tree give the same bytes (on the same zlib), provided the TorchScript
export writes the same bytes too: ``large_files.yml`` in the zip holds ``model.ts``'s hash. (The zoo's own
release, ``ci/update_model_info.py``, downloads the large files into its zip and drops ``large_files.yml``;
here they stay out of the zip and are served beside it.)

**Nothing half-written**: the bundle is staged and checked in a temporary folder; each file reaches ``DIST``
through a temporary name and ``os.replace``, ``model_info.json`` last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from monai.bundle import ConfigParser, ConfigWorkflow, verify_metadata, verify_net_in_out
from monai.bundle.properties import BundleProperty, BundlePropertyConfig

from scripts.atomic_io import replace_atomically
from scripts.networks.checkpoint import load_network_weights, recorded_encoder
from scripts.networks.encoder_weights import EncoderWeightsError, looks_like_hub_id, random_seed_of

__all__ = [
    "BUNDLE_NAME",
    "ReleaseCheckError",
    "bundle_files",
    "release",
    "releases_torchscript",
]

logger = logging.getLogger(__name__)

#: model-zoo naming: lower-case words joined by underscores, ending in the task
BUNDLE_NAME = "dino_3dra_aneurysm_segmentation"
REQUIRED_FILES = ("configs/metadata.json", "LICENSE", "docs/README.md", "models/model.pt")
INFERENCE_CONFIGS = ("configs/inference.json", "configs/inference.yaml", "configs/inference.yml")
MODEL_FILE = "models/model.pt"
TORCHSCRIPT_FILE = "models/model.ts"
SCHEMA_DIR = "bundle/schema"
HASH_TYPE = "sha256"
#: the zoo's checksum of a released zip (ci/utils.py: get_hash_func("sha1"))
ZIP_CHECKSUM_TYPE = "sha1"
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
#: mode of the zip's entries and of the files written to output_dir
FILE_MODE = 0o644
ZIP_LEVEL = 9

# what the zip holds, from the bundle root: single files, and folders taken with every file matching a pattern
_ALLOWED_FILES = ("LICENSE", "requirements.txt")
_ALLOWED_TREES = (("configs", "*"), ("docs", "*"), ("scripts", "*.py"))
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
_DINO_MODEL_LINE = re.compile(r"^dino_model:.*$", re.MULTILINE)


class ReleaseCheckError(ValueError):
    """The bundle fails one of the release checks; the message names the file and the problem."""


def bundle_files(bundle_root: str | Path) -> list[str]:
    """The allow-listed files of ``bundle_root`` that the zip holds (POSIX paths relative to it, sorted).

    ``LICENSE``, ``requirements.txt``, every file under ``configs/`` and ``docs/`` and every ``.py`` file under
    ``scripts/``; nothing in ``__pycache__``, no hidden file or folder, no ``.pyc``, no symbolic link.
    """
    root = Path(bundle_root)
    found = [name for name in _ALLOWED_FILES if (root / name).is_file()]
    for folder, pattern in _ALLOWED_TREES:
        for path in (root / folder).rglob(pattern):
            relative = path.relative_to(root)
            if _excluded(relative) or not path.is_file():
                continue
            if path.is_symlink():
                logger.warning("%s is a symbolic link: left out of the release", relative)
                continue
            found.append(relative.as_posix())
    return sorted(found)


def _excluded(relative: Path) -> bool:
    return relative.suffix == ".pyc" or any(p == "__pycache__" or p.startswith(".") for p in relative.parts)


def check_bundle(bundle_root: str | Path) -> tuple[dict[str, Any], str]:
    """The checks that need no network: required files, version in changelog, metadata against the schema.

    Returns:
        the metadata and the inference config's path relative to ``bundle_root``.

    Raises:
        ReleaseCheckError: naming the file and what is wrong with it.
    """
    root = Path(bundle_root)
    missing = [name for name in REQUIRED_FILES if not (root / name).is_file()]
    inference = [name for name in INFERENCE_CONFIGS if (root / name).is_file()]
    if not inference:
        missing.append("configs/inference.{json,yaml,yml}")
    if missing:
        raise ReleaseCheckError(f"{root}: required file(s) missing: {', '.join(missing)}.")
    if len(inference) > 1:
        raise ReleaseCheckError(f"{root}: more than one inference config ({', '.join(inference)}): keep one.")
    meta_file = root / "configs" / "metadata.json"
    metadata = _read_metadata(meta_file)
    _check_version(meta_file, metadata)
    _check_schema(meta_file, metadata, root / SCHEMA_DIR)
    return metadata, inference[0]


def _read_metadata(meta_file: Path) -> dict[str, Any]:
    try:
        metadata = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ReleaseCheckError(f"{meta_file}: not valid JSON ({error}).") from error
    if not isinstance(metadata, dict):
        raise ReleaseCheckError(f"{meta_file}: holds {type(metadata).__name__}, not a JSON object.")
    return metadata


def _check_version(meta_file: Path, metadata: Mapping[str, Any]) -> None:
    """The zoo's ``verify_version_changes``: a ``version`` that is a key of the ``changelog``."""
    version, changelog = metadata.get("version"), metadata.get("changelog")
    if not isinstance(version, str) or not _VERSION.match(version):
        raise ReleaseCheckError(f"{meta_file}: 'version' must be a string X.Y.Z, got {version!r}.")
    if not isinstance(changelog, Mapping):
        raise ReleaseCheckError(f"{meta_file}: no 'changelog' object.")
    if version not in changelog:
        raise ReleaseCheckError(
            f"{meta_file}: version {version} is not in its 'changelog' (which has {', '.join(changelog)}): "
            "say what changed in this version."
        )


def _check_schema(meta_file: Path, metadata: Mapping[str, Any], schema_dir: Path) -> None:
    """``verify_metadata`` against the local copy of the schema the metadata names (never downloaded)."""
    url = metadata.get("schema")
    if not isinstance(url, str) or not url:
        raise ReleaseCheckError(f"{meta_file}: no 'schema' URL.")
    schema = schema_dir / url.rstrip("/").rsplit("/", 1)[-1]
    if not schema.is_file():
        raise ReleaseCheckError(
            f"{meta_file}: its schema {url} has no local copy at {schema}; the release checks offline: "
            "download it there."
        )
    try:
        with warnings.catch_warnings():  # the schema is the local copy; no hash to check it against
            warnings.filterwarnings("ignore", message="No hash value provided", category=UserWarning)
            verify_metadata(meta_file=str(meta_file), filepath=str(schema))
    except ValueError as error:
        raise ReleaseCheckError(
            f"{meta_file}: not valid against the schema {schema.name}: {error}"
        ) from error


def released_dino_model(checkpoint: str | Path, dino_model: str | None = None) -> str:
    """The ``dino_model`` the packaged configs get: the checkpoint's recorded source, or ``dino_model``.

    Raises:
        ReleaseCheckError: the checkpoint has no encoder record, or the source is a local path.
    """
    try:
        record = recorded_encoder(checkpoint)
    except EncoderWeightsError as error:
        raise ReleaseCheckError(str(error)) from error
    if record is None:
        raise ReleaseCheckError(
            f"{checkpoint}: no slice-encoder record (a network without the DINO path?); the packaged "
            "configs build DINO-3DRA, which would not load it."
        )
    source = str(record.get("source"))
    if dino_model is None:
        if _is_local_path(source):
            raise ReleaseCheckError(
                f"{checkpoint}: the model was trained with the slice encoder from the local path {source!r}. "
                "A path on the releasing machine means nothing to whoever downloads the bundle: pass "
                "--dino_model with the hub id of the same weights (the release checks they are the same)."
            )
        return _normalised(source)
    if _is_local_path(dino_model):
        raise ReleaseCheckError(
            f"dino_model={dino_model!r} is a local path, which means nothing to whoever downloads the "
            "bundle: give a hub id (owner/name) or random:SEED."
        )
    return _normalised(dino_model)


def _is_local_path(source: str) -> bool:
    if random_seed_of(source) is not None:
        return False
    path = Path(source).expanduser()
    return path.is_absolute() or path.exists() or not looks_like_hub_id(source)


def _normalised(source: str) -> str:
    seed = random_seed_of(source)
    return f"random:{seed}" if seed is not None else source


def _set_dino_model(configs: Path, inference: str, dino_model: str) -> None:
    """Set the top-level ``dino_model:`` line of every YAML config under ``configs`` that has one.

    The inference config must have exactly one; another config may have none.
    """
    for path in sorted([*configs.glob("*.yaml"), *configs.glob("*.yml")]):
        text = path.read_text()
        lines = _DINO_MODEL_LINE.findall(text)
        is_inference = path.name == Path(inference).name
        if len(lines) > 1 or (is_inference and not lines):
            raise ReleaseCheckError(
                f"{path.relative_to(configs.parent)}: needs exactly one top-level 'dino_model:' line for the "
                f"release to set the encoder, found {len(lines)}."
            )
        if not lines:
            continue
        path.write_text(_DINO_MODEL_LINE.sub(lambda _: f"dino_model: {json.dumps(dino_model)}", text))
        if ConfigParser.load_config_file(str(path)).get("dino_model") != dino_model:
            raise ReleaseCheckError(f"{path.relative_to(configs.parent)}: dino_model could not be set.")
        logger.info("%s: dino_model set to %r", path.relative_to(configs.parent), dino_model)


def _check_network(
    staged: Path, inference: str, checkpoint: Path, overrides: Mapping[str, Any], dino_model: str
) -> None:
    """``verify_net_in_out`` as the zoo's CI calls it, then the checkpoint loaded into the packaged network."""
    config, meta = staged / inference, staged / "configs" / "metadata.json"
    try:
        verify_net_in_out(net_id="network_def", meta_file=str(meta), config_file=str(config), **overrides)
    except Exception as error:  # the network's own errors, and MONAI's ValueError / KeyError
        raise ReleaseCheckError(
            f"{inference}: verify_net_in_out failed for network_def on the smallest input that "
            f"configs/metadata.json's spatial_shape allows (n=1): {error}"
        ) from error
    parser = ConfigParser()
    parser.read_config(str(config))
    parser.update(dict(overrides))
    try:
        load_network_weights(parser.get_parsed_content("network_def"), checkpoint, "network_def")
    except Exception as error:  # EncoderMismatchError, missing / unexpected keys, unreadable file
        raise ReleaseCheckError(
            f"{MODEL_FILE} does not load into the packaged {inference} (dino_model={dino_model!r}): {error}"
        ) from error


def _check_workflow_properties(staged: Path, inference: str, overrides: Mapping[str, Any]) -> None:
    """The inference workflow has every required property and ``check_properties()`` returns nothing."""
    try:
        workflow = ConfigWorkflow(
            config_file=str(staged / inference),
            meta_file=str(staged / "configs" / "metadata.json"),
            logging_file=False,
            workflow_type="infer",
            **{**overrides, "datalist": []},
        )
    except Exception as error:
        raise ReleaseCheckError(f"{inference}: cannot be read as an inference workflow: {error}") from error
    absent = [
        f"{name} ({prop[BundlePropertyConfig.ID]})"
        for name, prop in (workflow.properties or {}).items()
        if prop.get(BundleProperty.REQUIRED) and prop[BundlePropertyConfig.ID] not in workflow.parser
    ]
    if absent:
        raise ReleaseCheckError(
            f"{inference}: the inference workflow lacks required properties: {', '.join(absent)}."
        )
    try:
        workflow.initialize()
        missing = workflow.check_properties()
    except Exception as error:
        raise ReleaseCheckError(f"{inference}: the inference workflow's properties fail: {error}") from error
    if missing:
        raise ReleaseCheckError(f"{inference}: check_properties() reports {missing}.")


def _export_torchscript(
    root: Path, config: Path, checkpoint: Path, filepath: Path, dino_model: str, overrides: Mapping
) -> Path:
    """``scripts.export_torchscript`` of the packaged ``config`` into ``filepath``, loaded back as the zoo does.

    ``bundle_root`` is the bundle's own folder, not the temporary staging one: the export records it in the
    file, and a folder that changes from build to build would change ``model.ts``, its hash in
    ``large_files.yml`` and so the zip.
    """
    try:
        from scripts.export_torchscript import export_torchscript
    except ImportError as error:
        raise ReleaseCheckError(
            f"scripts/export_torchscript.py cannot be imported ({error}): no TorchScript export; "
            "--export False releases models/model.pt alone."
        ) from error
    try:
        written = export_torchscript(
            bundle_root=str(root),
            ckpt_file=str(checkpoint),
            filepath=str(filepath),
            dino_model=dino_model,
            config_file=str(config),
            overrides=dict(overrides),
        )
        torch.jit.load(str(written), map_location="cpu")
    except Exception as error:
        raise ReleaseCheckError(f"{MODEL_FILE}: TorchScript export failed: {error}") from error
    return Path(written)


def _sha(path: Path, kind: str) -> str:
    digest = hashlib.new(kind)
    with open(path, "rb") as source:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def large_files_yaml(assets: Mapping[str, Path], model_url: str) -> str:
    """``large_files.yml`` for ``{path in the bundle: file}``: url ``<model_url>/<file name>``, sha256."""
    entries = [
        {
            "path": path,
            "url": f"{model_url}/{Path(path).name}",
            "hash_val": _sha(file, HASH_TYPE),
            "hash_type": HASH_TYPE,
        }
        for path, file in sorted(assets.items())
    ]
    return yaml.safe_dump({"large_files": entries}, sort_keys=False)


def write_zip(path: str | Path, top_folder: str, files: Mapping[str, Path]) -> None:
    """A deterministic zip of ``{name inside top_folder: file}``.

    Entries sorted by name, each at 1980-01-01 00:00 with mode 0644 (Unix), deflated at level 9; no directory
    entries. The same contents give the same bytes whatever the files' dates, owners or modes.
    """
    with zipfile.ZipFile(path, "w") as archive:
        for name in sorted(files):
            info = zipfile.ZipInfo(f"{top_folder}/{name}", date_time=ZIP_DATE_TIME)
            info.create_system = 3  # Unix, so external_attr reads as a mode everywhere
            info.external_attr = FILE_MODE << 16
            data = Path(files[name]).read_bytes()
            archive.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=ZIP_LEVEL)


def _build(
    build: Path, files: dict[str, Path], assets: Mapping[str, Path], version: str, model_url: str
) -> dict[str, Path]:
    """``large_files.yml`` (also into the zip), the zip and ``model_info.json`` in ``build``.

    Returns:
        ``{name in output_dir: file}``: the assets, ``large_files.yml``, the zip, ``model_info.json`` last.
    """
    zip_name = f"{BUNDLE_NAME}_v{version}.zip"
    large_files = build / "large_files.yml"
    large_files.write_text(large_files_yaml(assets, model_url))
    write_zip(build / zip_name, BUNDLE_NAME, {**files, large_files.name: large_files})
    checksum = _sha(build / zip_name, ZIP_CHECKSUM_TYPE)
    model_info = {f"{BUNDLE_NAME}_v{version}": {"checksum": checksum, "source": f"{model_url}/{zip_name}"}}
    (build / "model_info.json").write_text(json.dumps(model_info, indent=4) + "\n")
    logger.info("%s: %s %s", zip_name, ZIP_CHECKSUM_TYPE, checksum)
    outputs = {Path(path).name: file for path, file in sorted(assets.items())}
    return {
        **outputs,
        large_files.name: large_files,
        zip_name: build / zip_name,
        "model_info.json": build / "model_info.json",
    }


def _publish(dist: Path, outputs: Mapping[str, Path], stale: list[str]) -> None:
    """Each output into ``dist`` through a temporary name and ``os.replace`` (a new file's mode), in order; a file of
    ``stale`` (an asset of an earlier release into ``dist`` that this one does not list) is removed first."""
    for name in stale:
        if (dist / name).is_file():
            logger.warning("removing %s: this release does not list it", dist / name)
            (dist / name).unlink()

    def copy(source: Path) -> Callable[[str], None]:
        def write(tmp: str) -> None:
            shutil.copyfile(source, tmp)  # replace_atomically gives it a new file's mode

        return write

    for name, file in outputs.items():
        replace_atomically(dist / name, copy(file))


def _stage(bundle_root: Path, staged: Path) -> dict[str, Path]:
    """Copy the allow-listed files into ``staged``; ``{relative name: staged file}``."""
    files = {}
    for name in bundle_files(bundle_root):
        target = staged / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundle_root / name, target)
        files[name] = target
    return files


def releases_torchscript(export: bool | None, source: str) -> bool:
    """Whether to release ``model.ts``, which holds the encoder's weights (see :func:`release`)."""
    random_encoder = random_seed_of(source) is not None
    if export is None and not random_encoder:
        logger.warning(
            "No TorchScript model released: %s would hold the weights of the encoder %r, and redistributing "
            "them is governed by their licence (DINOv3 License for Meta's). --export True releases it anyway.",
            TORCHSCRIPT_FILE,
            source,
        )
        return False
    if export and not random_encoder:
        logger.warning(
            "%s holds the weights of %r: check that their licence lets you share them.",
            TORCHSCRIPT_FILE,
            source,
        )
    return True if export is None else export


def _check_arguments(
    bundle_root: Path, dist: Path, model_url: str, overrides: Mapping[str, Any], export: Any
) -> Mapping[str, Any]:
    """:func:`release`'s arguments, before anything is read or written; ``overrides`` returned."""
    if "://" not in model_url:
        raise ReleaseCheckError(f"model_url={model_url!r} is not a URL (https://..., file://...).")
    clash = sorted({"dino_model", "bundle_root"} & set(overrides))
    if clash:
        raise ReleaseCheckError(
            f"overrides may not set {clash}: the release sets bundle_root, and dino_model is its own argument."
        )
    for folder, _ in _ALLOWED_TREES:
        if dist.is_relative_to(bundle_root / folder):
            raise ReleaseCheckError(f"output_dir {dist} is inside {folder}/, which the zip holds.")
    if export not in (None, True, False):
        raise ReleaseCheckError(
            f"export must be True, False or None, got {export!r} (spell it False, not false)."
        )
    return overrides


def _check_and_export(
    root: Path, staged: Path, inference: str, source: str, overrides: Mapping[str, Any], export: bool
) -> dict[str, Path]:
    """Check that the network and the workflow build from the ``staged`` bundle with the encoder ``source``,
    and export the TorchScript model next to it when ``export``.

    Returns:
        the large files (``models/model.pt``, and ``models/model.ts`` when exported) by their path in the
        release.
    """
    checkpoint = root / MODEL_FILE
    settings = {**overrides, "bundle_root": str(staged), "dino_model": source}
    _check_network(staged, inference, checkpoint, settings, source)
    _check_workflow_properties(staged, inference, settings)
    assets = {MODEL_FILE: checkpoint}
    if export:
        ts = staged.parent / Path(TORCHSCRIPT_FILE).name
        assets[TORCHSCRIPT_FILE] = _export_torchscript(
            root, staged / inference, checkpoint, ts, source, overrides
        )
    else:
        logger.warning("export=False: no TorchScript model (%s) is released", TORCHSCRIPT_FILE)
    return assets


def release(
    output_dir: str,
    model_url: str | None = None,
    bundle_root: str = ".",
    dino_model: str | None = None,
    export: bool | None = None,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Check the bundle as the model zoo does, then write the release into ``output_dir``.

    Args:
        output_dir: where the zip, ``model.pt``, ``model.ts``, ``large_files.yml`` and ``model_info.json`` go.
        model_url: URL of the folder the large files and the zip will be served from; default ``output_dir``'s
            ``file://`` URL.
        bundle_root: the bundle to release. Default ``.``.
        dino_model: the encoder the packaged configs name, for a checkpoint trained from a local path
            (a hub id or ``random:SEED``); default the checkpoint's recorded source.
        export: export and release ``models/model.ts`` (TorchScript). The file holds the encoder's weights as
            constants, so releasing it redistributes them: None (default) exports for a random encoder (nothing
            to redistribute) and leaves it out, with a warning, for pretrained weights such as DINOv3's, whose
            licence governs their redistribution; True exports in every case.
        overrides: config overrides for every check that builds the network or the workflow (tests use a
            tiny encoder); they do not change the packaged configs.

    Returns:
        the zip's path.

    Raises:
        ReleaseCheckError: a check failed; ``output_dir`` is left as it was.
    """
    root, dist = Path(bundle_root).resolve(), Path(output_dir).resolve()
    model_url = (model_url or dist.as_uri()).rstrip("/")
    overrides = _check_arguments(root, dist, model_url, dict(overrides or {}), export)
    metadata, inference = check_bundle(root)
    version, checkpoint = metadata["version"], root / MODEL_FILE
    source = released_dino_model(checkpoint, dino_model)
    export = releases_torchscript(export, source)
    with tempfile.TemporaryDirectory(prefix="release-") as scratch:
        build = Path(scratch)
        staged = build / BUNDLE_NAME
        files = _stage(root, staged)
        _set_dino_model(staged / "configs", inference, source)
        assets = _check_and_export(root, staged, inference, source, overrides, export)
        outputs = _build(build, files, assets, version, model_url)
        _publish(dist, outputs, stale=[] if export else [Path(TORCHSCRIPT_FILE).name])
    logger.info(
        "released %s into %s (encoder %s); upload %s and the zip to %s",
        ", ".join(outputs),
        dist,
        source,
        ", ".join(Path(p).name for p in sorted(assets)),
        model_url,
    )
    return dist / f"{BUNDLE_NAME}_v{version}.zip"


if __name__ == "__main__":
    import fire

    from scripts.cli import configure_logging

    configure_logging()
    fire.Fire(release, serialize=lambda path: None)  # the log names the files
