"""Shared fixtures. The repository root is the bundle root and must be importable as ``scripts``.

The tests mirror the package: ``tests/<subpackage>/test_<module>.py`` tests
``scripts/<subpackage>/<module>.py`` (``tests/test_handlers.py`` for ``scripts/handlers.py``,
``tests/data/test_crops.py`` for ``scripts/data/crops.py``). Modules tested only through others:

* ``scripts/data/vessel_tree.py``, ``lesions.py``: ``tests/data/test_anatomy.py`` (whole geometries);
* ``scripts/networks/dino_path.py``: ``tests/networks/test_dino_3dra.py`` (the network it is a path of);
* ``scripts/labels.py``, ``selection_metric.py``, ``switches.py``: ``tests/test_bundle.py`` (the configs
  that use them) and the tests of the modules that import them;
* ``scripts/study/`` (plan, run, nnunet, tables): ``tests/test_study.py``, through the study's ``main``.

Tests of the bundle as a whole: ``test_bundle.py`` (every config), ``test_geometry.py`` (inference and
evaluation on a scan with a known answer), ``test_public_names.py`` (``__all__``), ``test_style.py`` (ruff),
``test_mutation_check.py`` (``.ci/mutation_check.py``), ``test_conftest.py`` (the fixtures here). Helpers shared by
several test modules live here or beside them (``tests/networks/profile_cases.py``,
``tests/networks/dinov3_vits16_layout.py``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))

import pytest  # noqa: E402

CONFIGS = BUNDLE_ROOT / "configs"


def inference_config():
    """A ``ConfigParser`` of configs/inference.yaml as shipped, the one definition of the post-processing."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.yaml"))
    return parser


def shipped_settings(prefix: str, keys) -> dict:
    """The values configs/inference.yaml ships for ``prefix + key`` (train.yaml and evaluate.yaml take them
    from it), by key."""
    parser = inference_config()
    return {key: parser.get_parsed_content(f"{prefix}{key}") for key in keys}


def bundle_workflow(config_file, workflow_type: str, **overrides):
    """A ``monai.bundle.ConfigWorkflow`` of this bundle's configs with its metadata and logging.conf, as
    ``python -m monai.bundle run`` builds it; ``overrides`` as on its command line."""
    from monai.bundle import ConfigWorkflow

    return ConfigWorkflow(
        config_file=config_file,
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type=workflow_type,
        **overrides,
    )


def run_workflow(workflow, check_properties: bool = True):
    """Initialize, check the bundle's required properties (MONAI's list for the workflow type, unless
    ``check_properties`` is False), run and finalize a workflow; return it."""
    workflow.initialize()
    if check_properties:
        assert workflow.check_properties() == []
    workflow.run()
    workflow.finalize()
    return workflow


MAX_WORKERS = 4  # each worker holds torch, MONAI and its tests' workflows (the largest process here: 2.5 GiB)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the platform tells it, else all of them)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads_per_worker(cpus: int, workers: int) -> int:
    """Threads each of ``workers`` test processes gets so that together they use ``cpus`` without
    oversubscribing them (at least one)."""
    return max(1, cpus // workers)


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pyproject.toml's default): one pytest-xdist worker per usable CPU, at most MAX_WORKERS."""
    return min(usable_cpus(), MAX_WORKERS)


def pytest_configure(config):
    """In a pytest-xdist worker, split the CPUs between the workers: torch in this process and in the processes
    its tests start gets ``threads_per_worker`` threads instead of one per core each, which would oversubscribe
    the cores. Set before anything here imports torch, which reads ``OMP_NUM_THREADS`` once, at its import
    (``tests/test_conftest.py`` checks both)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads_per_worker(usable_cpus(), int(workers)))


@pytest.fixture(scope="session", autouse=True)
def read_each_config_file_once():
    """Parse each config file once per test session instead of once per macro.

    MONAI reads and parses a file again for every ``'%file#key'`` macro it resolves: train.yaml's 40 macros
    into configs/inference.yaml cost about a second of YAML parsing per workflow the suite builds. The file
    is still read every time and the cache is keyed on its path and bytes, so a file a test writes or changes
    is parsed again (a modification time could miss a rewrite within one clock tick), and each caller gets its
    own deep copy, as from a fresh parse (``tests/test_conftest.py``). Subprocesses read files as users' runs
    do."""
    import copy

    from monai.bundle import ConfigParser

    real = ConfigParser.load_config_file.__func__
    parsed: dict = {}

    def load_once(cls, filepath, **kwargs):
        if kwargs:  # options change the parse: MONAI's own
            return real(cls, filepath, **kwargs)
        try:
            content = Path(filepath).read_bytes()
        except (OSError, TypeError, ValueError):  # MONAI's own error for what it cannot read
            return real(cls, filepath)
        key = (os.path.abspath(filepath), content)
        if key not in parsed:
            parsed[key] = real(cls, filepath)
        return copy.deepcopy(parsed[key])

    ConfigParser.load_config_file = classmethod(load_once)
    yield
    ConfigParser.load_config_file = classmethod(real)


# A DINOv3 ViT small enough for CPU tests: 2 layers, hidden 64, one 64-wide head, 4 registers.
TINY_DINOV3 = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 1,
    "intermediate_size": 128,
    "num_register_tokens": 4,
}
TINY_IMAGE_SIZE = 32


@pytest.fixture(scope="session")
def tiny_dinov3_dir(tmp_path_factory) -> Path:
    """A tiny random DINOv3 saved as a local Hugging Face folder."""
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    folder = tmp_path_factory.mktemp("tiny_dinov3")
    torch.manual_seed(0)
    DINOv3ViTModel(DINOv3ViTConfig(**TINY_DINOV3)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dinov2_dir(tmp_path_factory) -> Path:
    """A tiny random DINOv2 (ablation row) saved as a local Hugging Face folder."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("tiny_dinov2")
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=1,
        intermediate_size=128,
        patch_size=8,
        image_size=32,
    )
    Dinov2Model(config).save_pretrained(folder)
    return folder


def write_tiny_case(
    path_image: Path, path_label: Path, seed: int, shape=(40, 40, 40), spacing=(0.4, 0.4, 0.4)
):
    """A bright tube along the last axis with a spherical bulge: labels 1 (tube) and 2 (bulge)."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    cx, cy = shape[0] / 2 + rng.uniform(-4, 4), shape[1] / 2 + rng.uniform(-4, 4)
    label = np.zeros(shape, np.uint8)
    label[(x - cx) ** 2 + (y - cy) ** 2 < 9] = 1
    cz = shape[2] / 2 + rng.uniform(-5, 5)
    label[((x - cx - 4) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 < 16) & (label == 0)] = 2
    image = np.where(label > 0, 1000.0, 50.0) + rng.normal(0, 20, shape)
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), path_image)
    nib.save(nib.Nifti1Image(label, affine), path_label)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Three tiny labelled cases (training, validation, test) with a dataset.json datalist."""
    import json

    root = tmp_path_factory.mktemp("tiny_dataset")
    entries = {}
    for split, seed in (("training", 0), ("validation", 1), ("test", 2)):
        for folder in ("images", "labels"):
            (root / folder).mkdir(exist_ok=True)
        name = f"case_{seed:03d}.nii.gz"
        write_tiny_case(root / "images" / name, root / "labels" / name, seed)
        entries[split] = [{"image": f"images/{name}", "label": f"labels/{name}"}]
    (root / "dataset.json").write_text(json.dumps(entries))
    return root


def postprocessing_scene():
    """(30, 30, 30) uint8 label: a vessel with an aneurysm, a small aneurysm, a detached one and a speck."""
    import numpy as np

    label = np.zeros((30, 30, 30), np.uint8)
    label[2:28, 14:17, 14:17] = 1  # vessel
    label[10:15, 17:22, 13:18] = 2  # aneurysm on it: 125 voxels
    label[20:22, 17:19, 14:16] = 2  # small aneurysm on it: 8 voxels
    label[2:6, 2:6, 2:6] = 2  # detached aneurysm: 64 voxels
    label[25, 25, 25] = 1  # one-voxel vessel speck
    return label


def blurred_lumen_scene():
    """A ball of radius 8 (a sac, label 2) on a tube of radius 3 (label 1) along the last axis of a (40, 40, 40)
    volume, blurred as a scanner blurs them (Gaussian, 1 voxel, noise 2 % of the lumen): (image float32,
    truth uint8, the truth drawn two voxels inside itself as a model that misses the rim does)."""
    import numpy as np
    from scipy import ndimage

    grid = np.indices((40, 40, 40)).astype(np.float32)
    tube = np.hypot(grid[0] - 20, grid[1] - 12) <= 3
    ball = np.sqrt((grid[0] - 20) ** 2 + (grid[1] - 24) ** 2 + (grid[2] - 20) ** 2) <= 8
    truth = np.where(ball, 2, np.where(tube, 1, 0)).astype(np.uint8)
    rng = np.random.default_rng(0)
    image = ndimage.gaussian_filter((truth > 0).astype(np.float32), 1.0) + rng.normal(0, 0.02, truth.shape)
    inner = ndimage.binary_erosion(truth > 0, iterations=2)
    return image.astype(np.float32), truth, np.where(inner, truth, 0).astype(np.uint8)


def flat_aneurysm_scene():
    """(30, 30, 30) uint8 label: a vessel along axis 0 with a protruding aneurysm (5 voxels high, 5 wide) and
    a one-voxel-thin patch of aneurysm lying along its wall (7 voxels long)."""
    import numpy as np

    label = np.zeros((30, 30, 30), np.uint8)
    label[2:28, 14:17, 14:17] = 1
    label[5:10, 17:22, 13:18] = 2
    label[18:25, 17, 14:17] = 2
    return label


def bone_scene(tube_radius_mm: float = 1.5, plate: bool = True, plate_thickness_mm: float = 3.0):
    """A 28 mm cube at 0.5 mm: a straight artery along X with a sac on it, and 11 mm above it a plate
    (``plate_thickness_mm`` thick, default 3), 21 mm square and dimmer than the lumen, that the "network"
    labelled vessel, but for a patch it labelled aneurysm.

    Returns:
        image (X, Y, Z) float32 (lumen 1, blurred, noisy), label (X, Y, Z) int64, and the tube, plate and sac
        masks.
    """
    import numpy as np
    from scipy import ndimage

    x, y, z = np.meshgrid(*[np.arange(56) * 0.5] * 3, indexing="ij")
    tube = (y - 14.0) ** 2 + (z - 8.0) ** 2 <= tube_radius_mm**2
    sac = (x - 14.0) ** 2 + (y - 14.0) ** 2 + (z - 9.5 - tube_radius_mm) ** 2 <= 2.5**2
    slab = (np.abs(z - 19.0) <= plate_thickness_mm / 2) & (x > 3) & (x < 25) & (y > 3) & (y < 25)
    slab &= plate
    image = np.where(tube | sac, 1.0, np.where(slab, 0.7, 0.0)).astype(np.float32)
    noise = np.random.default_rng(0).normal(0.0, 0.05, image.shape).astype(np.float32)
    image = ndimage.gaussian_filter(image, 1.0) + noise
    label = np.zeros(image.shape, dtype=np.int64)
    label[tube | slab] = 1
    label[sac] = 2
    label[slab & (x > 8) & (x < 11) & (y > 8) & (y < 11)] = 2  # a false aneurysm on the bone
    return image, label, tube, slab, sac
