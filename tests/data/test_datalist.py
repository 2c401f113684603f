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
