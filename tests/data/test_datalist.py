"""The synthetic default dataset in distributed runs: one process generates it, the others wait and reuse it."""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2


def _resolve_on_rank(rank: int, shared: str) -> None:
    """One torchrun-like process: gloo group, then the datalist the training config resolves."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE))
    dist.init_process_group(
        "gloo", init_method=f"file://{shared}/rendezvous", rank=rank, world_size=WORLD_SIZE
    )
    import scripts.data.synthetic as synthetic
    from scripts.data.datalist import resolve_datalist

    real = synthetic.write_dataset

    def recording(*args, **kwargs):
        Path(shared, f"generated_by_rank_{rank}").touch()
        return real(*args, **kwargs)

    synthetic.write_dataset = recording
    path = resolve_datalist(None, synthetic_dir=f"{shared}/synthetic", synthetic_cases=3)
    Path(shared, f"rank_{rank}_read").write_text(path)
    dist.destroy_process_group()


def test_only_local_rank_zero_generates_the_synthetic_dataset(tmp_path):
    mp.spawn(_resolve_on_rank, args=(str(tmp_path),), nprocs=WORLD_SIZE, join=True)
    assert sorted(p.name for p in tmp_path.glob("generated_by_rank_*")) == ["generated_by_rank_0"]
    paths = {Path(tmp_path, f"rank_{rank}_read").read_text() for rank in range(WORLD_SIZE)}
    assert paths == {str(tmp_path / "synthetic" / "dataset.json")}


def test_training_config_passes_every_synthetic_setting(monkeypatch, tmp_path):
    """configs/train.yaml's synthetic_* keys reach ensure_dataset (a key left unwired would be ignored silently)."""
    import scripts.data.synthetic as synthetic
    from scripts.data.datalist import bundle_datalist

    seen = {}

    def recording(dataset_dir, **kwargs):
        seen.update(kwargs, dataset_dir=dataset_dir)
        return "dataset.json"

    monkeypatch.setattr(synthetic, "ensure_dataset", recording)
    asked = {
        "num_cases": 7,
        "seed": 3,
        "centre": "B",
        "splits": [4, 2, 1],
        "negatives": 1,
        "training_aneurysms": [0.0, 0.5, 0.5],
        "training_p_bone": 0.6,
        "training_stratified_sizes": True,
        "training_overlapping_loops": True,
    }
    # config key of each ensure_dataset argument: synthetic_<argument>, but synthetic_cases for num_cases
    overrides = {("synthetic_cases" if k == "num_cases" else f"synthetic_{k}"): v for k, v in asked.items()}
    assert bundle_datalist("datalist", {**overrides, "synthetic_dir": str(tmp_path)}) == "dataset.json"
    assert seen == {**asked, "dataset_dir": str(tmp_path)}
