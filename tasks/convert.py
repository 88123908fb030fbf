"""Stage `convert`: the downloaded HF model as a Megatron `torch_dist` checkpoint at the configured
TP/PP (torchrun when TP×PP > 1), verified against transformers before it is published."""

from __future__ import annotations

import json

from settings.errors import UserError
from settings.models import ConvertSettings
from tasks.artifacts import Manifest
from tasks.stage import BuildContext, Stage


def build(ctx: BuildContext) -> None:
    from megatron_bridge.launch import run_bridge

    s: ConvertSettings = ctx.settings
    hf = ctx.upstream["download"].dir
    layout = (s.tensor_parallel, s.pipeline_parallel)
    nproc = s.tensor_parallel * s.pipeline_parallel
    timeout = s.timeout_minutes * 60
    logs = ctx.out / "logs"
    logs.mkdir()
    ctx.log.info("convert: %s -> megatron TP=%d PP=%d (%d process%s)", hf.name,
                 s.tensor_parallel, s.pipeline_parallel, nproc, "es" if nproc > 1 else "")
    run_bridge(["hf2mcore", "--hf", str(hf), "--out", str(ctx.out), "--dtype", s.dtype],
               layout, logs / "hf2mcore.log", timeout)
    if s.verify:
        run_bridge(["verify", "--hf", str(hf), "--mcore", str(ctx.out), "--json",
                    str(ctx.out / "verification.json")], layout, logs / "verify.log", timeout)
    meta = json.loads((ctx.out / "rsft_checkpoint.json").read_text())
    ctx.meta.update(architecture=meta["architecture"], dtype=meta["dtype"],
                    tensor_parallel=s.tensor_parallel, pipeline_parallel=s.pipeline_parallel,
                    vocab_size=meta["vocab_size"], padded_vocab_size=meta["padded_vocab_size"])
    if not s.verify:
        return
    check_verification(ctx, s.max_abs_diff, s.min_top1_agreement,
                       "the Megatron checkpoint does not reproduce transformers' logits")


def check_verification(ctx: BuildContext, limit: float, min_top1: float, failure: str) -> None:
    """Record `verification.json`'s numbers and fail the stage beyond the tolerances."""
    report = json.loads((ctx.out / "verification.json").read_text())
    ctx.meta.update(max_abs_diff=report["max_abs_diff"], top1_agreement=report["top1_agreement"])
    ctx.log.info("verified: max |Δlogit| %.3g (limit %.3g), top-1 agreement %.3f",
                 report["max_abs_diff"], limit, report["top1_agreement"])
    if report["max_abs_diff"] > limit or report["top1_agreement"] < min_top1:
        raise UserError(
            f"{failure} (max |Δ| {report['max_abs_diff']:.3g} > {limit:.3g} or top-1 "
            f"{report['top1_agreement']:.3f} < {min_top1}); see verification.json in the logs; "
            "nothing was published")


def report(manifest: Manifest) -> list[dict]:
    """The verification table shown as a Prefect artifact."""
    path = manifest.dir / "verification.json"
    if not path.is_file():
        return []
    return json.loads(path.read_text())["prompts"]


def gpus(settings: ConvertSettings) -> int:
    import torch

    return settings.tensor_parallel * settings.pipeline_parallel if torch.cuda.is_available() else 0


STAGE = Stage(
    name="convert", version="1", settings=lambda s: s.convert, build=build,
    upstream=("download",), description="Megatron torch_dist checkpoint at the configured TP/PP",
    report=report, gpus=gpus,
)
