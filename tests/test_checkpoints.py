"""Every checkpoint evaluated: the training run's lineage (a longer run continues a shorter one,
bit-exactly) and the per-checkpoint export/evaluate plan keyed by lineage and iteration. (The
whole pipeline with `evaluate.checkpoints: all`, extended from 4 to 6 steps: test_whole_run.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from settings import load_settings
from settings.errors import UserError
from tests.conftest import exported, job, metrics


# -- the trainer: one folder, runs of several lengths ------------------------------------------------
def test_a_longer_run_continues_a_shorter_one_bit_exactly(converted, data, tmp_path):
    """4 steps, then 6 in the same folder with the decay horizon fixed at 6: the same weights as
    6 steps at once (the data order is a function of the step, the LR of the horizon)."""
    from megatron_bridge.training.trainer import run

    common = dict(lr_decay_iters=6, save_interval=2, keep_last=1, attention_dropout=0.1)
    run(job(converted, data, tmp_path / "extended", train_iters=4, **common))
    extended = job(converted, data, tmp_path / "extended", train_iters=6, **common)
    run(extended)
    fresh = job(converted, data, tmp_path / "fresh", train_iters=6, **common)
    run(fresh)
    a, b = exported(tmp_path / "extended", tmp_path / "a"), exported(tmp_path / "fresh", tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    numbers = ("step", "loss", "lr", "grad_norm", "tokens", "supervised_tokens")
    assert ([{k: r[k] for k in numbers} for r in metrics(extended)]
            == [{k: r[k] for k in numbers} for r in metrics(fresh)])
    # Without the fixed horizon the 4-step run decays to min_lr by step 4: other weights.
    run(job(converted, data, tmp_path / "own", train_iters=4, save_interval=2))
    run(job(converted, data, tmp_path / "own", train_iters=6, save_interval=2))
    own = exported(tmp_path / "own", tmp_path / "c")
    assert not all(torch.equal(own[k], a[k]) for k in a)


def test_a_shorter_run_resumes_before_a_longer_runs_checkpoints_and_keeps_chosen_ones(
        converted, data, tmp_path):
    from megatron_bridge.training.job import read_metrics
    from megatron_bridge.training.state import resume_point
    from megatron_bridge.training.trainer import run

    save = tmp_path / "run"
    common = dict(lr_decay_iters=6, save_interval=1, keep_last=1)
    long = job(converted, data, save, train_iters=6, **common).model_copy(update={"keep": [2, 4]})
    run(long)
    # keep_last 1 prunes all but the newest, except the iterations the pipeline evaluates.
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000002", "iter_0000004",
                                                             "iter_0000006"]
    assert not list(save.glob(".*deleting"))
    assert resume_point(save, 5) == 4 and resume_point(save, 6) == 6 and resume_point(save, 1) is None
    short = job(converted, data, save, train_iters=5, **common).model_copy(update={"keep": [2, 4]})
    run(short)  # resumes at 4, trains step 5
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "5"
    assert [m["step"] for m in read_metrics(short.metrics_path)] == [1, 2, 3, 4, 5, 6]
    assert [m["step"] for m in read_metrics(short.metrics_path, until=5)] == [1, 2, 3, 4, 5]
    five = exported(save, tmp_path / "five")  # the tracker's: iteration 5
    again = job(converted, data, tmp_path / "straight", train_iters=5, **common)
    run(again)
    straight = exported(tmp_path / "straight", tmp_path / "straight-hf")
    assert all(torch.equal(five[k], straight[k]) for k in five)


# -- the plan: keys of per-checkpoint stages ------------------------------------------------------
def plan(*sets: str) -> dict:
    from flows.pipeline import plan_pipeline
    from flows.selection import Selection

    settings = load_settings("tiny", ["workdir=/nonexistent", *sets])
    return {p.name: p for p in plan_pipeline(settings, Selection())}


def test_checkpoints_are_keyed_by_the_training_run_and_iteration_not_its_length():
    twelve = plan("evaluate.checkpoints=all")
    eighteen = plan("evaluate.checkpoints=all", "train.train_iters=18")
    assert [n for n in twelve if "@" in n or n == "scores"] == ["export@6", "evaluate@6", "scores"]
    assert [n for n in eighteen if "@" in n] == ["export@6", "export@12", "evaluate@6", "evaluate@12"]
    assert twelve["train"].plan.key != eighteen["train"].plan.key
    assert twelve["train"].plan.scratch == eighteen["train"].plan.scratch  # one lineage
    assert eighteen["train"].plan.options == {"keep": [6, 12]}
    for node in ("export@6", "evaluate@6"):
        assert twelve[node].plan.key == eighteen[node].plan.key
    # the final checkpoint of the shorter run is the longer run's intermediate one
    assert twelve["export"].plan.key == eighteen["export@12"].plan.key
    assert twelve["evaluate"].plan.key == eighteen["evaluate@12"].plan.key
    assert eighteen["evaluate@12"].upstream == {"export": "export@12", "download": "download"}
    assert set(eighteen["scores"].upstream) == {"evaluate@6", "evaluate@12", "evaluate"}
    # `last` plans today's DAG, with the same keys as `all` for the final stages
    last = plan()
    assert [n for n in last if "@" in n or n == "scores"] == []
    assert last["export"].plan.key == twelve["export"].plan.key
    assert last["train"].plan.options == {"keep": []}
    assert last["train"].plan.key == twelve["train"].plan.key  # what is kept is not in the key
    # Settings that do not change the weights share the run; a moved decay horizon does not.
    assert plan("train.save_interval=4")["train"].plan.scratch == twelve["train"].plan.scratch
    assert plan("train.lr_decay_iters=18")["train"].plan.scratch != twelve["train"].plan.scratch
    # null: the horizon is train_iters (the same run at 12 steps; another one at 18)
    assert plan("train.lr_decay_iters=null")["train"].plan.scratch == twelve["train"].plan.scratch
    own = [plan("train.lr_decay_iters=null", f"train.train_iters={n}")["train"].plan.scratch
           for n in (12, 18)]
    assert own[0] != own[1]
    constant = [plan("train.lr_decay_style=constant", "train.lr_decay_iters=null",
                     f"train.train_iters={n}")["train"].plan.scratch for n in (12, 18)]
    assert constant[0] == constant[1]


@pytest.mark.parametrize("sets, message", [
    (["evaluate.checkpoints=[5, 6]"], "evaluate.checkpoints: iteration 5 is not saved by this run; "
                                      "it saves 6, 12 (every train.save_interval=6 steps and the last)"),
    (["evaluate.checkpoints=all", "export.iteration=6"],
     "export.iteration and evaluate.checkpoints cannot be combined"),
])
def test_a_checkpoint_the_run_does_not_save_is_refused_at_plan_time(sets, message):
    with pytest.raises(UserError) as e:
        plan(*sets)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


# -- train.epochs: resolved from the tokenize artifact's packed train rows -------------------------
def test_epochs_resolve_from_the_tokenized_rows_once_tokenize_is_built(tmp_path):
    import math

    from flows.pipeline import plan_pipeline, status_table
    from flows.selection import Selection
    from tasks.artifacts import ArtifactStore

    def planned(*sets: str) -> dict:
        settings = load_settings("tiny", [f"workdir={tmp_path}", "train.train_iters=null", *sets])
        return {p.name: p for p in plan_pipeline(settings, Selection())}

    epochs = ["train.epochs=1.5", "evaluate.checkpoints=all", "train.save_interval=20"]
    before = planned(*epochs)
    assert "tokenize" in before and "train" not in before  # not known until the data is
    # the tokenize artifact of this plan: 30 packed train rows
    store = ArtifactStore(tmp_path)
    tok = before["tokenize"].plan
    with store.publish("tokenize", tok.key, tok.key_material, {}, "1") as build:
        (build.out / "stats.json").write_text(json.dumps({"splits": {"train": {"rows": 30}}}))
    after = planned(*epochs)
    steps = math.ceil(1.5 * 30 / 2)  # global_batch_size 2 in the tiny preset
    assert after["train"].section.train_iters == steps == 23
    assert [n for n in after if "@" in n] == ["export@20", "evaluate@20"]
    assert after["export"].plan.iteration == 23
    # the key holds epochs, not a step count; the run's decay horizon is the resolved one
    assert "train_iters" not in after["train"].plan.key_material["settings"]
    assert after["train"].plan.key_material["settings"]["epochs"] == 1.5
    plain = planned("train.train_iters=23", "train.lr_decay_iters=null", "train.save_interval=20",
                    "evaluate.checkpoints=all")
    with_epochs = planned("train.epochs=1.5", "train.lr_decay_iters=null", "train.save_interval=20",
                          "evaluate.checkpoints=all")
    assert with_epochs["train"].plan.scratch == plain["train"].plan.scratch  # one lineage
    assert with_epochs["train"].plan.key != plain["train"].plan.key
    assert with_epochs["export@20"].plan.key == plain["export@20"].plan.key
    row = next(r for r in status_table(load_settings("tiny", [f"workdir={tmp_path}",
               "train.train_iters=null", *epochs]), list(after.values())) if r["stage"] == "train")
    assert row["what"].endswith("; train_iters: 23 (from epochs 1.5)")
    # either counts the run, not both
    with pytest.raises(UserError) as e:
        load_settings("tiny", ["train.epochs=2"])
    assert "train.epochs and train.train_iters cannot both be set" in str(e.value)
    assert "\n" not in str(e.value)
