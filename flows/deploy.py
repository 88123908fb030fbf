"""`rsft deploy`: apply `deployments/prefect.yaml` to the Prefect API in PREFECT_API_URL — the work
pools it names (process type) and the `gpu` global concurrency limit first, then Prefect's own
`prefect deploy --all`, from the project root so workers run this checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from settings.errors import UserError
from tasks.stage import GPU_LIMIT, ensure_gpu_limit

ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = ROOT / "deployments" / "prefect.yaml"


def work_pools(prefect_file: Path = PREFECT_FILE) -> list[str]:
    spec = yaml.safe_load(prefect_file.read_text())
    return sorted({d["work_pool"]["name"] for d in spec["deployments"] if d.get("work_pool")})


def ensure_infrastructure(pools: list[str], gpus: int) -> list[str]:
    """Create what is missing (never changes what exists); returns what was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    created = []
    with get_client(sync_client=True) as client:
        for name in pools:
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))
                created.append(f"work pool {name}")
    if ensure_gpu_limit(gpus):
        created.append(f"concurrency limit {GPU_LIMIT} ({gpus} slots)")
    return created


def deploy(gpus: int, names: list[str] | None = None, prefect_file: Path = PREFECT_FILE,
           notify: str | None = None) -> str:
    """Apply the deployments (all, or `names` as `flow/deployment`), and the failure automations
    when a notification block is given. Returns what was created and Prefect's output."""
    if not os.environ.get("PREFECT_API_URL"):
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise UserError("PREFECT_API_URL is not set: start a server (`prefect server start`) "
                            "and export PREFECT_API_URL=http://127.0.0.1:4200/api")
    pools = work_pools(prefect_file)
    created = ensure_infrastructure(pools, gpus)
    if notify:
        from flows.notify import ensure_automations

        created += ensure_automations(notify)
    select = ["--all"] if not names else [a for n in names for a in ("--name", n)]
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", *select,
           "--prefect-file", str(prefect_file)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "RSFT_PROJECT_DIR": str(ROOT)})
    if proc.returncode:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"prefect deploy failed (exit {proc.returncode}):\n{tail}")
    return "\n".join([*(f"created {c}" for c in created), proc.stdout.strip()])
