"""CPU shims for megatron-core: the few CUDA hard-codes that stop its model, DDP, optimizer and
schedules on a CUDA-less box. All of them are no-ops where CUDA is present: a GPU runs
megatron-core untouched, and the CPU runs the very same training step.

Process-wide, installed by `apply_cpu_shims()` (only without CUDA):
1. `torch.cuda.current_device()` answers the CPU device — rotary `inv_freq` and buffers are moved
   to "the current CUDA device" (rotary_pos_embedding.py, param_and_grad_buffer.py:783/800/806).
2. The model-parallel RNG tracker forks the CPU generator instead of CUDA's, so code under
   `get_cuda_rng_tracker().fork()` (attention dropout, TP weight init) runs and stays seeded per
   tensor-parallel rank, as on GPU (tensor_parallel/random.py).
3. `torch.cuda.synchronize()` is a no-op (checkpoint saves, dist_checkpointing/strategies).
4. `Tensor.cuda()` returns the tensor unchanged (finalize_model_grads all-reduces the tied
   embedding between the first and last pipeline stages after `.cuda()`).
5. megatron's "CUDA RNG state" is the CPU generator's: activation recomputation
   (`tensor_parallel.random.CheckpointFunction`) saves and restores it to replay dropout.

Scoped, `cuda_as_cpu()`: a `TorchFunctionMode` entered only around building DDP and the
optimizer, the schedule call and `optimizer.step()` (the forward itself runs outside it, see
`outside_cuda_as_cpu`). It maps `device="cuda"` to the CPU and answers `Tensor.type()` with the
`torch.cuda.*` name the optimizer asserts. Every redirect is counted by its megatron-core call
site (file and qualified function) in `REDIRECTS`; `KNOWN_CALL_SITES` lists the ones
megatron-core 0.16 has: a new one warns, and the tests fail naming it (an upgrade that adds a
CUDA-only call).

Callers also pass an explicit attention mask (megatron's default causal mask is built on CUDA).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False

# megatron-core 0.16.1: "path under megatron/core:qualified function" → what is redirected there.
KNOWN_CALL_SITES = {
    "pipeline_parallel/schedules.py:forward_backward_no_pipelining":
        "token count on cuda (line 596)",
    "pipeline_parallel/schedules.py:forward_backward_pipelining_without_interleaving":
        "1F1B token count on cuda (2138)",
    "optimizer/optimizer.py:MixedPrecisionOptimizer.__init__":
        "found_inf, overflow buffer, unit scale on cuda (473, 481, 485)",
    "optimizer/optimizer.py:Float16OptimizerWithFloat16Params.__init__":
        "asserts param.type() is torch.cuda.* (671, 690)",
    "optimizer/optimizer.py:FP32Optimizer.__init__": "unit scale on cuda (907)",
    "optimizer/grad_scaler.py:MegatronGradScaler.__init__": "loss scale on cuda (15)",
    "optimizer/grad_scaler.py:DynamicGradScaler.__init__":
        "min scale, growth and backoff factors on cuda (88, 91, 94)",
    "optimizer/clip_grads.py:get_grad_norm_fp32": "overflow buffer on cuda (103)",
    "optimizer/clip_grads.py:clip_grad_by_total_norm_fp32":
        "asserts grad.type() is torch.cuda.FloatTensor, overflow buffer on cuda (167, 174)",
    "optimizer/distrib_optimizer.py:DistributedOptimizer._build_model_and_main_param_groups":
        "asserts param.type() is torch.cuda.* (361, 420)",
    "optimizer/distrib_optimizer.py:DistributedOptimizer.__init__":
        "asks param.type() for torch.cuda.* (582)",
    "utils.py:local_multi_tensor_l2_norm": "l2 norm result on cuda (1207)",
}
REDIRECTS: Counter[str] = Counter()
"""Call sites ("path:function" as in KNOWN_CALL_SITES; "?file:function" outside megatron-core)
redirected by `cuda_as_cpu()` in this process so far."""


def cpu_only() -> bool:
    return not torch.cuda.is_available()


def apply_cpu_shims() -> bool:
    """Install the process-wide shims if there is no CUDA; returns whether they are active.
    Idempotent."""
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
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)
    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _APPLIED = True
    return True


def _is_cuda(value) -> bool:
    if isinstance(value, str):
        return value.startswith("cuda")
    return isinstance(value, torch.device) and value.type == "cuda"


def _redirected() -> None:
    """Count the innermost megatron-core frame of the current call (else the caller's); warn
    once for a site megatron-core 0.16 does not have."""
    core = str(Path(sys.modules["megatron.core"].__file__).parent) + "/"
    frame = first = sys._getframe(2)
    while frame is not None and not frame.f_code.co_filename.startswith(core):
        frame = frame.f_back
    frame = frame or first
    code = frame.f_code
    function = getattr(code, "co_qualname", code.co_name)  # Python ≥ 3.11
    path = code.co_filename
    site = f"{path[len(core):]}:{function}" if path.startswith(core) else f"?{path}:{function}"
    if site not in REDIRECTS and site not in KNOWN_CALL_SITES:
        warnings.warn(f"compat.cuda_as_cpu: CUDA asked for at an unreviewed site {site} "
                      f"(line {frame.f_lineno}); add it to KNOWN_CALL_SITES once checked",
                      stacklevel=3)
    REDIRECTS[site] += 1


class _CudaAsCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            if name.startswith("torch.") and not name.startswith("torch.cuda."):
                _redirected()
                return "torch.cuda." + name[len("torch."):]
            return name
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            _redirected()
            kwargs = {**kwargs, "device": "cpu"}
        if any(_is_cuda(a) for a in args):
            _redirected()
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_as_cpu():
    """Run megatron-core's DDP/optimizer/schedule code that asks for CUDA on the CPU (no-op on a
    CUDA machine)."""
    if not cpu_only():
        yield
        return
    with _CudaAsCpu():
        yield


@contextlib.contextmanager
def outside_cuda_as_cpu():
    """Leave `cuda_as_cpu` for a stretch that needs none of it (the model's forward): every torch
    call inside a TorchFunctionMode pays a Python round trip."""
    if not cpu_only():
        yield
        return
    with torch._C.DisableTorchFunction():
        yield


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
