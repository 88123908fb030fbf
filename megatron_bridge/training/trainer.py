"""The training loop: check the job, build the model from the converted checkpoint's metadata,
start from it (`finetune`) or resume the save folder's latest checkpoint, then step, log
metrics (rank 0, JSON lines) and save every `save_interval` steps and at the end."""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_bridge import checkpoint
from megatron_bridge.build import build_model
from megatron_bridge.data.indexed import SFTDataset
from megatron_bridge.parallel import model_parallel
from megatron_bridge.training import state
from megatron_bridge.training.batches import Batches
from megatron_bridge.training.job import TrainJob, packed_sequences
from settings.errors import UserError
from megatron_bridge.training.schedule import learning_rate
from megatron_bridge.training.step import Stepper, device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PEAK_FLOPS = float(os.environ.get("RSFT_PEAK_TFLOPS", "989")) * 1e12  # H100 bf16 dense


def read_inputs(job: TrainJob) -> tuple[dict[str, Any], dict[str, Any]]:
    meta = checkpoint.read_metadata(Path(job.checkpoint))
    checkpoint.read_tracker(Path(job.checkpoint))
    stats_path = Path(job.data) / "stats.json"
    if not stats_path.is_file():
        raise UserError(f"{job.data} is not a tokenize artifact (no stats.json); run the tokenize "
                       "stage first")
    return meta, json.loads(stats_path.read_text())


def model_flops(hf: dict[str, Any], lengths: list[list[int]]) -> float:
    """Training FLOPs of a step over rows of packed samples (Megatron's formula, forward +
    backward = 3× forward), attention counted over the real sample lengths (packed samples do
    not attend to each other; causal: half of each square)."""
    h, layers = hf["hidden_size"], hf["num_hidden_layers"]
    heads = hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or h // heads
    ffn = hf["intermediate_size"]
    per_token = layers * (2 * h * head_dim * (heads + 2 * kv) + 2 * heads * head_dim * h
                          + 6 * h * ffn) + 2 * h * hf["vocab_size"]
    tokens = sum(n for row in lengths for n in row)
    attention = layers * 4 * heads * head_dim * sum(n * n for row in lengths for n in row) / 2
    return 3 * (per_token * tokens + attention)


def memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def model_overrides(job: TrainJob, packed: bool) -> dict[str, Any]:
    """TransformerConfig fields the training job sets on top of the architecture's."""
    # Weight-gradient GEMMs accumulating straight into DDP's main_grad: TE's layers do it
    # themselves, megatron's own output layer needs Apex's extension (NGC containers have it;
    # a pip install of TE does not, and megatron-core refuses the flag without it).
    fusion = packed and importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None
    overrides: dict[str, Any] = {"calculate_per_token_loss": True,
                                 "gradient_accumulation_fusion": fusion}
    if job.attention_dropout is not None:
        overrides["attention_dropout"] = job.attention_dropout
    if job.hidden_dropout is not None:
        overrides["hidden_dropout"] = job.hidden_dropout
    if job.recompute != "none":
        overrides["recompute_granularity"] = job.recompute
        if job.recompute == "full":
            overrides.update(recompute_method="uniform", recompute_num_layers=1)
    return overrides


def build_stepper(job: TrainJob, meta: dict[str, Any], resume: int | None) -> Stepper:
    """This rank's model under megatron-core's DDP and optimizer (model-parallel groups must be
    initialised): the converted weights and a fresh optimizer (`resume` None), or model,
    optimizer and RNG of the save folder's iteration `resume`."""
    packed = packed_sequences()
    model = build_model(meta["hf_config"], job.tensor_parallel, job.pipeline_parallel,
                        DTYPES[job.precision], **model_overrides(job, packed)).to(device())
    if resume is None:
        checkpoint.load(model, Path(job.checkpoint))
    # After the weights: the optimizer's master weights are copies of the parameters.
    stepper = Stepper(model, job, meta["vocab_size"], packed)
    if resume is not None:
        state.load(Path(job.save), resume, stepper, meta)
    return stepper


def run(job: TrainJob) -> None:
    meta, stats = read_inputs(job)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    job.check(world, meta, stats)
    hf = meta["hf_config"]
    seq_length = stats["seq_length"]
    with model_parallel(job.tensor_parallel, job.pipeline_parallel, job.seed):
        from megatron.core import parallel_state as ps

        save_dir = Path(job.save)
        start = state.latest_iteration(save_dir)
        stepper = build_stepper(job, meta, start)
        start = start or 0
        trained_meta = {**meta, "dtype": str(DTYPES[job.precision]).split(".")[-1],
                        "tensor_parallel": job.tensor_parallel,
                        "pipeline_parallel": job.pipeline_parallel}
        rank0 = dist.get_rank() == 0
        if rank0:
            attention = ("THD packed sequences (Transformer Engine)" if stepper.packed
                         else "block-diagonal mask (megatron-core local spec)")
            print(f"training: steps {start}..{job.train_iters}, {world} processes "
                  f"(TP {job.tensor_parallel}, PP {job.pipeline_parallel}, "
                  f"DP {ps.get_data_parallel_world_size()}), seq {seq_length}, {job.precision}"
                  f"{', distributed optimizer' if job.use_distributed_optimizer else ''}, "
                  f"attention: {attention}", flush=True)
        batches = Batches(SFTDataset(Path(job.data) / "train"), seq_length, job.global_batch_size,
                          job.micro_batch_size, ps.get_data_parallel_rank(),
                          ps.get_data_parallel_world_size(), job.seed)
        metrics = None
        if rank0:
            save_dir.mkdir(parents=True, exist_ok=True)
            job.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            if job.metrics_path.is_file():  # steps after the resumed checkpoint are redone
                kept = [line for line in job.metrics_path.read_text().splitlines()
                        if json.loads(line)["step"] <= start]
                job.metrics_path.write_text("".join(line + "\n" for line in kept))
            metrics = open(job.metrics_path, "a")
        try:
            for step in range(start, job.train_iters):
                micro = batches.step(step)
                lr = learning_rate(step, lr=job.lr, min_lr=job.min_lr, warmup=job.lr_warmup_iters,
                                   total=job.train_iters, style=job.lr_decay_style)
                began = time.perf_counter()
                result = stepper.step(micro, lr)
                seconds = time.perf_counter() - began
                # This data-parallel rank's tokens and FLOPs, summed over the DP group: the global
                # batch's, counted once.
                lengths = [r for mb in micro for r in mb.lengths]
                work = torch.tensor([sum(map(sum, lengths)), model_flops(hf, lengths)],
                                    dtype=torch.float64, device=device())
                dist.all_reduce(work, group=ps.get_data_parallel_group())
                tokens, flops = work.tolist()
                record = {"step": step + 1, "loss": result["loss"], "lr": lr,
                          "grad_norm": result["grad_norm"], "tokens": int(tokens),
                          "supervised_tokens": result["supervised_tokens"],
                          "seconds": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
                          "memory_gb": round(memory_gb(), 3)}
                if job.device == "cuda":
                    record["mfu"] = round(flops / (seconds * PEAK_FLOPS * world), 4)
                if job.precision == "fp16":
                    record.update(loss_scale=result["loss_scale"], skipped=result["skipped"])
                if metrics and ((step + 1) % job.log_interval == 0 or step + 1 == job.train_iters):
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    print(f"step {step + 1}/{job.train_iters} loss {result['loss']:.4f} "
                          f"lr {lr:.3g} grad_norm {result['grad_norm']:.3f} "
                          f"{record['tokens_per_s']:.0f} tok/s", flush=True)
                if (step + 1) % job.save_interval == 0 or step + 1 == job.train_iters:
                    state.save(save_dir, step + 1, stepper, trained_meta, job.keep_last)
        finally:
            if metrics:
                metrics.close()
