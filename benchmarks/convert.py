"""HF ⇄ Megatron conversion speed and memory against plain file copies.

Writes a random Qwen2 of ~0.5B parameters (Qwen2.5-0.5B geometry, bf16) to disk, then measures
  - HF→Megatron and Megatron→HF wall time next to copying the same safetensors bytes (with
    fsync, as durable as the checkpoint writes), both with and without the interpreter and
    library start-up (a process that only imports what the converter imports);
  - each conversion's peak RSS next to the largest safetensors shard + the runtime's baseline
    (a process that imports torch and megatron-core and exits).
Targets: ≤ 2× copy time (the conversion's own work); peak RSS ≤ 1.5× largest shard + baseline.

    python benchmarks/convert.py [--layers 24] [--tp 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAKE_MODEL = """
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.for_model("qwen2", hidden_size=896, intermediate_size=4864, num_attention_heads=14,
    num_key_value_heads=2, num_hidden_layers=int(sys.argv[2]), vocab_size=151936,
    tie_word_embeddings=True, max_position_embeddings=32768, torch_dtype="bfloat16")
with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(config)
model = model.to_empty(device="cpu").to(torch.bfloat16)
model.tie_weights()  # to_empty breaks the tie; an untied copy would add an lm_head to the file
torch.manual_seed(0)
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.02)
model.save_pretrained(sys.argv[1], max_shard_size="5GB")
print(sum(p.numel() for p in model.parameters()))
"""
# What `python -m megatron_bridge` imports before converting: its start-up, subtracted below.
BASELINE = ("import megatron_bridge.__main__, megatron_bridge.convert, megatron.core.dist_checkpointing,"
            " megatron.core.models.gpt")


# Runs the command and reports the largest RSS among *its* descendants (a fresh wrapper per
# measurement, so one measurement's peak never leaks into the next).
WRAP = """
import resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stdout.write(proc.stdout)
sys.stderr.write(proc.stderr)
print(f"@@maxrss {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}", file=sys.stderr)
sys.exit(proc.returncode)
"""


def child(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (GB) of the command's processes, stdout."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAP, *cmd], cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    maxrss_kb = int(proc.stderr.rsplit("@@maxrss ", 1)[1].split()[0])
    return seconds, maxrss_kb / 1e6, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--tp", type=int, default=1)
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="rsft-convert-bench-") as tmp:
        tmp_path = Path(tmp)
        hf = tmp_path / "hf"
        _, _, params = child([py, "-c", MAKE_MODEL, str(hf), str(args.layers)], root)
        shards = sorted(hf.glob("*.safetensors"))
        total = sum(f.stat().st_size for f in shards)
        largest = max(f.stat().st_size for f in shards) / 1e9
        copy_start = time.perf_counter()
        for f in shards:
            with open(f, "rb") as src, open(tmp_path / f"copy-{f.name}", "wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
                dst.flush()
                os.fsync(dst.fileno())
        copy = time.perf_counter() - copy_start

        base_s, base_rss, _ = child([py, "-c", BASELINE], root)
        runner = ([py, "-m", "megatron_bridge"] if args.tp == 1 else
                  [py, "-m", "torch.distributed.run", "--nproc_per_node", str(args.tp), "-m",
                   "megatron_bridge"])
        h2m_s, h2m_rss, _ = child(runner + ["hf2mcore", "--hf", str(hf), "--out",
                                            str(tmp_path / "mcore"), "--tp", str(args.tp)], root)
        m2h_s, m2h_rss, _ = child([py, "-m", "megatron_bridge", "mcore2hf", "--mcore",
                                   str(tmp_path / "mcore"), "--out", str(tmp_path / "back")], root)

    print(f"model: {int(params) / 1e9:.2f} B parameters, {total / 1e9:.2f} GB safetensors in "
          f"{len(shards)} shard(s), largest {largest:.2f} GB; TP={args.tp}")
    limit = 1.5 * largest + base_rss
    print(f"{'':22}{'wall s':>8}{'work s':>8}{'work/copy':>11}{'peak RSS GB':>13}{'limit GB':>10}")
    print(f"{'copy + fsync':22}{copy:8.2f}{copy:8.2f}{1:11.2f}")
    print(f"{'start-up (imports)':22}{base_s:8.2f}{'':>8}{'':>11}{base_rss:13.2f}")
    for name, s, rss in (("HF → Megatron", h2m_s, h2m_rss), ("Megatron → HF", m2h_s, m2h_rss)):
        work = s - base_s
        print(f"{name:22}{s:8.2f}{work:8.2f}{work / copy:11.2f}{rss:13.2f}{limit:10.2f}"
              f"   time {'ok' if work <= 2 * copy else 'OVER 2×'}, memory "
              f"{'ok' if rss <= limit else 'OVER'}")
    print("work = wall − start-up: the conversion itself, without the interpreter and the "
          "~6 s import of megatron-core that every process pays once")


if __name__ == "__main__":
    main()
