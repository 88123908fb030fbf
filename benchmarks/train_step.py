"""CPU optimizer-step time of the trainer's step next to a bare megatron-core loop and the step it replaced.

One process, a world of one (gloo), fp32, the built-in tiny Qwen2 (DeepSeek-R1-Distill-Qwen's
config: real 151936-token vocabulary, QKV bias, 2 KV groups, untied) with --layers / --hidden
(FFN 4×hidden, 4 heads) and random weights, copied into identical GPTModels:
  - ours: `Stepper.step(micro_batches, lr)` — megatron-core's DDP (contiguous grad buffer,
    overlapped bucket reduce), `get_megatron_optimizer` (clipping, Adam), the no-pipelining
    schedule and `finalize_model_grads` (per-token loss over the global batch), with the scoped
    CPU shims (`compat.cuda_as_cpu`) around DDP/optimizer/schedule;
  - bare: the loop one would write by hand on megatron-core — per micro-batch
    `model(tokens, position_ids, mask)`, `per_token_loss` masked sum / supervised tokens,
    `.backward()`; then `clip_grad_norm_`, `AdamW.step()`, `zero_grad()`;
  - before: the CPU step this one replaced (`CpuStepper`, read from git at --before), when git
    has it.
All get the same micro-batches (synthetic packed rows written with `SFTWriter` and read back with
`Batches`: --samples samples of varying lengths per row of --seq tokens, loss mask on the second
half of each sample; --micro micro-batches of one row per step) and build the same explicit
block-diagonal causal mask inside the timed step. Steps rotate through the variants after
--warmup warm-up steps each, so drift and noise (CPU steal, other processes) fall on all.
Target: ours ≤ 1.10× bare step time (median; the median of the per-step ratios is shown too).

Then the cost of experiment tracking: `Stepper.step` plus `Trackers.log` of the step's scalars
(what the trainer does on rank 0) with `report_to: []`, `[tensorboard]`, and `[wandb]` (offline)
and `[mlflow]` (file store) when installed, each in --rounds blocks of --tracking-steps steps
with its trackers open only during its blocks (W&B's service process then runs only in its own),
block order rotating. Target: ≤ 1.02× the step time without tracking; the `log` column is the
median time of the `Trackers.log` call itself.

    python benchmarks/train_step.py [--layers 2] [--hidden 64] [--seq 512] [--micro 2] [--steps 10]
                                    [--tracking-steps 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TARGET = 1.10
TRACKING_TARGET = 1.02


def hf_config(layers: int, hidden: int) -> dict:
    from tasks.builtin_models import BUILTIN_MODELS

    folder, overrides, _ = BUILTIN_MODELS["tiny-qwen2"]
    hf = {**json.loads((folder / "config.json").read_text()), **overrides}
    hf.update(num_hidden_layers=layers, max_window_layers=layers, hidden_size=hidden,
              intermediate_size=4 * hidden, num_attention_heads=4, num_key_value_heads=2,
              torch_dtype="float32")
    return hf


def write_rows(prefix: Path, rows: int, seq: int, samples: int, vocab: int, seed: int) -> int:
    """Packed rows of `samples` samples (lengths varying, filling 85–100% of the row); mask 1 on
    each sample's second half. Returns the supervised-token count."""
    from megatron_bridge.data.indexed import SFTWriter

    rng = np.random.default_rng(seed)
    writer = SFTWriter(prefix)
    supervised = 0
    for _ in range(rows):
        total = int(rng.integers(int(0.85 * seq), seq + 1))
        weights = rng.uniform(0.3, 1.0, samples)
        lengths = np.maximum((weights / weights.sum() * total).astype(int), 2)
        lengths[-1] -= max(int(lengths.sum()) - seq, 0)
        row = []
        for n in lengths.tolist():
            tokens = rng.integers(0, vocab, n, dtype=np.int32)
            mask = np.zeros(n, dtype=np.uint8)
            mask[n // 2:] = 1
            supervised += int(mask[1:].sum())
            row.append((tokens, mask))
        writer.add_row(row)
    writer.finalize()
    return supervised


class Bare:
    """The hand-written megatron-core loop: forward, masked per-token CE, backward, clip, AdamW."""

    def __init__(self, model, settings, vocab_size: int):
        self.model, self.vocab_size, self.clip = model, vocab_size, settings.clip_grad
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr,
                                           betas=(settings.adam_beta1, settings.adam_beta2),
                                           eps=settings.adam_eps,
                                           weight_decay=settings.weight_decay)

    def step(self, micro_batches, lr: float) -> float:
        from megatron_bridge.training.step import per_token_loss

        self.model.train()
        count = sum(mb.loss_mask.sum() for mb in micro_batches).clamp(min=1)
        total = 0.0
        for mb in micro_batches:
            logits = self.model(mb.tokens, mb.position_ids, mb.attention_mask())
            loss = (per_token_loss(logits, mb.labels, self.vocab_size) * mb.loss_mask).sum() / count
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad()
        return total


def before_stepper(commit: str):
    """`CpuStepper` as it was at `commit` (None when git or the commit is not available)."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{commit}:megatron_bridge/training/step.py"],
                            cwd=root, capture_output=True, text=True)
    if source.returncode or "class CpuStepper" not in source.stdout:
        return None
    path = Path(tempfile.mkdtemp(prefix="rsft-before-")) / "before_step.py"
    path.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location("before_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CpuStepper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--samples", type=int, default=3, help="samples packed per row")
    parser.add_argument("--micro", type=int, default=2, help="micro-batches (one row each) per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tracking-steps", type=int, default=6,
                        help="steps per tracking block (the first of each untimed); 0: skip")
    parser.add_argument("--rounds", type=int, default=3, help="blocks of each tracking setting")
    parser.add_argument("--before", default="bd391a2",
                        help="git commit whose CpuStepper to time too (the step this one replaced)")
    args = parser.parse_args()

    from megatron_bridge import compat
    from megatron_bridge.build import build_model
    from megatron_bridge.data.indexed import SFTDataset
    from megatron_bridge.parallel import model_parallel
    from megatron_bridge.training.batches import Batches
    from megatron_bridge.training.step import Stepper
    from settings.models import TrainSettings

    hf = hf_config(args.layers, args.hidden)
    vocab = hf["vocab_size"]
    settings = TrainSettings(train_iters=args.warmup + args.steps, global_batch_size=args.micro,
                             micro_batch_size=1)
    total_steps = args.warmup + args.steps
    CpuStepper = before_stepper(args.before)
    with tempfile.TemporaryDirectory(prefix="rsft-step-bench-") as tmp, \
            model_parallel(1, 1, settings.seed):
        prefix = Path(tmp) / "train"
        write_rows(prefix, total_steps * args.micro, args.seq, args.samples, vocab, settings.seed)
        batches = Batches(SFTDataset(prefix), args.seq, settings.global_batch_size,
                          settings.micro_batch_size, 0, 1, settings.seed)

        models = {name: build_model(hf, 1, 1, torch.float32, initialize=True,
                                    calculate_per_token_loss=True)
                  for name in ("ours", "bare", *(["before"] if CpuStepper else []))}
        for model in models.values():
            model.load_state_dict(models["ours"].state_dict())
        params = sum(p.numel() for p in models["ours"].parameters())
        steppers = {"ours": Stepper(models["ours"], settings, vocab, thd=False),
                    "bare": Bare(models["bare"], settings, vocab)}
        if CpuStepper:
            steppers["before"] = CpuStepper(models["before"], settings, vocab)

        def loss(name, micro) -> float:
            result = steppers[name].step(micro, settings.lr)
            return result if name == "bare" else result["loss"]

        step_batches = [batches.step(s) for s in range(total_steps)]
        tokens = [sum(sum(r) for mb in micro for r in mb.lengths) for micro in step_batches]
        names = list(steppers)
        times: dict[str, list[float]] = {n: [] for n in names}
        first: dict[str, float] = {}
        compat.REDIRECTS.clear()
        for step, micro in enumerate(step_batches):
            # Who goes first rotates, so none always runs right after another's frees.
            for name in names[step % len(names):] + names[:step % len(names)]:
                start = time.perf_counter()
                value = loss(name, micro)
                took = time.perf_counter() - start
                first.setdefault(name, value)
                if step >= args.warmup:
                    times[name].append(took)
        redirects = sum(compat.REDIRECTS.values()) / total_steps
        if args.tracking_steps:
            tracking = tracking_overhead(steppers["ours"], step_batches, settings, args,
                                         Path(tmp))

    def stats(xs):
        return statistics.median(xs), statistics.fmean(xs), min(xs)

    mean_tokens = statistics.fmean(tokens)
    b_med = statistics.median(times["bare"])
    print(f"model: {params / 1e6:.1f} M parameters ({args.layers} layers, hidden {args.hidden}, "
          f"vocab {vocab}), fp32, {torch.get_num_threads()} threads; step = {args.micro} "
          f"micro-batches × 1 row × seq {args.seq} ({args.samples} packed samples/row, "
          f"{mean_tokens:.0f} tokens/step); {args.warmup} warm-up + {args.steps} timed steps each, "
          "rotating")
    print("first-step loss (same weights and batch): "
          + ", ".join(f"{n} {first[n]:.6f}" for n in names))
    print(f"{'step s':26}{'median':>9}{'mean':>9}{'min':>9}{'tok/s (med)':>13}"
          f"{'ratio (med)':>13}{'per-step ratio':>16}{'target':>8}")
    labels = {"ours": "ours (Stepper.step)", "bare": "bare megatron-core loop",
              "before": f"before ({args.before} CpuStepper)"}
    for name in ["bare", "ours", *(["before"] if "before" in names else [])]:
        med, mean, low = stats(times[name])
        pair = statistics.median(o / b for o, b in zip(times[name], times["bare"]))
        target = f"≤{TARGET:.2f}" if name == "ours" else ""
        verdict = ("  ok" if med <= TARGET * b_med else "  OVER") if name == "ours" else ""
        print(f"{labels[name]:26}{med:9.3f}{mean:9.3f}{low:9.3f}{mean_tokens / med:13.0f}"
              f"{med / b_med:13.2f}{pair:16.3f}{target:>8}{verdict}")
    if "before" not in names:
        print(f"(before: git has no CpuStepper at {args.before}; nothing to compare with)")
    print(f"CPU shims: {redirects:.0f} CUDA requests of megatron-core redirected per step "
          "(compat.cuda_as_cpu; the forward runs outside it)")
    if args.tracking_steps:
        print_tracking(tracking, args)


def tracking_overhead(stepper, step_batches, settings, args, tmp: Path) -> dict:
    """{report_to label: (step+log seconds, log seconds)} over the rounds' timed steps."""
    import importlib.util
    import os

    from megatron_bridge.training.tracking import open_trackers
    from megatron_bridge.training.trainer import memory_gb, scalars

    os.environ.setdefault("WANDB_MODE", "offline")  # no network, no account
    os.environ.setdefault("WANDB_SILENT", "true")
    configs = [[]] + [[n] for n in ("tensorboard", "wandb", "mlflow")
                      if importlib.util.find_spec(n)]
    times = {",".join(c) or "none": ([], []) for c in configs}
    done = dict.fromkeys(times, 0)
    for rnd in range(args.rounds):
        for config in configs[rnd % len(configs):] + configs[:rnd % len(configs)]:
            label = ",".join(config) or "none"
            trackers = open_trackers(settings.model_copy(update={"report_to": config}),
                                     tmp / "tracking" / label, "bench", done[label])
            for i in range(args.tracking_steps):
                micro = step_batches[i % len(step_batches)]
                start = time.perf_counter()
                result = stepper.step(micro, settings.lr)
                logged = time.perf_counter()
                done[label] += 1
                trackers.log(done[label], scalars({
                    "loss": result["loss"], "lr": settings.lr, "grad_norm": result["grad_norm"],
                    "supervised_tokens": result["supervised_tokens"],
                    "tokens_per_s": 1.0 / (logged - start), "memory_gb": memory_gb()}))
                end = time.perf_counter()
                if i:  # the first step of a block pays for opening the trackers' files
                    times[label][0].append(end - start)
                    times[label][1].append(end - logged)
            trackers.close()
    return times


def print_tracking(times: dict, args) -> None:
    base = statistics.median(times["none"][0])
    print(f"tracking: {args.rounds} blocks × {args.tracking_steps - 1} timed steps per setting, "
          "rotating; step = Stepper.step + Trackers.log")
    # `ratio` includes what runs beside the step (TensorBoard's writer thread, W&B's service
    # process) but also the machine's noise; `log/step` is the call alone, noise-free.
    print(f"{'report_to':26}{'step s (med)':>13}{'log ms (med)':>14}{'ratio':>8}"
          f"{'log/step':>10}{'target':>8}")
    for label, (steps, logs) in times.items():
        med, log = statistics.median(steps), statistics.median(logs)
        verdict = ("" if label == "none" else
                   "  ok" if med <= TRACKING_TARGET * base else "  OVER")
        print(f"{label:26}{med:13.3f}{1e3 * log:14.2f}{med / base:8.3f}{log / base:10.2%}"
              f"{'' if label == 'none' else f'≤{TRACKING_TARGET:.2f}':>8}{verdict}")


if __name__ == "__main__":
    main()
