"""`train.launcher: kubernetes`: the PyTorchJob manifest, checked against the Kubeflow training
operator's and Kubernetes' own API models, and the watch loop, played against a fake `kubectl`
(a script that records its arguments and plays a job's lifecycle)."""

from __future__ import annotations

import json
import logging
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from settings.errors import UserError
from settings.loader import load_settings
from tasks.kubernetes import watch
from tasks.kubernetes.launch import run_pytorchjob
from tasks.kubernetes.manifest import MAX_NAME, job_name, pytorchjob_manifest
from tasks.train import resolve_device
from tests.conftest import ROOT, rsft


KEY = "0123456789abcdef"
RUN_ID = f"rsft-{KEY}"
IMAGE = "registry.example/reasoning-sft:1.0"
EXAMPLE = ROOT / "deployments" / "kubernetes" / "pytorchjob.example.yaml"


def train_settings(preset: str = "tiny", *overrides: str, image: str = IMAGE,
                   claim: str = "rsft-workdir"):
    sets = ["train.launcher=kubernetes", *overrides]
    if image:
        sets.append(f"train.kubernetes.image={image}")
    if claim:
        sets.append(f"train.kubernetes.volume_claim={claim}")
    return load_settings(preset, sets).train


def manifest_of(settings, job_path: Path, workdir: Path) -> dict:
    """The manifest for the device the train stage resolves."""
    return pytorchjob_manifest(settings, job_path, workdir, RUN_ID, resolve_device(settings))


# ---------------------------------------------------------------------------------------------
# Strict validation against the operator's and Kubernetes' generated API models

PRIMITIVES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
QUALIFIED_NAME = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*"
                            r"[A-Za-z0-9])?$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


def _model(name: str):
    from kubeflow.training import models as kubeflow_models
    from kubernetes.client import models as k8s_models

    return getattr(kubeflow_models, name, None) or getattr(k8s_models, name)


def _walk(value, type_name: str, path: str, errors: list[str]) -> None:
    """`value` (plain JSON) against an OpenAPI-generated model type: unknown fields, wrong types
    and missing required fields are errors."""
    if type_name.startswith("list["):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            _walk(item, type_name[5:-1], f"{path}[{i}]", errors)
    elif type_name.startswith("dict("):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a map, got {type(value).__name__}")
            return
        inner = type_name[5:-1].split(", ", 1)[1]
        for k, v in value.items():
            if not isinstance(k, str):
                errors.append(f"{path}: key {k!r} is not a string")
            _walk(v, inner, f"{path}.{k}", errors)
    elif type_name in PRIMITIVES:
        ok = isinstance(value, PRIMITIVES[type_name])
        if type_name in ("int", "float") and isinstance(value, bool):
            ok = False
        if not ok:
            errors.append(f"{path}: expected {type_name}, got {type(value).__name__} {value!r}")
    elif type_name == "object":
        pass  # free-form (IntOrString and the like)
    elif type_name in ("datetime", "date"):
        if not isinstance(value, str):
            errors.append(f"{path}: expected a timestamp string")
    else:
        cls = _model(type_name)
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a {type_name} object, got {type(value).__name__}")
            return
        by_json = {json_name: attr for attr, json_name in cls.attribute_map.items()}
        kwargs = {}
        for key, item in value.items():
            if key not in by_json:
                errors.append(f"{path}.{key}: unknown field of {type_name}")
                continue
            kwargs[by_json[key]] = item
            _walk(item, cls.openapi_types[by_json[key]], f"{path}.{key}", errors)
        try:  # the generated setters refuse a missing required field
            cls(**kwargs)
        except ValueError as e:
            errors.append(f"{path}: {type_name}: {e}")


def _rules(manifest: dict, errors: list[str]) -> None:
    """What the operator's validating webhook (pytorchjob_webhook.go, webhooks/utils) and the
    API server's pod-template validation check beyond the types."""
    meta = manifest.get("metadata", {})
    name = meta.get("name", "")
    if not (DNS1035_LABEL.match(name) and len(name) <= 63):
        errors.append(f"metadata.name {name!r}: not a DNS-1035 label")
    if manifest.get("apiVersion") != "kubeflow.org/v1" or manifest.get("kind") != "PyTorchJob":
        errors.append("apiVersion/kind: not kubeflow.org/v1 PyTorchJob")
    for key, value in {**meta.get("labels", {})}.items():
        if not QUALIFIED_NAME.match(key) or not (LABEL_VALUE.match(value) and len(value) <= 63):
            errors.append(f"metadata.labels: invalid label {key}={value}")
    spec = manifest.get("spec", {})
    policy = spec.get("runPolicy", {})
    if policy.get("cleanPodPolicy", "None") not in ("All", "Running", "None"):
        errors.append(f"spec.runPolicy.cleanPodPolicy {policy.get('cleanPodPolicy')!r}")
    nproc = spec.get("nprocPerNode", "auto")
    if not (str(nproc).isdigit() or nproc in ("auto", "cpu", "gpu")):
        errors.append(f"spec.nprocPerNode {nproc!r}")
    replicas = spec.get("pytorchReplicaSpecs") or {}
    if not replicas:
        errors.append("spec.pytorchReplicaSpecs: must be required")
    for rtype, rspec in replicas.items():
        path = f"spec.pytorchReplicaSpecs.{rtype}"
        if rtype not in ("Master", "Worker"):
            errors.append(f"{path}: unsupported replica type")
        count = rspec.get("replicas")
        if rtype == "Master" and count != 1:
            errors.append(f"{path}.replicas: must be 1")
        if rtype == "Worker" and isinstance(count, int) and count < 1:
            errors.append(f"{path}.replicas: must be at least 1")
        if rspec.get("restartPolicy", "Never") not in ("Always", "OnFailure", "Never", "ExitCode"):
            errors.append(f"{path}.restartPolicy {rspec.get('restartPolicy')!r}")
        template = rspec.get("template", {})
        for key, value in template.get("metadata", {}).get("labels", {}).items():
            if not QUALIFIED_NAME.match(key) or not (LABEL_VALUE.match(value)
                                                     and len(value) <= 63):
                errors.append(f"{path}.template.metadata.labels: invalid label {key}={value}")
        pod = template.get("spec", {})
        containers = pod.get("containers") or []
        if not any(c.get("name") == "pytorch" for c in containers):
            errors.append(f"{path}.template.spec.containers: must have one named pytorch")
        volumes = {v.get("name") for v in pod.get("volumes") or []}
        for v in pod.get("volumes") or []:
            if not DNS1123_LABEL.match(v.get("name", "")):
                errors.append(f"{path}: volume name {v.get('name')!r}")
        for c in containers:
            if not c.get("image"):
                errors.append(f"{path}: container {c.get('name')}: image must be required")
            if not DNS1123_LABEL.match(c.get("name", "")):
                errors.append(f"{path}: container name {c.get('name')!r}")
            for env in c.get("env") or []:
                if not ENV_NAME.match(env.get("name", "")):
                    errors.append(f"{path}: env name {env.get('name')!r}")
            for port in c.get("ports") or []:
                if "name" in port and not (len(port["name"]) <= 15
                                           and DNS1123_LABEL.match(port["name"])):
                    errors.append(f"{path}: port name {port['name']!r}")
                if not 0 < int(port.get("containerPort") or 0) < 65536:
                    errors.append(f"{path}: containerPort {port.get('containerPort')!r}")
            for mount in c.get("volumeMounts") or []:
                if mount.get("name") not in volumes:
                    errors.append(f"{path}: volumeMount {mount.get('name')!r} has no volume")
                if not str(mount.get("mountPath", "")).startswith("/"):
                    errors.append(f"{path}: mountPath {mount.get('mountPath')!r} not absolute")


def schema_errors(manifest: dict) -> list[str]:
    """Everything wrong with a PyTorchJob manifest, as JSON would reach the API server."""
    plain = json.loads(json.dumps(manifest))  # what kubectl sends: JSON types only
    errors: list[str] = []
    _walk(plain, "KubeflowOrgV1PyTorchJob", "", errors)
    _rules(plain, errors)
    return errors


def test_the_validator_catches_each_kind_of_mistake(tmp_path: Path):
    good = manifest_of(train_settings("tiny", "train.nnodes=2"),
                       tmp_path / "scratch/train/k/job.json", tmp_path)
    assert schema_errors(good) == []

    def broken(edit) -> list[str]:
        manifest = json.loads(json.dumps(good))
        edit(manifest)
        return schema_errors(manifest)

    def container(m):
        return m["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]

    assert "unknown field" in " ".join(broken(lambda m: container(m).update(gpus=1)))
    assert "unknown field" in " ".join(broken(lambda m: m["spec"].update(nprocs="1")))
    assert "expected int" in " ".join(
        broken(lambda m: m["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas="1")))
    assert "expected str" in " ".join(
        broken(lambda m: m["spec"].update(nprocPerNode=1)))
    assert "expected str" in " ".join(
        broken(lambda m: container(m).update(resources={"limits": {"nvidia.com/gpu": 8}})))
    assert "expected a list" in " ".join(broken(lambda m: container(m).update(command="python")))
    assert "must not be `None`" in " ".join(broken(lambda m: container(m).pop("name")))
    assert "must not be `None`" in " ".join(broken(
        lambda m: m["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["volumes"][0]
        ["persistentVolumeClaim"].pop("claimName")))
    assert "must not be `None`" in " ".join(broken(lambda m: m["spec"].pop("runPolicy")))
    assert "restartPolicy" in " ".join(
        broken(lambda m: m["spec"]["pytorchReplicaSpecs"]["Master"].update(restartPolicy="Nevr")))
    assert "must be 1" in " ".join(
        broken(lambda m: m["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas=2)))
    assert "named pytorch" in " ".join(broken(lambda m: container(m).update(name="trainer")))
    assert "DNS-1035" in " ".join(broken(lambda m: m["metadata"].update(name="0-job")))
    assert "has no volume" in " ".join(
        broken(lambda m: container(m)["volumeMounts"].append({"name": "x", "mountPath": "/x"})))


# ---------------------------------------------------------------------------------------------
# The manifest


def test_tiny_manifest_one_cpu_pod(tmp_path: Path):
    workdir = tmp_path / "work"
    job_path = workdir / "scratch" / "train" / KEY / "job.json"
    manifest = manifest_of(train_settings(), job_path, workdir)
    assert schema_errors(manifest) == []
    assert manifest["metadata"]["name"] == RUN_ID
    assert manifest["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "reasoning-sft"
    spec = manifest["spec"]
    assert list(spec["pytorchReplicaSpecs"]) == ["Master"]  # one node: no Worker entry
    assert spec["nprocPerNode"] == "1"
    assert spec["runPolicy"]["backoffLimit"] == 0
    master = spec["pytorchReplicaSpecs"]["Master"]
    assert master["replicas"] == 1 and master["restartPolicy"] == "Never"
    pod = master["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "pytorch" and container["image"] == IMAGE
    # One process: the trainer itself, on the image's python.
    assert container["command"] == ["python", "-m", "megatron_bridge.training", str(job_path)]
    assert "resources" not in container  # CPU: no GPU limit
    assert {"name": "PYTHONUNBUFFERED", "value": "1"} in container["env"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "workdir")
    assert mount["mountPath"] == str(workdir)
    volume = next(v for v in pod["volumes"] if v["name"] == "workdir")
    assert volume["persistentVolumeClaim"] == {"claimName": "rsft-workdir"}
    assert "serviceAccountName" not in pod and "nodeSelector" not in pod


def test_thinkless_two_nodes(tmp_path: Path):
    workdir = tmp_path / "work"
    job_path = workdir / "scratch" / "train" / KEY / "job.json"
    settings = train_settings(
        "thinkless-warmup-1.5b", "train.nnodes=2", "train.rdzv_port=29400",
        "train.kubernetes.namespace=ml", "train.kubernetes.service_account=trainer",
        "train.kubernetes.node_selector={nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}")
    manifest = manifest_of(settings, job_path, workdir)
    assert schema_errors(manifest) == []
    assert manifest["metadata"]["namespace"] == "ml"
    specs = manifest["spec"]["pytorchReplicaSpecs"]
    assert {k: v["replicas"] for k, v in specs.items()} == {"Master": 1, "Worker": 1}
    assert manifest["spec"]["nprocPerNode"] == "8"
    for rspec in specs.values():
        pod = rspec["template"]["spec"]
        (container,) = pod["containers"]
        assert container["resources"] == {"limits": {"nvidia.com/gpu": "8"}}
        assert container["ports"] == [{"name": "pytorchjob-port", "containerPort": 29400,
                                       "protocol": "TCP"}]
        command = container["command"]
        assert command[:3] == ["python", "-m", "torch.distributed.run"]
        assert command[command.index("--rdzv_endpoint") + 1] == "$(MASTER_ADDR):$(MASTER_PORT)"
        assert command[command.index("--nnodes") + 1] == "2"
        assert command[command.index("--nproc_per_node") + 1] == "8"
        assert command[command.index("--rdzv_id") + 1] == RUN_ID
        assert command[-1] == str(job_path)
        assert pod["serviceAccountName"] == "trainer"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert any(m["mountPath"] == str(workdir) for m in container["volumeMounts"])
    # Explicit GPUs per pod; fewer GPUs than processes is refused.
    more = train_settings("thinkless-warmup-1.5b", "train.kubernetes.gpus_per_pod=8",
                          "train.nproc_per_node=4", "train.global_batch_size=128")
    container = manifest_of(more, job_path, workdir)["spec"][
        "pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    fewer = train_settings("thinkless-warmup-1.5b", "train.kubernetes.gpus_per_pod=4")
    with pytest.raises(UserError, match="gpus_per_pod"):
        manifest_of(fewer, job_path, workdir)


def test_the_gpu_limit_follows_the_device_passed_in(tmp_path: Path):
    job_path = tmp_path / "scratch" / "train" / KEY / "job.json"
    settings = train_settings("tiny", "train.device=auto", "train.nproc_per_node=2")

    def gpu_limit(device: str):
        container = pytorchjob_manifest(settings, job_path, tmp_path, RUN_ID, device)["spec"][
            "pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        return container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")

    assert resolve_device(settings) == "cuda"  # auto on a cluster: its pods get GPUs
    # Only the caller's device counts, not whatever a job file on disk says.
    job_path.parent.mkdir(parents=True)
    job_path.write_text(json.dumps({"device": "cpu"}))
    assert gpu_limit("cuda") == "2"
    assert gpu_limit("cpu") is None  # the trainer will run on CPU: no GPUs asked for


def test_job_names_are_dns_labels():
    assert job_name("rsft-0123456789abcdef") == "rsft-0123456789abcdef"
    assert job_name("1_Run.ID") == "rsft-1-run-id"
    long_a, long_b = "rsft-" + "a" * 80, "rsft-" + "a" * 79 + "b"
    for run_id in (long_a, long_b, "x" * 200, "--Weird__ID--"):
        name = job_name(run_id)
        assert DNS1035_LABEL.match(name) and len(name) <= MAX_NAME, name
        assert len(f"{name}-worker-1000") <= 63
    assert job_name(long_a) != job_name(long_b)


@pytest.mark.parametrize("missing,setting", [("image", "train.kubernetes.image"),
                                             ("claim", "train.kubernetes.volume_claim")])
def test_missing_setting_is_one_line_and_nothing_happens(tmp_path: Path, fake_kubectl,
                                                         missing, setting):
    kwargs = {missing: ""}
    settings = train_settings("tiny", f"train.kubernetes.kubectl={fake_kubectl.path}", **kwargs)
    work = _work(tmp_path)
    with pytest.raises(UserError) as err:
        run_pytorchjob(settings, work / "job.json", work, tmp_path / "w", RUN_ID, "cpu", 60,
                       logging.getLogger("t"))
    message = str(err.value)
    assert message.startswith(setting) and "\n" not in message
    assert sorted(p.name for p in work.iterdir()) == ["job.json"]  # nothing written
    assert fake_kubectl.calls() == []  # nothing asked of the cluster


def test_example_manifest_is_current(tmp_path: Path, cli_env):
    """deployments/kubernetes/pytorchjob.example.yaml is what its header's `rsft kubernetes
    manifest` command prints."""
    text = EXAMPLE.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    command = next(line for line in header if line.startswith("# rsft kubernetes manifest "))
    printed = rsft(*shlex.split(command)[2:], cwd=tmp_path, env=cli_env, check=True).stdout
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#")) + "\n"
    assert body.lstrip("\n") == printed
    manifest = yaml.safe_load(body)
    assert schema_errors(manifest) == []
    assert manifest["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1


# ---------------------------------------------------------------------------------------------
# The watch loop, against a fake kubectl

FAKE_KUBECTL = r'''
import fcntl, json, os, sys, time

d = os.environ["FAKE_KUBE_DIR"]
argv = sys.argv[1:]
with open(os.path.join(d, "calls.jsonl"), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    f.write(json.dumps(argv) + "\n")
scen = json.load(open(os.path.join(d, "scenario.json")))
if scen.get("unreachable"):
    sys.stderr.write("E0101 memcache.go: couldn't get current server API group list\n"
                     "The connection to the server localhost:8080 was refused - did you specify "
                     "the right host or port?\n")
    sys.exit(1)
lock = open(os.path.join(d, "lock"), "a")
fcntl.flock(lock, fcntl.LOCK_EX)
state_path = os.path.join(d, "state.json")
state = (json.load(open(state_path)) if os.path.exists(state_path)
         else {"job": scen.get("existing"), "applied": False, "gets": 0, "dropped": False})


def save():
    with open(state_path, "w") as f:
        json.dump(state, f)


def job_json(name, phase):
    kinds = {"": [], "Created": ["Created"], "Running": ["Created", "Running"]}.get(
        phase, ["Created", "Running", phase])
    conditions = [{"type": kind, "status": "True", "reason": "PyTorchJob" + kind,
                   "message": f"PyTorchJob {name} is {kind.lower()}."} for kind in kinds]
    if phase in ("Succeeded", "Failed"):
        conditions[1]["status"] = "False"
    if phase == "Failed":
        conditions[-1]["message"] = scen.get("message", "")
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": name}, "status": {"conditions": conditions}}


def pod(name, kind, index, phase):
    status = {"phase": phase, "containerStatuses": [{"name": "pytorch", "image": "img",
                                                     "state": {}}]}
    if phase == "Pending":
        reason = scen.get("image_error") or "ContainerCreating"
        status["containerStatuses"][0]["state"] = {"waiting": {
            "reason": reason, "message": f"{reason}: \"img\" is not valid\nmore"}}
    labels = {"app.kubernetes.io/instance": name}
    labels[scen.get("replica_label", "training.kubeflow.org/replica-type")] = kind
    return {"metadata": {"name": f"{name}-{kind}-{index}", "labels": labels}, "status": status}


verb = argv[0]
if verb == "get" and argv[1] == "pytorchjobs.kubeflow.org":
    name = argv[2]
    if state["applied"]:
        life = scen["lifecycle"]
        state["job"] = life[min(state["gets"], len(life) - 1)]
        state["gets"] += 1
    save()
    if state["job"] is not None:
        print(json.dumps(job_json(name, state["job"])))
elif verb == "get" and argv[1] == "pods":
    name = argv[3].split("=", 1)[1]
    phase = {"": "Pending", "Created": "Pending"}.get(state["job"] or "", state["job"])
    items = []
    if state["applied"]:
        items.append(pod(name, "master", 0, phase))
        items += [pod(name, "worker", i, phase) for i in range(scen.get("workers", 0))]
    print(json.dumps({"kind": "List", "items": items}))
elif verb == "apply":
    path = argv[argv.index("-f") + 1]
    with open(os.path.join(d, "applied.yaml"), "w") as f:
        f.write(open(path).read())
    state.update(applied=True, gets=0, job="")
    save()
    print("pytorchjob.kubeflow.org/x created")
elif verb == "delete":
    state.update(applied=False, job=None)
    save()
    print("pytorchjob.kubeflow.org \"x\" deleted")
elif verb == "logs":
    pod_name = argv[1]
    lines = scen["worker_log"] if "-worker-" in pod_name else scen["log"]
    drop = "-f" in argv and scen.get("drop_after") and not state["dropped"]
    state["dropped"] = state["dropped"] or bool(drop)
    save()
    lock.close()  # stream without holding the others up
    since = argv[argv.index("--since-time") + 1][:19] if "--since-time" in argv else ""
    for i, (stamp, text) in enumerate(lines):
        if drop and i == scen["drop_after"]:
            sys.exit(0)  # the stream drops while the job runs
        if stamp[:19] < since:  # the API server has second precision
            continue
        print(f"{stamp} {text}" if "--timestamps" in argv else text, flush=True)
    if "-f" in argv and scen.get("hang"):
        time.sleep(3600)
else:
    sys.stderr.write(f"error: unexpected call {argv}\n")
    sys.exit(1)
'''


class FakeKubectl:
    def __init__(self, root: Path):
        self.dir = root / "kube"
        self.dir.mkdir()
        self.path = root / "bin" / "kubectl"
        self.path.parent.mkdir()
        self.path.write_text(f"#!{sys.executable} -S\n{FAKE_KUBECTL}")
        self.path.chmod(0o755)
        self.play()

    def play(self, lifecycle=("Created", "Running", "Running", "Succeeded"), **scenario):
        scenario = {"lifecycle": list(lifecycle), "log": LOG, "worker_log": WORKER_LOG,
                    **scenario}
        (self.dir / "scenario.json").write_text(json.dumps(scenario))

    def calls(self) -> list[list[str]]:
        path = self.dir / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() \
            else []

    def verbs(self) -> list[str]:
        """The calls in short: `get job`, `get pods`, `apply`, `logs`, `delete`, collapsing
        repeats."""
        out: list[str] = []
        for argv in self.calls():
            verb = argv[0] if argv[0] != "get" else f"get {'pods' if argv[1] == 'pods' else 'job'}"
            if not out or out[-1] != verb:
                out.append(verb)
        return out


LOG = [["2025-01-01T00:00:01.000000001Z", "training: 2 nodes × 1 processes, 12 steps"],
       ["2025-01-01T00:00:01.000000001Z", "[rank0]: building the model"],
       ["2025-01-01T00:00:01.5Z", "step 1/12 loss 11.93 lr 2.5e-04"],
       ["2025-01-01T00:00:02Z", "step 2/12 loss 11.80 lr 5.0e-04"],
       ["2025-01-01T00:00:02.25Z", "some library chatter"],
       ["2025-01-01T00:00:03.000000009Z", "step 3/12 loss 11.52 lr 7.5e-04"],
       ["2025-01-01T00:00:03.000000009Z", "training: saved iteration 3"]]
WORKER_LOG = [["2025-01-01T00:00:01Z", "worker rank 1 up"]]


@pytest.fixture
def fake_kubectl(tmp_path: Path, monkeypatch) -> FakeKubectl:
    fake = FakeKubectl(tmp_path)
    monkeypatch.setenv("FAKE_KUBE_DIR", str(fake.dir))
    monkeypatch.setattr(watch, "POLL_SECONDS", 0.02)
    monkeypatch.setattr(watch, "RECONNECT_SECONDS", 0.02)
    monkeypatch.setattr(watch, "LOG_DRAIN_SECONDS", 10.0)
    return fake


def _work(tmp_path: Path, device: str = "cpu") -> Path:
    workdir = tmp_path / "w"
    work = workdir / "scratch" / "train" / KEY
    work.mkdir(parents=True)
    (work / "job.json").write_text(json.dumps({
        "checkpoint": str(workdir / "artifacts" / "convert" / "c"),
        "data": str(workdir / "artifacts" / "tokenize" / "t"),
        "save": str(work / "checkpoints"), "metrics": str(work / "metrics.jsonl"),
        "device": device}))
    return work


def _run(fake: FakeKubectl, tmp_path: Path, log, *overrides: str, timeout: float = 60):
    settings = train_settings("tiny", f"train.kubernetes.kubectl={fake.path}", *overrides)
    work = _work(tmp_path)
    run_pytorchjob(settings, work / "job.json", work, tmp_path / "w", RUN_ID, "cpu", timeout, log)
    return work


def _log_lines(work: Path) -> list[str]:
    return [line for line in (work / "train.log").read_text().splitlines()
            if not line.startswith("$ ")]


def test_a_job_that_succeeds(tmp_path: Path, fake_kubectl, log):
    fake_kubectl.play(workers=1)
    work = _run(fake_kubectl, tmp_path, log, "train.nnodes=2",
                "train.kubernetes.namespace=ml")
    verbs = fake_kubectl.verbs()
    # Nothing to replace, create, poll (job, pods), follow the master, then the worker's log.
    assert verbs[:3] == ["get job", "apply", "get job"]
    assert "logs" in verbs and "delete" not in verbs
    calls = fake_kubectl.calls()
    assert all(c[-2:] == ["-n", "ml"] for c in calls)
    assert calls[0] == ["get", "pytorchjobs.kubeflow.org", RUN_ID, "--ignore-not-found", "-o",
                        "json", "-n", "ml"]
    assert calls[1] == ["apply", "-f", str(work / "pytorchjob.yaml"), "-n", "ml"]
    follow = [c for c in calls if c[0] == "logs" and "-f" in c]
    assert follow and all(c[1] == f"{RUN_ID}-master-0" and "--timestamps" in c for c in follow)
    assert ["logs", f"{RUN_ID}-worker-0", "-c", "pytorch", "-n", "ml"] in calls
    # What was applied is the manifest written beside the job, and it is valid.
    applied = (fake_kubectl.dir / "applied.yaml").read_text()
    assert applied == (work / "pytorchjob.yaml").read_text()
    assert schema_errors(yaml.safe_load(applied)) == []
    # The master's whole log in train.log; the trainer's lines in the Prefect log.
    assert _log_lines(work) == [text for _, text in LOG]
    assert (work / "train.node1.log").read_text().splitlines()[1:] == ["worker rank 1 up"]
    forwarded = [m for m in log.recorder.messages
                 if m.startswith(("train: step ", "train: training:"))]
    assert forwarded == [f"train: {text}" for _, text in LOG
                         if text.startswith(("step ", "training:"))]
    assert any("Succeeded" in m for m in log.recorder.messages)


def test_a_rerun_replaces_the_finished_job(tmp_path: Path, fake_kubectl, log):
    fake_kubectl.play(existing="Failed")
    _run(fake_kubectl, tmp_path, log)
    calls = fake_kubectl.calls()
    assert [c[0] for c in calls[:3]] == ["get", "delete", "apply"]
    assert calls[1][:3] == ["delete", "pytorchjobs.kubeflow.org", RUN_ID]
    assert "--cascade=foreground" in calls[1] and "--wait=true" in calls[1]
    assert "delete" not in fake_kubectl.verbs()[2:]
    assert any("earlier attempt (Failed)" in m for m in log.recorder.messages)


def test_a_failed_job(tmp_path: Path, fake_kubectl, log):
    message = "PyTorchJob rsft-x is failed because 1 Worker replica(s) failed."
    fake_kubectl.play(lifecycle=["Created", "Running", "Failed"], message=message, workers=1,
                      log=LOG + [["2025-01-01T00:00:04Z", "RuntimeError: NCCL timeout"]])
    with pytest.raises(RuntimeError) as err:
        _run(fake_kubectl, tmp_path, log, "train.nnodes=2")
    text = str(err.value)
    assert message in text and "RuntimeError: NCCL timeout" in text and "step 3/12" in text
    assert fake_kubectl.verbs()[-1] == "delete"
    assert (tmp_path / "w/scratch/train" / KEY / "train.node1.log").exists()


def test_a_trainer_error_is_a_user_error(tmp_path: Path, fake_kubectl, log):
    fake_kubectl.play(lifecycle=["Created", "Running", "Failed"], message="exit code 2",
                      log=[["2025-01-01T00:00:01Z", ("error: train.device is cuda but no GPU is "
                                                     "visible; set train.device: cpu")]])
    with pytest.raises(UserError, match=r"^train.device is cuda but no GPU is visible; set "
                                        r"train.device: cpu$"):
        _run(fake_kubectl, tmp_path, log)
    assert fake_kubectl.verbs()[-1] == "delete"


def test_a_timeout_deletes_the_job(tmp_path: Path, fake_kubectl, log):
    fake_kubectl.play(lifecycle=["Running"], hang=True)
    with pytest.raises(UserError, match=r"timed out after .* \(train.timeout_minutes\); rerun"):
        _run(fake_kubectl, tmp_path, log, timeout=3)
    calls = fake_kubectl.calls()
    assert calls[-1][:3] == ["delete", "pytorchjobs.kubeflow.org", RUN_ID]
    assert "--wait=false" in calls[-1]
    assert "logs" in fake_kubectl.verbs()
    # The lines streamed before the timeout are in train.log.
    assert _log_lines(tmp_path / "w/scratch/train" / KEY) == [text for _, text in LOG]


def test_cancellation_deletes_the_job(tmp_path: Path, fake_kubectl, log, monkeypatch):
    fake_kubectl.play(lifecycle=["Created", "Running"], hang=True)
    waits = []

    def cancelled(seconds):
        waits.append(seconds)
        if len(waits) == 4:
            raise KeyboardInterrupt  # what a cancelled run raises in its thread
    monkeypatch.setattr(watch, "_wait", cancelled)
    with pytest.raises(KeyboardInterrupt):
        _run(fake_kubectl, tmp_path, log)
    assert fake_kubectl.verbs()[-1] == "delete"


def test_an_image_that_cannot_be_pulled(tmp_path: Path, fake_kubectl, log):
    fake_kubectl.play(lifecycle=["Created"], image_error="InvalidImageName")
    with pytest.raises(UserError) as err:
        _run(fake_kubectl, tmp_path, log)
    assert "InvalidImageName" in str(err.value) and "train.kubernetes.image" in str(err.value)
    assert "\n" not in str(err.value)
    assert fake_kubectl.verbs()[-1] == "delete"


def test_a_dropped_log_stream_is_followed_again(tmp_path: Path, fake_kubectl, log):
    # The stream drops after 3 lines; the next one starts at that line's second, replaying it.
    fake_kubectl.play(lifecycle=["Created"] + ["Running"] * 6 + ["Succeeded"], drop_after=3,
                      replica_label="pytorch-replica-type")  # an older operator's label
    work = _run(fake_kubectl, tmp_path, log)
    follows = [c for c in fake_kubectl.calls() if c[0] == "logs"]
    assert len(follows) >= 2
    assert follows[1][follows[1].index("--since-time") + 1] == "2025-01-01T00:00:01.5Z"
    assert _log_lines(work) == [text for _, text in LOG]  # each line once, in order


def test_kubectl_missing_or_cluster_unreachable(tmp_path: Path, fake_kubectl, log):
    settings = train_settings("tiny", "train.kubernetes.kubectl=no-such-kubectl-here")
    work = _work(tmp_path)
    with pytest.raises(UserError, match=r"^train.kubernetes.kubectl: 'no-such-kubectl-here' not "
                                        r"found") as err:
        run_pytorchjob(settings, work / "job.json", work, tmp_path / "w", RUN_ID, "cpu", 60, log)
    assert "\n" not in str(err.value) and not (work / "pytorchjob.yaml").exists()

    fake_kubectl.play(unreachable=True)
    settings = train_settings("tiny", f"train.kubernetes.kubectl={fake_kubectl.path}")
    with pytest.raises(UserError, match="cannot reach the cluster") as err:
        run_pytorchjob(settings, work / "job.json", work, tmp_path / "w", RUN_ID, "cpu", 60, log)
    assert "\n" not in str(err.value) and "localhost:8080 was refused" in str(err.value)
    assert [c[0] for c in fake_kubectl.calls()] == ["get"]  # nothing created


def test_job_paths_outside_the_workdir_are_refused(tmp_path: Path, fake_kubectl, log):
    work = _work(tmp_path)
    job = json.loads((work / "job.json").read_text())
    job["data"] = "/elsewhere/tokenize"
    (work / "job.json").write_text(json.dumps(job))
    settings = train_settings("tiny", f"train.kubernetes.kubectl={fake_kubectl.path}")
    with pytest.raises(UserError, match="data /elsewhere/tokenize is outside the workdir"):
        run_pytorchjob(settings, work / "job.json", work, tmp_path / "w", RUN_ID, "cpu", 60, log)
    assert fake_kubectl.calls() == []


def test_parse_timestamp():
    assert watch.parse_timestamp("2025-01-01T00:00:01Z") == 1735689601 * 10**9
    assert watch.parse_timestamp("2025-01-01T00:00:01.5Z") == 1735689601 * 10**9 + 5 * 10**8
    assert watch.parse_timestamp("2025-01-01T01:00:01.000000001+01:00") == 1735689601 * 10**9 + 1
    assert watch.parse_timestamp("step") is None


def test_the_train_stage_launches_through_here(tmp_path: Path, fake_kubectl, log):
    from tasks.train import launch

    settings = train_settings("tiny", f"train.kubernetes.kubectl={fake_kubectl.path}")
    work = _work(tmp_path)
    launch(settings, work / "job.json", work, tmp_path / "w", "cpu", log)
    applied = yaml.safe_load((fake_kubectl.dir / "applied.yaml").read_text())
    assert applied["metadata"]["name"] == f"rsft-{KEY}"
    assert _log_lines(work) == [text for _, text in LOG]
