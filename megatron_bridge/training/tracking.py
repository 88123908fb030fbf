"""Experiment tracking of a training run (rank 0 only): TensorBoard, W&B, MLflow.

`open_trackers(settings, folder, run_name, start_step)` opens what `settings.report_to` asks
for in the run's scratch folder `folder`: `tensorboard/` (event files, written through torch's
`SummaryWriter`), `wandb/` (W&B's run folders; `WANDB_MODE=offline` needs no network), `mlruns/`
(MLflow's local file store, unless `tracking.mlflow_tracking_uri` names another), and
`tracking.json`, the W&B / MLflow run ids, so a resumed run re-attaches to the same runs.

Resume without duplicates: training is bit-exact on resume, so the steps after the resumed
checkpoint (`start_step`) are trained — and logged — again with the same values. TensorBoard
purges what an earlier session wrote after `start_step` (`purge_step`: its readers drop those
events); W&B and MLflow cannot delete points offline, so each metric skips the steps it already
holds, read back from the tracker's own files (W&B's transaction logs, the MLflow store), not
from a note of ours a kill could leave behind. W&B writes through a service process that a
kill -9 can take down before it wrote the last points, so on resume W&B and MLflow also log the
steps up to `start_step` that they lack from the trainer's own record (`Trackers.catch_up`).

Tracking never fails training: a tracker's error is printed once and that tracker is off for
the rest of the run. A tracker that is asked for but not installed is a user error, raised
before training starts (`check_installed`)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import struct
import sys
import time
import uuid
import zlib
from pathlib import Path
from typing import Any, Iterator

from settings.errors import UserError
from settings.models import TrainSettings

INSTALL = "pip install 'reasoning-sft[tracking]'"
STATE = "tracking.json"
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_installed(report_to: list[str]) -> None:
    """One line naming the install command when a tracker's package is missing."""
    missing = [name for name in report_to if importlib.util.find_spec(MODULES[name]) is None]
    if missing:
        raise UserError(f"train.report_to asks for {', '.join(missing)}, which is not installed: "
                        f"{INSTALL} (or remove it from train.report_to)")


class Trackers:
    """The open trackers; `log` sends one step's scalars to each, `close` ends their runs."""

    def __init__(self, backends: list[Any]):
        self.backends = backends

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for backend in list(self.backends):
            self._guard(backend, backend.log, step, scalars)

    def catch_up(self, earlier: dict[int, dict[str, float]]) -> None:
        """Log the earlier sessions' steps (`metrics.jsonl`, written before any tracker) that a
        tracker lost to a kill; trackers that skip the steps they hold (W&B, MLflow) only."""
        for backend in [b for b in self.backends if b.skips_held_steps]:
            self._guard(backend, _replay, backend, earlier)

    def close(self) -> None:
        for backend in list(self.backends):
            self._guard(backend, backend.close)
        self.backends = []

    def _guard(self, backend, call, *args) -> None:
        try:
            call(*args)
        except Exception as e:  # never fail training for its tracking
            self.backends.remove(backend)
            _warn(backend.name, e)


def _replay(backend, steps: dict[int, dict[str, float]]) -> None:
    for step, scalars in sorted(steps.items()):
        backend.log(step, scalars)


def _warn(name: str, error: BaseException) -> None:
    print(f"tracking: {name} failed ({type(error).__name__}: {error}); it is off for the rest of "
          "this run", file=sys.stderr, flush=True)


def open_trackers(settings: TrainSettings, folder: Path, run_name: str,
                  start_step: int | None) -> Trackers:
    """The trackers of `settings.report_to` for the run whose scratch folder is `folder`.

    `start_step`: the last step whose points an earlier session of this run keeps (the
    checkpoint training resumed from; 0 for a fresh run). Points after it are logged anew.
    None: add points to the run as it is (a checkpoint's scores after training)."""
    check_installed(settings.report_to)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / STATE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    kinds = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": MLflow}
    backends = []
    for name in settings.report_to:
        try:
            backends.append(kinds[name](settings, folder, run_name, start_step, state))
        except Exception as e:
            _warn(name, e)
        # The run ids go to disk before any point is logged: a kill then still resumes them.
        tmp = state_path.with_name(STATE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, state_path)
    return Trackers(backends)


def config_of(settings: TrainSettings) -> dict[str, Any]:
    """The training settings a tracker records with its run (where it goes left out)."""
    return settings.model_dump(mode="json", exclude={"tracking", "report_to", "slurm",
                                                     "kubernetes"})


class TensorBoard:
    name = "tensorboard"
    skips_held_steps = False  # written synchronously: what a session logged is on disk

    def __init__(self, settings, folder: Path, run_name: str, start_step: int | None,
                 state: dict):
        from torch.utils.tensorboard import SummaryWriter

        logdir = folder / "tensorboard"
        earlier = sorted(logdir.glob("events.out.tfevents.*")) if logdir.is_dir() else []
        # A new event file per session; readers drop the earlier files' events at steps ≥
        # purge_step, which this session writes again.
        purge = start_step + 1 if earlier and start_step is not None else None
        if earlier:
            _after_in_name_order(earlier[-1])
        self.writer = SummaryWriter(str(logdir), purge_step=purge)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a killed run keeps every step it logged

    def close(self) -> None:
        self.writer.close()


def _after_in_name_order(newest: Path) -> None:
    """Readers take event files in name order, `events.out.tfevents.<second>.<host>.<pid>.<n>`:
    a session opened within the same second as the newest file could sort before it (another
    pid, or n past 9), and the purge would then apply to the wrong file. Wait for the next
    second, which only a session following another at once (a test, a quick rerun) ever does."""
    stamp = int(newest.name.split(".")[3])
    while int(time.time()) <= stamp:
        time.sleep(0.05)


class Wandb:
    name = "wandb"
    skips_held_steps = True

    def __init__(self, settings: TrainSettings, folder: Path, run_name: str,
                 start_step: int | None, state: dict):
        import wandb

        t = settings.tracking
        run_id = state.get("wandb", {}).get("id") or uuid.uuid4().hex[:8]
        state["wandb"] = {"id": run_id, "project": t.project}
        # Points of earlier sessions, from W&B's own transaction logs of this run id.
        self.done = logged_steps(wandb_history(folder / "wandb", run_id))
        self.run = wandb.init(
            project=t.project, entity=t.wandb_entity, name=run_name, tags=t.tags or None,
            id=run_id, resume="allow", dir=str(folder), config=config_of(settings),
            # The trainer's stdout is the stage's log: W&B must not wrap it.
            settings=wandb.Settings(console="off", silent=True))
        # Our step, not W&B's own counter: points may come out of order (scores per checkpoint).
        self.run.define_metric("step", hidden=True)
        self.run.define_metric("*", step_metric="step")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        fresh = {k: v for k, v in scalars.items() if step not in self.done.get(k, ())}
        if fresh:
            self.run.log({"step": step, **fresh})

    def close(self) -> None:
        self.run.finish()


class MLflow:
    name = "mlflow"
    skips_held_steps = True

    def __init__(self, settings: TrainSettings, folder: Path, run_name: str,
                 start_step: int | None, state: dict):
        from mlflow.tracking import MlflowClient

        t = settings.tracking
        uri = t.mlflow_tracking_uri or (folder / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 keeps the file store in maintenance and refuses it unless asked; it is the
            # store that needs no server, database or network.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = client = MlflowClient(tracking_uri=uri)
        known = state.get("mlflow", {})
        self.run_id, self.done = None, {}
        if known.get("tracking_uri") == uri:
            run = client.get_run(known["run_id"])
            self.run_id = run.info.run_id
            self.done = {key: {m.step for m in client.get_metric_history(self.run_id, key)}
                         for key in run.data.metrics}
            if run.info.status != "RUNNING":
                client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = client.get_experiment_by_name(t.project)
            experiment_id = (experiment.experiment_id if experiment
                             else client.create_experiment(t.project))
            run = client.create_run(experiment_id, run_name=run_name,
                                    tags={tag: "true" for tag in t.tags})
            self.run_id = run.info.run_id
            state["mlflow"] = {"run_id": self.run_id, "tracking_uri": uri}
            from mlflow.entities import Param

            client.log_batch(self.run_id, params=[
                Param(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
                for k, v in config_of(settings).items()])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        fresh = [Metric(k, float(v), now, step) for k, v in
                 ((mlflow_name(k), v) for k, v in scalars.items()) if step not in self.done.get(k, ())]
        if fresh:
            self.client.log_batch(self.run_id, metrics=fresh)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def mlflow_name(key: str) -> str:
    """MLflow's metric names allow letters, digits, `_-. :/` only: lighteval's `pass@k:k=1&n=2`
    becomes `pass_k:k_1_n_2`."""
    return re.sub(r"[^\w\-. :/]", "_", key)


def logged_steps(rows: list[dict[str, Any]]) -> dict[str, set[int]]:
    """The steps each metric has a point at, in W&B history rows. A point is skipped when its
    step is there already (an earlier session logged it before a kill: training is bit-exact
    on resume), so the steps of a run come once each, in any order (scores per checkpoint)."""
    done: dict[str, set[int]] = {}
    for row in rows:
        for key in row:
            if not key.startswith("_") and key != "step":
                done.setdefault(key, set()).add(row["step"])
    return done


# -- W&B's transaction log (`run-<id>.wandb`): the record of everything a run logged ---------------
BLOCK = 32768
HEADER = b":W&B"


def _log_records(path: Path) -> Iterator[bytes]:
    """The records of a W&B transaction log (LevelDB's log format: 32 KiB blocks of checksummed
    chunks). A tail cut short by a kill ends the read."""
    data = path.read_bytes()
    if data[:4] != HEADER:
        return
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if (left := BLOCK - pos % BLOCK) < 7:
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        body = data[pos + 7:pos + 7 + length]
        if len(body) < length or crc != zlib.crc32(body, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF:
            return
        pos += 7 + length
        if kind == 1:  # full
            yield body
        elif kind == 2:  # first
            pending = body
        elif kind == 3:  # middle
            pending += body
        elif kind == 4:  # last
            yield pending + body
        else:
            return


def wandb_history(wandb_dir: Path, run_id: str) -> list[dict[str, Any]]:
    """Every history row (`run.log` call) of run `run_id` in a W&B folder, over all of its
    sessions (W&B writes one `*-<timestamp>-<id>/` folder per `wandb.init`), in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    # Named `[offline-]run-<YYYYmmdd_HHMMSS>-<id>`, and `…-<id>-<n>` for the n-th more session
    # started in the same second: in time order whatever the mode.
    name = re.compile(rf"^(?:offline-)?run-(\d{{8}}_\d{{6}})-{re.escape(run_id)}(?:-(\d+))?$")
    sessions = [(int(m[1].replace("_", "")), int(m[2] or 0), p)
                for p in Path(wandb_dir).glob("*run-*") if not p.is_symlink()
                and (m := name.match(p.name))]
    for *_, run_dir in sorted(sessions):
        for path in run_dir.glob("run-*.wandb"):
            for body in _log_records(path):
                record = pb.Record()
                record.ParseFromString(body)
                if record.WhichOneof("record_type") == "history":
                    rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                 for item in record.history.item})
    return rows
