"""The training loop: check the job, build the model from the converted checkpoint's metadata,
start from it (`finetune`) or resume the save folder's latest checkpoint, then step, log
metrics (rank 0: JSON lines and the experiment trackers of `report_to`), measure the validation
loss on the test split every `eval_interval` steps and save every `save_interval` steps and at
the end."""

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
from megatron_bridge.build import build_model, model_kernels
from megatron_bridge.data.indexed import SFTDataset
from megatron_bridge.host import Host, Kernels
from megatron_bridge.parallel import model_parallel
from megatron_bridge.training import state
from megatron_bridge.training.batches import Batches, Validation
from megatron_bridge.training.job import TrainJob, read_metrics
from megatron_bridge.training.mfu import model_flops, peak_flops
from megatron_bridge.training.schedule import learning_rate
from megatron_bridge.training.step import Stepper, device
from megatron_bridge.training.tracking import open_trackers
from settings.errors import UserError
from settings.models import TrainSettings

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def read_inputs(job: TrainJob) -> tuple[dict[str, Any], dict[str, Any]]:
    meta = checkpoint.read_metadata(Path(job.checkpoint))
    checkpoint.read_tracker(Path(job.checkpoint))
    stats_path = Path(job.data) / "stats.json"
    if not stats_path.is_file():
        raise UserError(f"{job.data} is not a tokenize artifact (no stats.json); run the tokenize "
                       "stage first")
    return meta, json.loads(stats_path.read_text())


def grown_vocabulary(meta: dict[str, Any], tokens: int) -> dict[str, Any]:
    """The converted checkpoint's metadata for a tokenizer of `tokens` tokens: unchanged if they
    fit its embedding, else grown to them (tokens the patch added, such as ChatML's
    `<|im_end|>`). Loading fills the rows the checkpoint has and zeroes the rest (megatron-core
    loads embeddings across vocabulary paddings); the trained checkpoints, and so the export,
    carry the grown size."""
    if tokens <= meta["vocab_size"]:
        return meta
    return {**meta, "vocab_size": tokens, "hf_config": {**meta["hf_config"], "vocab_size": tokens}}


def memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def model_overrides(settings: TrainSettings) -> dict[str, Any]:
    """TransformerConfig fields the training job sets on top of the architecture's."""
    overrides: dict[str, Any] = {"calculate_per_token_loss": True}
    if settings.attention_dropout is not None:
        overrides["attention_dropout"] = settings.attention_dropout
    if settings.hidden_dropout is not None:
        overrides["hidden_dropout"] = settings.hidden_dropout
    if settings.recompute != "none":
        overrides["recompute_granularity"] = settings.recompute
        if settings.recompute == "full":
            overrides.update(recompute_method="uniform", recompute_num_layers=1)
    return overrides


def build_stepper(job: TrainJob, meta: dict[str, Any], resume: int | None,
                  kernels: Kernels | None = None) -> Stepper:
    """This rank's model under megatron-core's DDP and optimizer (model-parallel groups must be
    initialised): the converted weights and a fresh optimizer (`resume` None), or model,
    optimizer and RNG of the save folder's iteration `resume`. `kernels`: what `job.check`
    decided (default: this host's for packed rows)."""
    t = job.train
    kernels = kernels or model_kernels(meta["hf_config"], training=True, forced=t.kernels)
    model = build_model(meta["hf_config"], t.tensor_parallel, t.pipeline_parallel,
                        DTYPES[t.precision], kernels=kernels, **model_overrides(t)).to(device())
    if resume is None:
        checkpoint.load(model, Path(job.checkpoint))
    # After the weights: the optimizer's master weights are copies of the parameters.
    stepper = Stepper(model, t, meta["vocab_size"], thd=kernels.transformer_engine)
    if resume is not None:
        state.load(Path(job.save), resume, stepper, meta)
    return stepper


def trained_metadata(meta: dict[str, Any], settings: TrainSettings) -> dict[str, Any]:
    """The converted checkpoint's metadata as the saved checkpoints have it: their dtype and
    layout."""
    return {**meta, "dtype": str(DTYPES[settings.precision]).split(".")[-1],
            "tensor_parallel": settings.tensor_parallel,
            "pipeline_parallel": settings.pipeline_parallel}


def banner(job: TrainJob, start: int, world: int, seq_length: int, kernels: Kernels) -> str:
    """The `training:` line (rank 0): steps, layout, precision, spec and kernels."""
    from megatron.core import parallel_state as ps

    t = job.train
    return (f"training: steps {start}..{t.train_iters}, {world} processes "
            f"(TP {t.tensor_parallel}, PP {t.pipeline_parallel}, "
            f"DP {ps.get_data_parallel_world_size()}), seq {seq_length}, {t.precision}"
            f"{', distributed optimizer' if t.use_distributed_optimizer else ''}, "
            f"{kernels.summary()}")


def due(done: int, interval: int, settings: TrainSettings) -> bool:
    """Every `interval` steps, and after the last."""
    return done % interval == 0 or done == settings.train_iters


def should_log(done: int, settings: TrainSettings) -> bool:
    return due(done, settings.log_interval, settings)


def should_save(done: int, settings: TrainSettings) -> bool:
    return due(done, settings.save_interval, settings)


def should_validate(done: int, settings: TrainSettings) -> bool:
    return settings.eval_interval > 0 and due(done, settings.eval_interval, settings)


TRACKED = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
           "tokens_per_s": "train/tokens_per_s", "supervised_tokens": "train/supervised_tokens",
           "memory_gb": "train/memory_gb", "mfu": "train/mfu", "loss_scale": "train/loss_scale",
           "val_loss": "val/loss", "val_tokens": "val/tokens"}
"""metrics.jsonl fields → tracker scalar names (those present in a step's record)."""


def scalars(record: dict[str, Any]) -> dict[str, float]:
    return {name: float(record[key]) for key, name in TRACKED.items() if key in record}


class MetricsLog:
    """Rank 0's per-step records: JSON lines in `path` and a `step …` line printed for each.

    On a resume the steps after the checkpoint are trained again: their old records go. Records
    past this run's end stay: a longer run of the same lineage trained them
    (`job.read_metrics` orders them)."""

    def __init__(self, path: Path, total: int, resumed_at: int):
        self.total = total
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in (read_metrics(path) if path.is_file() else [])
                if not resumed_at < r["step"] <= total]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        # What the earlier sessions trained up to the checkpoint, for trackers that lost some.
        self.earlier = {r["step"]: r for r in kept if r["step"] <= resumed_at}
        self.file = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        val = f" val_loss {record['val_loss']:.4f}" if "val_loss" in record else ""
        print(f"step {record['step']}/{self.total} loss {record['loss']:.4f}{val} "
              f"lr {record['lr']:.3g} grad_norm {record['grad_norm']:.3f} "
              f"{record['tokens_per_s']:.0f} tok/s", flush=True)

    def close(self) -> None:
        self.file.close()


def batch_work(micro, hf: dict[str, Any]) -> tuple[int, float]:
    """Collective over the data-parallel group: the global batch's tokens and model FLOPs (each
    DP rank's summed, so counted once whatever the layout)."""
    from megatron.core import parallel_state as ps

    lengths = [r for mb in micro for r in mb.lengths]
    work = torch.tensor([sum(map(sum, lengths)), model_flops(hf, lengths)],
                        dtype=torch.float64, device=device())
    dist.all_reduce(work, group=ps.get_data_parallel_group())
    tokens, flops = work.tolist()
    return int(tokens), flops


def record(done: int, result: dict[str, Any], lr: float, seconds: float, tokens: int,
           flops: float, job: TrainJob, world: int, peak: float | None) -> dict[str, Any]:
    """One step's metrics line; MFU against `peak` FLOP/s per process (a known GPU), the loss
    scale and skipped flag in fp16."""
    metrics = {"step": done, "loss": result["loss"], "lr": lr, "grad_norm": result["grad_norm"],
               "tokens": tokens, "supervised_tokens": result["supervised_tokens"],
               "seconds": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
               "memory_gb": round(memory_gb(), 3)}
    if peak:
        metrics["mfu"] = round(flops / (seconds * peak * world), 4)
    if job.train.precision == "fp16":
        metrics.update(loss_scale=result["loss_scale"], skipped=result["skipped"])
    return metrics


def run(job: TrainJob) -> None:
    meta, stats = read_inputs(job)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    kernels = job.check(world, meta, stats)
    converted, meta = meta["vocab_size"], grown_vocabulary(meta, stats["tokenizer"]["vocab_size"])
    if meta["vocab_size"] != converted and int(os.environ.get("RANK", "0")) == 0:
        print(f"training: the embedding grows from {converted} to {meta['vocab_size']} rows for "
              "the tokens the tokenizer added; the new rows start at zero", flush=True)
    t, save_dir = job.train, Path(job.save)
    with model_parallel(t.tensor_parallel, t.pipeline_parallel, t.seed):
        from megatron.core import parallel_state as ps

        resume = state.resume_point(save_dir, t.train_iters)
        stepper = build_stepper(job, meta, resume, kernels)
        start = resume or 0
        batches = Batches(SFTDataset(Path(job.data) / "train"), stats["seq_length"],
                          t.global_batch_size, t.micro_batch_size, ps.get_data_parallel_rank(),
                          ps.get_data_parallel_world_size(), t.seed)
        validation = None
        if t.eval_interval:
            validation = Validation(SFTDataset(Path(job.data) / "test"), stats["seq_length"],
                                    t.eval_iters, t.global_batch_size,
                                    ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
        log = trackers = None
        peak = None
        if dist.get_rank() == 0:
            print(banner(job, start, world, stats["seq_length"], kernels), flush=True)
            if job.device == "cuda":
                peak = peak_flops(Host.probe().device_name, t.precision)
                if peak is None:
                    print(f"training: no MFU: the peak FLOP/s of {Host.probe().device_name} is "
                          "not in megatron_bridge/training/mfu.py; set RSFT_PEAK_TFLOPS",
                          flush=True)
            save_dir.mkdir(parents=True, exist_ok=True)
            log = MetricsLog(job.metrics_path, t.train_iters, start)
            if t.report_to:
                trackers = open_trackers(t, job.run_folder, t.tracking.run_name
                                         or f"rsft-{job.run_folder.name}", start)
                trackers.catch_up({s: scalars(r) for s, r in log.earlier.items()})
        try:
            for step in range(start, t.train_iters):
                micro = batches.step(step)
                lr = learning_rate(step, lr=t.lr, min_lr=t.min_lr, warmup=t.lr_warmup_iters,
                                   total=t.decay_iters or t.train_iters, style=t.lr_decay_style)
                began = time.perf_counter()
                result = stepper.step(micro, lr)
                seconds = time.perf_counter() - began
                tokens, flops = batch_work(micro, meta["hf_config"])
                done = step + 1
                val = None
                # Every rank, one holding no validation row too: the sums are collectives.
                if validation is not None and should_validate(done, t):
                    val = stepper.evaluate(validation.micro_batches(), len(validation),
                                           stats["seq_length"])
                if log and (should_log(done, t) or val):
                    metrics = record(done, result, lr, seconds, tokens, flops, job, world, peak)
                    if val:
                        metrics.update(val_loss=val[0], val_tokens=val[1])
                    log.write(metrics)
                    if trackers:
                        trackers.log(done, scalars(metrics))
                if should_save(done, t):
                    state.save(save_dir, done, stepper, trained_metadata(meta, t), t.keep_last,
                               set(job.keep))
        finally:
            if log:
                log.close()
            if trackers:
                trackers.close()
