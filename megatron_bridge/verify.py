"""Numerics check: the same real-tokenizer prompts through transformers and through the Megatron
checkpoint at a given TP/PP; max and mean |Δlogit| and top-1 agreement."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from settings.errors import UserError

PROMPTS = [
    "What is 7 times 8? Think step by step.",
    "<think>\nThe user asks for the derivative of x^2, which is 2x.\n</think>\n\nThe answer is 2x.",
    "Write a Python function that reverses a string.",
]


def _causal_mask(n: int) -> torch.Tensor:
    return torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), diagonal=1)


@torch.no_grad()
def megatron_logits(model, ids: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Full-vocab logits [b, s, vocab] on the last pipeline stage (None elsewhere). Pipeline
    stages hand activations on with send/recv (megatron's schedules are CUDA-only)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    device = next(model.parameters()).device
    ids = ids.to(device)
    pos = torch.arange(ids.shape[1], device=device)[None].expand_as(ids)
    mask = _causal_mask(ids.shape[1]).to(device)
    group = ps.get_pipeline_model_parallel_group()
    if not ps.is_pipeline_first_stage():
        hidden_size = model.config.hidden_size
        recv = torch.empty(ids.shape[1], ids.shape[0], hidden_size, dtype=model.config.params_dtype,
                           device=device)
        dist.recv(recv, src=ps.get_pipeline_model_parallel_prev_rank(), group=group)
        model.set_input_tensor(recv)
    out = model(ids, pos, mask)
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank(), group=group)
        return None
    return out[..., :vocab_size].float().cpu()  # beside transformers' logits, on the CPU


@torch.no_grad()
def compare(hf_dir: Path, model, vocab_size: int, prompts: list[str] = PROMPTS) -> dict[str, Any] | None:
    """Run prompts through both; returns the report on the last pipeline stage's TP rank 0."""
    from megatron.core import parallel_state as ps
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    encoded = [torch.tensor([tok.encode(prompt)], dtype=torch.long) for prompt in prompts]
    if any(ids.numel() == 0 for ids in encoded):
        raise UserError(f"the tokenizer in {hf_dir} encodes the prompts to no tokens: the folder "
                         "lacks the model's tokenizer files (tokenizer.json, "
                         "tokenizer_config.json); copy them there")
    if (top := max(int(ids.max()) for ids in encoded)) >= vocab_size:
        raise UserError(f"the tokenizer in {hf_dir} yields id {top} but the model has "
                         f"{vocab_size} tokens: tokenizer and weights are not one model")
    reference = None
    last = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    if last:
        reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=model.config.params_dtype).eval()
    rows = []
    for prompt, ids in zip(prompts, encoded):
        ours = megatron_logits(model, ids, vocab_size)
        if last:
            theirs = reference(ids).logits.float()
            delta = (ours - theirs).abs()
            rows.append({"prompt": prompt[:40], "tokens": ids.shape[1],
                         "max_abs_diff": delta.max().item(), "mean_abs_diff": delta.mean().item(),
                         "top1_agreement": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()})
    if not last:
        return None
    return {"prompts": rows, "max_abs_diff": max(r["max_abs_diff"] for r in rows),
            "top1_agreement": min(r["top1_agreement"] for r in rows)}
