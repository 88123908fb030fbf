"""kubectl, the launcher's only way to the cluster, and the mistakes it reveals before a job
exists."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from settings.errors import UserError
from tasks.kubernetes.manifest import CONTAINER, INSTANCE_LABEL, RESOURCE

KUBECTL_TIMEOUT = 120.0


class KubectlError(RuntimeError):
    """kubectl failed or did not answer in time (the message: its last stderr line)."""


class Kubectl:
    """kubectl on one namespace; every call is a subprocess whose JSON output is parsed here."""

    def __init__(self, executable: str, namespace: str):
        self.executable = executable
        self.namespace = namespace

    def command(self, verb: str, *args: str) -> list[str]:
        return [self.executable, verb, *args, "-n", self.namespace]

    def run(self, verb: str, *args: str, timeout: float = KUBECTL_TIMEOUT) -> str:
        try:
            proc = subprocess.run(self.command(verb, *args), capture_output=True, text=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise KubectlError(f"kubectl {verb} did not answer within {timeout:.0f} s") from None
        if proc.returncode:
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            raise KubectlError(lines[-1] if lines else f"kubectl {verb} exited {proc.returncode}")
        return proc.stdout

    def get_job(self, name: str) -> dict[str, Any] | None:
        out = self.run("get", RESOURCE, name, "--ignore-not-found", "-o", "json")
        return json.loads(out) if out.strip() else None

    def pods(self, name: str) -> list[dict[str, Any]]:
        out = self.run("get", "pods", "-l", f"{INSTANCE_LABEL}={name}", "-o", "json")
        return json.loads(out).get("items", []) if out.strip() else []

    def apply(self, path: Path) -> str:
        return self.run("apply", "-f", str(path))

    def delete(self, name: str, wait: bool) -> None:
        if wait:  # gone with its pods before a new job of the same name is created
            self.run("delete", RESOURCE, name, "--ignore-not-found", "--cascade=foreground",
                     "--wait=true", "--timeout=300s", timeout=330)
        else:
            self.run("delete", RESOURCE, name, "--ignore-not-found", "--wait=false")

    def logs(self, pod: str) -> str:
        return self.run("logs", pod, "-c", CONTAINER)


def find_kubectl(executable: str) -> str:
    found = shutil.which(executable)
    if found is None:
        raise UserError(f"train.kubernetes.kubectl: {executable!r} not found; install kubectl "
                        "(its current context selects the cluster) or set "
                        "train.kubernetes.kubectl to its path")
    return found


def preflight_error(err: KubectlError, namespace: str) -> UserError:
    """A failure before anything was created: the cluster, its operator or access is missing."""
    text = str(err)
    if "resource type" in text and "pytorchjob" in text.lower():
        return UserError("train.launcher kubernetes: the cluster has no PyTorchJob resource; "
                         "install the Kubeflow training operator "
                         "(deployments/kubernetes/README.md)")
    if "forbidden" in text.lower():
        return UserError(f"train.kubernetes.namespace {namespace!r}: kubectl may not manage "
                         f"PyTorchJobs there ({text})")
    return UserError(f"train.launcher kubernetes: kubectl cannot reach the cluster ({text}); "
                     "check `kubectl config current-context`")
