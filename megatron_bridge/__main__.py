"""`python -m megatron_bridge {hf2mcore,mcore2hf,verify} ...`: the conversion entry point, run as
one process or under `torchrun --nproc_per_node TP×PP` (every rank runs the same command)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_bridge")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf2mcore", help="HF folder → Megatron torch_dist checkpoint")
    a.add_argument("--hf", type=Path, required=True)
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--tp", type=int, default=1)
    a.add_argument("--pp", type=int, default=1)
    a.add_argument("--dtype", default="source", choices=["source", "float32", "bfloat16", "float16"])
    b = sub.add_parser("mcore2hf", help="Megatron checkpoint (any TP/PP) → HF folder")
    b.add_argument("--mcore", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--hf-base", type=Path, help="HF folder to take tokenizer files from")
    b.add_argument("--iteration", type=int, help="iteration to export (default: the latest)")
    b.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors file, e.g. 5GB or 500MB (bigger models are sharded)")
    c = sub.add_parser("verify", help="logits of the checkpoint vs transformers")
    c.add_argument("--hf", type=Path, required=True)
    c.add_argument("--mcore", type=Path, required=True)
    c.add_argument("--tp", type=int, default=1)
    c.add_argument("--pp", type=int, default=1)
    c.add_argument("--json", type=Path, help="write the report here (and print it)")
    c.add_argument("--iteration", type=int, help="iteration to compare (default: the latest)")
    c.add_argument("--dtype", default="float32", choices=["float32", "checkpoint"],
                   help="compute dtype of both models: float32 (upcast weights; isolates the "
                        "conversion from low-precision kernel noise) or the checkpoint's own")
    return p


def verify(hf: Path, mcore: Path, tp: int, pp: int, dtype: str = "float32",
           iteration: int | None = None) -> dict | None:
    import torch

    from megatron_bridge import checkpoint
    from megatron_bridge.build import DTYPES, build_model
    from megatron_bridge.parallel import model_parallel
    from megatron_bridge.verify import compare

    meta = checkpoint.read_metadata(mcore)
    compute = torch.float32 if dtype == "float32" else DTYPES[meta["dtype"]]
    with model_parallel(tp, pp):
        model = build_model(meta["hf_config"], tp, pp, compute, parallel_output=False).eval()
        checkpoint.load(model, mcore, iteration)  # upcasts a bf16/fp16 checkpoint into the fp32 model
        with torch.no_grad():
            return compare(hf, model, meta["vocab_size"])


def main(argv: list[str] | None = None) -> int:
    from megatron_bridge.convert import hf_to_mcore, mcore_to_hf
    from settings.errors import exit_on_user_error

    args = _parser().parse_args(argv)

    def work() -> None:
        if args.command == "hf2mcore":
            hf_to_mcore(args.hf, args.out, args.tp, args.pp, args.dtype)
        elif args.command == "mcore2hf":
            mcore_to_hf(args.mcore, args.out, args.hf_base, args.max_shard_size, args.iteration)
        else:
            report = verify(args.hf, args.mcore, args.tp, args.pp, args.dtype, args.iteration)
            if report is not None:
                text = json.dumps(report, indent=2)
                if args.json:
                    args.json.write_text(text)
                print(text)

    return exit_on_user_error(work)


if __name__ == "__main__":
    sys.exit(main())
