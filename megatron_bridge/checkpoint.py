"""Megatron `torch_dist` checkpoints: save/load through `dist_checkpointing` (any TP/PP layout
loads at any other), Megatron-LM's tracker file, and our small metadata file.

Layout (as Megatron-LM writes it):
    <dir>/latest_checkpointed_iteration.txt     "release" for converted models, else the iteration
    <dir>/release/ or <dir>/iter_0000100/       the torch_dist shards (+ .metadata, common.pt)
    <dir>/rsft_checkpoint.json                  source HF config, true vocab, dtype, TP/PP, mapping
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from settings.errors import UserError

TRACKER = "latest_checkpointed_iteration.txt"
METADATA = "rsft_checkpoint.json"
MAPPING_VERSION = 1



def iteration_dir(root: Path, iteration: int | str) -> Path:
    return Path(root) / ("release" if iteration == "release" else f"iter_{int(iteration):07d}")


def read_tracker(root: Path) -> str:
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        raise UserError(f"{root} is not a Megatron checkpoint (no {TRACKER})")
    value = tracker.read_text().strip()
    if value != "release" and not value.isdigit():
        raise UserError(f"{tracker} holds {value!r}, expected an iteration or 'release'")
    return value


def latest_iteration(save: Path) -> int | None:
    """The newest complete training iteration saved in `save` (None: none yet)."""
    tracker = Path(save) / TRACKER
    if not tracker.is_file():
        return None
    value = tracker.read_text().strip()
    return int(value) if value.isdigit() else None


def read_metadata(root: Path) -> dict[str, Any]:
    path = Path(root) / METADATA
    if not path.is_file():
        raise UserError(f"{root} has no {METADATA}; it was not written by rsft convert (convert "
                              "it again with `rsft convert hf2mcore`)")
    return json.loads(path.read_text())


def _threaded_torch_dist(threads: int):
    """Megatron's `torch_dist` save strategy with torch DCP's synchronous, threaded file writer.

    Megatron's default writer is built for async saves during training: it starts a `spawn`
    Manager process and forks writer processes per save (~6 s of start-up on CPU). A one-shot
    save (conversion) only needs the bytes on disk; the files and metadata are the same format,
    read by the standard `torch_dist` load strategy."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    class ThreadedTorchDistSave(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            state, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica)
            dcp.save(mcore_to_pyt_state_dict(state, False),
                     storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), thread_count=threads),
                     planner=MCoreSavePlanner(dedup_replicated_tensors=False,
                                              flatten_state_dict=False))

    return ThreadedTorchDistSave("torch_dist", 1)


def save(model, root: Path, iteration: int | str, metadata: dict[str, Any], threads: int = 2) -> Path:
    """Collective over all ranks: write the model's shards, then (rank 0) metadata and tracker.
    The tracker is written last, so a partly written checkpoint is never the latest."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    root = Path(root)
    target = iteration_dir(root, iteration)
    if dist.get_rank() == 0:
        target.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(target),
                            _threaded_torch_dist(threads))
    dist.barrier()
    if dist.get_rank() == 0:
        (root / METADATA).write_text(json.dumps(
            {**metadata, "mapping_version": MAPPING_VERSION}, indent=2))
        (root / TRACKER).write_text(str(iteration))
    dist.barrier()
    return target


def available_iterations(root: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in Path(root).glob("iter_*") if p.name[5:].isdigit())


EXTRA_STATE = "_extra_state"
"""Transformer Engine's per-layer FP8 metadata: a TE model asks for it, megatron's local spec has
none. A checkpoint written on one kind of host loads on the other: the TE model starts it from
its defaults, the local model leaves the checkpoint's unread."""


def _refuse_other_than_extra_state(keys, root: Path) -> None:
    keys = sorted(k for k in keys if not k.endswith(EXTRA_STATE))
    if keys:
        raise UserError(f"{root}: checkpoint lacks {keys[:3]}…; it is not this model")


def load_sharded(request: dict[str, Any], target: Path, root: Path) -> dict[str, Any]:
    """Collective: `dist_checkpointing.load` of `request` from the iteration folder `target`,
    tolerating `EXTRA_STATE` both ways (Megatron-LM's non-strict load): what the checkpoint has
    and the request lacks is left unread; what the request asks for and the checkpoint lacks is
    left out of the load if it is `_extra_state`, refused (naming it) otherwise."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    state, _, unexpected = dist_checkpointing.load(request, str(target),
                                                   strict=StrictHandling.RETURN_UNEXPECTED)
    _refuse_other_than_extra_state(unexpected, root)
    return state


def load_model_state(model, state: dict[str, Any], root: Path) -> None:
    """Put `load_sharded`'s model state into the model; a TE model keeps its `_extra_state`
    defaults where the checkpoint had none."""
    missing, _ = model.load_state_dict(state, strict=False)
    _refuse_other_than_extra_state(missing, root)


def load(model, root: Path, iteration: int | None = None) -> None:
    """Collective: load the latest (or the given) checkpoint into this rank's model, whatever
    layout it was saved with (dist_checkpointing reshards)."""
    if iteration is not None:
        target = iteration_dir(root, iteration)
        if not target.is_dir():
            have = ", ".join(map(str, available_iterations(root))) or "none"
            raise UserError(f"{root} has no checkpoint of iteration {iteration} "
                                  f"(available: {have})")
    else:
        target = iteration_dir(root, read_tracker(root))
    if not target.is_dir():
        raise UserError(f"{root}: the tracker points to {target.name}, which does not exist")
    state = load_sharded({"model": model.sharded_state_dict()}, target, root)
    load_model_state(model, state["model"], root)
