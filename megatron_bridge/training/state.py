"""Training checkpoints in Megatron-LM's layout, written atomically.

    <save>/latest_checkpointed_iteration.txt   the newest *complete* iteration (written last)
    <save>/iter_0000020/                       torch_dist model shards (+ the Megatron optimizer
                                               on GPU), and on CPU `optim_tp{t}_pp{p}.pt`;
                                               `rng_{rank}.pt`; `progress.json`
    <save>/rsft_checkpoint.json                source config, true vocab, dtype, layout

An iteration is written into `.iter_…tmp` and renamed when every rank has finished, then the
tracker moves: a crash mid-save leaves the previous checkpoint as the latest. The last
`keep_last` iterations are kept. Resuming needs the layout (TP/PP/DP) it was saved with: the
CPU optimizer state is per model-parallel rank.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_bridge import checkpoint
from megatron_bridge.files import fsync_path
from megatron_bridge.training.job import JobError


def latest_iteration(save: Path) -> int | None:
    tracker = Path(save) / checkpoint.TRACKER
    if not tracker.is_file():
        return None
    value = tracker.read_text().strip()
    return int(value) if value.isdigit() else None


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {"tensor_parallel": ps.get_tensor_model_parallel_world_size(),
            "pipeline_parallel": ps.get_pipeline_model_parallel_world_size(),
            "data_parallel": ps.get_data_parallel_world_size()}


def save(save_dir: Path, iteration: int, model, stepper, metadata: dict[str, Any],
         keep_last: int) -> Path:
    """Collective: write iteration `iteration` and make it the latest."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    root = Path(save_dir)
    final = checkpoint.iteration_dir(root, iteration)
    tmp = root / f".{final.name}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    state: dict[str, Any] = {"model": model.sharded_state_dict()}
    if hasattr(stepper, "sharded_state_dict"):  # GPU: Megatron's (distributed) optimizer
        state["optimizer"] = stepper.sharded_state_dict(state["model"])
    dist_checkpointing.save(state, str(tmp), checkpoint._threaded_torch_dist(2))
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    if hasattr(stepper, "state_dict") and ps.get_data_parallel_rank() == 0:
        torch.save(stepper.state_dict(), tmp / f"optim_tp{tp}_pp{pp}.pt")
    torch.save({"torch": torch.get_rng_state()}, tmp / f"rng_{rank}.pt")
    dist.barrier()
    if rank == 0:
        (tmp / "progress.json").write_text(json.dumps({"iteration": iteration, **_layout()}))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        fsync_path(root)
        (root / checkpoint.METADATA).write_text(json.dumps(
            {**metadata, "mapping_version": checkpoint.MAPPING_VERSION}, indent=2))
        tracker_tmp = root / f".{checkpoint.TRACKER}.tmp"
        tracker_tmp.write_text(str(iteration))
        tracker_tmp.rename(root / checkpoint.TRACKER)
        fsync_path(root)
        kept = sorted(p for p in root.glob("iter_*") if p.is_dir())
        for old in kept[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(save_dir: Path, iteration: int, model, stepper, source_meta: dict[str, Any]) -> None:
    """Collective: restore model, optimizer and RNG of `iteration` for an exact resume."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    root = Path(save_dir)
    saved = checkpoint.read_metadata(root)
    if saved.get("hf_config") != source_meta.get("hf_config"):
        raise JobError(f"{root} holds checkpoints of another model; use a new save folder or "
                       "delete it to start over")
    target = checkpoint.iteration_dir(root, iteration)
    progress = json.loads((target / "progress.json").read_text())
    if {k: progress[k] for k in _layout()} != _layout():
        raise JobError(f"{target} was saved with layout {progress}, this run is {_layout()}; "
                       "resume with the same TP/PP/DP or start a new save folder")
    request: dict[str, Any] = {"model": model.sharded_state_dict()}
    if hasattr(stepper, "sharded_state_dict"):
        request["optimizer"] = stepper.sharded_state_dict(request["model"])
    state = dist_checkpointing.load(request, str(target))
    model.load_state_dict(state["model"], strict=False)
    if "optimizer" in state:
        stepper.load_sharded(state["optimizer"])
    else:
        tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        stepper.load_state_dict(torch.load(target / f"optim_tp{tp}_pp{pp}.pt", weights_only=True))
    rng = target / f"rng_{dist.get_rank()}.pt"
    if rng.is_file():
        torch.set_rng_state(torch.load(rng, weights_only=True)["torch"])
