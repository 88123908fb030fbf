"""Typed settings for the whole pipeline: one pydantic model per stage, one root model.

Every field is documented by the docstring under it (pydantic reads them as descriptions, so they
show in `rsft settings show --docs`, the JSON schema and the Prefect UI). Unknown keys are errors.
Fields marked `affects_key=False` never change a stage's artifact key (secrets, verbosity).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, field_validator,
                      model_serializer, model_validator)

HF_SOURCE = re.compile(r"^hf://(?P<repo>[\w.\-]+/[\w.\-]+)(?:@(?P<revision>[\w.\-/]+))?$")
BUILTIN_SOURCE = re.compile(r"^builtin:(?P<name>[\w.\-]+)$")


def not_in_key(**kwargs: Any) -> Any:
    """A field that does not change the artifact key (secrets, logging)."""
    return Field(json_schema_extra={"affects_key": False}, **kwargs)


def not_in_lineage(**kwargs: Any) -> Any:
    """A `train` field that is part of the train artifact's key but does not change the weights
    at any step (the run's length, checkpoint cadence, validation): left out of the training
    run's lineage, so runs that differ only in it share one scratch folder and continue each
    other."""
    return Field(json_schema_extra={"lineage": False}, **kwargs)


class Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_assignment=True, frozen=False
    )


class DownloadSettings(Strict):
    """Stage `download`: fetch the base HF model folder."""

    source: str = not_in_key(default="builtin:tiny-qwen2")
    """Where the model comes from: `hf://org/name@revision` (Hugging Face Hub; a branch or tag is
    resolved to its commit and pinned), a local HF model directory, or `builtin:tiny-qwen2` (a
    deterministic random-weight Qwen2 shaped like DeepSeek-R1-Distill-Qwen-1.5B, real tokenizer).
    The artifact key follows what the source resolves to (commit, file stats), not its spelling."""

    allow_pickle: bool = False
    """Accept pickle weights (`*.bin`, `*.pt`, `*.pth`). They can run code when loaded, so only
    safetensors are taken unless this is true."""

    hf_token_secret: str | None = not_in_key(default=None)
    """Name of a Prefect Secret block holding a Hugging Face token. Without it `HF_TOKEN` (or the
    huggingface_hub login) is used. The token is never logged or stored in artifacts."""

    @field_validator("source")
    @classmethod
    def _source_form(cls, v: str) -> str:
        if v.startswith("hf://") and not HF_SOURCE.match(v):
            raise ValueError("expected hf://org/name or hf://org/name@revision")
        if v.startswith("builtin:") and not BUILTIN_SOURCE.match(v):
            raise ValueError("expected builtin:NAME, e.g. builtin:tiny-qwen2")
        return v


class TokenRename(Strict):
    """Turn one added token into another (Thinkless: `<|quad_start|>` → `<short>`)."""

    id: int
    """Token id to edit."""
    original: str
    """Content the id must have before patching (anything else is refused)."""
    content: str
    """Content after patching."""
    special: bool = False
    """Whether the patched token is special (special tokens vanish with skip_special_tokens)."""


class PatchTokenizerSettings(Strict):
    """Stage `patch_tokenizer`: settings-driven edits of tokenizer.json / tokenizer_config.json."""

    renames: list[TokenRename] = Field(
        default_factory=lambda: [
            TokenRename(id=151650, original="<|quad_start|>", content="<short>", special=False)
        ]
    )
    """Added tokens to rename. Default: id 151650 `<|quad_start|>` becomes the non-special control
    token `<short>` (the same name in both files)."""

    keep_reasoning: bool = True
    """Keep full `<think>…</think>` traces in assistant turns (removes the R1 template's
    `content.split('</think>')[-1]`, which would train on answers without their reasoning)."""

    generation_prompt_suffix: str | None = ""
    """What follows the assistant tag in the generation prompt. `""` (default): nothing, so the
    model picks `<think>` or `<short>` itself, exactly as in training data; `"\\n"`: the seed's
    template; null: leave the template's generation prompt as it is (R1: `<think>\\n`). The
    `tokenize` stage trains only with a generation prompt that is a prefix of the assistant turn
    (else inference prompts differ from training), so only `""` works for `<think>`/`<short>`
    answers."""

    chat_template_file: Path | None = None
    """Replace the chat template with the Jinja template in this file (applied before the edits
    above, which are then checked against it). Without it, a tokenizer that has no chat template
    gets ChatML (open-r1's default), `<|im_start|>`/`<|im_end|>` added as special tokens if
    missing."""

    single_tokens: list[str] = Field(default_factory=lambda: ["<think>", "</think>"])
    """Strings that must each encode to exactly one token after patching (checked)."""


class ConvertSettings(Strict):
    """Stage `convert` (HF → Megatron torch_dist): parallel layout of the converted checkpoint."""

    tensor_parallel: int = Field(default=1, ge=1)
    """Tensor-parallel size (must divide the attention heads and KV groups)."""
    pipeline_parallel: int = Field(default=1, ge=1)
    """Pipeline-parallel size (must divide the number of layers)."""
    dtype: Literal["source", "bfloat16", "float16", "float32"] = "source"
    """Parameter dtype of the checkpoint; `source` keeps the HF model's dtype."""
    verify: bool = True
    """Compare the checkpoint's logits with transformers' on real-tokenizer prompts; the stage
    fails (and publishes nothing) beyond the tolerances below."""
    max_abs_diff: float = Field(default=1e-4, gt=0)
    """Largest |Δlogit| allowed. Both models compute in float32 from the converted weights (a
    bf16 checkpoint is upcast), so any gap is a conversion error, not low-precision noise."""
    min_top1_agreement: float = Field(default=0.99, ge=0, le=1)
    """Smallest share of positions where both pick the same next token."""
    timeout_minutes: float = not_in_key(default=120, gt=0)
    """Kill the conversion (all its processes) after this long."""


ROLES = ("system", "user", "assistant")


class DatasetSource(Strict):
    """One source of a dataset mixture."""

    path: str
    """`hf://org/name@revision` (a Hub dataset; the revision is resolved to a commit and pinned),
    a local JSON / JSONL / Parquet file or a folder of them, or `builtin:openmathreasoning-r1-64`
    (the 64 real DeepSeek-R1 traces shipped in `examples/data`)."""
    weight: float = Field(default=1.0, gt=0)
    """How much of the source to use: below 1 keeps that fraction of its rows (seeded sample,
    without replacement), above 1 upsamples (2.5 = every row twice plus a seeded half)."""
    name: str | None = None
    """Hub dataset configuration (the `name` of `datasets.load_dataset`)."""
    split: str = "train"
    """Split to read (Hub datasets and local folders with split-named files)."""
    fields: dict[str, str] = Field(default_factory=dict)
    """Columns → roles for flat records, e.g. `{problem: user, generated_solution: assistant}`;
    or chat columns → `messages`, e.g. `{conversations: messages}` (several are joined in this
    order: `{prompt: messages, completion: messages}`). Empty: detected — a `messages` or
    `conversations` column (roles `role`/`content` or ShareGPT `from`/`value`), else TRL's
    `prompt` + `completion` (lists of messages: joined; text: user and assistant), else
    `instruction` (+ `input`) → user and `output` → assistant (the seed's format)."""

    @field_validator("path")
    @classmethod
    def _path_form(cls, v: str) -> str:
        if v.startswith("hf://") and not HF_SOURCE.match(v):
            raise ValueError("expected hf://org/name or hf://org/name@revision")
        if v.startswith("builtin:") and not BUILTIN_SOURCE.match(v):
            raise ValueError("expected builtin:NAME, e.g. builtin:openmathreasoning-r1-64")
        return v

    @field_validator("fields")
    @classmethod
    def _field_roles(cls, v: dict[str, str]) -> dict[str, str]:
        allowed = (*ROLES, "messages")
        if bad := [f"{k}: {r}" for k, r in v.items() if r not in allowed]:
            raise ValueError(f"{', '.join(bad)}: a field maps to one of {', '.join(allowed)}")
        roles = list(v.values())
        if "messages" in roles and any(r != "messages" for r in roles):
            raise ValueError("map chat columns to `messages`, or flat columns to roles, not both")
        if "messages" not in roles and roles and "assistant" not in roles:
            raise ValueError("no field maps to `assistant`: there would be nothing to train on")
        return v


class HybridSettings(Strict):
    """Thinkless warm-up data: short answers made from long reasoning answers."""

    enabled: bool = False
    """Build `<short>` samples from `<think>…</think>` answers."""
    ratio: float = Field(default=0.5, ge=0, le=1)
    """Share of the eligible samples (answers with a closed `</think>`) that get a short form."""
    keep_long: bool = True
    """Keep the long answer too (a short and a long sample per chosen problem), as the Thinkless
    authors paired them; false replaces it."""
    control_token: str = "<short>"
    """Prefix of a short answer (then a newline, then the text after `</think>`)."""
    seed: int = 0
    """Which samples get a short form."""


class DatasetSettings(Strict):
    """Stage `dataset`: sources and mixture of the SFT data, normalised to chat messages."""

    sources: list[DatasetSource] = Field(min_length=1, default_factory=lambda: [DatasetSource(
        path="builtin:openmathreasoning-r1-64",
        fields={"problem": "user", "generated_solution": "assistant"})])
    """The mixture; all selected rows are shuffled together with `seed`. Default: the built-in
    64 real R1 traces."""
    test_split: float = Field(default=0.0, ge=0)
    """Held-out test rows carved from the shuffled mixture: a fraction (<1) or a count (≥1)."""
    seed: int = 1234
    """Shuffle and sampling seed."""
    hybrid: HybridSettings = Field(default_factory=HybridSettings)
    on_bad_sample: Literal["error", "skip"] = "error"
    """A record that cannot be used (malformed JSON line, non-UTF-8 bytes, missing field, empty
    assistant answer, unknown role): `error` stops with its file and line; `skip` drops it and
    counts it by reason in the statistics."""


class TokenizeSettings(Strict):
    """Stage `tokenize`: chat template, response-only labels, packing, Megatron indexed datasets."""

    seq_length: int = Field(default=16384, ge=8)
    """Training sequence length (tokens per packed row)."""
    pack: bool = True
    """Best-fit-decreasing packing of whole samples over the whole dataset into `seq_length`
    rows (samples keep their boundaries; training never lets them attend to each other); false
    gives the seed's layout, one sample per row."""
    overlong: Literal["drop", "truncate", "error"] = "drop"
    """Samples longer than `seq_length`: `drop` them, `truncate` them (their EOS is lost; counted
    and flagged), or stop with an `error`. Always counted in the statistics."""
    assistant_turns: Literal["all", "last"] = "all"
    """Multi-turn samples: supervise every assistant turn, or only the last."""
    supervise_control_token: bool = True
    """Whether a leading control token of the answer (one of `control_tokens`) is in the loss.
    True (the seed): the model learns to choose its mode."""
    control_tokens: list[str] = Field(default_factory=lambda: ["<think>", "<short>"])
    """Mode tokens an answer may start with."""
    workers: int = not_in_key(default=0, ge=0)
    """Tokenizer processes (0 = one per CPU core). The output bytes do not depend on it."""


class SlurmLaunchSettings(Strict):
    """`train.launcher: slurm`: the flow (its Prefect worker) runs inside a Slurm allocation of
    `train.nnodes` nodes (see deployments/slurm/); the stage runs one torchrun agent per node with
    `srun`. Never part of an artifact key."""

    srun_args: list[str] = not_in_key(default_factory=list)
    """Extra `srun` flags, e.g. `["--gpus-per-node=8", "--cpus-per-task=64"]`."""


class KubernetesLaunchSettings(Strict):
    """`train.launcher: kubernetes`: the stage creates a Kubeflow PyTorchJob (one pod per node),
    streams its master's log and waits for it. The workdir must be a shared volume mounted at the
    same path in the pods. Never part of an artifact key."""

    image: str = not_in_key(default="")
    """Container image with this project installed (required for this launcher)."""
    namespace: str = not_in_key(default="default")
    """Namespace of the PyTorchJob."""
    volume_claim: str = not_in_key(default="")
    """ReadWriteMany PersistentVolumeClaim whose root is the workdir, mounted in the pods at the
    workdir's absolute path, the same path as on the worker (required)."""
    gpus_per_pod: int | None = not_in_key(default=None, ge=0)
    """`nvidia.com/gpu` limit per pod (default: `nproc_per_node` on CUDA, 0 on CPU; fewer than
    `nproc_per_node` on CUDA is refused)."""
    service_account: str | None = not_in_key(default=None)
    """Service account of the pods."""
    node_selector: dict[str, str] = not_in_key(default_factory=dict)
    """Node labels the pods must match."""
    kubectl: str = not_in_key(default="kubectl")
    """The kubectl executable (its current context selects the cluster; it needs pytorchjobs
    get/create/patch/delete, pods get/list and pods/log get)."""


class TrackingSettings(Strict):
    """Where `train.report_to` sends the metrics (names and places only: never part of an
    artifact key)."""

    project: str = not_in_key(default="reasoning-sft")
    """W&B project and MLflow experiment name."""
    run_name: str | None = not_in_key(default=None)
    """Name of the tracking run; null: `rsft-<train key>` (the stage's scratch folder), so a
    rerun that resumes training continues the same run."""
    tags: list[str] = not_in_key(default_factory=list)
    """Tags of the W&B / MLflow run."""
    wandb_entity: str | None = not_in_key(default=None)
    """W&B team or user (null: your default entity). `WANDB_MODE=offline` writes the run under
    the scratch folder's `wandb/` without any network (`wandb sync` uploads it later)."""
    mlflow_tracking_uri: str | None = not_in_key(default=None)
    """MLflow tracking server or store; null: a local file store `mlruns/` in the training
    scratch folder (no network; `mlflow ui --backend-store-uri <it>` shows it)."""


# YAML reads a bare on/off as true/false: take both spellings.
Switch = Annotated[Literal["auto", "on", "off"], BeforeValidator(
    lambda v: ("on" if v else "off") if isinstance(v, bool) else v)]


class KernelSettings(Strict):
    """The layer spec and fused kernels of the training model. `auto` (every default) decides
    from what the host running the ranks has (`megatron_bridge/host.py`): a flag is on only
    where the kernel it needs imports. `on` where that kernel is absent stops the run before
    any step, naming the kernel; `off` always works (e.g. to rule a kernel out while debugging
    numerics). They change how a step is computed, not what (the same math up to rounding), so
    no artifact key or training lineage depends on them, and a run resumes across hosts with
    other kernels."""

    transformer_engine: Switch = "auto"
    """Transformer Engine's layer spec with THD packed attention (needs TE on a CUDA host);
    `off`: megatron-core's local spec with a block-diagonal attention mask."""
    persist_layer_norm: Switch = "auto"
    """Apex's persistent LayerNorm kernel (LayerNorm models on the local spec only)."""
    masked_softmax_fusion: Switch = "auto"
    """The Megatron-LM / Apex fused attention softmax (local spec; never with packed rows,
    whose block-diagonal mask its causal kernel ignores)."""
    bias_activation_fusion: Switch = "auto"
    """megatron-core's compiled SwiGLU/GeLU fusion (torch.compile; `auto`: on with CUDA)."""
    bias_dropout_fusion: Switch = "auto"
    """megatron-core's compiled bias-dropout-add (torch.compile; `auto`: on with CUDA)."""
    apply_rope_fusion: Switch = "auto"
    """Transformer Engine's fused rotary embedding."""
    gradient_accumulation_fusion: Switch = "auto"
    """Weight-gradient GEMMs accumulating straight into the fp32 gradient buffer (Apex's
    `fused_weight_gradient_mlp_cuda`)."""

    CUDA_ONLY: ClassVar[tuple[str, ...]] = (
        "transformer_engine", "persist_layer_norm", "masked_softmax_fusion", "apply_rope_fusion",
        "gradient_accumulation_fusion")
    """The switches whose kernels exist only on CUDA (the compiled fusions also build on CPU)."""


class TrainSettings(Strict):
    """Stage `train`: megatron-core SFT under torchrun."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`cpu` (gloo), `cuda` (NCCL; Transformer Engine's layers and packed THD attention when it is
    installed), or `auto`. Both run the same megatron-core step (DDP, optimizer, schedules)."""
    nproc_per_node: int = Field(default=1, ge=1)
    """Processes (GPUs) per node."""
    nnodes: int = Field(default=1, ge=1)
    """Nodes in the torchrun job: one torchrun agent per node, meeting at a c10d rendezvous."""
    launcher: Literal["local", "slurm", "kubernetes"] = not_in_key(default="local")
    """How the agents start: `local` (all `nnodes` agents on this machine: one node, or a
    multi-node rehearsal on loopback), `slurm` (`srun` one agent per node of the allocation the
    flow runs in), `kubernetes` (a PyTorchJob created and watched from the task)."""
    rdzv_port: int = not_in_key(default=0, ge=0, le=65535)
    """Rendezvous port on the first node (0: a free port locally, 29500 under Slurm)."""
    slurm: SlurmLaunchSettings = not_in_key(default_factory=SlurmLaunchSettings)
    """`launcher: slurm` options."""
    kubernetes: KubernetesLaunchSettings = not_in_key(default_factory=KubernetesLaunchSettings)
    """`launcher: kubernetes` options."""
    tensor_parallel: int = Field(default=1, ge=1)
    """Tensor-parallel size of training (any layout loads the converted checkpoint)."""
    pipeline_parallel: int = Field(default=1, ge=1)
    """Pipeline-parallel size of training (megatron-core's 1F1B schedule); must divide the layers."""
    train_iters: int = not_in_lineage(default=40, ge=1)
    """Optimizer steps. Raising it continues an earlier run of the same settings from its last
    checkpoint when the decay horizon stays put (`lr_decay_iters`). With `epochs` set it is
    resolved from the data instead (a YAML `train_iters: null` removes a preset's value)."""
    epochs: float | None = Field(default=None, gt=0, json_schema_extra={
        "lineage": False, "key_when_set": True})
    """Passes over the training data (open-r1's `num_train_epochs`) instead of `train_iters`:
    the run takes ceil(epochs × packed train rows of the `tokenize` artifact ÷
    `global_batch_size`) steps, resolved once that artifact exists (`rsft stages` shows it);
    with no `lr_decay_iters` the decay horizon is that step count. The train key holds epochs
    (and the data's key), not a step count. null: `train_iters` counts."""
    global_batch_size: int = Field(default=8, ge=1)
    """Sequences per optimizer step, over all data-parallel ranks and micro-batches."""
    micro_batch_size: int = Field(default=1, ge=1)
    """Sequences per forward pass per rank."""
    lr: float = Field(default=1e-3, gt=0)
    """Peak learning rate."""
    min_lr: float = Field(default=1e-4, ge=0)
    """Final learning rate of the cosine decay."""
    lr_warmup_iters: int = Field(default=4, ge=0)
    """Linear warm-up steps (at most `train_iters`)."""
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up."""
    lr_decay_iters: int | None = Field(default=None, ge=1)
    """Step at which the decay reaches `min_lr` (then it stays there), as Megatron-LM's
    `--lr-decay-iters`; null: `train_iters`. Fix it to extend a run later: a rerun with a larger
    `train_iters` and the same horizon resumes the shorter run's last checkpoint and evaluates
    only the new checkpoints (bit-identical to training the longer run at once); with the
    horizon following `train_iters`, every step's learning rate changes and training starts
    over."""
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    """Adam β1."""
    adam_beta2: float = Field(default=0.95, ge=0, lt=1)
    """Adam β2."""
    adam_eps: float = Field(default=1e-8, gt=0)
    """Adam ε."""
    weight_decay: float = Field(default=0.1, ge=0)
    """Decoupled weight decay (not applied to biases and norms)."""
    clip_grad: float = Field(default=1.0, ge=0)
    """Global gradient-norm clip (0 = off)."""
    precision: Literal["bf16", "fp16", "fp32"] = "fp32"
    """Compute precision; the optimizer keeps fp32 master weights. bf16/fp16 run on CPU too
    (slowly: for tests)."""
    loss_scale: float | None = Field(default=None, gt=1)
    """fp16 only: a constant loss scale; null: dynamic (Megatron's DynamicGradScaler, from 2^32,
    halving on overflow and skipping that step)."""
    use_distributed_optimizer: bool = False
    """Megatron DistributedOptimizer: optimizer state and master weights sharded over the
    data-parallel ranks, parameters all-gathered (overlapped with the next forward)."""
    save_interval: int = not_in_lineage(default=20, ge=1)
    """Checkpoint every N steps (and at the end); a crash loses at most N steps."""
    keep_last: int = not_in_lineage(default=2, ge=1)
    """Checkpoints kept while training (older ones are deleted, except those
    `evaluate.checkpoints` chose)."""
    kernels: KernelSettings = not_in_key(default_factory=KernelSettings)
    """Layer spec and fused kernels (`auto`: what the host has)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: trade compute for memory at long sequence lengths (`selective`
    recomputes the attention core, `full` each layer)."""
    attention_dropout: float | None = Field(default=None, ge=0, lt=1)
    """Dropout on attention probabilities; null: the model config's (0 for Qwen2/Llama)."""
    hidden_dropout: float | None = Field(default=None, ge=0, lt=1)
    """Dropout after attention and MLP; null: the model's (0)."""
    timeout_minutes: float = not_in_key(default=24 * 60, gt=0)
    """Kill the training job (all its processes) after this long; a rerun resumes."""
    seed: int = 1234
    """Model-init / dropout / data-order seed."""
    log_interval: int = not_in_key(default=1, ge=1)
    """Log metrics every N steps."""
    eval_interval: int = not_in_lineage(default=0, ge=0)
    """Validation loss on the test split (`dataset.test_split`) every N steps and after the last
    (0 = off): the per-token loss of the supervised tokens, masked as in training, forward only.
    In `metrics.jsonl` (`val_loss`, `val_tokens`), the trackers and the model card."""
    eval_iters: int | None = not_in_lineage(default=None, ge=1)
    """Validation on the first N global batches (`global_batch_size` rows each) of the test
    split; null: the whole test split."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = not_in_key(
        default_factory=lambda: ["tensorboard"])
    """Experiment trackers fed by rank 0 as training goes: `tensorboard` (event files in the
    train artifact's `tensorboard/`), `wandb`, `mlflow` (these two need
    `pip install 'reasoning-sft[tracking]'`). `[]`: none."""
    tracking: TrackingSettings = not_in_key(default_factory=TrackingSettings)
    """Project, run name, tags and MLflow store of the trackers."""

    @model_validator(mode="before")
    @classmethod
    def _epochs_or_iters(cls, data: Any) -> Any:
        if isinstance(data, dict) and "train_iters" in data and data["train_iters"] is None:
            data = {k: v for k, v in data.items() if k != "train_iters"}  # null: not set
        if isinstance(data, dict) and data.get("epochs") is not None and "train_iters" in data:
            raise ValueError("train.epochs and train.train_iters cannot both be set: drop one "
                             "(`--set train.train_iters=null` drops a preset's)")
        return data

    @model_serializer(mode="wrap")
    def _without_unused_iters(self, handler) -> dict[str, Any]:
        # With epochs, train_iters is derived from the data: it is never written out (settings
        # files, flow parameters, the train key), so what is read back has epochs alone.
        data = handler(self)
        if self.epochs is not None:
            data.pop("train_iters", None)
        return data

    def with_steps(self, steps: int) -> "TrainSettings":
        """These settings with the step count `epochs` resolves to: `train_iters` set, epochs
        kept (so the key still says epochs; `for_trainer` drops it)."""
        return self.model_copy(update={"train_iters": steps})

    def for_trainer(self) -> "TrainSettings":
        """The resolved run as plain `train_iters` (what the training job reads)."""
        return self.model_copy(update={"epochs": None})

    @model_validator(mode="after")
    def _lr_order(self) -> "TrainSettings":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.lr_warmup_iters > self.train_iters:
            raise ValueError(f"lr_warmup_iters ({self.lr_warmup_iters}) must not exceed "
                             f"train_iters ({self.train_iters}): the learning rate would never "
                             "reach its peak; lower lr_warmup_iters")
        world = self.nproc_per_node * self.nnodes
        model_parallel = self.tensor_parallel * self.pipeline_parallel
        if world % model_parallel:
            raise ValueError(f"nproc_per_node × nnodes = {world} processes cannot hold "
                             f"tensor_parallel × pipeline_parallel = {model_parallel}")
        dp = world // model_parallel
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"micro_batch_size × data-parallel size ({self.micro_batch_size} × {dp})"
            )
        if self.lr_decay_iters is not None and self.lr_decay_iters <= self.lr_warmup_iters:
            raise ValueError(f"lr_decay_iters ({self.lr_decay_iters}) must exceed "
                             f"lr_warmup_iters ({self.lr_warmup_iters})")
        if self.loss_scale is not None and self.precision != "fp16":
            raise ValueError(f"loss_scale applies to precision fp16 only (this is "
                             f"{self.precision}); remove it")
        if self.device == "cpu" and (cuda_only := [
                name for name in KernelSettings.CUDA_ONLY if getattr(self.kernels, name) == "on"]):
            raise ValueError(f"kernels.{cuda_only[0]}: on needs a CUDA device, and train.device "
                             f"is cpu; set train.kernels.{cuda_only[0]}: auto (or device: cuda)")
        return self

    @property
    def decay_iters(self) -> int | None:
        """The effective decay horizon: `lr_decay_iters`, else `train_iters`; None for a
        constant learning rate (no horizon)."""
        if self.lr_decay_style == "constant":
            return None
        return self.lr_decay_iters or self.train_iters

    def saved_iterations(self) -> list[int]:
        """The checkpoints this run saves: every `save_interval` steps and the last."""
        return sorted({*range(self.save_interval, self.train_iters + 1, self.save_interval),
                       self.train_iters})


class HubPushSettings(Strict):
    """Optional upload of the exported folder to the Hugging Face Hub (after `evaluate`, so the
    model card carries the scores). Never part of an artifact key: pushing changes no artifact."""

    repo: str | None = None
    """`org/name` of a model repository to push to; null (default): no push."""
    revision: str | None = None
    """Branch to push to; null: `rsft-<export key>` (one branch per distinct export). The
    intermediate checkpoints `evaluate.checkpoints` chose go to `<revision>-step<N>`."""
    private: bool = True
    """Create the repository as private if it does not exist."""
    overwrite: bool = False
    """Push even if the branch already holds another export (else refused)."""
    dry_run: bool = False
    """List what would be uploaded, upload nothing."""
    token_secret: str | None = None
    """Name of a Prefect Secret block with a Hugging Face token (default: `HF_TOKEN` or the
    huggingface_hub login). Never logged."""


class ExportSettings(Strict):
    """Stage `export` (Megatron → HF): a Hugging Face model folder people can load and sample."""

    iteration: int | None = Field(default=None, ge=1)
    """Training iteration to export; null: the final one. Earlier ones must still be among the
    `train.keep_last` checkpoints of the training run (to export and evaluate several, use
    `evaluate.checkpoints`)."""
    max_shard_size: str = "5GB"
    """Largest safetensors shard (bigger models are split, with an index)."""
    temperature: float = Field(default=0.6, ge=0)
    """Sampling temperature written to `generation_config.json` (R1's recommendation)."""
    top_p: float = Field(default=0.95, gt=0, le=1)
    """Nucleus sampling written to `generation_config.json`."""
    verify: bool = True
    """Load the folder with transformers and compare its logits with the Megatron checkpoint's;
    the stage fails (and publishes nothing) beyond the tolerances below."""
    max_abs_diff: float = Field(default=1e-4, gt=0)
    """Largest |Δlogit| allowed (both sides compute in float32 from the same weights)."""
    min_top1_agreement: float = Field(default=0.99, ge=0, le=1)
    """Smallest share of positions where both pick the same next token."""
    timeout_minutes: float = not_in_key(default=120, gt=0)
    """Kill the export (and its verification) after this long."""
    push: HubPushSettings = not_in_key(default_factory=HubPushSettings)
    """Optional Hub upload of the exported folder."""


LOCAL_EVAL_TASKS = ("math_500_local", "aime24_local")
"""Tasks shipped with the project (`examples/eval`): lighteval custom tasks, no hub access."""


class EvalTask(Strict):
    """One lighteval task and how many samples to draw per problem."""

    name: str
    """lighteval task: a built-in (`aime24`, `math_500`, `gpqa:diamond`, `lcb:codegeneration`, …,
    need the Hub) or a shipped local one (`math_500_local`, `aime24_local`)."""
    samples: int = Field(default=1, ge=1)
    """Samples per problem (`n` of pass@1 estimated over n samples)."""


class VllmSettings(Strict):
    """vLLM engine settings (backend `vllm`, GPU only)."""

    dtype: Literal["bfloat16", "float16", "auto"] = "bfloat16"
    """Compute dtype."""
    max_model_length: int = Field(default=32768, ge=16)
    """Context length (prompt + generation)."""
    gpu_memory_utilization: float = Field(default=0.8, gt=0, le=1)
    """Share of GPU memory vLLM may take."""
    tensor_parallel: int = Field(default=1, ge=1)
    """GPUs per model replica."""
    data_parallel: int = Field(default=1, ge=1)
    """Model replicas."""


class EvaluateSettings(Strict):
    """Stage `evaluate`: lighteval scores of the exported model, as open-r1 runs them."""

    backend: Literal["auto", "vllm", "transformers"] = "auto"
    """`vllm` (GPU), `transformers` (any device; slow), `auto`: vLLM when CUDA and vllm are
    available, else transformers."""
    tasks: list[EvalTask] = Field(min_length=1, default_factory=lambda: [
        EvalTask(name="math_500_local", samples=2), EvalTask(name="aime24_local", samples=2)])
    """Tasks to run."""
    max_problems: int | None = Field(default=4, ge=1)
    """Evaluate only the first N problems of each task (smoke tests: scores are then partial);
    null: all."""
    max_new_tokens: int = Field(default=64, ge=1)
    """Generation budget per sample (open-r1: 32768)."""
    temperature: float = Field(default=0.6, ge=0)
    """Sampling temperature (0: greedy)."""
    top_p: float = Field(default=0.95, gt=0, le=1)
    """Nucleus sampling."""
    seed: int = 0
    """Sampling seed."""
    batch_size: int = Field(default=8, ge=1)
    """Prompts per generation batch (transformers backend)."""
    vllm: VllmSettings = Field(default_factory=VllmSettings)
    evaluate_base: bool = False
    """Also evaluate the base model (its own cached artifact) and report the delta."""
    checkpoints: Literal["last", "all"] | list[int] = not_in_key(default="last")
    """Which training checkpoints to export and evaluate: `last` (the final one), `all` (every
    `train.save_interval` multiple and the final one), or a list of saved iterations (the final
    one is always evaluated too). Each is its own cached export and evaluation, keyed by the
    training run and the iteration but not `train.train_iters`, so a longer run evaluates only
    its new checkpoints; the chosen ones are kept from `train.keep_last`'s pruning. With more
    than one, the run shows a table and a chart of score vs step (the `scores` stage)."""
    timeout_minutes: float = not_in_key(default=24 * 60, gt=0)
    """Kill an evaluation after this long."""

    @field_validator("checkpoints")
    @classmethod
    def _iterations(cls, v: str | list[int]) -> str | list[int]:
        if isinstance(v, list):
            if not v or any(i < 1 for i in v):
                raise ValueError("list training iterations (≥ 1), or use `last` or `all`")
            return sorted(set(v))
        return v

    @field_validator("tasks")
    @classmethod
    def _unique(cls, v: list[EvalTask]) -> list[EvalTask]:
        names = [t.name for t in v]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"task listed twice: {', '.join(dupes)}")
        return v


class RetrySettings(Strict):
    """Retries of the steps that talk to a network (the `download` stage and the hub `push`), for
    transient failures only: a refused or dropped connection, a timeout, an HTTP 429 or 5xx. A
    mistake (unknown repo, no access, bad input) fails at once."""

    attempts: int = not_in_key(default=3, ge=0, le=20)
    """Retries after the first try (0: none)."""
    delay_seconds: float = not_in_key(default=30.0, ge=0)
    """Wait before the first retry; doubled before each next one."""


class NotifySettings(Strict):
    """Where to tell people that a run failed or crashed (the flow's own hook; a process killed
    outright cannot run hooks, so `rsft deploy --notify BLOCK` also adds a server-side
    automation for crashed runs)."""

    block: str | None = None
    """A Prefect notification block, as `type-slug/name` (e.g. `slack-webhook/ml-alerts`,
    `custom-webhook/pager`); null: no notification."""


class PipelineSettings(Strict):
    """The whole pipeline: where artifacts live and every stage's settings."""

    name: str = "tiny"
    """Name of this configuration (the preset's name; shown in flow-run names)."""
    workdir: Path = not_in_key(
        default_factory=lambda: Path(os.environ.get("RSFT_WORKDIR") or "rsft-work"))
    """Root of the artifact store (`<workdir>/artifacts/<stage>/<key>/`) and the stages' scratch
    folders (`<workdir>/scratch/`: training checkpoints, logs). Relative paths are relative to the
    current directory. Precedence: this setting when a settings file or `--set workdir=…` gives
    it, else the environment variable `RSFT_WORKDIR` (pins one workdir whatever the current
    directory), else `rsft-work`."""
    download: DownloadSettings = Field(default_factory=DownloadSettings)
    patch_tokenizer: PatchTokenizerSettings = Field(default_factory=PatchTokenizerSettings)
    convert: ConvertSettings = Field(default_factory=ConvertSettings)
    dataset: DatasetSettings = Field(default_factory=DatasetSettings)
    tokenize: TokenizeSettings = Field(default_factory=TokenizeSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings)
    retries: RetrySettings = Field(default_factory=RetrySettings)
    """Retries of network steps on transient failures."""
    notify: NotifySettings = Field(default_factory=NotifySettings)
    """Notification on failed or crashed runs."""

    @model_validator(mode="after")
    def _validation_needs_a_test_split(self) -> "PipelineSettings":
        if self.train.eval_interval and not self.dataset.test_split:
            raise ValueError(f"train.eval_interval={self.train.eval_interval} needs held-out rows: "
                             "set dataset.test_split (e.g. 0.05), or train.eval_interval: 0")
        return self
