"""Process groups for megatron-core: one place that starts and stops torch.distributed.

Under `torchrun` the rank/world come from its environment; a plain process is a world of one
(loopback rendezvous on a free port). CPU uses gloo, GPU NCCL.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

from megatron_bridge.compat import apply_cpu_shims, cpu_only, seed_model_parallel
from megatron_bridge.launch import die_with_torchrun_agent, free_port
from settings.errors import UserError


@contextmanager
def model_parallel(tp: int = 1, pp: int = 1, seed: int = 1234):
    """Initialise torch.distributed and megatron's model-parallel groups; tear them down after."""
    from megatron.core import parallel_state as ps

    apply_cpu_shims()
    die_with_torchrun_agent()
    started = started_env = False
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a plain process: a world of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ["MASTER_PORT"] = str(free_port())
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            started_env = True
        if not cpu_only():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("gloo" if cpu_only() else "nccl")
        started = True
    try:
        if dist.get_world_size() % (tp * pp):
            raise UserError(f"world size {dist.get_world_size()} is not a multiple of "
                             f"TP×PP = {tp}×{pp}")
        ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                     pipeline_model_parallel_size=pp)
        seed_model_parallel(seed)
        yield
    finally:
        ps.destroy_model_parallel()
        if started:
            dist.destroy_process_group()
            if started_env:
                for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
                    os.environ.pop(k, None)
