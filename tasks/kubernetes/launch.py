"""`run_pytorchjob`, what the train stage calls for `launcher: kubernetes`:

1. refuses missing settings in one line before anything is written or created;
2. writes the manifest to `<work>/pytorchjob.yaml`, deletes a job of the same name left by an
   earlier attempt (a rerun restarts and resumes from the latest checkpoint), `kubectl apply`s it;
3. polls the job's conditions (Created/Running/Succeeded/Failed) and its pods (reporting
   scheduling and image problems), follows the master pod's log into the shared agent watcher
   (`train.log`, the trainer's lines to the Prefect log);
4. returns when the job Succeeded; deletes it on timeout, failure or cancellation. Workers' logs
   end up in `<work>/train.node<i>.log`, as with the local launcher.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from settings.errors import UserError
from settings.models import TrainSettings
from tasks.agent_watch import AgentWatch
from tasks.kubernetes.client import Kubectl, KubectlError, find_kubectl, preflight_error
from tasks.kubernetes.manifest import manifest_yaml, pytorchjob_manifest
from tasks.kubernetes.watch import JobWatch, job_condition


def run_pytorchjob(settings: TrainSettings, job_path: Path, work: Path, workdir: Path,
                   run_id: str, device: str, timeout: float, log) -> None:
    """Create the PyTorchJob for `job_path` (training on `device`), follow it, return when it
    Succeeded. `work` is the stage's scratch folder inside `workdir`, the shared volume's root
    (mounted at the same path in the pods). Raises UserError
    for settings, cluster and trainer mistakes and timeouts, RuntimeError for a failed job;
    deletes the job on timeout, failure and cancellation."""
    work, workdir = Path(work).absolute(), Path(workdir).absolute()
    manifest = pytorchjob_manifest(settings, job_path, workdir, run_id, device)
    _check_job_paths(Path(job_path), workdir)
    kubectl = Kubectl(find_kubectl(settings.kubernetes.kubectl), settings.kubernetes.namespace)
    name, namespace = manifest["metadata"]["name"], kubectl.namespace
    where = f"PyTorchJob {namespace}/{name}"
    manifest_path = work / "pytorchjob.yaml"
    manifest_path.write_text(manifest_yaml(manifest))

    try:
        previous = kubectl.get_job(name)
    except KubectlError as e:
        raise preflight_error(e, namespace) from None
    if previous is not None:
        state = job_condition(previous).get("type", "pending")
        log.info("train: deleting the %s left by an earlier attempt (%s)", where, state)
        try:
            kubectl.delete(name, wait=True)
        except KubectlError as e:
            raise RuntimeError(f"cannot delete the earlier {where}: {e}") from None

    with AgentWatch(work / "train.log", timeout, log) as output:
        output.note(f"$ {shlex.join(kubectl.command('apply', '-f', str(manifest_path)))}"
                    f"  # {where}")
        watch = JobWatch(kubectl, name, where, output, log)
        try:
            try:
                kubectl.apply(manifest_path)
            except KubectlError as e:
                raise UserError(f"kubectl apply {manifest_path} failed: {e}") from None
            nodes = settings.nnodes
            log.info("train: created %s (%d pod%s × %d process%s); kubectl get pytorchjob %s "
                     "-n %s", where, nodes, "s" if nodes > 1 else "", settings.nproc_per_node,
                     "es" if settings.nproc_per_node > 1 else "", name, namespace)
            condition = watch.until_done()
        except BaseException:  # cancelled, or the watch failed: leave nothing running
            watch.stop_logs()
            _delete_quietly(kubectl, name, log)
            raise
        if condition is None:  # the deadline passed with the pods still running
            watch.stop_logs()
        else:
            watch.drain_logs()
        watch.save_worker_logs(work)
        if condition is not None and condition.get("type") == "Succeeded":
            log.info("train: %s succeeded", where)
            return
        _delete_quietly(kubectl, name, log)
        output.result(_failure(where, condition))


def _failure(where: str, condition: dict | None) -> str:
    """What ended the job, for the outcome of a failed run."""
    if condition is None:
        return f"{where} still running at the deadline"
    why = ": ".join(x for x in (condition.get("reason", ""), condition.get("message", "")) if x)
    return f"{where} {why or 'failed'}"


def _delete_quietly(kubectl: Kubectl, name: str, log) -> None:
    try:
        kubectl.delete(name, wait=False)
    except (KubectlError, OSError) as e:  # already failing: report, do not mask the cause
        log.warning("train: could not delete PyTorchJob %s: %s", name, e)


def _check_job_paths(job_path: Path, workdir: Path) -> None:
    """Every path the trainer opens must be on the volume the pods mount."""
    try:
        job = json.loads(job_path.read_text())
    except (OSError, ValueError):
        return  # the trainer reports an unreadable job itself
    for field in ("checkpoint", "data", "save", "metrics"):
        value = job.get(field)
        if value and not Path(value).absolute().is_relative_to(workdir):
            raise UserError(f"the job's {field} {value} is outside the workdir {workdir}, "
                            "the only folder the pods mount (train.kubernetes.volume_claim)")
