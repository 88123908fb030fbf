"""What one training run is: written as JSON by the `train` stage (or by hand), read by every rank.

`check()` runs before the model is built, so bad input fails before any step with one line.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from settings.errors import UserError


def packed_sequences() -> bool:
    """Packed rows go in as THD sequences (Transformer Engine's attention on CUDA); otherwise
    with a block-diagonal attention mask (megatron-core's local attention: CPU, or a GPU
    without TE — same numbers, attention memory quadratic in the row length)."""
    from megatron_bridge.build import use_te

    return use_te()


@dataclass
class TrainJob:
    checkpoint: str
    """The converted model: a Megatron checkpoint written by `rsft convert` (fine-tuning start)."""
    data: str
    """The `tokenize` artifact folder (`train-tokens/-mask` indexed datasets + `stats.json`)."""
    save: str
    """Where checkpoints go; a rerun with the same folder resumes from its latest checkpoint."""
    train_iters: int
    global_batch_size: int
    micro_batch_size: int = 1
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    lr: float = 1e-5
    min_lr: float = 1e-6
    lr_warmup_iters: int = 0
    lr_decay_style: str = "cosine"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 | fp16
    loss_scale: float | None = None
    """fp16: a constant loss scale; None: dynamic (Megatron's DynamicGradScaler)."""
    use_distributed_optimizer: bool = False
    device: str = "cpu"  # cpu | cuda
    seed: int = 1234
    save_interval: int = 100
    keep_last: int = 2
    log_interval: int = 1
    recompute: str = "none"  # none | full | selective
    attention_dropout: float | None = None
    """None: the model config's."""
    hidden_dropout: float | None = None
    """None: the model config's (0 for the supported architectures)."""
    metrics: str = ""
    """JSONL file for per-step metrics (default: `<save>/metrics.jsonl`)."""

    @classmethod
    def read(cls, path: Path) -> "TrainJob":
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(data) - known):
            raise UserError(f"{path}: unknown job fields {unknown}")
        return cls(**data)

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @property
    def metrics_path(self) -> Path:
        return Path(self.metrics or Path(self.save) / "metrics.jsonl")

    def check(self, world_size: int, model_meta: dict[str, Any], data_stats: dict[str, Any]) -> None:
        """Everything that can be known wrong before building the model."""
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("train.device is cuda but no GPU is visible; set train.device: cpu "
                           "(or auto) or run on a GPU machine")
        mp = self.tensor_parallel * self.pipeline_parallel
        if world_size % mp:
            raise UserError(f"{world_size} processes cannot hold TP×PP = {mp}; set "
                           "train.nproc_per_node × nnodes to a multiple of it")
        dp = world_size // mp
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise UserError(f"train.global_batch_size={self.global_batch_size} is not divisible by "
                           f"micro_batch_size × data-parallel size = {self.micro_batch_size} × {dp}")
        if self.precision == "fp16" and self.loss_scale is not None and self.loss_scale <= 1:
            raise UserError(f"train.loss_scale={self.loss_scale}: fp16 gradients underflow without "
                           "loss scaling; leave loss_scale unset (dynamic) or set it above 1")
        if self.device == "cuda" and self.micro_batch_size != 1 and packed_sequences():
            raise UserError("train.micro_batch_size must be 1 with Transformer Engine: a packed row "
                           "is one THD sequence batch; raise global_batch_size instead")
        hf = model_meta["hf_config"]
        from megatron_bridge.build import check_layout

        try:
            check_layout(hf, self.tensor_parallel, self.pipeline_parallel)
        except ValueError as e:
            raise UserError(f"train.{e}") from None
        tok = data_stats["tokenizer"]
        ours, theirs = tok.get("eos_id"), hf.get("eos_token_id")
        if ours is not None and theirs is not None and ours not in (
                theirs if isinstance(theirs, list) else [theirs]):
            raise UserError(f"the data was tokenized with a tokenizer whose EOS is {ours}, but "
                           f"the model's config says {theirs}: re-tokenize with this model's "
                           "tokenizer")
        if tok["vocab_size"] > model_meta["vocab_size"]:
            raise UserError(f"the data's tokenizer has {tok['vocab_size']} tokens, the model only "
                           f"{model_meta['vocab_size']}: data and model are not from one tokenizer")
        max_pos = hf.get("max_position_embeddings")
        if max_pos and data_stats["seq_length"] > max_pos:
            raise UserError(f"the data's seq_length {data_stats['seq_length']} is above the model's "
                           f"max_position_embeddings {max_pos}; re-tokenize with a shorter one")
        rows = data_stats["splits"]["train"]["rows"]
        if rows < self.global_batch_size:
            raise UserError(f"the data has {rows} rows, fewer than one global batch "
                           f"({self.global_batch_size}); lower train.global_batch_size")
