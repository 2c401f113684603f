"""Mutation check: break one line of the implementation at a time and see whether the tests notice.

Each :data:`MUTATIONS` entry replaces one exact, unique piece of a tracked file in a scratch copy of the
repository (``git ls-files``), runs only the tests that guard it, and puts the file back. A mutation is
*caught* when those tests fail (pytest exit status 1); it *survives* when they pass. Anything else (the
text to replace is missing or not unique, no test selected, pytest crashed) is reported as an error, so a
mutation that went stale after a refactor cannot pass for caught.

Before any mutation, the selected tests run once on the unmutated copy: they must pass there, or a
"caught" would mean nothing.

Usage (from the repository root; about 5 minutes on 2 CPU cores)::

    python .ci/mutation_check.py                   # every mutation
    python .ci/mutation_check.py resume_only_trainer failure_at_half   # some, by name
    python .ci/mutation_check.py --list

Exit status 0 when every mutation run was caught, 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("mutation_check")

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    """Replace ``old`` (exactly once in ``path``) with ``new``; ``tests`` are pytest node ids or files."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


_BUNDLE = "tests/test_bundle.py"
_RESUME = f"{_BUNDLE}::test_resumed_training_ends_with_the_model_of_an_uninterrupted_run"
_DDP_RANK0 = f"{_BUNDLE}::test_multi_gpu_training_writes_and_logs_from_rank_0_only"
_SLICE = "tests/networks/test_slice_encoder.py"
_CACHE = "tests/test_embedding_cache.py"
_METRICS = "tests/test_metrics.py"

MUTATIONS: tuple[Mutation, ...] = (
    # resume and ranks (issue 11)
    Mutation(
        "resume_only_trainer",
        "scripts/handlers.py",
        'load_dict = {**self.load_dict, "trainer": engine}',
        'load_dict = {"trainer": engine}',
        (_RESUME,),
    ),
    Mutation(
        "no_seed_each_epoch",
        "configs/train.yaml",
        "    - _target_: scripts.handlers.SeedEachEpoch\n",
        "    - _target_: scripts.handlers.SeedEachEpoch\n      _disabled_: true\n",
        (_RESUME,),
    ),
    Mutation(
        "checkpoint_saver_on_every_rank",
        "scripts/handlers.py",
        "if idist.get_rank() != self.save_on_rank:",
        "if False:",
        ("tests/test_handlers.py::test_checkpoint_is_written_by_rank_0_only", _DDP_RANK0),
    ),
    Mutation(
        "superseded_checkpoint_removed_before_the_write",
        "scripts/handlers.py",
        "        self._superseded.append(filename)\n",
        "        (self.dirname / filename).unlink(missing_ok=True)\n",
        ("tests/test_handlers.py",),
    ),
    # metrics
    Mutation(
        "volume_similarity_without_abs",
        "scripts/metrics.py",
        '"volume_similarity": 1.0 - abs(n_pred - n_true) / total,',
        '"volume_similarity": 1.0 - (n_pred - n_true) / total,',
        (_METRICS,),
    ),
    Mutation(
        "failure_at_half",
        "scripts/metrics.py",
        '_dice"] < FAILURE_DICE_THRESHOLD)',
        '_dice"] <= FAILURE_DICE_THRESHOLD)',
        (_METRICS,),
    ),
    Mutation(
        "size_bins_without_spacing",
        "scripts/metrics.py",
        "[1:] * float(np.prod(spacing))",
        "[1:] * 1.0",
        (_METRICS,),
    ),
    Mutation(
        "detection_4_connected",
        "scripts/metrics.py",
        "true_cc, n_true = ndimage.label(true_mask, structure=COMPONENT_CONNECTIVITY)",
        "true_cc, n_true = ndimage.label(true_mask)",
        (_METRICS,),
    ),
    # geometry (inference and evaluation in the input's own grid and spacing)
    Mutation(
        "inference_without_invert",
        "configs/inference.yaml",
        "    - _target_: Invertd\n",
        "    - _target_: Invertd\n      _disabled_: true\n",
        ("tests/test_geometry.py",),
    ),
    Mutation(
        "evaluation_at_resampled_spacing",
        "scripts/handlers.py",
        'spacing = tuple(float(s) for s in label.meta["pixdim"][1:4])',
        "spacing = (0.4, 0.4, 0.4)",
        ("tests/test_geometry.py::test_evaluation_scores_at_the_label_s_own_spacing",),
    ),
    # encoder identity and the slice-embedding cache
    Mutation(
        "identity_without_rope_theta",
        "scripts/networks/encoder_weights.py",
        '        "attention_dropout",\n',
        '        "attention_dropout",\n        "rope_theta",\n',
        (_SLICE, _CACHE),
    ),
    Mutation(
        "namespace_without_dtype",
        "scripts/networks/slice_encoder.py",
        "            str(self.dtype),\n",
        "",
        (_CACHE,),
    ),
    Mutation(
        "lru_evicts_newest",
        "scripts/embedding_cache.py",
        "self._memory.popitem(last=False)",
        "self._memory.popitem(last=True)",
        (_CACHE,),
    ),
    Mutation(
        "lookup_does_not_refresh",
        "scripts/embedding_cache.py",
        "            self._memory.move_to_end(key)\n",
        "",
        (_CACHE,),
    ),
    Mutation(
        "cache_key_without_shape",
        "scripts/embedding_cache.py",
        "digest.update(repr(pixels.shape).encode())",
        "pass",
        (_CACHE,),
    ),
    # crops
    Mutation(
        "crops_aligned_on_the_slice_axis",
        "scripts/data/crops.py",
        "                if axis != self.slice_axis:",
        "                if axis == self.slice_axis:",
        ("tests/data/test_crops.py", _CACHE),
    ),
    Mutation(
        "empty_windows_on_the_wrong_axes",
        "scripts/data/crops.py",
        "np.arange(size - roi + 1) if axis == slice_axis else",
        "np.arange(size - roi + 1) if axis != slice_axis else",
        ("tests/data/test_crops.py",),
    ),
    # network: fusion and Room-Lite
    Mutation(
        "fusion_without_residual",
        "scripts/networks/fusion.py",
        "return unet + self.act(self.norm(mixed))",
        "return self.act(self.norm(mixed))",
        ("tests/networks/test_fusion.py",),
    ),
    Mutation(
        "fusion_reads_unet_weights_for_dino",
        "scripts/networks/fusion.py",
        "group_norm(dino, self.dino_norm).values, self.mix.weight[:, channels:], self.mix.bias",
        "group_norm(dino, self.dino_norm).values, self.mix.weight[:, :channels], self.mix.bias",
        ("tests/networks/test_fusion.py",),
    ),
    Mutation(
        "room_lite_without_depth_bias",
        "scripts/networks/room_lite.py",
        "SliceProfile.from_slices(x + bias, shape, self.slice_axis)",
        "SliceProfile.from_slices(x, shape, self.slice_axis)",
        ("tests/networks/test_room_lite.py",),
    ),
    # validation of inputs
    Mutation(
        "nan_image_accepted",
        "scripts/data/validation.py",
        "if not torch.isfinite(torch.as_tensor(image)).all():",
        "if False:",
        ("tests/data/test_validation.py",),
    ),
    Mutation(
        "unknown_labels_accepted",
        "scripts/data/validation.py",
        "unknown = np.setdiff1d(values, self.labels)",
        "unknown = np.setdiff1d(values, values)",
        ("tests/data/test_validation.py",),
    ),
    Mutation(
        "label_geometry_not_checked",
        "scripts/data/validation.py",
        "atol=self.affine_atol",
        "atol=1e9",
        ("tests/data/test_validation.py",),
    ),
    # model-zoo release and export (issue 13)
    Mutation(
        "export_loose_checkpoint",
        "scripts/networks/checkpoint.py",
        "network.load_state_dict(state, strict=True)",
        "network.load_state_dict(state, strict=False)",
        ("tests/test_export_torchscript.py", "tests/networks/test_checkpoint.py"),
    ),
    Mutation(
        "export_whole_batch_at_once",
        "scripts/export_torchscript.py",
        "for index in range(x.shape[0]):",
        "for index in range(1):",
        ("tests/test_export_torchscript.py",),
    ),
    Mutation(
        "release_keeps_training_encoder_name",
        "scripts/release.py",
        '        _set_dino_model(staged / "configs", inference, source)',
        "        pass",
        ("tests/test_release.py",),
    ),
    Mutation(
        "release_zip_dated_now",
        "scripts/release.py",
        "date_time=ZIP_DATE_TIME",
        "date_time=__import__('time').localtime()[:6]",
        ("tests/test_release.py::test_two_builds_give_byte_identical_zips",),
    ),
    Mutation(
        "atomic_writes_stay_private",
        "scripts/atomic_io.py",
        "        os.chmod(tmp, _new_file_mode())",
        "        pass",
        ("tests/test_atomic_io.py",),
    ),
)


def _copy_tree(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def _pytest(tree: Path, tests: tuple[str, ...]) -> tuple[int, float, str]:
    start = time.perf_counter()
    run = subprocess.run(  # -n 0: a mutation's few tests in this process, not in the suite's workers
        [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider", *tests],
        cwd=tree,
        capture_output=True,
        text=True,
    )
    return run.returncode, time.perf_counter() - start, (run.stdout + run.stderr).strip().splitlines()[-1:]


def _apply(tree: Path, mutation: Mutation) -> str:
    """Apply ``mutation`` in ``tree``; return the original text of the file (raises if ``old`` is not unique)."""
    path = tree / mutation.path
    text = path.read_text()
    count = text.count(mutation.old)
    if count != 1:
        raise ValueError(
            f"{mutation.name}: {mutation.path} holds {count} copies of {mutation.old!r}, not one."
        )
    path.write_text(text.replace(mutation.old, mutation.new))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    known = {m.name: m for m in MUTATIONS}
    if args.list:
        for m in MUTATIONS:
            logger.info("%-36s %s  %s", m.name, m.path, " ".join(m.tests))
        return 0
    unknown = sorted(set(args.names) - set(known))
    if unknown:
        parser.error(f"unknown mutations {unknown}; see --list")
    selected = [known[n] for n in args.names] if args.names else list(MUTATIONS)

    with tempfile.TemporaryDirectory(prefix="mutation_check_") as scratch:
        tree = Path(scratch)
        _copy_tree(tree)
        baseline = tuple(dict.fromkeys(t for m in selected for t in m.tests))
        rc, seconds, tail = _pytest(tree, baseline)
        if rc != 0:
            logger.error("The unmutated tests fail (pytest exit %d): %s", rc, tail)
            return 1
        logger.info("unmutated: %d test selections pass (%.0f s)", len(baseline), seconds)

        results = {}
        for mutation in selected:
            try:
                original = _apply(tree, mutation)
            except ValueError as error:
                results[mutation.name] = "error"
                logger.error("%s", error)
                continue
            try:
                rc, seconds, tail = _pytest(tree, mutation.tests)
            finally:
                (tree / mutation.path).write_text(original)
            results[mutation.name] = {1: "caught"}.get(
                rc, "survived" if rc == 0 else f"error (pytest exit {rc})"
            )
            logger.info(
                "%-36s %-10s %5.0f s  %s", mutation.name, results[mutation.name], seconds, " ".join(tail)
            )

    caught = sum(r == "caught" for r in results.values())
    logger.info("%d of %d mutations caught", caught, len(results))
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
