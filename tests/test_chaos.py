"""Crash drills from benchmarks/chaos.py on a cheap pipeline: a crashed stage process (convert),
a dead worker while evaluate runs lighteval in its own process, and corrupted artifact files.
Every rerun must complete with artifacts equal to an uninterrupted run and never reuse what the
kill left half-written. (The kills of download/patch_tokenizer and a killed training's resume are
tested in test_cli.py.)"""

from __future__ import annotations

import pytest

from benchmarks.chaos_harness import DrillResult, Harness

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("chaos")]  # one baseline run

CHEAP = ["train.train_iters=2", "train.lr_warmup_iters=1", "train.save_interval=1",
         "train.global_batch_size=1",
         "convert.verify=false", "export.verify=false",
         "evaluate.tasks=[{name: math_500_local, samples: 1}]", "evaluate.max_problems=1",
         "evaluate.max_new_tokens=8"]


@pytest.fixture(scope="module")
def chaos(tmp_path_factory, cli_env):
    harness = Harness(tmp_path_factory.mktemp("chaos"), CHEAP, env=cli_env, timeout=900,
                      say=lambda _: None)
    try:
        harness.start_server()  # one API server for all runs: ~10 s less per `rsft run`
        yield harness, harness.baseline()
    finally:
        harness.cleanup()


def assert_recovered(r: DrillResult) -> None:
    assert r.rerun_ok, r.problems
    assert r.identical in ("hash", "equal*"), r.problems
    assert r.problems == [] and r.orphans == []
    assert not r.trusted_partial and r.partial_reused == 0
    assert r.passed


def test_crashed_convert_process_fails_the_run_and_the_rerun_rebuilds_it(chaos):
    harness, base = chaos
    r = harness.kill_drill(base, 1, "convert", "child", 0.02, wait_child=True, until="convert")
    assert r.target.startswith("stage child (megatron_bridge hf2mcore"), r.target
    assert r.mid_stage and "flow exit 1" in r.left  # the flow failed, it did not publish
    assert r.left.startswith("nothing")  # and removed its temp dir
    assert_recovered(r)
    # The rebuilt checkpoint is the same content (its DCP .metadata names another temp dir and
    # save id, its logs differ), so the stages after convert stay cached: test_pipeline.py.
    assert r.identical == "hash"


def test_dead_worker_during_evaluate_takes_lighteval_with_it(chaos):
    harness, base = chaos
    r = harness.kill_drill(base, 2, "evaluate", "group", 0.05, wait_child=True)
    assert r.target == "flow group" and r.children_at_kill >= 1 and r.mid_stage
    assert "tmp dir" in r.left  # a dead flow cannot clean up: the rerun sweeps it
    assert_recovered(r)  # no orphan: PR_SET_PDEATHSIG ended the lighteval process


def test_flipped_bytes_in_an_artifact_are_rebuilt_by_verify(chaos):
    """Same size, other bytes: only --verify sees it (a truncated file fails the size check
    every run does: tests/test_artifacts.py)."""
    harness, base = chaos
    r = harness.corrupt_drill(base, 3, "flip", until="patch_tokenizer")
    assert r.left == "size check: passes; hash check: fails"
    assert_recovered(r)
    assert r.identical == "hash"  # download is reproducible byte for byte
