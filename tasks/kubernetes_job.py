"""`train.launcher: kubernetes`: the training job as a Kubeflow PyTorchJob, created and watched
from the `train` task with `kubectl` (its current context selects the cluster).

The job has one pod per node (`Master` + `nnodes - 1` `Worker`s); each runs the same torchrun
agent as the other launchers (`tasks.train_launch.agent_command`), meeting at a c10d rendezvous on
`$(MASTER_ADDR):$(MASTER_PORT)`, which the training operator sets in every replica. The workdir is
a shared volume (`train.kubernetes.volume_claim`) mounted in the pods at the same absolute path as
on the machine running the flow, so the job JSON, the checkpoints and `metrics.jsonl` are the same
files on both sides.

The task:
1. refuses missing settings in one line before anything is written or created;
2. writes the manifest to `<work>/pytorchjob.yaml`, deletes a job of the same name left by an
   earlier attempt (a rerun restarts and resumes from the latest checkpoint), `kubectl apply`s it;
3. polls the job's conditions (Created/Running/Succeeded/Failed) and its pods (reporting
   scheduling and image problems), follows the master pod's log into `<work>/train.log`
   (reconnecting if the stream drops) and forwards the trainer's lines to the Prefect log;
4. returns when the job Succeeded; deletes it on timeout, failure or cancellation. Workers' logs
   end up in `<work>/train.node<i>.log`, as with the local launcher.

No Kubernetes Python client at run time: kubectl's JSON is all it reads.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import threading
import time
from datetime import datetime
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
REPLICA_TYPE_LABELS = ("training.kubeflow.org/replica-type", "pytorch-replica-type")
REPLICA_INDEX_LABELS = ("training.kubeflow.org/replica-index", "pytorch-replica-index")
# "<name>-worker-<i>" names the pods and their services, which must stay DNS labels (<= 63).
MAX_NAME = 45
# The job's own deadline on the cluster: it outlives a controller killed without cleanup by at
# most this margin past train.timeout_minutes (the task's timeout fires first).
DEADLINE_MARGIN_SECONDS = 600

POLL_SECONDS = 10.0  # job and pod status polling
RECONNECT_SECONDS = 5.0  # before re-following a dropped log stream
API_GRACE_SECONDS = 300.0  # kubectl get failing this long in a row ends the watch
IMAGE_PULL_GRACE_SECONDS = 300.0  # a pod stuck pulling its image this long fails the run
LOG_DRAIN_SECONDS = 60.0  # for the master's log stream to end once the job has finished
KUBECTL_TIMEOUT = 120.0
IMAGE_ERRORS_FATAL = {"InvalidImageName", "ErrImageNeverPull"}
IMAGE_ERRORS_RETRIED = {"ErrImagePull", "ImagePullBackOff"}


# ---------------------------------------------------------------------------------------------
# The manifest


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


def trainer_device(settings: TrainSettings, job_path: Path | str) -> str:
    """The device the trainer will use: the setting, or for `auto` the one the stage resolved into
    the job JSON (on the machine running the flow), or cuda before a job exists."""
    if settings.device != "auto":
        return settings.device
    try:
        return json.loads(Path(job_path).read_text())["device"]
    except (OSError, ValueError, KeyError):
        return "cuda"


def gpus_per_pod(settings: TrainSettings, device: str) -> int:
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
                        run_id: str) -> dict[str, Any]:
    """The PyTorchJob running the training job `job_path` (inside `workdir`) on `nnodes` pods."""
    check_settings(settings)
    k = settings.kubernetes
    workdir, job_path = Path(workdir).absolute(), Path(job_path).absolute()
    if not job_path.is_relative_to(workdir):
        raise UserError(f"the job {job_path} is outside the workdir {workdir}, the only "
                        "folder the pods mount (train.kubernetes.volume_claim)")
    gpus = gpus_per_pod(settings, trainer_device(settings, job_path))
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


# ---------------------------------------------------------------------------------------------
# kubectl


class KubectlError(RuntimeError):
    pass


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


# ---------------------------------------------------------------------------------------------
# Job and pod status


def job_condition(job: dict[str, Any]) -> dict[str, Any]:
    """The job's terminal condition if it has one, else its latest true condition ({} if none)."""
    conditions = [c for c in job.get("status", {}).get("conditions") or []
                  if c.get("status") == "True"]
    for c in conditions:
        if c.get("type") in ("Succeeded", "Failed"):
            return c
    return conditions[-1] if conditions else {}


def replica(pod: dict[str, Any]) -> tuple[str, int]:
    """(replica type, index) of a pod of the job, from the operator's labels (current or old)."""
    meta = pod.get("metadata", {})
    labels = meta.get("labels") or {}
    kind = next((labels[k] for k in REPLICA_TYPE_LABELS if k in labels), "")
    index = next((labels[k] for k in REPLICA_INDEX_LABELS if k in labels), None)
    if not kind or index is None:  # the operator names pods <job>-<type>-<index>
        match = re.search(r"-(master|worker)-(\d+)$", meta.get("name", ""))
        if match:
            kind, index = kind or match[1], index if index is not None else match[2]
    return kind.lower(), int(index or 0)


def pod_problems(pod: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(container, image, reason, message) for containers that cannot start, and scheduling."""
    status = pod.get("status", {})
    found = []
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            found.append(("", "", cond.get("reason", "Unschedulable"), cond.get("message", "")))
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason", "")
        if reason and reason not in ("ContainerCreating", "PodInitializing"):
            found.append((cs.get("name", ""), cs.get("image", ""), reason,
                          waiting.get("message", "")))
    return found


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


_TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$")


def parse_timestamp(text: str) -> int | None:
    """Nanoseconds since the epoch of an RFC 3339 timestamp as `kubectl logs --timestamps`
    prints them (None if `text` is not one)."""
    match = _TS.match(text)
    if not match:
        return None
    zone = "+00:00" if match[3] == "Z" else match[3]
    seconds = int(datetime.fromisoformat(match[1] + zone).timestamp())
    return seconds * 1_000_000_000 + int((match[2] or "0").ljust(9, "0"))


# ---------------------------------------------------------------------------------------------
# The master's log


class MasterLog:
    """Follows the master pod's log into train.log, forwarding the trainer's lines (`step …`,
    `training: …`) to the Prefect log and collecting its `error: …` lines. A stream that drops
    while the job runs is followed again from the last line's timestamp; replayed lines are
    skipped."""

    def __init__(self, kubectl: Kubectl, pod: str, log_file, log):
        self.kubectl, self.pod, self.log_file, self.log = kubectl, pod, log_file, log
        self.errors: list[str] = []
        self.finished = threading.Event()  # the job has ended: one last read, then stop
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.last: int | None = None  # timestamp of the last line written (ns)
        self.last_text = ""
        self.at_last: list[str] = []  # the lines written with that timestamp
        self.thread = threading.Thread(target=self._follow, name=f"logs-{pod}", daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        # No parent-death signal needed: if this process dies, kubectl's next write to the
        # closed pipe ends it.
        reported = ""
        while not self.stopped.is_set():
            final = self.finished.is_set()
            args = ["logs", self.pod, "-c", CONTAINER, "--timestamps", "-f"]
            if self.last is not None:
                args += ["--since-time", self.last_text]
            with self.lock:
                if self.stopped.is_set():
                    return
                try:
                    self.proc = subprocess.Popen(
                        self.kubectl.command(*args), stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True, errors="replace")
                except OSError as e:
                    self.log.warning("train: cannot follow %s's log: %s", self.pod, e)
                    return
            assert self.proc.stdout is not None and self.proc.stderr is not None
            replay = list(self.at_last)
            for raw in self.proc.stdout:
                stamp, _, text = raw.partition(" ")
                t = parse_timestamp(stamp)
                if t is None:  # no timestamp: take the line as it is
                    text = raw
                elif self.last is not None and t < self.last:
                    continue  # replayed after a reconnect
                elif t == self.last and replay and replay[0] == text:
                    replay.pop(0)
                    continue
                else:
                    if t != self.last:
                        self.last, self.last_text, self.at_last = t, stamp, []
                    self.at_last.append(text)
                self._line(text)
            error = _first_line(self.proc.stderr.read())
            if self.proc.wait() and error and error != reported and not self.stopped.is_set():
                self.log.warning("train: kubectl logs %s: %s", self.pod, error)
                reported = error
            if final or self.stopped.is_set():
                return
            self.stopped.wait(RECONNECT_SECONDS)

    def _line(self, line: str) -> None:
        self.log_file.write(line if line.endswith("\n") else line + "\n")
        self.log_file.flush()
        text = line.rstrip()
        if text.startswith(("step ", "training:")):
            self.log.info("train: %s", text)
        elif "error: " in text:
            self.errors.append(text.split("error: ", 1)[1])

    def finish(self, drain: float) -> None:
        """The job has ended: let the stream end by itself (the container has exited), within
        `drain` seconds, then stop."""
        self.finished.set()
        self.thread.join(drain)
        self.stop()

    def stop(self) -> None:
        with self.lock:
            self.stopped.set()
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
        self.thread.join(10)


# ---------------------------------------------------------------------------------------------
# Running the job


def _wait(seconds: float) -> None:
    time.sleep(seconds)


def run_pytorchjob(settings: TrainSettings, job_path: Path, work: Path, run_id: str,
                   timeout: float, log) -> None:
    """Create the PyTorchJob for `job_path`, follow it, return when it Succeeded. `work` is
    `<workdir>/scratch/train/<key>` on the shared volume. Raises UserError for settings, cluster
    and trainer mistakes and timeouts, RuntimeError for a failed job; deletes the job on timeout,
    failure and cancellation."""
    work = Path(work).absolute()
    workdir = work.parents[2]  # <workdir>/scratch/train/<key>
    manifest = pytorchjob_manifest(settings, job_path, workdir, run_id)
    _check_job_paths(Path(job_path), workdir)
    kubectl = Kubectl(find_kubectl(settings.kubernetes.kubectl), settings.kubernetes.namespace)
    if settings.device == "auto" and trainer_device(settings, job_path) == "cpu":
        log.warning("train: device auto resolved to cpu on this machine, so the pods train on "
                    "CPU; set train.device: cuda to train on the cluster's GPUs")
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

    log_path = work / "train.log"
    deadline = time.monotonic() + timeout
    with open(log_path, "a") as log_file:
        log_file.write(f"$ {shlex.join(kubectl.command('apply', '-f', str(manifest_path)))}"
                       f"  # {where}\n")
        log_file.flush()
        watch = _Watch(settings, kubectl, name, where, log_file, log)
        try:
            try:
                kubectl.apply(manifest_path)
            except KubectlError as e:
                raise UserError(f"kubectl apply {manifest_path} failed: {e}") from None
            nodes = settings.nnodes
            log.info("train: created %s (%d pod%s × %d process%s); kubectl get pytorchjob %s "
                     "-n %s", where, nodes, "s" if nodes > 1 else "", settings.nproc_per_node,
                     "es" if settings.nproc_per_node > 1 else "", name, namespace)
            condition = watch.until_done(deadline)
        except BaseException:  # cancelled, or the watch failed: leave nothing running
            watch.stop_logs()
            _delete_quietly(kubectl, name, log)
            raise
        _finish(watch, condition, timeout, log_path, where, work, kubectl, name, log)


def _finish(watch: _Watch, condition: dict[str, Any] | None, timeout: float, log_path: Path,
            where: str, work: Path, kubectl: Kubectl, name: str, log) -> None:
    if condition is None:  # timed out: the pods still run
        watch.stop_logs()
        watch.save_worker_logs(work)
        _delete_quietly(kubectl, name, log)
        raise UserError(f"timed out after {timeout / 60:.0f} min (train.timeout_minutes); "
                        "rerun to resume from the latest checkpoint")
    watch.drain_logs()
    watch.save_worker_logs(work)
    if condition.get("type") == "Succeeded":
        log.info("train: %s succeeded", where)
        return
    _delete_quietly(kubectl, name, log)
    if watch.errors:
        raise UserError(f"{watch.errors[-1]}")
    why = ": ".join(x for x in (condition.get("reason", ""), condition.get("message", "")) if x)
    tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-30:])
    raise RuntimeError(f"training failed: {where} {why or 'failed'}; see {log_path}:\n{tail}")


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


class _Watch:
    """Polls the job and its pods; follows the master's log once its container has started."""

    def __init__(self, settings: TrainSettings, kubectl: Kubectl, name: str, where: str,
                 log_file, log):
        self.settings, self.kubectl, self.name, self.where = settings, kubectl, name, where
        self.log_file, self.log = log_file, log
        self.master_log: MasterLog | None = None
        self.master_pod: str | None = None
        self.workers: dict[int, str] = {}
        self.reported: dict[str, str] = {}  # pod -> last problem reported
        self.pulling_since: dict[str, float] = {}

    @property
    def errors(self) -> list[str]:
        return self.master_log.errors if self.master_log else []

    def until_done(self, deadline: float) -> dict[str, Any] | None:
        """The job's terminal condition, or None at the deadline."""
        last_type = ""
        failing_since: float | None = None
        while True:
            try:
                job = self.kubectl.get_job(self.name)
                failing_since = None
            except KubectlError as e:
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                    self.log.warning("train: kubectl get %s failed (retrying): %s", self.name, e)
                elif now - failing_since > API_GRACE_SECONDS:
                    raise RuntimeError(f"cannot read {self.where} for "
                                       f"{API_GRACE_SECONDS:.0f} s: {e}") from None
                job = {}
            if job is None:
                raise RuntimeError(f"{self.where} was deleted outside this run")
            condition = job_condition(job) if job else {}
            kind = condition.get("type", "")
            if kind and kind != last_type:
                self.log.info("train: %s %s%s", self.where, kind,
                              f" ({condition['message']})" if condition.get("message") else "")
                last_type = kind
            if job:
                self._pods(terminal=kind in ("Succeeded", "Failed"))
            if kind in ("Succeeded", "Failed"):
                return condition
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            _wait(min(POLL_SECONDS, remaining))

    def _pods(self, terminal: bool) -> None:
        try:
            pods = self.kubectl.pods(self.name)
        except KubectlError as e:
            self.log.warning("train: kubectl get pods of %s failed: %s", self.name, e)
            return
        now = time.monotonic()
        for pod in pods:
            pod_name = pod.get("metadata", {}).get("name", "")
            kind, index = replica(pod)
            if kind == "master":
                self.master_pod = pod_name
            elif kind == "worker":
                self.workers[index] = pod_name
            self._check(pod_name, pod_problems(pod), now)
            started = pod.get("status", {}).get("phase") in ("Running", "Succeeded", "Failed")
            if kind == "master" and self.master_log is None and (started or terminal):
                self.master_log = MasterLog(self.kubectl, pod_name, self.log_file, self.log)

    def _check(self, pod: str, problems: list[tuple[str, str, str, str]], now: float) -> None:
        pulling = False
        for container, image, reason, message in problems:
            if reason in IMAGE_ERRORS_FATAL or reason in IMAGE_ERRORS_RETRIED:
                pulling = True
                since = self.pulling_since.setdefault(pod, now)
                if reason in IMAGE_ERRORS_FATAL or now - since >= IMAGE_PULL_GRACE_SECONDS:
                    raise UserError(f"pod {pod} cannot start container {container} (image "
                                    f"{image}): {reason}: {_first_line(message)}; check "
                                    "train.kubernetes.image and the cluster's access to it")
        if not pulling:
            self.pulling_since.pop(pod, None)
        summary = "; ".join(f"{c + ': ' if c else ''}{r}: {_first_line(m)}".rstrip(": ")
                            for c, _, r, m in problems)
        if summary and summary != self.reported.get(pod):
            self.log.warning("train: pod %s: %s", pod, summary)
        self.reported[pod] = summary

    def drain_logs(self) -> None:
        if self.master_log is None and self.master_pod is not None:  # ended between two polls
            self.master_log = MasterLog(self.kubectl, self.master_pod, self.log_file, self.log)
        if self.master_log is not None:
            self.master_log.finish(LOG_DRAIN_SECONDS)

    def stop_logs(self) -> None:
        if self.master_log is not None:
            self.master_log.stop()

    def save_worker_logs(self, work: Path) -> None:
        """Each worker's log (as the kubelet still has it) to train.node<i>.log."""
        for index, pod in sorted(self.workers.items()):
            try:
                text = self.kubectl.logs(pod)
            except KubectlError as e:
                text = f"(no log: {e})\n"
            with open(work / f"train.node{index + 1}.log", "a") as f:
                f.write(f"# kubectl logs {pod}\n{text}")


# ---------------------------------------------------------------------------------------------
# `python -m tasks.kubernetes_job`: print the manifest a preset would get (no cluster needed)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from settings.loader import load_settings

    parser = argparse.ArgumentParser(
        prog="python -m tasks.kubernetes_job",
        description="Print the PyTorchJob manifest the train stage would create.")
    parser.add_argument("config", nargs="?", help="preset name or YAML file (default: tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="setting override, as for rsft run")
    parser.add_argument("--workdir", help="the workdir's absolute path in the pods "
                        "(default: the settings' workdir, resolved here)")
    parser.add_argument("--key", default="0123456789abcdef", help="the train stage's key")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config, args.overrides)
        workdir = Path(args.workdir or settings.workdir).absolute()
        job_path = workdir / "scratch" / "train" / args.key / "job.json"
        manifest = pytorchjob_manifest(settings.train, job_path, workdir, f"rsft-{args.key}")
    except UserError as e:
        print(f"error: {e}")
        return 2
    print(manifest_yaml(manifest), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
