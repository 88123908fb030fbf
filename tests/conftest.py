"""Shared fixtures and helpers: real assets, a real Prefect API for the session, the CLI, tiny
real models, the real traces tokenized, a converted checkpoint and training jobs, pipeline runs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from settings.models import DatasetSource, TokenizeSettings, TrainSettings

if TYPE_CHECKING:
    from megatron_bridge.training.job import TrainJob

ROOT = Path(__file__).resolve().parents[1]
SHARED_ASSETS = ROOT.parent / "shared" / "assets"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
R1_TOKENIZER = ROOT / "examples" / "tokenizers" / "deepseek-r1-distill-qwen-1.5b"

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def pytest_configure(config):
    """A worker's share of the cores for torch, here and in every process it starts (they
    inherit OMP_NUM_THREADS): xdist runs one worker per core, and two workers each spinning a
    thread per core run twice as slow as with one thread each (measured: 36 s vs 18.7 s for two
    concurrent tiny evaluations on 2 cores)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Slow tests first: spread over processes (pytest-xdist), the longest work starts at once
    and the quick tests fill the gaps at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory):
    """Environment for `rsft` subprocesses: their own Prefect home and one real `prefect server`
    per test process, shared by all of them (each `rsft run` would otherwise start an ephemeral
    API, ~10 s) and by the in-process flow runs (`prefect_api`)."""
    from benchmarks.chaos_harness import killpg, start_prefect_server

    home = tmp_path_factory.mktemp("prefect-home")
    env = {**os.environ, "PREFECT_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)
    server, env["PREFECT_API_URL"] = start_prefect_server(env, home / "server.log")
    yield env
    killpg(server.pid)
    server.wait()


@pytest.fixture(scope="session")
def prefect_api(cli_env):
    """The session's Prefect API server for the flow runs made in this process (as
    `prefect_test_harness` does, with the server the `rsft` subprocesses use)."""
    from prefect.context import _temporary_global_settings_context, get_settings_context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: cli_env["PREFECT_API_URL"]}), \
            _temporary_global_settings_context(get_settings_context()):
        yield


def settled_task_runs(client, flow_run_filter, timeout: float = 60.0) -> list:
    """The flow runs' task runs once the API has recorded their final states (or `NotReady`:
    never started because an upstream stage failed).

    Prefect 3 reports task-run states as events the server records asynchronously (retrying
    when sqlite is busy), so right after a flow returns a task run can still lack its state,
    show an older one, or be missing: wait until all are final and two reads agree."""
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all()
    deadline = time.monotonic() + timeout
    previous = None
    while True:
        runs = client.read_task_runs(flow_run_filter=flow_run_filter)
        snapshot = sorted((str(r.id), r.state_name, r.run_count) for r in runs)
        if snapshot == previous and all(r.state and (r.state.is_final() or r.state.name == "NotReady")
                                        for r in runs):  # NotReady: an upstream failed
            return runs
        if time.monotonic() > deadline:
            raise AssertionError(f"task runs not settled after {timeout:.0f} s: {snapshot}")
        previous = snapshot
        time.sleep(0.5)


@pytest.fixture
def r1_tokenizer_dir(tmp_path: Path) -> Path:
    """A writable copy of the real DeepSeek-R1-Distill-Qwen tokenizer files."""
    out = tmp_path / "tokenizer"
    shutil.copytree(R1_TOKENIZER, out)
    return out


@pytest.fixture(scope="session")
def patched_tokenizer(tmp_path_factory) -> Path:
    """The R1 tokenizer patched as the tiny preset does (`<short>`, full reasoning kept)."""
    from settings.loader import load_settings
    from tasks.patch_tokenizer import patch_folder

    out = tmp_path_factory.mktemp("patched") / "tokenizer"
    shutil.copytree(R1_TOKENIZER, out)
    patch_folder(out, load_settings("tiny", []).patch_tokenizer)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The built-in tiny Qwen2 as a plain HF folder (read-only for tests: copy before editing)."""
    from tasks.builtin_models import build_builtin

    out = tmp_path_factory.mktemp("tiny-qwen2")
    build_builtin("tiny-qwen2", out)
    return out


def rsft(*args: str, cwd: Path, env: dict[str, str], timeout: int = 300,
         check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"rsft {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def full_disk(tmp_path: Path):
    """A real 1 MiB filesystem (tmpfs): writes past it fail with ENOSPC."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN) to fill a disk")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def make_hf_cache(cache: Path, repo: str, source: Path, commit: str = COMMIT,
                  names: list[str] | None = None, repo_type: str = "model") -> None:
    """The layout huggingface_hub writes: blobs by hash, snapshots of symlinks, refs/main.
    `names` are paths relative to `source` (default: its top-level files)."""
    repo_dir = cache / f"{repo_type}s--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    for name in names or sorted(p.name for p in source.iterdir()):
        data = (source / name).read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


# -- shared helpers and fixtures of the model, data, training and pipeline tests -------------------
TRACES = SHARED_ASSETS / "data" / "openmathreasoning_r1_505.jsonl"
TRACE_FIELDS = {"problem": "user", "generated_solution": "assistant"}
LOG = logging.getLogger("test")


def build_dataset(out: Path, **settings) -> dict:
    from settings.models import DatasetSettings
    from tasks import dataset
    from tasks.stage import BuildContext

    s = DatasetSettings(**settings)
    out.mkdir(parents=True, exist_ok=True)
    meta: dict = {}
    dataset.build(BuildContext(s, out, {}, dataset.fingerprint(s), meta, LOG))
    return json.loads((out / "stats.json").read_text())


FAMILIES = {
    "qwen2": {},
    "llama": {},
    "qwen3": {"head_dim": 32},  # Qwen3 decouples head_dim from hidden/heads
}


def tiny_hf(out: Path, family: str, dtype: torch.dtype = torch.float32, tied: bool = False,
            layers: int = 2, **extra) -> Path:
    """A random tiny model of `family` with the real R1 tokenizer and its full vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        family, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, num_hidden_layers=layers, vocab_size=151936,
        max_position_embeddings=512, tie_word_embeddings=tied, **{**FAMILIES[family], **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # HF initialises biases and norms to constants: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0, 0.5)
    model.to(dtype).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(R1_TOKENIZER / f, out / f)
    return out


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder, single file or sharded."""
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


SEQ = 256


def tokenized(root: Path, tokenizer: Path, settings: TokenizeSettings, rows: int = 8,
              **dataset) -> Path:
    from tasks.tokenize import tokenize_dataset

    subset = root / "traces.jsonl"
    subset.write_text("".join(TRACES.read_text().splitlines(keepends=True)[:rows]))
    build_dataset(root / "ds", sources=[DatasetSource(path=str(subset), fields=TRACE_FIELDS)],
                  **dataset)
    out = root / "tok"
    out.mkdir()
    splits = {s: root / "ds" / f"{s}.parquet" for s in ("train", "test")}
    tokenize_dataset(settings, {s: f for s, f in splits.items() if f.is_file()}, tokenizer, out,
                     LOG)
    return out


@pytest.fixture(scope="session")
def converted(tiny_model_dir, tmp_path_factory) -> Path:
    from megatron_bridge.convert import hf_to_mcore

    out = tmp_path_factory.mktemp("mcore") / "ckpt"
    hf_to_mcore(tiny_model_dir, out, 1, 1)
    return out


@pytest.fixture(scope="session")
def held_out(patched_tokenizer, tmp_path_factory) -> Path:
    """`data`'s 8 traces with 3 of them held out as the test split (validation loss)."""
    return tokenized(tmp_path_factory.mktemp("held-out"), patched_tokenizer,
                     TokenizeSettings(seq_length=SEQ, overlong="truncate", pack=False, workers=1),
                     test_split=3)


@pytest.fixture(scope="session")
def data(patched_tokenizer, tmp_path_factory) -> Path:
    """8 real traces, truncated to 256-token rows (the prompt and the start of each answer)."""
    return tokenized(tmp_path_factory.mktemp("data"), patched_tokenizer,
                     TokenizeSettings(seq_length=SEQ, overlong="truncate", pack=False, workers=1))


def job(converted: Path, data: Path, save: Path, metrics: str = "", **settings) -> TrainJob:
    """A 4-step CPU job; `settings` are the train section's (`device` included: the job's is
    the same)."""
    from megatron_bridge.training.job import TrainJob

    base = dict(device="cpu", train_iters=4, global_batch_size=4, micro_batch_size=1, lr=1e-3,
                min_lr=1e-4, lr_warmup_iters=1, save_interval=2, weight_decay=0.0, seed=7)
    train = TrainSettings(**{**base, **settings})
    return TrainJob(train=train, checkpoint=str(converted), data=str(data), save=str(save),
                    device=train.device, metrics=metrics)


def metrics(j: TrainJob) -> list[dict]:
    return [json.loads(line) for line in j.metrics_path.read_text().splitlines()]


def exported(save: Path, out: Path) -> dict[str, torch.Tensor]:
    """The weights of a Megatron checkpoint folder, read back through the HF export."""
    from megatron_bridge.convert import mcore_to_hf

    mcore_to_hf(save, out)
    return load_folder(out)


def assert_known_shims() -> None:
    """Every CUDA request megatron-core made on this CPU box is a reviewed call site."""
    from megatron_bridge import compat

    unknown = sorted(set(compat.REDIRECTS) - set(compat.KNOWN_CALL_SITES))
    assert not unknown, f"megatron-core asked for CUDA at unreviewed sites: {unknown}"


def run_pipeline(workdir: Path, *overrides: str, **selection):
    """The sft-pipeline flow on the tiny preset, up to patch_tokenizer unless told otherwise:
    (flow state, {stage: task-run state name}, artifact keys)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import sft_pipeline
    from settings import load_settings
    from settings.loader import overrides_dict

    if not {"until", "only", "from_stage"} & selection.keys():  # until=None: everything
        selection["until"] = "patch_tokenizer"
    # Two short training steps: the trainer has its own tests; here it is the wiring.
    quick = ["train.train_iters=2", "train.save_interval=1", "train.lr_warmup_iters=1"]
    assignments = [f"workdir={workdir}", *quick, *overrides]
    load_settings("tiny", assignments)  # a test's own mistake, as a traceback here
    state = sft_pipeline(preset="tiny", settings=overrides_dict(assignments), return_state=True,
                         **selection)
    with get_client(sync_client=True) as client:
        flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        task_runs = settled_task_runs(client, flow_filter)
        artifacts = client.read_artifacts(flow_run_filter=flow_filter)
        prefix = run_key_prefix(client.read_flow_run(state.state_details.flow_run_id).name)
    states = {stage_of(tr.name): tr.state.name for tr in task_runs}
    keys = {a.key for a in artifacts if a.key}
    assert all(k.startswith(prefix) for k in keys), (prefix, keys)  # every key is the run's own
    return state, states, {k.removeprefix(prefix) for k in keys}


def run_key_prefix(flow_run_name: str) -> str:
    """What a run's artifact keys start with: its name as a key, and a dash."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", flow_run_name.lower())).strip("-") + "-"


def stage_of(task_run_name: str) -> str:
    """A stage's task run is named after it once it starts; one that never started (`NotReady`)
    keeps Prefect's provisional `<stage>-<suffix>`."""
    return task_run_name if "-" not in task_run_name else task_run_name.rsplit("-", 1)[0]


def artifact_dir(workdir: Path, stage: str) -> Path:
    (d,) = [p for p in (workdir / "artifacts" / stage).iterdir() if not p.name.startswith(".")]
    return d


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def log(request):
    """A logger of its own whose messages the test reads back (`log.recorder.messages`)."""
    logger = logging.getLogger(f"test-{request.node.name}-{os.getpid()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.recorder = Recorder()
    logger.addHandler(logger.recorder)
    yield logger
    logger.removeHandler(logger.recorder)


class EosAfter:
    """A logits processor that makes the EOS token certain once `n` tokens were generated (a
    random model rarely samples it by itself)."""

    def __init__(self, n: int, eos: int, start: int):
        self.n, self.eos, self.start = n, eos, start

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.start >= self.n:
            scores[:, self.eos] = scores.max() + 100
        return scores


def asking_for(model, key: str, data=None):
    """The model's sharded request plus, per layer, an object stacked along the layers as
    megatron shards them (what a Transformer Engine layer adds for `..._extra_state`; `data`:
    what it saves)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    plain = model.sharded_state_dict
    layers = len(model.decoder.layers)

    def sharded_state_dict(*args, **kwargs):
        return {**plain(*args, **kwargs), **{
            key.replace("layers.", f"layers.{i}."): ShardedObject(key, data, (layers,), (i,), 0)
            for i in range(layers)}}

    model.sharded_state_dict = sharded_state_dict
    return model
