"""Fill `.whl/` with every wheel the device check needs and the lent GPU machine lacks, built for
its CPython 3.12 on manylinux x86_64, and print their sizes (a call carries at most 64 MiB).

    python benchmarks/device_bundle.py     # here, with network access to the package index
    # there, carrying .whl (the device check's own one-call recipe, README "Device check"):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_check.py --out $OUT

The versions are the ones installed here, i.e. what the test suite ran with. What the device has
is listed in `benchmarks/device_packages.txt`; `tests/test_gpu_check.py` runs the check's import
closure (every process of its dry run) against that list plus `BUNDLE`, so a module the device
would miss fails CI instead of the one GPU call.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".whl"
LIMIT_MIB = 64
PYTHON = "3.12"
# The device's glibc takes any of these (pip does not infer older manylinux tags from a newer one).
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
BUNDLE = (
    "megatron-core",  # the training core
    "pydantic", "pydantic-core", "annotated-types", "typing-inspection",  # the typed settings
    # pydantic needs typing-extensions >= 4.14.1; the device's version was not recorded, and a
    # newer one is backward compatible with what else imports it there.
    "typing-extensions",
)


def pins() -> list[str]:
    return [f"{name}=={version(name)}" for name in BUNDLE]


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", PYTHON, "--implementation", "cp",
           *(arg for platform in PLATFORMS for arg in ("--platform", platform)),
           "--dest", str(OUT), *pins()]
    if subprocess.run(cmd).returncode:
        print("error: pip could not download the bundle (see above)", file=sys.stderr)
        return 1
    wheels = sorted(OUT.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:8.2f} MiB  {wheel.name}")
    print(f"{total / 2**20:8.2f} MiB  in {OUT.relative_to(ROOT)}/ ({len(wheels)} wheels; a call "
          f"carries at most {LIMIT_MIB} MiB)")
    if total > LIMIT_MIB * 2**20:
        print(f"error: the bundle is over {LIMIT_MIB} MiB and cannot travel", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
