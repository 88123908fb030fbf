"""Device check: the one training step on a lent GPU, in one call (≤ 8 minutes on one H100 80GB).

Parts, each in its own processes, each reported as soon as it is known (printed, and the whole
report rewritten to OUT/gpu_check.json), a failed part never hiding the others:
1. parity — a tiny Qwen2 (2 layers, hidden 128, the real 151936-token vocabulary; 512-token rows,
   128 in the dry run) trained a few steps in bf16 on the device, with the kernels this host's
   probes choose, and in fp32 on the CPU (CUDA hidden): losses and grad norms agree to bf16
   accuracy; the first step's loss difference is printed.
2. convert — a random Qwen2 of DeepSeek-R1-Distill-Qwen-1.5B's geometry (its config.json)
   converted HF → Megatron on the device and verified against transformers (max |Δlogit|, top-1).
3. train-<seq> — that model, bf16 with the distributed optimizer, at each sequence length (packed
   rows of random documents; selective recompute above 8k): tokens/s, MFU against the device's
   bf16 peak, peak memory, and the checkpoint save with its optimizer state.

The report opens with the host: versions, the probes (`megatron_bridge.host`) and the kernels the
1.5B model trains with. Everything runs under a deadline (`--budget-s`): a part's processes are
killed when it passes, and a part with no time left is reported as skipped.

Nothing of the project's Prefect side is needed. On the lent machine (Python 3.12; no
megatron-core or pydantic) the wheels travel in `.whl/` (`benchmarks/device_bundle.py`):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_check.py --out $OUT

Without a GPU, `--dry-run` runs the same parts on the CPU with small sizes (the "device" runs
then train in bf16 on the CPU): it checks the script, not the device.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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


class OutOfTime(Exception):
    """The check's deadline (`--budget-s`) came before the part could finish."""


class Check:
    """The report and the deadline: `part()` runs one part, records its result (or its error)
    at once, and refuses to start one when no time is left."""

    def __init__(self, out: Path | None, budget_s: float):
        self.out, self.report = out, {}
        self.deadline = time.monotonic() + budget_s

    def left(self) -> float:
        if (left := self.deadline - time.monotonic()) < 5:
            raise OutOfTime("out of time (--budget-s)")
        return left

    def put(self, name: str, value) -> None:
        self.report[name] = value
        log(f"{name}: {json.dumps(value)}")
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
            tmp = self.out / ".gpu_check.json.tmp"
            tmp.write_text(json.dumps(self.report, indent=2) + "\n")
            tmp.replace(self.out / "gpu_check.json")

    def part(self, name: str, run: Callable[[], dict]) -> dict | None:
        began = time.monotonic()
        try:
            self.left()
            result = run()
        except OutOfTime as e:
            result = {"skipped": str(e)}
        except Exception as e:  # report what broke and go on with the next part
            result = {"error": f"{type(e).__name__}: {e}"}
        result["seconds"] = round(time.monotonic() - began, 1)
        self.put(name, result)
        return None if "error" in result or "skipped" in result else result

    def failed(self) -> list[str]:
        return [name for name, r in self.report.items() if isinstance(r, dict)
                and ("error" in r or r.get("ok") is False)]


def make_hf(out: Path, overrides: dict, dtype: str, device: str) -> int:
    """A random-weight HF folder of the R1-Distill-Qwen config with `overrides` and the real
    tokenizer; returns its parameter count. Built on `device` (1.5B parameters initialise in
    seconds on a GPU), then freed: the check's children get the whole device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    base = json.loads((R1 / "config.json").read_text())
    fields = {k: v for k, v in base.items() if k not in {"model_type", "transformers_version"}}
    config = AutoConfig.for_model(base["model_type"], **{**fields, **overrides})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(R1 / name, out / name)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return parameters


def write_data(out: Path, seq: int, rows: int, vocab: int, eos: int) -> Path:
    """A tokenize-stage-like folder: packed rows of random documents + stats.json."""
    from train_step import write_rows

    out.mkdir(parents=True)
    write_rows(out / "train", rows, seq, samples=max(2, seq // 1024), vocab=vocab, seed=0)
    (out / "stats.json").write_text(json.dumps({
        "seq_length": seq, "pack": True, "tokenizer": {"eos_id": eos, "vocab_size": vocab},
        "splits": {"train": {"rows": rows}}}))
    return out


def env_for(device: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path: megatron-core with the CPU shims
    return env


def bridge(args: list[str], logs: Path, name: str, timeout: float) -> None:
    from megatron_bridge.launch import run_bridge

    run_bridge(args, (1, 1), logs / f"{name}.log", timeout)


def verify(hf: Path, mcore: Path, logs: Path, timeout: float) -> dict:
    report = logs / "verify.json"
    bridge(["verify", "--hf", str(hf), "--mcore", str(mcore), "--json", str(report)], logs,
           "verify", timeout)
    result = json.loads(report.read_text())
    return {"max_abs_diff": result["max_abs_diff"], "top1_agreement": result["top1_agreement"]}


def train(ckpt: Path, data: Path, save: Path, device: str, logs: Path, timeout: float,
          **job) -> list[dict]:
    from megatron_bridge.training.job import TrainJob
    from settings.models import TrainSettings

    settings = TrainSettings(**{"device": device, "global_batch_size": 2, "micro_batch_size": 1,
                                "lr": 1e-5, "min_lr": 1e-6, "lr_warmup_iters": 1,
                                "weight_decay": 0.1, "seed": 1234, "report_to": [], **job,
                                "save_interval": job["train_iters"]})  # one save, at the end
    spec = TrainJob(train=settings, checkpoint=str(ckpt), data=str(data), save=str(save),
                    device=device)
    path = save.with_suffix(".json")
    spec.write(path)
    try:
        proc = subprocess.run([sys.executable, "-m", "megatron_bridge.training", str(path)],
                              cwd=ROOT, env=env_for(device), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        (logs / f"{save.name}.log").write_text(f"{e.stdout or ''}{e.stderr or ''}")
        raise OutOfTime(f"training {save.name} ran out of time (--budget-s)") from None
    (logs / f"{save.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"training {save.name} failed ({proc.returncode}):\n"
                           + "\n".join((proc.stdout + proc.stderr).splitlines()[-25:]))
    return [json.loads(line) for line in spec.metrics_path.read_text().splitlines()]


def parity(check: Check, work: Path, device: str, steps: int, seq: int) -> dict:
    """The same tiny run in bf16 on the device and in fp32 on the CPU."""
    hf = work / "tiny-hf"
    make_hf(hf, TINY, "float32", "cpu")
    ckpt = work / "tiny-mcore"
    bridge(["hf2mcore", "--hf", str(hf), "--out", str(ckpt)], work, "tiny-convert", check.left())
    config = json.loads((hf / "config.json").read_text())
    data = write_data(work / "tiny-data", seq, 4 * steps, config["vocab_size"],
                      config["eos_token_id"])
    runs = {name: train(ckpt, data, work / f"tiny-{name}", dev, work, check.left(),
                        train_iters=steps, precision=precision, lr=1e-3, min_lr=1e-4)
            for name, dev, precision in (("device-bf16", device, "bf16"),
                                         ("cpu-fp32", "cpu", "fp32"))}
    pairs = list(zip(runs["device-bf16"], runs["cpu-fp32"]))
    loss_rel = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in pairs)
    norm_rel = max(abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"] for a, b in pairs)
    return {"losses": {k: [round(m["loss"], 5) for m in v] for k, v in runs.items()},
            "grad_norms": {k: [round(m["grad_norm"], 5) for m in v] for k, v in runs.items()},
            "first_step_loss_diff_bf16_vs_fp32": abs(pairs[0][0]["loss"] - pairs[0][1]["loss"]),
            "max_loss_rel_diff": loss_rel, "max_grad_norm_rel_diff": norm_rel,
            "ok": loss_rel < 2e-2 and norm_rel < 5e-2}


def convert_big(check: Check, work: Path, device: str, dry: bool) -> dict:
    import torch

    from settings.models import ConvertSettings

    hf = work / "big-hf"
    parameters = make_hf(hf, DRY_BIG if dry else {}, "bfloat16", device)
    out = {"parameters_b": round(parameters / 1e9, 3)}
    if device == "cuda":  # what the parent keeps on the GPU while the children run
        out["parent_gpu_reserved_gb"] = round(torch.cuda.memory_reserved() / 1e9, 3)
    began = time.monotonic()
    bridge(["hf2mcore", "--hf", str(hf), "--out", str(work / "big-mcore")], work, "convert",
           check.left())
    out["convert_s"] = round(time.monotonic() - began, 1)
    out["verify"] = verify(hf, work / "big-mcore", work, check.left())
    shutil.rmtree(hf)
    # The convert stage's own tolerances: would it publish this conversion?
    limits = ConvertSettings()
    out["ok"] = (out["verify"]["max_abs_diff"] <= limits.max_abs_diff
                 and out["verify"]["top1_agreement"] >= limits.min_top1_agreement)
    return out


def train_big(check: Check, work: Path, device: str, seq: int, steps: int) -> dict:
    config = json.loads((R1 / "config.json").read_text())
    data = write_data(work / f"data-{seq}", seq, 2 * steps, config["vocab_size"],
                      config["eos_token_id"])
    save = work / f"train-{seq}"
    began = time.monotonic()
    try:
        metrics = train(work / "big-mcore", data, save, device, work, check.left(),
                        train_iters=steps, precision="bf16", use_distributed_optimizer=True,
                        recompute="selective" if seq > 8192 else "none")
        steady = metrics[1:] or metrics  # the first step compiles kernels
        pick = sorted(steady, key=lambda m: m["seconds"])[len(steady) // 2]  # the median step
        return {"losses": [round(m["loss"], 4) for m in metrics],
                "tokens_per_s": pick["tokens_per_s"], "step_s": pick["seconds"],
                "mfu": pick.get("mfu"), "peak_memory_gb": max(m["memory_gb"] for m in metrics),
                "wall_s_with_startup_and_save": round(time.monotonic() - began, 1),
                "saved": (save / "latest_checkpointed_iteration.txt").read_text() == str(steps)}
    finally:  # the optimizer state of 1.5B parameters is ~20 GB
        shutil.rmtree(save, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)


def host(device: str, dry: bool) -> dict:
    """Versions, the probes and the kernels the 1.5B model trains with on this host."""
    import megatron.core
    import torch
    import transformers

    from megatron_bridge.build import model_kernels
    from megatron_bridge.host import Host
    from megatron_bridge.training.mfu import peak_flops

    probed = Host.probe()
    kernels = model_kernels(json.loads((R1 / "config.json").read_text()), training=True)
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "cuda": torch.version.cuda, "megatron_core": megatron.core.__version__,
            "transformers": transformers.__version__, "dry_run": dry, "device": device,
            "probes": dataclasses.asdict(probed), "kernels": kernels.summary(), "kernels_why": kernels.why,
            "peak_bf16_tflops": (peak := peak_flops(probed.device_name, "bf16")) and peak / 1e12}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="where gpu_check.json goes (default: print only)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, small sizes: check the script")
    parser.add_argument("--seqs", type=int, nargs="+", help="training sequence lengths "
                        "(default 4096 16384; dry run 256)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per training run")
    parser.add_argument("--budget-s", type=float, default=470,
                        help="stop starting parts, and kill a running one, after this long")
    parser.add_argument("--skip", nargs="*", default=[], choices=["parity", "convert", "train"])
    args = parser.parse_args()

    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no GPU visible; use --dry-run to check the script on the CPU",
              file=sys.stderr)
        return 2
    seqs = args.seqs or ([256] if args.dry_run else [4096, 16384])
    check = Check(args.out, args.budget_s)
    check.put("env", host(device, args.dry_run))
    with tempfile.TemporaryDirectory(prefix="rsft-gpu-check-") as tmp:
        work = Path(tmp)
        if "parity" not in args.skip:
            check.part("parity", lambda: parity(check, work, device, 3,
                                                128 if args.dry_run else 512))
        converted = None
        if "convert" not in args.skip:
            converted = check.part("convert", lambda: convert_big(check, work, device,
                                                                  args.dry_run))
        for seq in seqs if "train" not in args.skip else []:
            if converted:
                check.part(f"train_{seq}",
                           lambda seq=seq: train_big(check, work, device, seq, args.steps))
            else:
                check.put(f"train_{seq}", {"skipped": "needs the convert part"})
    print(json.dumps(check.report, indent=2))
    return 1 if check.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
