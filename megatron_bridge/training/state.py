"""Training checkpoints in Megatron-LM's layout, written atomically.

    <save>/latest_checkpointed_iteration.txt   the newest *complete* iteration (written last)
    <save>/iter_0000020/                       torch_dist shards of the model and the Megatron
                                               optimizer; `rng_{rank}.pt`; `progress.json`
    <save>/rsft_checkpoint.json                source config, true vocab, dtype, layout

An iteration is written into `.iter_…tmp` and renamed when every rank has finished, then the
tracker moves: a crash mid-save leaves the previous checkpoint as the latest. The last
`keep_last` iterations are kept. Resuming needs the layout (TP/PP/DP) it was saved with (the
distributed optimizer's `dp_reshardable` format and the per-rank RNG states follow the layout).
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
from settings.errors import UserError


latest_iteration = checkpoint.latest_iteration


def resume_point(save: Path, limit: int) -> int | None:
    """The iteration a run of `limit` steps resumes from: the newest complete checkpoint at or
    before `limit`. A folder shared by runs of one lineage (same settings but their length) can
    hold later iterations of a longer run; those are the same weights this run would reach, but
    not where it ends. (`iter_*` folders appear by rename once complete and are removed by
    rename before deletion, so each one present is whole.)"""
    latest = latest_iteration(save)
    if latest is not None and latest <= limit:
        return latest
    done = [i for i in checkpoint.available_iterations(save) if i <= limit]
    return max(done) if done else None


def prune(root: Path, current: int, keep_last: int, keep: set[int]) -> None:
    """Delete the iterations before `current` but the newest `keep_last` (counting `current`)
    and those in `keep`. Later ones (a longer run's, in a folder shared by one lineage) stay.
    Each goes by an atomic rename first, so a kill mid-delete never leaves a partial `iter_*`
    folder."""
    counted = [i for i in checkpoint.available_iterations(root) if i <= current and i not in keep]
    for old in counted[:-keep_last] if keep_last > 0 else []:
        target = checkpoint.iteration_dir(root, old)
        trash = root / f".{target.name}.deleting"
        shutil.rmtree(trash, ignore_errors=True)
        target.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {"tensor_parallel": ps.get_tensor_model_parallel_world_size(),
            "pipeline_parallel": ps.get_pipeline_model_parallel_world_size(),
            "data_parallel": ps.get_data_parallel_world_size()}


def rng_state() -> dict[str, Any]:
    """Every random stream a step draws from: torch's (CPU and this rank's CUDA device) and
    megatron's model-parallel tracker (attention dropout, forked per TP rank)."""
    from megatron.core.tensor_parallel import random as mrandom

    rng = {"torch": torch.get_rng_state(),
           "tracker": mrandom.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def set_rng_state(rng: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import random as mrandom

    torch.set_rng_state(rng["torch"])
    mrandom.get_cuda_rng_tracker().set_states(rng["tracker"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])


def save(save_dir: Path, iteration: int, stepper, metadata: dict[str, Any],
         keep_last: int, keep: set[int] = frozenset()) -> Path:
    """Collective: write iteration `iteration` (model, optimizer, RNG), make it the latest and
    prune older ones (`prune`)."""
    from megatron.core import dist_checkpointing

    root = Path(save_dir)
    final = checkpoint.iteration_dir(root, iteration)
    tmp = root / f".{final.name}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    stepper.sync_params()
    model_state = stepper.module.sharded_state_dict()
    state = {"model": model_state, "optimizer": stepper.optimizer_state(model_state)}
    dist_checkpointing.save(state, str(tmp), checkpoint._threaded_torch_dist(2))
    torch.save(rng_state(), tmp / f"rng_{rank}.pt")
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
        prune(root, iteration, keep_last, keep)
    dist.barrier()
    return final


def load(save_dir: Path, iteration: int, stepper, source_meta: dict[str, Any]) -> None:
    """Collective: restore model, optimizer and RNG of `iteration` for an exact resume (on a host
    with or without Transformer Engine, whichever saved it: `checkpoint.load_sharded`)."""
    root = Path(save_dir)
    saved = checkpoint.read_metadata(root)
    if saved.get("hf_config") != source_meta.get("hf_config"):
        raise UserError(f"{root} holds checkpoints of another model; use a new save folder or "
                       "delete it to start over")
    target = checkpoint.iteration_dir(root, iteration)
    progress = json.loads((target / "progress.json").read_text())
    if {k: progress[k] for k in _layout()} != _layout():
        raise UserError(f"{target} was saved with layout {progress}, this run is {_layout()}; "
                       "resume with the same TP/PP/DP or start a new save folder")
    model_state = stepper.module.sharded_state_dict()
    request = {"model": model_state,
               "optimizer": stepper.optimizer_state(model_state, loading=True)}
    state = checkpoint.load_sharded(request, target, root)
    checkpoint.load_model_state(stepper.module, state["model"], root)
    stepper.load_optimizer_state(state["optimizer"])
    set_rng_state(torch.load(target / f"rng_{dist.get_rank()}.pt", weights_only=True))
