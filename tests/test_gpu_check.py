"""The device check (`benchmarks/gpu_check.py`) is one call on a lent GPU: it must not be the
first time its code runs. Its dry run takes the same path on the CPU with small sizes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_device_check_dry_run_on_the_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--steps", "2",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["env"]["dry_run"] and report["parity"]["ok"], report
    big = report["big"]
    assert big["verify"]["max_abs_diff"] < 1e-4 and big["verify"]["top1_agreement"] >= 0.99, big
    run = big["seq_256"]
    assert run["saved"] and len(run["losses"]) == 2 and run["tokens_per_s"] > 0, run
