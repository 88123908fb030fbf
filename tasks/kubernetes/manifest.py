"""The PyTorchJob manifest of a training job, and the names and labels of the objects it makes."""

from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path
from typing import Any

from settings.errors import UserError
from settings.models import TrainSettings
from tasks.train_launch import agent_command

API_VERSION = "kubeflow.org/v1"
KIND = "PyTorchJob"
RESOURCE = "pytorchjobs.kubeflow.org"
CONTAINER = "pytorch"  # the operator finds the training container by this name
PORT_NAME = "pytorchjob-port"  # ... and sets MASTER_PORT from the port of this name
DEFAULT_PORT = 23456  # the operator's default for that port
ENDPOINT = "$(MASTER_ADDR):$(MASTER_PORT)"  # expanded by Kubernetes from the container's env
MANAGED_BY = "reasoning-sft"
INSTANCE_LABEL = "app.kubernetes.io/instance"
# "<name>-worker-<i>" names the pods and their services, which must stay DNS labels (<= 63).
MAX_NAME = 45
# The job's own deadline on the cluster: it outlives a controller killed without cleanup by at
# most this margin past train.timeout_minutes (the task's timeout fires first).
DEADLINE_MARGIN_SECONDS = 600


def job_name(run_id: str) -> str:
    """The PyTorchJob's name: a DNS-1035 label (the operator's rule) short enough for the pod and
    service names derived from it; a shortened name keeps a hash of the full run id."""
    name = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")
    if not name[:1].isalpha():
        name = f"rsft-{name}".rstrip("-")
    if len(name) > MAX_NAME:
        digest = hashlib.sha256(run_id.encode()).hexdigest()[:8]
        name = f"{name[:MAX_NAME - 9].rstrip('-')}-{digest}"
    return name


def gpus_per_pod(settings: TrainSettings, device: str) -> int:
    """Each pod's `nvidia.com/gpu` limit: the setting, else one per process on CUDA."""
    k = settings.kubernetes
    if k.gpus_per_pod is None:
        return settings.nproc_per_node if device == "cuda" else 0
    if device == "cuda" and 0 < k.gpus_per_pod < settings.nproc_per_node:
        raise UserError(f"train.kubernetes.gpus_per_pod ({k.gpus_per_pod}) is below "
                        f"train.nproc_per_node ({settings.nproc_per_node}): each process needs its "
                        "own GPU; raise gpus_per_pod or leave it unset")
    return k.gpus_per_pod


def check_settings(settings: TrainSettings) -> None:
    """The settings this launcher cannot do without, refused in one line."""
    k = settings.kubernetes
    if not k.image:
        raise UserError("train.kubernetes.image is not set: launcher kubernetes needs a container "
                        "image with this project installed (--set "
                        "train.kubernetes.image=REGISTRY/IMAGE:TAG)")
    if not k.volume_claim:
        raise UserError("train.kubernetes.volume_claim is not set: launcher kubernetes needs the "
                        "PersistentVolumeClaim (ReadWriteMany) that holds the workdir (--set "
                        "train.kubernetes.volume_claim=CLAIM)")


def pytorchjob_manifest(settings: TrainSettings, job_path: Path | str, workdir: Path | str,
                        run_id: str, device: str) -> dict[str, Any]:
    """The PyTorchJob running the training job `job_path` (inside `workdir`) on `nnodes` pods;
    `device` is the one the job trains on (`tasks.train.resolve_device`)."""
    check_settings(settings)
    k = settings.kubernetes
    workdir, job_path = Path(workdir).absolute(), Path(job_path).absolute()
    if not job_path.is_relative_to(workdir):
        raise UserError(f"the job {job_path} is outside the workdir {workdir}, the only "
                        "folder the pods mount (train.kubernetes.volume_claim)")
    gpus = gpus_per_pod(settings, device)
    command = agent_command(settings, job_path, ENDPOINT, run_id)
    command[0] = "python"  # the image's interpreter, not this machine's
    name = job_name(run_id)
    labels = {"app.kubernetes.io/name": "reasoning-sft", "app.kubernetes.io/component": "train",
              INSTANCE_LABEL: name, "app.kubernetes.io/managed-by": MANAGED_BY}
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": k.image,
        "command": command,
        # As the local launcher: unbuffered, so the log follows the steps as they happen.
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"},
                {"name": "PYTHONWARNINGS", "value": "ignore"}],
        "ports": [{"name": PORT_NAME, "containerPort": settings.rdzv_port or DEFAULT_PORT,
                   "protocol": "TCP"}],
        "volumeMounts": [{"name": "workdir", "mountPath": str(workdir)},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [
            {"name": "workdir", "persistentVolumeClaim": {"claimName": k.volume_claim}},
            # NCCL and data loaders need more shared memory than a container's default 64 MB.
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    if k.service_account:
        pod_spec["serviceAccountName"] = k.service_account
    if k.node_selector:
        pod_spec["nodeSelector"] = dict(k.node_selector)

    def replicas(n: int) -> dict[str, Any]:
        # Never restart a pod: a failed attempt fails the run, whose rerun resumes from the
        # latest checkpoint with a fresh job.
        return {"replicas": n, "restartPolicy": "Never",
                "template": {"metadata": {"labels": dict(labels)},
                             "spec": copy.deepcopy(pod_spec)}}

    specs = {"Master": replicas(1)}
    if settings.nnodes > 1:
        specs["Worker"] = replicas(settings.nnodes - 1)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": k.namespace, "labels": labels,
                     "annotations": {"reasoning-sft/run-id": run_id,
                                     "reasoning-sft/job": str(job_path)}},
        "spec": {
            "nprocPerNode": str(settings.nproc_per_node),
            "runPolicy": {
                "backoffLimit": 0,
                # Pods still running when the job ends (a worker failed) are deleted; finished
                # pods stay, with their logs, until the job is deleted.
                "cleanPodPolicy": "Running",
                "activeDeadlineSeconds": int(settings.timeout_minutes * 60)
                + DEADLINE_MARGIN_SECONDS,
            },
            "pytorchReplicaSpecs": specs,
        },
    }


def manifest_yaml(manifest: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False, width=100)
