"""One whole run of the tiny preset, every saved checkpoint exported, verified, evaluated against
the base model and pushed (dry run), then extended from 4 to 6 steps: the end-to-end checks read
it (conversion, training, bit-exact export that transformers loads and stops at EOS, lighteval's
tables, the model card, the hub push, per-checkpoint scores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from tests.conftest import EosAfter, run_key_prefix, run_pipeline

pytestmark = pytest.mark.usefixtures("prefect_api")


def megatron_tensors(checkpoint_dir: Path, scratch: Path) -> dict:
    """Every model tensor of a torch_dist checkpoint (not the optimizer's state a training
    checkpoint holds beside them), read with torch's DCP reader."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = scratch / f"{checkpoint_dir.parent.name}-{checkpoint_dir.name}.pt"
    dcp_to_torch_save(str(checkpoint_dir), str(target))
    return {k: v for k, v in torch.load(target, weights_only=False).items()
            if "_extra_state" not in k and not k.startswith("optimizer.")}


def check_export_is_the_checkpoint(export: Path, checkpoint_dir: Path, tmp_path: Path) -> None:
    """Bit-exact: the exported HF folder, converted back to Megatron (the other direction of the
    mapping tables), holds exactly the trained checkpoint's tensors."""
    import torch

    from megatron_bridge.convert import hf_to_mcore

    hf_to_mcore(export, tmp_path / "back", 1, 1)
    back = megatron_tensors(tmp_path / "back" / "release", tmp_path)
    trained = megatron_tensors(checkpoint_dir, tmp_path)
    assert back.keys() == trained.keys() and "decoder.layers.self_attention.linear_qkv.bias" in back
    for name, tensor in back.items():
        assert tensor.dtype == trained[name].dtype and torch.equal(tensor, trained[name]), name


def check_loads_and_generates_to_eos(export: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export)
    config = model.generation_config
    end = tokenizer.convert_tokens_to_ids("<｜end▁of▁sentence｜>")
    assert config.eos_token_id == end and config.do_sample and config.temperature == 0.6
    assert tokenizer.convert_tokens_to_ids("<short>") == 151650
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    assert prompt["input_ids"][0, -1].item() == tokenizer.convert_tokens_to_ids("<｜Assistant｜>")
    torch.manual_seed(0)
    # A random model rarely samples the EOS by itself: make it likely after 3 tokens and check
    # that the folder's own generation config stops there.
    out = model.generate(**prompt, max_new_tokens=50, sequence_bias={(end,): 0.0},
                         min_new_tokens=3, logits_processor=[EosAfter(3, end, prompt["input_ids"].shape[1])])
    new = out[0, prompt["input_ids"].shape[1]:].tolist()
    assert new[-1] == end and len(new) == 4


# -- one whole run, every checkpoint evaluated, then extended: the tests below read it -------------
WHOLE = ["train.train_iters=4", "train.save_interval=2", "train.lr_warmup_iters=1",
         "train.global_batch_size=1", "evaluate.checkpoints=all", "evaluate.evaluate_base=true",
         "evaluate.max_problems=2", "evaluate.max_new_tokens=16",
         "train.eval_iters=1"]  # validation on one held-out row (the whole split: test_training.py)
LONGER = [*WHOLE, "train.train_iters=6"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory, prefect_api):
    """One workdir: the tiny preset to the end, every saved checkpoint (4 steps, saved every 2)
    exported, verified, evaluated against the base model and pushed (dry run); then the same
    run extended to 6 steps and pushed to a named revision."""
    work = tmp_path_factory.mktemp("whole")
    first = run_pipeline(work, *WHOLE, "export.push.repo=someone/tiny-rsft",
                         "export.push.dry_run=true", until=None)
    (base_done,) = work.glob("scratch/evaluate/base-*/done")
    stamp = base_done.stat().st_mtime_ns
    second = run_pipeline(work, *LONGER, "export.push.repo=someone/tiny", "export.push.revision=v1",
                          "export.push.dry_run=true", until=None)
    assert base_done.stat().st_mtime_ns == stamp  # the base model was not evaluated again
    return work, first, second


def reads_whole(test):
    """A test of the `whole` workdir: on one process (pytest-xdist), so it is built once."""
    return pytest.mark.slow(pytest.mark.xdist_group("whole")(test))


@reads_whole
def test_whole_pipeline_converts_trains_exports_evaluates_and_pushes(whole, tmp_path):
    work, (state, states, artifacts), _ = whole
    assert state.is_completed(), state.message
    assert states == {s: "Completed" for s in (
        "download", "patch_tokenizer", "convert", "dataset", "tokenize", "train", "export@2",
        "export", "evaluate@2", "evaluate", "scores", "push@2", "push")}
    assert {"convert-report", "patch-tokenizer-report", "dataset-report", "tokenize-report",
            "tokenize-summary", "train-report", "train-summary", "train-progress", "train-live", "export-report",
            "export-summary", "evaluate-report", "evaluate-summary"} <= artifacts
    m = state.result()
    train = m["train"]
    assert train.meta["iterations"] == 4 and (train.dir / "loss.png").is_file()
    # validation on the preset's 4 held-out traces; TensorBoard events kept as a record
    assert train.meta["final_val_loss"] > 0 and train.meta["final_val_step"] == 4
    events = [f for f in train.files if f.path.startswith("tensorboard/events.out.tfevents.")]
    assert events and all(f.record for f in events)
    assert (train.dir / "latest_checkpointed_iteration.txt").read_text() == "4"
    convert = m["convert"]
    assert convert.inputs == {"download": m["download"].content_hash}
    assert convert.meta["dtype"] == "bfloat16"  # the source's, kept
    assert convert.meta["max_abs_diff"] <= 1e-5 and convert.meta["top1_agreement"] == 1.0
    assert (convert.dir / "latest_checkpointed_iteration.txt").read_text() == "release"
    tokenize = m["tokenize"]
    assert tokenize.inputs == {"dataset": m["dataset"].content_hash,
                               "patch_tokenizer": m["patch_tokenizer"].content_hash}
    assert tokenize.meta["train"]["samples_out"] > 50 and (tokenize.dir / "lengths.png").is_file()

    # export: the trained weights, bit-exact, with the base vocabulary, loadable and stopping at EOS
    export = m["export"].dir
    assert m["export"].meta["iteration"] == 4 and m["export"].meta["max_abs_diff"] <= 1e-5
    base_vocab = json.loads((m["download"].dir / "config.json").read_text())["vocab_size"]
    assert json.loads((export / "config.json").read_text())["vocab_size"] == base_vocab == 151936
    check_export_is_the_checkpoint(export, train.dir / "iter_0000004", tmp_path)
    check_loads_and_generates_to_eos(export)
    card = (export / "README.md").read_text()
    assert "builtin:openmathreasoning-r1-64" in card and f"train: `{train.meta['lineage']}@4`" in card
    assert f"): {train.meta['final_val_loss']:.4f}." in card  # the validation loss at step 4

    # evaluate: lighteval's scores as a table artifact of this flow run, hybrid metrics, the card
    evaluate = m["evaluate"].dir
    results = json.loads((evaluate / "results.json").read_text())
    assert set(results["scores"]) == {"math_500_local", "aime24_local"}
    assert sum(v["samples"] for v in results["hybrid"]["math_500_local"].values()) == 2 * 2
    with get_client(sync_client=True) as client:
        (table,) = [a for a in client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[state.state_details.flow_run_id]))) if a.key and a.key.endswith("-evaluate-report")]
    rows = json.loads(table.data)
    assert {(r["task"], r["metric"]) for r in rows} == {
        ("math_500_local", "pass@k:k=1&n=2"), ("aime24_local", "pass@k:k=1&n=2")}
    assert "## Evaluation (lighteval)" in (evaluate / "model_card.md").read_text()
    # the hub push (dry run) lists the model files only, under this export's own branch
    with get_client(sync_client=True) as client:
        (pushed,) = [a for a in client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[state.state_details.flow_run_id]))) if a.key and a.key.endswith("-push-files")]
    files = {r["file"] for r in json.loads(pushed.data)}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "README.md"} <= files and not files & {"manifest.json", "verification.json"}
    assert f"not pushed to someone/tiny-rsft@rsft-{m['export'].key}" == pushed.description
    from tasks.artifacts import ArtifactStore  # evaluating never touched the export artifact
    assert ArtifactStore(work).check("export", m["export"].key, verify=True)[0] is not None

    # An earlier kept iteration exports on request; one not kept fails in one line.
    state, states, _ = run_pipeline(work, *LONGER, "evaluate.checkpoints=last", "export.iteration=2",
                                    "export.verify=false", only=["export"])
    assert states == {"export": "Completed"}, state.message
    assert state.result()["export"].meta["iteration"] == 2
    state, states, _ = run_pipeline(work, *LONGER, "evaluate.checkpoints=last", "export.iteration=7",
                                    only=["export"])
    assert state.is_failed() and states == {"export": "Failed"}
    assert "export.iteration 7: no checkpoint of that iteration (kept: 2, 4, 6)" in state.message
    assert "\n" not in state.message

    # A tokenizer edit re-tokenizes but neither reconverts the weights nor rebuilds the data.
    _, states, _ = run_pipeline(work, *LONGER, "patch_tokenizer.renames=[]",
                       only=["patch_tokenizer", "convert", "dataset", "tokenize"])
    assert states == {"patch_tokenizer": "Completed", "convert": "Cached", "dataset": "Cached",
                      "tokenize": "Completed"}


@reads_whole
def test_every_saved_checkpoint_is_exported_and_scored(whole):
    work, (state, states, artifacts), _ = whole
    assert state.is_completed(), state.message
    assert {k: v for k, v in states.items() if k.startswith(("export", "evaluate", "scores"))} == {
        "export@2": "Completed", "export": "Completed", "evaluate@2": "Completed",
        "evaluate": "Completed", "scores": "Completed"}
    m = state.result()
    assert [m[n].meta["iteration"] for n in ("export@2", "export", "evaluate@2", "evaluate")] == [2, 4, 2, 4]
    assert m["scores"].meta["iterations"] == [2, 4]
    assert (m["scores"].dir / "scores.png").stat().st_size > 1000
    rows = json.loads((m["scores"].dir / "scores.json").read_text())
    assert {(r["iteration"], r["task"]) for r in rows} == {
        (i, task) for i in (2, 4) for task in ("math_500_local", "aime24_local")}
    assert {"export-step2-summary", "evaluate-step2-report", "scores-report", "scores-summary",
            "evaluate-report"} <= artifacts
    # every checkpoint is scored against the base model, whose scores are computed once
    assert len(list(work.glob("scratch/evaluate/base-*/done"))) == 1
    for name in ("evaluate@2", "evaluate"):
        rows = json.loads((m[name].dir / "scores.json").read_text())
        assert rows and all(r["base"] is not None and r["delta"] == r["value"] - r["base"]
                            for r in rows)
    card = (m["export@2"].dir / "README.md").read_text()
    assert "Checkpoint of iteration 2" in card and f"train: `{m['train'].meta['lineage']}@2`" in card


@reads_whole
def test_a_longer_run_trains_on_and_evaluates_only_its_new_checkpoints(whole, tmp_path):
    work, (first, _, _), (state, states, _) = whole
    assert state.is_completed(), state.message
    assert states["train"] == "Completed"
    assert {k: v for k, v in states.items() if k.startswith(("export", "evaluate", "scores"))} == {
        "export@2": "Cached", "export@4": "Cached", "export": "Completed",
        "evaluate@2": "Cached", "evaluate@4": "Cached", "evaluate": "Completed",
        "scores": "Completed"}
    m, before = state.result(), first.result()
    assert m["evaluate@4"].key == before["evaluate"].key
    assert m["train"].meta["lineage"] == before["train"].meta["lineage"]
    log = (m["train"].dir / "train.log").read_text()
    assert "training: steps 4..6" in log  # resumed the 4-step run's last checkpoint
    assert [json.loads(x)["step"] for x in (m["train"].dir / "metrics.jsonl").read_text().splitlines()] \
        == list(range(1, 7))
    assert m["scores"].meta["iterations"] == [2, 4, 6]
    # each checkpoint's export is pushed (dry run) to its own branch
    assert {k: v for k, v in states.items() if k.startswith("push")} == {
        "push@2": "Completed", "push@4": "Completed", "push": "Completed"}
    with get_client(sync_client=True) as client:
        prefix = run_key_prefix(client.read_flow_run(state.state_details.flow_run_id).name)
        pushed = {a.key.removeprefix(prefix): a.description for a in client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
            if a.key and "push" in a.key}
    assert pushed == {"push-step2-files": "not pushed to someone/tiny@v1-step2",
                      "push-step4-files": "not pushed to someone/tiny@v1-step4",
                      "push-files": "not pushed to someone/tiny@v1"}


@reads_whole
def test_a_list_with_an_unsaved_iteration_fails_before_anything_runs(whole):
    work = whole[0]
    state, states, _ = run_pipeline(work, *WHOLE, "evaluate.checkpoints=[2, 3]", until=None)
    assert state.is_failed() and states == {}
    assert state.message == ("evaluate.checkpoints: iteration 3 is not saved by this run; it saves "
                             "2, 4 (every train.save_interval=2 steps and the last)")
