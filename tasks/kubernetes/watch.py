"""Watching a PyTorchJob: its conditions and pods as kubectl reports them, the master pod's log
followed into the shared agent watcher (`tasks/agent_watch.py`), the poll loop between them."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from settings.errors import UserError
from tasks.agent_watch import AgentWatch
from tasks.kubernetes.client import Kubectl, KubectlError
from tasks.kubernetes.manifest import CONTAINER

POLL_SECONDS = 10.0  # job and pod status polling
RECONNECT_SECONDS = 5.0  # before re-following a dropped log stream
API_GRACE_SECONDS = 300.0  # kubectl get failing this long in a row ends the watch
IMAGE_PULL_GRACE_SECONDS = 300.0  # a pod stuck pulling its image this long fails the run
LOG_DRAIN_SECONDS = 60.0  # for the master's log stream to end once the job has finished
IMAGE_ERRORS_FATAL = {"InvalidImageName", "ErrImageNeverPull"}
IMAGE_ERRORS_RETRIED = {"ErrImagePull", "ImagePullBackOff"}
# The operator's labels on a job's pods (current ones first, then an older operator's).
REPLICA_TYPE_LABELS = ("training.kubeflow.org/replica-type", "pytorch-replica-type")
REPLICA_INDEX_LABELS = ("training.kubeflow.org/replica-index", "pytorch-replica-index")


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


class MasterLog:
    """Follows the master pod's log (in a thread) into the agent watcher, each line once: a stream
    that drops while the job runs is followed again from the last line's timestamp, and the
    replayed lines are skipped."""

    def __init__(self, kubectl: Kubectl, pod: str, output: AgentWatch, log):
        self.kubectl, self.pod, self.output, self.log = kubectl, pod, output, log
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
                self.output.line(text)
            error = _first_line(self.proc.stderr.read())
            if self.proc.wait() and error and error != reported and not self.stopped.is_set():
                self.log.warning("train: kubectl logs %s: %s", self.pod, error)
                reported = error
            if final or self.stopped.is_set():
                return
            self.stopped.wait(RECONNECT_SECONDS)

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


def _wait(seconds: float) -> None:
    time.sleep(seconds)


class JobWatch:
    """Polls the job and its pods; follows the master's log once its container has started."""

    def __init__(self, kubectl: Kubectl, name: str, where: str, output: AgentWatch, log):
        self.kubectl, self.name, self.where = kubectl, name, where
        self.output, self.log = output, log
        self.master_log: MasterLog | None = None
        self.master_pod: str | None = None
        self.workers: dict[int, str] = {}
        self.reported: dict[str, str] = {}  # pod -> last problem reported
        self.pulling_since: dict[str, float] = {}

    def until_done(self) -> dict[str, Any] | None:
        """The job's terminal condition, or None at the run's deadline."""
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
            remaining = self.output.remaining()
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
                self.master_log = MasterLog(self.kubectl, pod_name, self.output, self.log)

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
            self.master_log = MasterLog(self.kubectl, self.master_pod, self.output, self.log)
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
