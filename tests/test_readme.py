"""The README's two commands are exactly what CI runs."""

import re

from tests.conftest import ROOT


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", quick_start, re.S)
    assert len(blocks) == 2, "Quick start must hold two commands: install+run, and tests"
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines()
          if line and not line.startswith(("#", "set ", "cd ", "export "))]
    assert ci == [blocks[0].strip(), blocks[1].strip()]


def test_quick_start_says_which_torch_a_cpu_and_a_gpu_machine_install():
    """Plain `pip install torch==…` on Linux is the multi-GB CUDA build: the CPU-only line uses
    PyTorch's CPU index (CI resolves it from the wheel on disk), and a GPU user is told the
    plain one."""
    quick_start = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    install = re.findall(r"```bash\n(.*?)```", quick_start, re.S)[0]
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in install
    assert "On a GPU machine run `pip install torch==2.13.0` instead" in " ".join(quick_start.split())
