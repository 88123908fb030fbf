"""One optimizer step on megatron-core's own machinery, the same code on CPU and GPU.

Wired as Megatron-LM's training loop wires it: the model wrapped in megatron-core's
`DistributedDataParallel` (contiguous grad buffers, overlapped bucket reduce), the optimizer from
`get_megatron_optimizer` (mixed precision, loss scaling, optional DistributedOptimizer), the
schedule from `get_forward_backward_func` (no pipelining, or 1F1B under pipeline parallel), and on
the model config `finalize_model_grads_func` (data-parallel reduce, tied embeddings across
pipeline stages, division by the global token count), `no_sync_func` and `grad_scale_func`.

Loss: cross-entropy on supervised tokens only, normalised per token over the *global* batch —
the sum over every micro-batch and data-parallel rank divided by the total number of supervised
tokens (`calculate_per_token_loss`, the seed's `--calculate-per-token-loss`), not a mean of
per-micro-batch means.

What differs by machine is only what CUDA provides (`megatron_bridge.host` decides): with
Transformer Engine's spec packed rows go in as THD sequences (`PackedSeqParams`); without it (CPU,
or a GPU without TE) they go in with a block-diagonal causal attention mask — the same numbers,
more attention memory. On a CPU box the CUDA hard-codes of megatron-core are redirected by
`compat.cuda_as_cpu()`. A micro-batch reaches the GPU by an asynchronous copy from pinned memory,
and nothing of it is read back to the host (the THD lengths come from the host's copy).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.distributed as dist

from megatron_bridge import compat
from megatron_bridge.training.batches import MicroBatch
from settings.models import TrainSettings

DISTRIBUTED_OPTIMIZER_CHECKPOINT = {"distrib_optim_sharding_type": "dp_reshardable"}
"""Megatron's per-DP-shard optimizer format: saves and loads without gathering (the default
format refuses the flattened shards of 0.16's DistributedOptimizer)."""


def device() -> torch.device:
    """Where this rank computes: its CUDA device, else the CPU."""
    if compat.cpu_only():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def per_token_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Cross-entropy [b, s] from this TP rank's vocabulary slice of the logits [b, s, v/TP].

    The vocabulary is padded to a multiple of 128×TP; the padding's logits are excluded (set to
    −inf) so the loss is the true model's whatever the TP size (Megatron-LM leaves them in the
    softmax, which makes TP=2 differ from TP=1)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    local = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * local
    if start + local > vocab_size:
        logits = logits.clone()
        logits[..., max(vocab_size - start, 0):] = float("-inf")
    return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)


class Stepper:
    """The model under megatron-core DDP with its optimizer; `step()` is one optimizer step.

    Build it after the weights are loaded: the optimizer's fp32 master weights are copies of the
    parameters at construction."""

    def __init__(self, model, settings: TrainSettings, vocab_size: int, thd: bool):
        from megatron.core.distributed import (DistributedDataParallel,
                                               DistributedDataParallelConfig,
                                               finalize_model_grads)
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.settings, self.vocab_size, self.thd = settings, vocab_size, thd
        s = settings
        self.module = model
        config = model.config
        assert config.calculate_per_token_loss, "build the model with calculate_per_token_loss"
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=True,
            use_distributed_optimizer=s.use_distributed_optimizer,
            overlap_param_gather=s.use_distributed_optimizer)
        fp16 = s.precision == "fp16"
        with compat.cuda_as_cpu():
            self.model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
            self.optimizer = get_megatron_optimizer(
                OptimizerConfig(
                    optimizer="adam", lr=s.lr, min_lr=s.min_lr, weight_decay=s.weight_decay,
                    adam_beta1=s.adam_beta1, adam_beta2=s.adam_beta2, adam_eps=s.adam_eps,
                    clip_grad=s.clip_grad, bf16=s.precision == "bf16", fp16=fp16,
                    loss_scale=s.loss_scale if fp16 else None,
                    params_dtype=config.params_dtype,
                    use_distributed_optimizer=s.use_distributed_optimizer),
                [self.model])
        # Megatron-LM's train(): the schedule calls these.
        config.grad_scale_func = self.optimizer.scale_loss
        config.no_sync_func = self.model.no_sync
        config.finalize_model_grads_func = finalize_model_grads

    def forward_step(self, data_iterator, model):
        """The schedule's `forward_step_func`: this micro-batch through this pipeline stage."""
        with compat.outside_cuda_as_cpu():
            mb: MicroBatch = next(data_iterator).to(device())
            mask, packed = None, None
            if self.thd:  # every sample its own sequence (Transformer Engine attention)
                packed = mb.packed_seq_params()
            else:
                mask = mb.attention_mask()
            output = model(mb.tokens, mb.position_ids, mask, packed_seq_params=packed)

        def loss_func(logits: torch.Tensor):  # last pipeline stage only
            with compat.outside_cuda_as_cpu():
                loss = (per_token_loss(logits, mb.labels, self.vocab_size) * mb.loss_mask).sum()
                count = mb.loss_mask.sum().to(torch.int)
                # calculate_per_token_loss: finalize_model_grads divides by the global count
                return loss, count, {"lm loss": torch.stack([loss.detach().double(),
                                                             count.double()])}

        return output, loss_func

    def forward_backward(self, micro_batches: list[MicroBatch]) -> list[dict[str, torch.Tensor]]:
        """Gradients of the step's loss in the DDP buffers (`param.main_grad`): reduced over
        data-parallel ranks and divided by the global supervised-token count."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        with compat.cuda_as_cpu():
            return get_forward_backward_func()(
                forward_step_func=self.forward_step, data_iterator=iter(micro_batches),
                model=[self.model], num_microbatches=len(micro_batches),
                seq_length=micro_batches[0].tokens.shape[1],
                micro_batch_size=micro_batches[0].tokens.shape[0], forward_only=False)

    def evaluate(self, micro_batches: Iterator[MicroBatch], count: int,
                 seq_length: int) -> tuple[float, int]:
        """Validation: the per-token loss (summed over supervised tokens of every micro-batch
        and data-parallel rank, divided by their count: the training loss's convention and
        masks) and that count, forward only through the same schedule, in eval mode (no
        dropout). `count` one-row micro-batches on this rank (0: none here); every rank
        returns the totals."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.sync_params()  # the distributed optimizer's last update, on every rank's copy
        reports: list[dict[str, torch.Tensor]] = []
        if count:
            self.model.eval()
            try:
                with torch.no_grad(), compat.cuda_as_cpu():
                    reports = get_forward_backward_func()(
                        forward_step_func=self.forward_step, data_iterator=micro_batches,
                        model=[self.model], num_microbatches=count, seq_length=seq_length,
                        micro_batch_size=1, forward_only=True)
            finally:
                self.model.train()
        loss_sum, tokens = self._reduce(reports)
        return loss_sum / max(tokens, 1.0), int(tokens)

    def _reduce(self, reports: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        """(loss sum, supervised tokens) over the micro-batches of every data-parallel rank.
        The loss lives on the last pipeline stage: sum it over data-parallel ranks, then hand
        it to every stage (zeros elsewhere), so rank 0 can log it."""
        from megatron.core import parallel_state as ps

        totals = torch.zeros(2, dtype=torch.float64, device=device())
        if ps.is_pipeline_last_stage():
            for r in reports:
                totals += r["lm loss"]
        dist.all_reduce(totals, group=ps.get_data_parallel_group())
        dist.all_reduce(totals, group=ps.get_pipeline_model_parallel_group())
        loss_sum, tokens = totals.tolist()
        return loss_sum, tokens

    def step(self, micro_batches: list[MicroBatch], lr: float) -> dict[str, Any]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            # Megatron marks biases and 1-D params wd_mult 0; only its LR scheduler applies it.
            group["weight_decay"] = self.settings.weight_decay * group["wd_mult"]
        reports = self.forward_backward(micro_batches)
        with compat.cuda_as_cpu():
            updated, grad_norm, _ = self.optimizer.step()
        loss_sum, tokens = self._reduce(reports)
        return {"loss": loss_sum / max(tokens, 1.0), "grad_norm": float(grad_norm or 0.0),
                "supervised_tokens": int(tokens), "skipped": not updated,
                "loss_scale": float(self.optimizer.get_loss_scale())}

    # -- checkpoints -------------------------------------------------------------------------
    def sync_params(self) -> None:
        """With overlapped param all-gather, a rank's copy of the shards it does not own is only
        refreshed by the next forward: gather them now (before saving or exporting weights)."""
        if self.model.ddp_config.overlap_param_gather:
            self.model.start_param_sync(force_sync=True)

    def optimizer_state(self, model_state: dict[str, Any], loading: bool = False) -> dict[str, Any]:
        """The optimizer's sharded state dict for `dist_checkpointing`, next to the model's."""
        if loading:
            self._allocate_torch_adam_state()
        return self.optimizer.sharded_state_dict(model_state, is_loading=loading,
                                                 metadata=DISTRIBUTED_OPTIMIZER_CHECKPOINT)

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.optimizer.load_state_dict(state)
        # The distributed optimizer (torch Adam) keeps the step count in its param groups and
        # hands every parameter one shared `step` tensor — then overwrites it with the value
        # the load request was built with. Give each parameter its own, from the groups.
        for adam in self._torch_adams():
            for group in adam.param_groups:
                for p in group["params"]:
                    param_state = adam.state[p]
                    if "step" in group:
                        param_state["step"] = torch.tensor(float(group["step"]))
                    elif "step" in param_state:
                        param_state["step"] = param_state["step"].clone()

    def _torch_adams(self) -> list[torch.optim.Optimizer]:
        """The torch Adam(W) inside megatron's wrappers (no TE/Apex fused Adam installed)."""
        wrappers = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        return [w.optimizer for w in wrappers
                if isinstance(w.optimizer, (torch.optim.Adam, torch.optim.AdamW))]

    def _allocate_torch_adam_state(self) -> None:
        """Torch Adam allocates its state at the first step; the distributed optimizer's loader
        reads it (one common `step`) before anything is loaded into it."""
        for adam in self._torch_adams():
            for group in adam.param_groups:
                for p in group["params"]:
                    if not adam.state[p]:
                        adam.state[p] = {"step": torch.tensor(0.0),
                                         "exp_avg": torch.zeros_like(p),
                                         "exp_avg_sq": torch.zeros_like(p)}
