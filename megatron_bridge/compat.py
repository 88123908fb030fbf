"""CPU shims for megatron-core: the few CUDA hard-codes that stop its GPTModel on a CUDA-less box.

Applied by `apply_cpu_shims()` only when CUDA is unavailable, never on a GPU. What they change:

1. `torch.cuda.current_device()` answers the CPU device. megatron-core moves rotary `inv_freq`
   (and a few buffers) to "the current CUDA device"; on a CPU-only box that is the CPU.
2. The model-parallel RNG tracker forks the CPU generator instead of CUDA's, so code under
   `get_cuda_rng_tracker().fork()` (attention dropout, TP weight init) runs and stays seeded per
   tensor-parallel rank, as on GPU.
3. `torch.cuda.synchronize()` (called around checkpoint saves) is a no-op.
4. `Tensor.cuda()` returns the tensor unchanged (megatron moves the tied embedding to CUDA before
   all-reducing it between the first and last pipeline stages).

Callers also pass an explicit attention mask (megatron's default causal mask is built on CUDA).
"""

from __future__ import annotations

import contextlib

import torch

_APPLIED = False


def cpu_only() -> bool:
    return not torch.cuda.is_available()


def apply_cpu_shims() -> bool:
    """Install the shims if there is no CUDA; returns whether they are active. Idempotent."""
    global _APPLIED
    if not cpu_only():
        return False
    if _APPLIED:
        return True
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """The tracker's named RNG streams, kept as CPU generator states."""

        def add(self, name: str, seed: int) -> None:
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _APPLIED = True
    return True


def seed_model_parallel(seed: int) -> None:
    """Seed every RNG the model uses, per tensor-parallel rank (megatron's
    `model_parallel_cuda_manual_seed`, on whichever device is present)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    torch.manual_seed(seed)
    if not cpu_only():
        mrandom.model_parallel_cuda_manual_seed(seed)
        return
    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tp_rank = ps.get_tensor_model_parallel_rank()
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
