"""The trainer on CPU: a tiny real model (built-in Qwen2 with the real vocabulary), the real R1
traces tokenized with the patched tokenizer; numerics of the loss, parallel equivalence under
torchrun (gloo), exact resume after kill -9, and bad input caught before any step."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_bridge.training.job import JobError, TrainJob
from settings.models import DatasetSource, TokenizeSettings
from tests.conftest import ROOT
from tests.test_data import LOG, TRACE_FIELDS, TRACES, build_dataset

SEQ = 256


@pytest.fixture(scope="module")
def converted(tiny_model_dir, tmp_path_factory) -> Path:
    from megatron_bridge.convert import hf_to_mcore

    out = tmp_path_factory.mktemp("mcore") / "ckpt"
    hf_to_mcore(tiny_model_dir, out, 1, 1)
    return out


@pytest.fixture(scope="module")
def data(patched_tokenizer, tmp_path_factory) -> Path:
    """8 real traces, truncated to 256-token rows (the prompt and the start of each answer)."""
    from tasks.tokenize import tokenize_dataset

    root = tmp_path_factory.mktemp("data")
    subset = root / "traces.jsonl"
    subset.write_text("".join(TRACES.read_text().splitlines(keepends=True)[:8]))
    build_dataset(root / "ds", sources=[DatasetSource(path=str(subset), fields=TRACE_FIELDS)])
    out = root / "tok"
    out.mkdir()
    tokenize_dataset(TokenizeSettings(seq_length=SEQ, overlong="truncate", pack=False, workers=1),
                     {"train": root / "ds" / "train.parquet"}, patched_tokenizer, out, LOG)
    return out


def job(converted: Path, data: Path, save: Path, **kw) -> TrainJob:
    base = dict(checkpoint=str(converted), data=str(data), save=str(save), train_iters=4,
                global_batch_size=4, micro_batch_size=1, lr=1e-3, min_lr=1e-4, lr_warmup_iters=1,
                save_interval=2, weight_decay=0.0, seed=7)
    return TrainJob(**{**base, **kw})


def launch(j: TrainJob, path: Path, nproc: int = 1, **popen) -> subprocess.Popen:
    j.write(path)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = ([sys.executable, "-m", "megatron_bridge.training", str(path)] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "-m", "megatron_bridge.training", str(path)])
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def train(j: TrainJob, path: Path, nproc: int = 1) -> list[dict]:
    proc = launch(j, path, nproc)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    return [json.loads(line) for line in j.metrics_path.read_text().splitlines()]


def weights(save: Path) -> dict[str, torch.Tensor]:
    """The final model of a save folder, read back through the HF export."""
    from megatron_bridge.convert import mcore_to_hf
    from tests.test_megatron_bridge import load_folder

    out = save.parent / f"{save.name}-hf"
    mcore_to_hf(save, out)
    return load_folder(out)


# -- numerics, in process ---------------------------------------------------------------------------
@pytest.fixture
def stepper(converted, data, tmp_path):
    """A CPU stepper over the converted model, in this process (world of one)."""
    from megatron_bridge import checkpoint
    from megatron_bridge.build import build_model
    from megatron_bridge.parallel import model_parallel
    from megatron_bridge.training.step import CpuStepper

    meta = checkpoint.read_metadata(converted)
    with model_parallel(1, 1, seed=0):
        model = build_model(meta["hf_config"], 1, 1, torch.float32)
        checkpoint.load(model, converted)
        yield CpuStepper(model, job(converted, data, tmp_path / "s"), meta["vocab_size"])


def loss_and_grads(stepper, micro_batches):
    stepper.model.zero_grad(set_to_none=False)
    total = sum(float(mb.loss_mask.sum()) for mb in micro_batches)
    per_token = []
    for mb in micro_batches:
        losses = stepper.losses(mb)
        (losses * mb.loss_mask).sum().div(total).backward()
        per_token.append(losses.detach()[mb.loss_mask.bool()])
    grads = {n: p.grad.clone() for n, p in stepper.named}
    return torch.cat(per_token), grads


def test_labels_at_masked_positions_do_not_matter(stepper, data):
    from megatron_bridge.data.indexed import SFTDataset
    from megatron_bridge.training.batches import pack_rows

    mb = pack_rows(SFTDataset(data / "train"), np.array([0, 1]), SEQ)
    assert 0 < mb.loss_mask.sum() < mb.loss_mask.numel()
    loss_a, grads_a = loss_and_grads(stepper, [mb])
    scrambled = replace(mb, labels=torch.where(mb.loss_mask.bool(), mb.labels,
                                               torch.randint_like(mb.labels, 0, 151000)))
    assert not torch.equal(scrambled.labels, mb.labels)
    loss_b, grads_b = loss_and_grads(stepper, [scrambled])
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


def test_packed_and_unpacked_rows_give_the_same_loss_and_gradients(stepper, data):
    from megatron_bridge.data.indexed import SFTDataset
    from megatron_bridge.training.batches import MicroBatch, pack_rows

    ds = SFTDataset(data / "train")
    a, b = (pack_rows(ds, np.array([i]), SEQ) for i in (0, 1))
    na, nb = sum(a.lengths[0]), sum(b.lengths[0])
    # The same two documents packed into one row of 2×SEQ.
    packed = MicroBatch(
        tokens=torch.cat([a.tokens[:, :na], b.tokens[:, :nb]], 1),
        labels=torch.cat([a.labels[:, :na], b.labels[:, :nb]], 1),
        loss_mask=torch.cat([a.loss_mask[:, :na], b.loss_mask[:, :nb]], 1),
        position_ids=torch.cat([a.position_ids[:, :na], b.position_ids[:, :nb]], 1),
        segments=torch.cat([torch.zeros(1, na, dtype=torch.long), torch.ones(1, nb, dtype=torch.long)], 1),
        lengths=[[na, nb]])
    loss_u, grads_u = loss_and_grads(stepper, [a, b])
    loss_p, grads_p = loss_and_grads(stepper, [packed])
    assert torch.allclose(loss_u, loss_p, atol=1e-6, rtol=0)
    for n in grads_u:
        assert torch.allclose(grads_u[n], grads_p[n], atol=1e-6, rtol=1e-5), n


def test_per_token_loss_is_the_global_token_mean(stepper, data):
    """Two micro-batches with different supervised counts: the step's loss is the mean over all
    their supervised tokens, not the mean of the two micro-batch means."""
    from megatron_bridge.data.indexed import SFTDataset
    from megatron_bridge.training.batches import pack_rows

    ds = SFTDataset(data / "train")
    mbs = [pack_rows(ds, np.array([i]), SEQ) for i in (0, 3)]
    per_token, _ = loss_and_grads(stepper, mbs)
    result = stepper.step(mbs, lr=0.0)
    assert result["supervised_tokens"] == len(per_token)
    assert result["loss"] == pytest.approx(per_token.double().mean().item(), abs=1e-6)


def test_learning_rate_schedule():
    from megatron_bridge.training.schedule import learning_rate

    lrs = [learning_rate(s, lr=1.0, min_lr=0.1, warmup=2, total=10) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0] and lrs[-1] == pytest.approx(0.1)
    assert all(x >= y for x, y in zip(lrs[1:], lrs[2:]))


# -- whole runs under torchrun / subprocesses ------------------------------------------------------
def test_loss_falls_clearly_on_the_real_traces(converted, data, tmp_path):
    metrics = train(job(converted, data, tmp_path / "save", train_iters=24, global_batch_size=4,
                        lr=5e-3, min_lr=5e-4, lr_warmup_iters=2, save_interval=24), tmp_path / "j.json")
    first, last = metrics[0]["loss"], metrics[-1]["loss"]
    assert first > 10 and last < 0.6 * first, (first, last)
    assert [m["step"] for m in metrics] == list(range(1, 25))
    save = tmp_path / "save"
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "24"
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000024"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{"tensor_parallel": 2}, {}], ids=["TP2", "DP2"])
def test_two_ranks_match_one(converted, data, tmp_path, layout):
    one = train(job(converted, data, tmp_path / "one"), tmp_path / "one.json")
    two = train(job(converted, data, tmp_path / "two", **layout), tmp_path / "two.json", nproc=2)
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
        assert a["supervised_tokens"] == b["supervised_tokens"]
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * max(1.0, a["grad_norm"])


@pytest.mark.slow
def test_kill_9_and_rerun_gives_bit_identical_weights(converted, data, tmp_path):
    base = dict(train_iters=6, save_interval=2, keep_last=1)
    train(job(converted, data, tmp_path / "straight", **base), tmp_path / "a.json")
    killed = job(converted, data, tmp_path / "killed", **base)
    proc = launch(killed, tmp_path / "b.json", start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once step 3 is logged (a checkpoint at 2 exists)
        if killed.metrics_path.is_file() and len(killed.metrics_path.read_text().splitlines()) >= 3:
            break
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert (tmp_path / "killed" / "latest_checkpointed_iteration.txt").read_text() in ("2", "4")
    train(killed, tmp_path / "b.json")  # resumes
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in killed.metrics_path.read_text().splitlines()]
    assert steps == list(range(1, 7))  # redone steps are not logged twice


# -- bad input: one line, before any step -----------------------------------------------------------
def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        target = data
        *parents, last = key.split(".")
        for p in parents:
            target = target[p]
        target[last] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("case, message", [
    ("missing", "is not a Megatron checkpoint"),
    ("tokenizer", "the data was tokenized with a tokenizer whose EOS is 1"),
    ("batch", "global_batch_size=3 is not divisible by micro_batch_size × data-parallel size = 2 × 1"),
    ("gpu", "train.device is cuda but no GPU is visible"),
    ("seq", "the data's seq_length 256 is above the model's max_position_embeddings 128"),
])
def test_bad_input_fails_in_one_line_before_training(converted, data, tmp_path, case, message):
    from megatron_bridge.checkpoint import CheckpointError
    from megatron_bridge.training.trainer import run

    ckpt, tok = tmp_path / "ckpt", tmp_path / "tok"
    shutil.copytree(converted, ckpt)
    shutil.copytree(data, tok)
    j = job(ckpt, tok, tmp_path / "save")
    if case == "missing":
        (ckpt / "latest_checkpointed_iteration.txt").unlink()
    elif case == "tokenizer":
        _edit_json(tok / "stats.json", **{"tokenizer.eos_id": 1})
    elif case == "batch":
        j = replace(j, global_batch_size=3, micro_batch_size=2)
    elif case == "gpu":
        j = replace(j, device="cuda")
    else:
        _edit_json(ckpt / "rsft_checkpoint.json", **{"hf_config.max_position_embeddings": 128})
    if case == "tokenizer":  # once through the real entry point: exit 2, one `error:` line
        proc = launch(j, tmp_path / "j.json")
        _, err = proc.communicate(timeout=300)
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], err[-2000:]
    else:
        with pytest.raises((JobError, CheckpointError)) as e:
            run(j)
        assert message in str(e.value) and "\n" not in str(e.value)
    assert not j.metrics_path.exists()  # no step ran


def test_job_checks_refuse_pipeline_parallel_on_cpu(converted, data):
    meta = json.loads((converted / "rsft_checkpoint.json").read_text())
    stats = json.loads((data / "stats.json").read_text())
    with pytest.raises(JobError, match="pipeline-parallel training needs CUDA"):
        job(converted, data, Path("x"), pipeline_parallel=2).check(2, meta, stats)
