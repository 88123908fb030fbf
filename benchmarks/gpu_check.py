"""Device check: the one training step on a lent GPU, in one call (one H200: about 5 minutes).

What it runs, each part in its own process, and prints (and writes to OUT/gpu_check.json):
1. parity — a tiny Qwen2 (2 layers, hidden 128, the real 151936-token vocabulary; 512-token rows,
   128 in the dry run) trained for a few steps in bf16 on the GPU and in fp32 on the CPU (CUDA
   hidden): the first losses agree to bf16 accuracy and the grad norms too;
2. conversion — a random Qwen2 of DeepSeek-R1-Distill-Qwen-1.5B's geometry (its config.json)
   converted HF → Megatron on the GPU and verified against transformers (max |Δlogit|, top-1);
3. training — that model, bf16 with the distributed optimizer, at each sequence length (packed
   rows of random documents; selective recompute above 8k): tokens/s, MFU, peak memory, and
   the checkpoint save with its optimizer state.

Nothing of the project's Prefect side is needed: `megatron_bridge` plus megatron-core, torch,
transformers and safetensors. On the lent machine (Python 3.12, no megatron-core) the wheel
travels in `.whl/` (see README, "Device check"):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_check.py --out $OUT

Without a GPU, `--dry-run` runs the same parts on the CPU with small sizes (the "GPU" runs then
train in bf16 on the CPU): it checks the script, not the device.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
R1 = ROOT / "examples" / "tokenizers" / "deepseek-r1-distill-qwen-1.5b"  # config + real tokenizer
TINY = {"num_hidden_layers": 2, "max_window_layers": 2, "hidden_size": 128,
        "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}
DRY_BIG = {"num_hidden_layers": 2, "max_window_layers": 2, "hidden_size": 128,
           "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def make_hf(out: Path, overrides: dict, dtype: str, device: str) -> tuple[Path, int]:
    """A random-weight HF folder of the R1-Distill-Qwen config with `overrides` and the real
    tokenizer, and its parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    base = json.loads((R1 / "config.json").read_text())
    fields = {k: v for k, v in base.items() if k not in {"model_type", "transformers_version"}}
    config = AutoConfig.for_model(base["model_type"], **{**fields, **overrides})
    torch.manual_seed(0)
    with torch.device(device):  # initialising 1.5B parameters on the GPU takes seconds
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(R1 / name, out / name)
    return out, sum(p.numel() for p in model.parameters())


def write_data(out: Path, seq: int, rows: int, vocab: int, eos: int) -> Path:
    """A tokenize-stage-like folder: packed rows of random documents + stats.json."""
    from train_step import write_rows

    out.mkdir(parents=True)
    write_rows(out / "train", rows, seq, samples=max(2, seq // 1024), vocab=vocab, seed=0)
    (out / "stats.json").write_text(json.dumps({
        "seq_length": seq, "tokenizer": {"eos_id": eos, "vocab_size": vocab},
        "splits": {"train": {"rows": rows}}}))
    return out


def env_for(device: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path: megatron-core with the CPU shims
    return env


def convert(hf: Path, out: Path, logs: Path) -> None:
    from megatron_bridge.launch import run_bridge

    run_bridge(["hf2mcore", "--hf", str(hf), "--out", str(out)], (1, 1), logs / "convert.log")


def verify(hf: Path, mcore: Path, logs: Path) -> dict:
    from megatron_bridge.launch import run_bridge

    report = logs / "verify.json"
    run_bridge(["verify", "--hf", str(hf), "--mcore", str(mcore), "--json", str(report)], (1, 1),
               logs / "verify.log")
    result = json.loads(report.read_text())
    return {"max_abs_diff": result["max_abs_diff"], "top1_agreement": result["top1_agreement"]}


def train(ckpt: Path, data: Path, save: Path, device: str, logs: Path, **job) -> list[dict]:
    from megatron_bridge.training.job import TrainJob
    from settings.models import TrainSettings

    settings = TrainSettings(**{"device": device, "global_batch_size": 2, "micro_batch_size": 1,
                                "lr": 1e-5, "min_lr": 1e-6, "lr_warmup_iters": 1,
                                "weight_decay": 0.1, "seed": 1234, **job,
                                "save_interval": job["train_iters"]})  # one save, at the end
    spec = TrainJob(train=settings, checkpoint=str(ckpt), data=str(data), save=str(save),
                    device=device)
    path = save.with_suffix(".json")
    spec.write(path)
    proc = subprocess.run([sys.executable, "-m", "megatron_bridge.training", str(path)],
                          cwd=ROOT, env=env_for(device), capture_output=True, text=True)
    (logs / f"{save.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"training {save.name} failed ({proc.returncode}):\n"
                           + "\n".join((proc.stdout + proc.stderr).splitlines()[-25:]))
    return [json.loads(line) for line in spec.metrics_path.read_text().splitlines()]


def parity(work: Path, device: str, steps: int, seq: int) -> dict:
    """The same tiny run in bf16 on the device and in fp32 on the CPU."""
    hf, _ = make_hf(work / "tiny-hf", TINY, "float32", "cpu")
    ckpt = work / "tiny-mcore"
    convert(hf, ckpt, work)
    config = json.loads((hf / "config.json").read_text())
    data = write_data(work / "tiny-data", seq, 4 * steps, config["vocab_size"],
                      config["eos_token_id"])
    runs = {name: train(ckpt, data, work / f"tiny-{name}", dev, work, train_iters=steps,
                        precision=precision, lr=1e-3, min_lr=1e-4)
            for name, dev, precision in (("device-bf16", device, "bf16"),
                                         ("cpu-fp32", "cpu", "fp32"))}
    pairs = list(zip(runs["device-bf16"], runs["cpu-fp32"]))
    loss_rel = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in pairs)
    norm_rel = max(abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"] for a, b in pairs)
    return {"losses": {k: [round(m["loss"], 5) for m in v] for k, v in runs.items()},
            "grad_norms": {k: [round(m["grad_norm"], 5) for m in v] for k, v in runs.items()},
            "max_loss_rel_diff": loss_rel, "max_grad_norm_rel_diff": norm_rel,
            "ok": loss_rel < 2e-2 and norm_rel < 5e-2}


def big(work: Path, device: str, seqs: list[int], steps: int, dry: bool) -> dict:
    out: dict = {}
    started = time.monotonic()
    hf, parameters = make_hf(work / "big-hf", DRY_BIG if dry else {}, "bfloat16", device)
    config = json.loads((hf / "config.json").read_text())
    out["parameters_b"] = round(parameters / 1e9, 3)
    ckpt = work / "big-mcore"
    convert(hf, ckpt, work)
    out["convert_s"] = round(time.monotonic() - started, 1)
    log(f"converted in {out['convert_s']} s; verifying against transformers")
    out["verify"] = verify(hf, ckpt, work)
    log(f"verify: {out['verify']}")
    shutil.rmtree(hf)
    for seq in seqs:
        data = write_data(work / f"data-{seq}", seq, 2 * steps, config["vocab_size"],
                          config["eos_token_id"])
        save = work / f"train-{seq}"
        began = time.monotonic()
        metrics = train(ckpt, data, save, device, work, train_iters=steps, precision="bf16",
                        use_distributed_optimizer=True,
                        recompute="selective" if seq > 8192 else "none")
        steady = metrics[1:] or metrics
        pick = sorted(steady, key=lambda m: m["seconds"])[len(steady) // 2]  # the median step
        out[f"seq_{seq}"] = {
            "losses": [round(m["loss"], 4) for m in metrics],
            "tokens_per_s": pick["tokens_per_s"], "step_s": pick["seconds"],
            "mfu": pick.get("mfu"), "peak_memory_gb": max(m["memory_gb"] for m in metrics),
            "wall_s_with_startup_and_save": round(time.monotonic() - began, 1),
            "saved": (save / "latest_checkpointed_iteration.txt").read_text() == str(steps)}
        log(f"seq {seq}: {out[f'seq_{seq}']}")
        shutil.rmtree(save)  # the optimizer state of 1.5B parameters is ~20 GB
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="where gpu_check.json goes (default: print only)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, small sizes: check the script")
    parser.add_argument("--seqs", type=int, nargs="+", help="training sequence lengths "
                        "(default 4096 16384; dry run 256)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per training run")
    parser.add_argument("--skip", nargs="*", default=[], choices=["parity", "big"])
    args = parser.parse_args()

    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no GPU visible; use --dry-run to check the script on the CPU",
              file=sys.stderr)
        return 2
    seqs = args.seqs or ([256] if args.dry_run else [4096, 16384])
    import megatron.core

    report: dict = {"env": {
        "python": sys.version.split()[0], "torch": torch.__version__,
        "megatron_core": megatron.core.__version__,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "transformer_engine": _has("transformer_engine"), "dry_run": args.dry_run}}
    log(f"environment: {report['env']}")
    with tempfile.TemporaryDirectory(prefix="rsft-gpu-check-") as tmp:
        work = Path(tmp)
        for part, run in (("parity", lambda: parity(work, device, 3, 128 if args.dry_run else 512)),
                          ("big", lambda: big(work, device, seqs, args.steps, args.dry_run))):
            if part in args.skip:
                continue
            began = time.monotonic()
            try:
                report[part] = run()
            except Exception as e:  # report what broke and go on with the next part
                report[part] = {"error": f"{type(e).__name__}: {e}"}
            report[part]["seconds"] = round(time.monotonic() - began, 1)
            log(f"{part}: {json.dumps(report[part])}")
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(text + "\n")
    print(text)
    failed = [p for p in ("parity", "big") if "error" in report.get(p, {})
              or report.get(p, {}).get("ok") is False]
    return 1 if failed else 0


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    sys.exit(main())
