"""The loss and one optimizer step, on CPU and on GPU.

Loss: cross-entropy on supervised tokens only, normalised per token over the *global* batch —
the sum over every micro-batch and data-parallel rank divided by the total number of supervised
tokens (the seed's `--calculate-per-token-loss`), not a mean of per-micro-batch means.

The two paths share the model, data, loss definition, LR and checkpoints. They differ in:
- CPU (`CpuStepper`): block-diagonal causal attention masks for packed rows, a manual
  micro-batch loop, gradients summed over data-parallel ranks with one gloo all-reduce, global
  grad-norm clipping, torch AdamW (no weight decay on biases and norms).
- GPU (`GpuStepper`): THD `PackedSeqParams` (TE attention, documents never attend to each
  other), megatron-core's schedules (pipeline parallel), Megatron DDP (overlapped grad reduce)
  and Megatron's optimizer (mixed precision, optional DistributedOptimizer).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_bridge.training.batches import MicroBatch
from megatron_bridge.training.job import TrainJob


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    return param.ndim < 2 or name.endswith(".bias")


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
        logits[..., max(vocab_size - start, 0):] = float("-inf")
    return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)


def all_reduce_flat(tensors: list[torch.Tensor], group) -> None:
    """Sum tensors over the group's ranks with one collective (a flat buffer, copied back)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


class CpuStepper:
    def __init__(self, model, job: TrainJob, vocab_size: int):
        from megatron.core import parallel_state as ps

        self.model = model
        self.vocab_size = vocab_size
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in self.named if not no_weight_decay(n, p)],
             "weight_decay": job.weight_decay},
            {"params": [p for n, p in self.named if no_weight_decay(n, p)], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=job.lr, betas=(job.adam_beta1, job.adam_beta2),
                                           eps=job.adam_eps)
        self.clip = job.clip_grad
        self.dp_group = ps.get_data_parallel_group()
        self.tp_group = ps.get_tensor_model_parallel_group()

    def losses(self, mb: MicroBatch) -> torch.Tensor:
        """Per-token cross-entropy [b, s] (vocab-parallel under TP)."""
        logits = self.model(mb.tokens, mb.position_ids, mb.attention_mask())
        return per_token_loss(logits, mb.labels, self.vocab_size)

    def step(self, micro_batches: list[MicroBatch], lr: float) -> dict[str, Any]:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=False)
        tokens = torch.tensor(sum(float(mb.loss_mask.sum()) for mb in micro_batches),
                              dtype=torch.float64)
        dist.all_reduce(tokens, group=self.dp_group)
        denominator = max(tokens.item(), 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for mb in micro_batches:
            loss = (self.losses(mb) * mb.loss_mask).sum()
            (loss / denominator).backward()
            loss_sum += loss.detach().double()
        dist.all_reduce(loss_sum, group=self.dp_group)
        grads = [p.grad for _, p in self.named]
        if dist.get_world_size(self.dp_group) > 1:  # the global sum: already token-normalised
            all_reduce_flat(grads, self.dp_group)
        norm = self.grad_norm()
        if self.clip and norm > self.clip:
            for g in grads:
                g.mul_(self.clip / (norm + 1e-6))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return {"loss": loss_sum.item() / denominator, "grad_norm": norm,
                "supervised_tokens": int(tokens.item())}

    def grad_norm(self) -> float:
        """L2 norm of the whole model's gradient: tensor-parallel shards summed over the TP
        group, replicated parameters (identical on every TP rank) counted once."""
        sharded = torch.zeros((), dtype=torch.float64)
        replicated = torch.zeros((), dtype=torch.float64)
        for _, p in self.named:  # per-tensor norms in fp32 (as Megatron), summed in fp64
            sq = torch.linalg.vector_norm(p.grad).double().pow(2)
            if getattr(p, "tensor_model_parallel", False):
                sharded += sq
            else:
                replicated += sq
        dist.all_reduce(sharded, group=self.tp_group)
        return float((sharded + replicated).sqrt())

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


class GpuStepper:
    """megatron-core's own machinery (imported only here, on GPU)."""

    def __init__(self, model, job: TrainJob, vocab_size: int):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.job = job
        self.vocab_size = vocab_size
        self.module = model
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=True,
            use_distributed_optimizer=job.use_distributed_optimizer,
            overlap_param_gather=job.use_distributed_optimizer)
        self.model = DistributedDataParallel(config=model.config, ddp_config=ddp_config,
                                             module=model)
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=job.lr, min_lr=job.min_lr,
                            weight_decay=job.weight_decay, adam_beta1=job.adam_beta1,
                            adam_beta2=job.adam_beta2, adam_eps=job.adam_eps,
                            clip_grad=job.clip_grad, bf16=job.precision == "bf16",
                            fp16=job.precision == "fp16",
                            use_distributed_optimizer=job.use_distributed_optimizer),
            [self.model])

    def step(self, micro_batches: list[MicroBatch], lr: float) -> dict[str, Any]:
        from megatron.core import parallel_state as ps
        from megatron.core.packed_seq_params import PackedSeqParams
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            mb: MicroBatch = next(data_iterator)
            cu = mb.cu_seqlens().cuda()
            longest = int((cu[1:] - cu[:-1]).max())
            packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                     max_seqlen_q=longest, max_seqlen_kv=longest)
            mask, labels = mb.loss_mask.cuda(), mb.labels.cuda()
            output = model(mb.tokens.cuda(), mb.position_ids.cuda(), None,
                           packed_seq_params=packed)

            def loss_func(logits: torch.Tensor):  # last pipeline stage only
                loss = (per_token_loss(logits, labels, self.vocab_size) * mask).sum()
                count = mask.sum().to(torch.int)
                # calculate_per_token_loss: the schedule divides by the global token count
                return loss, count, {"lm loss": torch.stack([loss.detach(), count.float()])}

            return output, loss_func

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        reports = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[self.model],
            num_microbatches=len(micro_batches), seq_length=micro_batches[0].tokens.shape[1],
            micro_batch_size=micro_batches[0].tokens.shape[0], forward_only=False)
        _, grad_norm, _ = self.optimizer.step()
        totals = torch.zeros(2, device="cuda")
        if ps.is_pipeline_last_stage():
            for r in reports:
                totals += r["lm loss"]
        dist.all_reduce(totals, group=ps.get_data_parallel_group())
        dist.all_reduce(totals, group=ps.get_pipeline_model_parallel_group())
        return {"loss": float(totals[0] / totals[1].clamp(min=1)), "grad_norm": float(grad_norm or 0),
                "supervised_tokens": int(totals[1])}

    def sharded_state_dict(self, model_state: dict[str, Any]) -> dict[str, Any]:
        return self.optimizer.sharded_state_dict(model_state)

    def load_sharded(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
