"""The device check (`benchmarks/gpu_check.py`) is one call on a lent GPU: it must not be the
first time its code runs, nor the first time its imports meet the device's packages. Its dry run
takes the same path on the CPU with small sizes, every process of it recording what it imports
(`tests/import_probe`)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
from importlib.metadata import packages_distributions, requires
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from device_bundle import BUNDLE  # noqa: E402

DEVICE = {"python_version": "3.12", "sys_platform": "linux", "platform_machine": "x86_64",
          "platform_system": "Linux", "implementation_name": "cpython", "extra": ""}


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def on_device() -> list[str]:
    lines = (ROOT / "benchmarks" / "device_packages.txt").read_text().splitlines()
    return [normal(line) for line in map(str.strip, lines) if line and not line.startswith("#")]


def travels(distribution: str) -> bool:
    """On the device's list, or in the bundle."""
    name = normal(distribution)
    return name in map(normal, BUNDLE) or any(fnmatch.fnmatch(name, p) for p in on_device())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out, imports = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("imports")
    env = {**os.environ, "RSFT_IMPORT_LOG": str(imports),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "import_probe"),
                                          *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--steps", "2",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), imports


@pytest.mark.slow
def test_device_check_dry_run_on_the_cpu(dry_run):
    report, _ = dry_run
    assert report["env"]["dry_run"] and report["env"]["probes"]["cuda"] is False
    assert report["env"]["kernels"].startswith("local spec"), report["env"]
    parity = report["parity"]
    assert parity["ok"] and parity["first_step_loss_diff_bf16_vs_fp32"] < 0.05, parity
    convert = report["convert"]
    assert convert["ok"] and convert["verify"]["max_abs_diff"] < 1e-4, convert
    run = report["train_256"]
    assert run["saved"] and len(run["losses"]) == 2 and run["tokens_per_s"] > 0, run
    assert run["mfu"] is None  # no GPU, no peak


def _import_edges(folder: Path) -> tuple[list[str], dict[str, set[str]]]:
    commands, edges = [], {}
    for log in folder.glob("*.txt"):
        command, *lines = log.read_text().splitlines()
        commands.append(command)
        for line in lines:
            importer, imported = line.split(" ", 1)
            edges.setdefault(importer, set()).add(imported)
    return commands, edges


def _ours(module: str) -> bool:
    if module.startswith("__main__:"):
        return module.removeprefix("__main__:").startswith(str(ROOT))
    return (ROOT / module).is_dir() or (ROOT / "benchmarks" / f"{module}.py").is_file()


@pytest.mark.slow
def test_what_the_device_check_imports_is_on_the_device_or_in_the_bundle(dry_run):
    """Every third-party module the check's own code imports, in any of its processes, comes
    from a package the device has (benchmarks/device_packages.txt, with its date) or from the
    bundle; every bundled package's requirements do too. (What a device package imports is its
    own business: the device's version brings what it needs.)"""
    _, folder = dry_run
    commands, edges = _import_edges(folder)
    assert any("megatron_bridge/training/__main__.py" in c for c in commands), commands
    assert any("megatron_bridge/__main__.py hf2mcore" in c for c in commands), commands
    owners = packages_distributions()
    stdlib = sys.stdlib_module_names | set(sys.builtin_module_names)
    imported = {m for importer, ms in edges.items() if _ours(importer) for m in ms
                if m not in stdlib and not _ours(m)}
    assert {"torch", "megatron", "pydantic", "transformers"} <= imported, imported
    unowned = sorted(m for m in imported if m not in owners)
    assert not unowned, f"modules of no installed distribution: {unowned}"
    missing = {m: owners[m] for m in imported if not any(travels(d) for d in owners[m])}
    assert not missing, (f"the device lacks {missing}: add them to BUNDLE in "
                         "benchmarks/device_bundle.py (or to device_packages.txt if it has them)")
    for name in BUNDLE:
        needed = [Requirement(r) for r in requires(name) or []]
        lacking = [str(r) for r in needed if (r.marker is None or r.marker.evaluate(DEVICE))
                   and not travels(r.name)]
        assert not lacking, f"{name} needs {lacking}, neither on the device nor in the bundle"
