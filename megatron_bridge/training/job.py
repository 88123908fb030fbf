"""What one training run is: the `train` settings section, whole, plus what the settings cannot
know (where the inputs and outputs are, the device `auto` resolved to). Written as JSON by the
`train` stage (or by hand), read by every rank; pydantic validates the settings there, once.

`check()` holds only what needs the running job (the launched world, the GPU, the model and the
data); it runs before the model is built, so bad input fails before any step with one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from settings.errors import UserError
from settings.loader import format_validation_error
from settings.models import TrainSettings

if TYPE_CHECKING:
    from megatron_bridge.host import Kernels


def read_metrics(path: Path, until: int | None = None) -> list[dict[str, Any]]:
    """The records of `metrics.jsonl` in step order, each step's latest, up to step `until`."""
    records: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return [records[s] for s in sorted(records) if until is None or s <= until]


class TrainJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    train: TrainSettings
    """The `train` settings section, whole: every training setting and its one default."""
    checkpoint: str
    """The converted model: a Megatron checkpoint written by `rsft convert` (fine-tuning start)."""
    data: str
    """The `tokenize` artifact folder (`train-tokens/-mask` indexed datasets + `stats.json`)."""
    save: str
    """Where checkpoints go; a rerun with the same folder resumes from its latest checkpoint."""
    device: Literal["cpu", "cuda"]
    """What `train.device` resolved to where the job was written (`auto` cannot be decided on
    the ranks: a cluster's nodes may have GPUs the writer has not)."""
    metrics: str = ""
    """JSONL file for per-step metrics (default: `<save>/metrics.jsonl`)."""
    keep: list[int] = []
    """Iterations whose checkpoints are never pruned (`train.keep_last` counts the others): the
    ones the pipeline exports and evaluates after training."""

    @model_validator(mode="after")
    def _device_resolves_the_setting(self) -> "TrainJob":
        if self.train.device not in ("auto", self.device):
            raise ValueError(f"device {self.device} contradicts train.device {self.train.device}")
        return self

    @classmethod
    def read(cls, path: Path) -> "TrainJob":
        """The job file, validated; anything wrong in it is one line."""
        try:
            return cls.model_validate_json(Path(path).read_text())
        except OSError as e:
            raise UserError(f"cannot read the training job {path}: {e.strerror}") from None
        except ValidationError as e:
            raise UserError("; ".join(format_validation_error(e, str(path)).splitlines())) from None

    def write(self, path: Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")

    @property
    def metrics_path(self) -> Path:
        return Path(self.metrics or Path(self.save) / "metrics.jsonl")

    @property
    def run_folder(self) -> Path:
        """The run's scratch folder, beside metrics.jsonl: the trackers' files
        (`tensorboard/`, `wandb/`, `mlruns/`, `tracking.json`)."""
        return self.metrics_path.parent

    def check(self, world_size: int, model_meta: dict[str, Any],
              data_stats: dict[str, Any]) -> "Kernels":
        """Everything that can be known wrong before building the model (the settings' own
        consistency was validated with them); returns the kernels the model is built with."""
        import torch

        from megatron_bridge.build import check_layout, model_kernels

        t = self.train
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("train.device is cuda but no GPU is visible; set train.device: cpu "
                           "(or auto) or run on a GPU machine")
        # The settings checked TP×PP and the batch against nproc_per_node × nnodes: hold the
        # launch to it.
        if world_size != t.nproc_per_node * t.nnodes:
            raise UserError(f"{world_size} processes were launched for a job of "
                            f"train.nproc_per_node × nnodes = {t.nproc_per_node} × {t.nnodes}; "
                            "launch it with that many")
        hf = model_meta["hf_config"]
        try:
            check_layout(hf, t.tensor_parallel, t.pipeline_parallel)
        except ValueError as e:
            raise UserError(f"train.{e}") from None
        tok = data_stats["tokenizer"]
        ours, theirs = tok.get("eos_id"), hf.get("eos_token_id")
        if ours is not None and theirs is not None and ours not in (
                theirs if isinstance(theirs, list) else [theirs]):
            raise UserError(f"the data was tokenized with a tokenizer whose EOS is {ours}, but "
                           f"the model's config says {theirs}: re-tokenize with this model's "
                           "tokenizer")
        # Added tokens beyond the model's rows (ChatML's `<|im_end|>`) grow its embedding
        # (`grown_vocabulary`); a larger base vocabulary is another tokenizer.
        if tok.get("base_vocab_size", tok["vocab_size"]) > model_meta["vocab_size"]:
            raise UserError(f"the data's tokenizer has {tok['vocab_size']} tokens, the model only "
                           f"{model_meta['vocab_size']}: data and model are not from one tokenizer")
        max_pos = hf.get("max_position_embeddings")
        if max_pos and data_stats["seq_length"] > max_pos:
            raise UserError(f"the data's seq_length {data_stats['seq_length']} is above the model's "
                           f"max_position_embeddings {max_pos}; re-tokenize with a shorter one")
        test = data_stats["splits"].get("test", {}).get("rows", 0)
        if t.eval_interval and not test:
            raise UserError(f"train.eval_interval={t.eval_interval} needs a test split, and the "
                            "data has none: set dataset.test_split (e.g. 0.05), or "
                            "train.eval_interval: 0")
        from megatron_bridge.training.tracking import check_installed

        check_installed(t.report_to)
        rows = data_stats["splits"]["train"]["rows"]
        if rows < t.global_batch_size:
            raise UserError(f"the data has {rows} rows, fewer than one global batch "
                           f"({t.global_batch_size}); lower train.global_batch_size")
        # Packed rows (the default) hold several samples; unpacked ones one and its padding.
        kernels = model_kernels(hf, training=True, document_mask=data_stats.get("pack", True),
                                forced=t.kernels)
        if kernels.transformer_engine and t.micro_batch_size != 1:
            raise UserError("train.micro_batch_size must be 1 with Transformer Engine: a packed row "
                           "is one THD sequence batch; raise global_batch_size instead (or set "
                           "train.kernels.transformer_engine: off)")
        return kernels
