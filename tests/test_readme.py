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
