"""The training loop: check the job, build the model from the converted checkpoint's metadata,
start from it (`finetune`) or resume the save folder's latest checkpoint, then step, log
metrics (rank 0, JSON lines) and save every `save_interval` steps and at the end."""

from __future__ import annotations

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
from megatron_bridge.training.job import JobError, TrainJob
from megatron_bridge.training.schedule import learning_rate
from megatron_bridge.training.step import CpuStepper, GpuStepper

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PEAK_FLOPS = float(os.environ.get("RSFT_PEAK_TFLOPS", "989")) * 1e12  # H100 bf16 dense


def read_inputs(job: TrainJob) -> tuple[dict[str, Any], dict[str, Any]]:
    meta = checkpoint.read_metadata(Path(job.checkpoint))
    checkpoint.read_tracker(Path(job.checkpoint))
    stats_path = Path(job.data) / "stats.json"
    if not stats_path.is_file():
        raise JobError(f"{job.data} is not a tokenize artifact (no stats.json); run the tokenize "
                       "stage first")
    return meta, json.loads(stats_path.read_text())


def model_flops(hf: dict[str, Any], lengths: list[list[int]], tokens: int) -> float:
    """Training FLOPs of one step (Megatron's formula, forward + backward = 3× forward), with
    attention cost from the real sample lengths (packed samples do not attend to each other)."""
    h, layers = hf["hidden_size"], hf["num_hidden_layers"]
    heads = hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or h // heads
    ffn = hf["intermediate_size"]
    per_token = layers * (2 * h * head_dim * (heads + 2 * kv) + 2 * heads * head_dim * h
                          + 6 * h * ffn) + 2 * h * hf["vocab_size"]
    attention = layers * 4 * heads * head_dim * sum(n * n for row in lengths for n in row) / 2
    return 3 * (per_token * tokens + attention)


def memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def run(job: TrainJob) -> None:
    meta, stats = read_inputs(job)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    job.check(world, meta, stats)
    hf = meta["hf_config"]
    seq_length = stats["seq_length"]
    with model_parallel(job.tensor_parallel, job.pipeline_parallel, job.seed):
        from megatron.core import parallel_state as ps

        gpu = job.device == "cuda"
        overrides: dict[str, Any] = {"calculate_per_token_loss": True} if gpu else {}
        if gpu and job.recompute != "none":
            overrides.update(recompute_granularity=job.recompute,
                             **({"recompute_method": "uniform", "recompute_num_layers": 1}
                                if job.recompute == "full" else {}))
        model = build_model(hf, job.tensor_parallel, job.pipeline_parallel, DTYPES[job.precision],
                            **overrides)
        if gpu:
            model = model.cuda()
        stepper = (GpuStepper if gpu else CpuStepper)(model, job, meta["vocab_size"])
        save_dir = Path(job.save)
        start = state.latest_iteration(save_dir)
        trained_meta = {**meta, "dtype": str(DTYPES[job.precision]).split(".")[-1],
                        "tensor_parallel": job.tensor_parallel,
                        "pipeline_parallel": job.pipeline_parallel}
        if start is None:
            checkpoint.load(model, Path(job.checkpoint))  # fine-tune: fresh optimizer, step 0
            start = 0
        else:
            state.load(save_dir, start, model, stepper, meta)
        rank0 = dist.get_rank() == 0
        if rank0:
            print(f"training: steps {start}..{job.train_iters}, {world} processes "
                  f"(TP {job.tensor_parallel}, PP {job.pipeline_parallel}, "
                  f"DP {ps.get_data_parallel_world_size()}), seq {seq_length}", flush=True)
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
                tokens = torch.tensor([sum(sum(r) for mb in micro for r in mb.lengths)],
                                      dtype=torch.float64)
                dist.all_reduce(tokens, group=ps.get_data_parallel_group())
                record = {"step": step + 1, "loss": result["loss"], "lr": lr,
                          "grad_norm": result["grad_norm"], "tokens": int(tokens),
                          "supervised_tokens": result["supervised_tokens"],
                          "seconds": round(seconds, 4), "tokens_per_s": round(float(tokens) / seconds, 1),
                          "memory_gb": round(memory_gb(), 3)}
                if gpu:
                    lengths = [r for mb in micro for r in mb.lengths]
                    flops = model_flops(hf, lengths, int(tokens)) * ps.get_data_parallel_world_size()
                    record["mfu"] = round(flops / (seconds * PEAK_FLOPS * world), 4)
                if metrics and ((step + 1) % job.log_interval == 0 or step + 1 == job.train_iters):
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    print(f"step {step + 1}/{job.train_iters} loss {result['loss']:.4f} "
                          f"lr {lr:.3g} grad_norm {result['grad_norm']:.3f} "
                          f"{record['tokens_per_s']:.0f} tok/s", flush=True)
                if (step + 1) % job.save_interval == 0 or step + 1 == job.train_iters:
                    state.save(save_dir, step + 1, model, stepper, trained_meta, job.keep_last)
        finally:
            if metrics:
                metrics.close()
