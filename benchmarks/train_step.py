"""CPU optimizer-step time of our trainer next to a bare megatron-core loop on the same model and batch.

One process, a world of one (gloo), fp32, the built-in tiny Qwen2 (DeepSeek-R1-Distill-Qwen's
config: real 151936-token vocabulary, QKV bias, 2 KV groups, untied) with --layers / --hidden
(FFN 4×hidden, 4 heads) and random weights, copied into two identical GPTModels:
  - ours: `CpuStepper.step(micro_batches, lr)` — global per-token loss over the micro-batches,
    token-count and loss all-reduces, one flat-gradient all-reduce copied back into the grads,
    float64 TP-aware grad norm + clipping, torch AdamW with decay / no-decay groups;
  - bare: the loop one would write by hand on megatron-core — per micro-batch
    `model(tokens, position_ids, mask)`, `per_token_loss` masked sum / supervised tokens,
    `.backward()`; then `clip_grad_norm_`, `AdamW.step()`, `zero_grad()`.
Both get the same micro-batches (synthetic packed rows written with `SFTWriter` and read back with
`Batches`: --samples samples of varying lengths per row of --seq tokens, loss mask on the second
half of each sample; --micro micro-batches of one row per step) and build the same explicit
block-diagonal causal mask (`MicroBatch.attention_mask()`) inside the timed step. Steps alternate
ours / bare after --warmup warm-up steps each, so drift and noise (CPU steal, other processes)
fall on both. Also shown: the batch building the trainer does outside the step (`Batches.step`:
read + pack), and ours' extra pieces timed alone on real gradients.
Target: ours ≤ 1.10× bare step time (median; the median of the per-pair ratios is shown too).

    python benchmarks/train_step.py [--layers 2] [--hidden 64] [--seq 512] [--micro 2] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TARGET = 1.10


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

    def __init__(self, model, job, vocab_size: int):
        self.model, self.vocab_size, self.clip = model, vocab_size, job.clip_grad
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=job.lr,
                                           betas=(job.adam_beta1, job.adam_beta2),
                                           eps=job.adam_eps, weight_decay=job.weight_decay)

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


def seconds(fn, repeats: int = 5) -> float:
    """Median wall seconds of `fn()` over `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--samples", type=int, default=3, help="samples packed per row")
    parser.add_argument("--micro", type=int, default=2, help="micro-batches (one row each) per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    import torch.distributed as dist

    from megatron_bridge.build import build_model
    from megatron_bridge.data.indexed import SFTDataset
    from megatron_bridge.parallel import model_parallel
    from megatron_bridge.training.batches import Batches
    from megatron_bridge.training.job import TrainJob
    from megatron_bridge.training.step import CpuStepper, all_reduce_flat, per_token_loss

    hf = hf_config(args.layers, args.hidden)
    vocab = hf["vocab_size"]
    job = TrainJob(checkpoint="", data="", save="", train_iters=args.warmup + args.steps,
                   global_batch_size=args.micro, micro_batch_size=1)
    total_steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory(prefix="rsft-step-bench-") as tmp, model_parallel(1, 1, job.seed):
        prefix = Path(tmp) / "train"
        write_rows(prefix, total_steps * args.micro, args.seq, args.samples, vocab, job.seed)
        batches = Batches(SFTDataset(prefix), args.seq, job.global_batch_size,
                          job.micro_batch_size, 0, 1, job.seed)

        ours_model = build_model(hf, 1, 1, torch.float32, initialize=True)
        bare_model = build_model(hf, 1, 1, torch.float32, initialize=True)
        bare_model.load_state_dict(ours_model.state_dict())
        params = sum(p.numel() for p in ours_model.parameters())
        ours, bare = CpuStepper(ours_model, job, vocab), Bare(bare_model, job, vocab)

        step_batches = [batches.step(s) for s in range(total_steps)]
        tokens = [sum(sum(r) for mb in micro for r in mb.lengths) for micro in step_batches]
        ours_s, bare_s, first = [], [], None
        for step, micro in enumerate(step_batches):
            took = {}
            # Who goes first alternates too, so neither always runs right after the other's frees.
            for name in (("ours", "bare") if step % 2 == 0 else ("bare", "ours")):
                start = time.perf_counter()
                took[name] = (ours.step(micro, job.lr)["loss"] if name == "ours"
                              else bare.step(micro, job.lr))
                took[name + "_s"] = time.perf_counter() - start
            if step == 0:
                first = (took["ours"], took["bare"])
            if step >= args.warmup:
                ours_s.append(took["ours_s"])
                bare_s.append(took["bare_s"])

        # Outside the step: what trainer.py's `batches.step(step)` costs per step, and the mask.
        build = seconds(lambda: batches.step(0))
        micro = step_batches[-1]
        mask = seconds(lambda: [mb.attention_mask() for mb in micro])

        # Ours' extra pieces alone, on the gradients of one more backward (kept, not stepped).
        ours.optimizer.zero_grad(set_to_none=False)
        bare.optimizer.zero_grad(set_to_none=False)
        for mb in micro:
            ours.losses(mb).sum().backward()
            logits = bare_model(mb.tokens, mb.position_ids, mb.attention_mask())
            per_token_loss(logits, mb.labels, vocab).sum().backward()
        grads = [p.grad for _, p in ours.named]

        def flat_reduce():
            all_reduce_flat(grads, ours.dp_group)

        def scalar_reduces():
            for _ in range(2):
                t = torch.zeros((), dtype=torch.float64)
                dist.all_reduce(t, group=ours.dp_group)
                t.item()

        parts = [
            ("flat-gradient all-reduce + copy back", seconds(flat_reduce)),
            ("float64 grad norm (ours)", seconds(ours.grad_norm)),
            ("clip_grad_norm_ norm, fp32 (bare)",
             seconds(lambda: torch.nn.utils.get_total_norm([p.grad for p in bare.params]))),
            ("2 scalar all-reduces + .item()", seconds(scalar_reduces)),
            # Ours zeroes the grads in place (backward then accumulates into them); bare sets
            # them to None (backward hands over fresh tensors).
            ("zero_grad(set_to_none=False) fill",
             seconds(lambda: ours.optimizer.zero_grad(set_to_none=False))),
        ]

    def stats(xs):
        return statistics.median(xs), statistics.fmean(xs), min(xs)

    o_med, o_mean, o_min = stats(ours_s)
    b_med, b_mean, b_min = stats(bare_s)
    pair = statistics.median(o / b for o, b in zip(ours_s, bare_s))
    mean_tokens = statistics.fmean(tokens)
    print(f"model: {params / 1e6:.1f} M parameters ({args.layers} layers, hidden {args.hidden}, "
          f"vocab {vocab}), fp32, {torch.get_num_threads()} threads; step = {args.micro} "
          f"micro-batches × 1 row × seq {args.seq} ({args.samples} packed samples/row, "
          f"{mean_tokens:.0f} tokens/step); {args.warmup} warm-up + {args.steps} timed steps each, "
          "alternating")
    print(f"first-step loss: ours {first[0]:.6f}, bare {first[1]:.6f} (same weights and batch)")
    print(f"{'step s':24}{'median':>9}{'mean':>9}{'min':>9}{'tok/s (med)':>13}"
          f"{'ratio (med)':>13}{'target':>8}")
    print(f"{'bare megatron-core loop':24}{b_med:9.3f}{b_mean:9.3f}{b_min:9.3f}"
          f"{mean_tokens / b_med:13.0f}{1:13.2f}")
    verdict = "ok" if o_med <= TARGET * b_med else "OVER"
    print(f"{'ours (CpuStepper.step)':24}{o_med:9.3f}{o_mean:9.3f}{o_min:9.3f}"
          f"{mean_tokens / o_med:13.0f}{o_med / b_med:13.2f}{'≤' + f'{TARGET:.2f}':>8}  {verdict}")
    print(f"ratio ours/bare: median of per-pair ratios {pair:.3f}, of means {o_mean / b_mean:.3f}, "
          f"of minima {o_min / b_min:.3f}")
    print(f"outside the step (trainer.py): Batches.step (read + pack {args.micro} rows) "
          f"{build * 1e3:.1f} ms = {build / b_med:.1%} of a bare step; inside both steps: "
          f"attention_mask() × {args.micro} {mask * 1e3:.1f} ms")
    print("ours' extra work alone (median ms; share of a bare step):")
    for name, s in parts:
        print(f"  {name:40}{s * 1e3:8.1f}{s / b_med:8.1%}")
    ours_part = sum(s for name, s in parts if "(bare)" not in name)
    extra = ours_part - sum(s for name, s in parts if "(bare)" in name)
    label = "net: ours' pieces − bare's norm"
    print(f"  {label:40}{extra * 1e3:8.1f}{extra / b_med:8.1%}"
          f"   → ratio ≈ {1 + extra / b_med:.2f} expected from these alone")


if __name__ == "__main__":
    main()
