"""The sft-pipeline flow on a real Prefect API: caching, forced rebuilds, reruns, stage selection."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

from benchmarks.chaos_harness import clone_workdir
from tests.conftest import (ROOT, EosAfter, artifact_dir, make_hf_cache, run_pipeline,
                            stage_of)

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_first_run_builds_and_second_is_all_cached(tmp_path):
    storage = PREFECT_LOCAL_STORAGE_PATH.value()  # Prefect's task results and cache records
    results = set(storage.rglob("*"))  # empty while the folder does not exist
    state, states, artifacts = run_pipeline(tmp_path)
    assert state.is_completed(), state.message
    assert states == {"download": "Completed", "patch_tokenizer": "Completed"}
    assert "sft-pipeline-stages" in artifacts
    manifests = state.result()
    assert manifests["patch_tokenizer"].inputs == {"download": manifests["download"].content_hash}
    state, states, _ = run_pipeline(tmp_path)
    assert states == {"download": "Cached", "patch_tokenizer": "Cached"}
    assert state.result()["patch_tokenizer"].content_hash == manifests["patch_tokenizer"].content_hash
    # The store alone decided: no Prefect cache records or results, in the workdir or in
    # Prefect's result storage
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts"]
    assert set(storage.rglob("*")) == results


def test_force_rebuilds_that_stage_and_downstream_only_if_changed(tmp_path):
    run_pipeline(tmp_path)
    _, states, _ = run_pipeline(tmp_path, force=["patch_tokenizer"])
    assert states == {"download": "Cached", "patch_tokenizer": "Completed"}
    # The built-in model is deterministic: a forced rebuild gives the same content, so
    # patch_tokenizer stays cached.
    _, states, _ = run_pipeline(tmp_path, force=["download"])
    assert states == {"download": "Completed", "patch_tokenizer": "Cached"}


def test_forced_rebuild_with_new_content_reruns_downstream(tmp_path, tiny_model_dir):
    src = tmp_path / "model"
    shutil.copytree(tiny_model_dir, src)
    work = tmp_path / "work"
    first, _, _ = run_pipeline(work, f"download.source={src}")
    # Edit the weights in place keeping size and mtime: the key cannot see it, a forced
    # rebuild of download does, and patch_tokenizer must then rebuild on the new input.
    weights = src / "model.safetensors"
    st = weights.stat()
    with open(weights, "r+b") as f:
        f.seek(st.st_size - 8)
        f.write(b"\x11" * 8)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    _, states, _ = run_pipeline(work, f"download.source={src}")
    assert states == {"download": "Cached", "patch_tokenizer": "Cached"}
    state, states, _ = run_pipeline(work, f"download.source={src}", force=["download"])
    assert states == {"download": "Completed", "patch_tokenizer": "Completed"}
    new = state.result()
    assert new["download"].key == first.result()["download"].key
    assert new["download"].content_hash != first.result()["download"].content_hash
    assert new["patch_tokenizer"].inputs == {"download": new["download"].content_hash}


def test_deleted_or_truncated_artifacts_are_rebuilt(tmp_path):
    run_pipeline(tmp_path)
    shutil.rmtree(artifact_dir(tmp_path, "patch_tokenizer"))
    _, states, _ = run_pipeline(tmp_path)
    assert states == {"download": "Cached", "patch_tokenizer": "Completed"}
    weights = artifact_dir(tmp_path, "download") / "model.safetensors"
    os.truncate(weights, 1000)
    _, states, _ = run_pipeline(tmp_path)
    assert states == {"download": "Completed", "patch_tokenizer": "Cached"}
    assert weights.stat().st_size > 1000


def test_verify_catches_same_size_corruption(tmp_path):
    run_pipeline(tmp_path)
    tokenizer = artifact_dir(tmp_path, "patch_tokenizer") / "tokenizer.json"
    data = tokenizer.read_bytes()
    tokenizer.write_bytes(data.replace(b'"<short>"', b'"<shxrt>"'))
    _, states, _ = run_pipeline(tmp_path)
    assert states["patch_tokenizer"] == "Cached"  # sizes only: not noticed
    state, states, _ = run_pipeline(tmp_path, verify=True)
    assert states == {"download": "Cached", "patch_tokenizer": "Completed"}
    assert b'"<short>"' in tokenizer.read_bytes()


def test_only_and_from(tmp_path):
    state, states, _ = run_pipeline(tmp_path, only=["patch_tokenizer"])
    assert state.is_failed() and states == {}
    assert "stage download is needed as input but its artifact" in state.message
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").rglob("manifest.json"))
    _, states, _ = run_pipeline(tmp_path, until="download")
    assert states == {"download": "Completed"}
    _, states, _ = run_pipeline(tmp_path, only=["patch_tokenizer"])
    assert states == {"patch_tokenizer": "Completed"}
    _, states, _ = run_pipeline(tmp_path, from_stage="download", until="patch_tokenizer")
    assert states == {"download": "Completed", "patch_tokenizer": "Completed"}


def test_unpatchable_tokenizer_fails_in_one_line_and_publishes_nothing(tmp_path, tiny_model_dir):
    src = tmp_path / "model"
    shutil.copytree(tiny_model_dir, src)
    tj = json.loads((src / "tokenizer.json").read_text())
    next(t for t in tj["added_tokens"] if t["id"] == 151650)["content"] = "<|something|>"
    (src / "tokenizer.json").write_text(json.dumps(tj))
    state, states, _ = run_pipeline(tmp_path / "work", f"download.source={src}")
    assert state.is_failed() and states["patch_tokenizer"] == "Failed"
    assert "token 151650 in tokenizer.json is '<|something|>'" in state.message
    assert "\n" not in state.message
    assert not list((tmp_path / "work" / "artifacts" / "patch_tokenizer").glob("[!.]*"))


def test_bad_dataset_record_fails_in_one_line_and_publishes_nothing(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "Q", "output": "A"}\n{"instruction": "Q", "output": \n')
    state, states, _ = run_pipeline(tmp_path / "work", f"dataset.sources=[{{path: {data}}}]",
                           until="dataset")
    assert state.is_failed() and states["dataset"] == "Failed"
    assert f"{data}:2: malformed JSON" in state.message and "\n" not in state.message
    assert not list((tmp_path / "work" / "artifacts" / "dataset").glob("[!.]*"))


def test_hf_token_from_a_prefect_secret_is_used_and_never_logged(tmp_path, tiny_model_dir,
                                                                   offline_hub, caplog):
    from prefect.blocks.system import Secret

    from settings.errors import UserError
    from settings.models import DownloadSettings
    from tasks.download import hf_token

    token = "hf_rsftTestTokenThatMustNotLeak"
    Secret(value=token).save("rsft-test-hf-token", overwrite=True)
    assert hf_token(DownloadSettings(hf_token_secret="rsft-test-hf-token")) == token
    with pytest.raises(UserError, match="no Prefect Secret block named 'absent'"):
        hf_token(DownloadSettings(hf_token_secret="absent"))
    make_hf_cache(offline_hub, "tiny-org/tiny-qwen2", tiny_model_dir)
    source = "download.source=hf://tiny-org/tiny-qwen2@main"
    with_secret, states, _ = run_pipeline(tmp_path, source, "download.hf_token_secret=rsft-test-hf-token")
    assert states == {"download": "Completed", "patch_tokenizer": "Completed"}
    _, states, _ = run_pipeline(tmp_path, source)  # the token does not change what is downloaded
    assert states == {"download": "Cached", "patch_tokenizer": "Cached"}
    assert token not in caplog.text
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert token.encode() not in f.read_bytes(), f


def test_a_moved_workdir_is_reused_without_rebuilding(tmp_path):
    built = run_pipeline(tmp_path / "before")[0].result()
    (tmp_path / "before").rename(tmp_path / "after")
    state, states, _ = run_pipeline(tmp_path / "after")  # the store finds them where they now are
    assert states == {"download": "Cached", "patch_tokenizer": "Cached"}
    for name, manifest in state.result().items():
        assert manifest.created_unix == built[name].created_unix  # reused, not rebuilt
        assert manifest.path.startswith(str(tmp_path / "after")) and manifest.dir.is_dir()
    _, states, _ = run_pipeline(tmp_path / "after")
    assert states == {"download": "Cached", "patch_tokenizer": "Cached"}


@pytest.mark.slow
def test_a_tokenizer_without_chat_template_gets_chatml_and_its_tokens_grow_the_embedding(tmp_path):
    """open-r1's rule: no chat template → ChatML. The R1 tokenizer without its template, on a
    model whose embedding has exactly its 151665 tokens: `<|im_start|>`/`<|im_end|>` are added
    (151665, 151666), training grows the embedding to hold them, and the export is a folder
    transformers loads with vocab_size 151667 and whose generation stops at `<|im_end|>`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = tmp_path / "model"
    config = AutoConfig.for_model("qwen2", hidden_size=64, intermediate_size=128,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  num_hidden_layers=2, vocab_size=151665,
                                  max_position_embeddings=4096)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(src)
    shutil.copyfile(ROOT / "examples/tokenizers/deepseek-r1-distill-qwen-1.5b/tokenizer.json",
                    src / "tokenizer.json")
    tokenizer_config = json.loads((ROOT / "examples/tokenizers/deepseek-r1-distill-qwen-1.5b/"
                                   "tokenizer_config.json").read_text())
    del tokenizer_config["chat_template"]
    (src / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    state, states, _ = run_pipeline(tmp_path / "work", f"download.source={src}", *TRAIN,
                                    until="export")
    assert state.is_completed(), state.message
    m = state.result()
    changes = m["patch_tokenizer"].meta["changes"]
    assert ("no chat template: ChatML (open-r1's default), <|im_end|> closes a turn; added "
            "special token <|im_start|> = 151665; added special token <|im_end|> = 151666"
            in changes)
    assert any(c.startswith("token ids 151665, 151666 are beyond the model's 151665 embedding "
                            "rows: train grows the embedding") for c in changes)
    assert ("training: the embedding grows from 151665 to 151667 rows"
            in (m["train"].dir / "train.log").read_text())

    export = m["export"].dir
    assert json.loads((export / "config.json").read_text())["vocab_size"] == 151667
    assert m["export"].meta["max_abs_diff"] <= 1e-5
    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end == 151666 and model.get_input_embeddings().weight.shape[0] == 151667
    assert model.generation_config.eos_token_id[0] == end
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    start = prompt["input_ids"].shape[1]
    assert tokenizer.decode(prompt["input_ids"][0]).endswith("<|im_start|>assistant\n")
    torch.manual_seed(0)
    out = model.generate(**prompt, max_new_tokens=50, logits_processor=[EosAfter(3, end, start)])
    new = out[0, start:].tolist()
    assert new[-1] == end and len(new) == 4


def readme_edges() -> set[tuple[str, str]]:
    """The README's `Edges:` line: `a → b, c; d → e` → {(a, b), (a, c), (d, e)}."""
    line = next(ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("Edges:"))
    edges = set()
    for part in line.removeprefix("Edges:").strip().rstrip(".").split(";"):
        source, targets = part.split("→")
        edges |= {(source.strip(), t.strip()) for t in targets.split(",")}
    return edges


@pytest.mark.slow
def test_the_flow_runs_the_dag_and_a_failed_branch_stops_only_its_dependants(tmp_path):
    """The UI's graph of a whole run has exactly the README's edges (none between the
    dataset/tokenize branch and download/convert); convert failing leaves train, export and
    evaluate NotReady, while tokenize — which needs no convert — is built and published."""
    from tasks import STAGES

    state, states, _ = run_pipeline(tmp_path, "convert.max_abs_diff=1e-30", until=None)
    assert state.is_failed() and "does not reproduce transformers' logits" in state.message
    assert state.message.startswith("convert: ") and "\n" not in state.message
    assert states == {"download": "Completed", "patch_tokenizer": "Completed", "dataset": "Completed",
                      "tokenize": "Completed", "convert": "Failed", "train": "NotReady",
                      "export": "NotReady", "evaluate": "NotReady"}
    assert not list((tmp_path / "artifacts" / "convert").glob("[!.]*"))
    assert list((tmp_path / "artifacts" / "tokenize").glob("*/manifest.json"))

    with get_client(sync_client=True) as client:
        response = client._client.get(f"/flow_runs/{state.state_details.flow_run_id}/graph-v2")
    response.raise_for_status()
    nodes = {node_id: node for node_id, node in response.json()["nodes"]}
    label = {node_id: stage_of(node["label"]) for node_id, node in nodes.items()}
    graph = {(label[parent["id"]], label[node_id])
             for node_id, node in nodes.items() for parent in node["parents"]}
    declared = {(u, s.name) for s in STAGES for u in s.upstream}
    assert graph == declared == readme_edges()
    data_branch, model_branch = {"dataset", "tokenize"}, {"download", "convert"}
    assert not {(a, b) for a, b in graph if {a, b} & data_branch and {a, b} & model_branch}
    # Branches overlap in time: tokenize did not wait for convert.
    times = {label[i]: (node["start_time"], node["end_time"]) for i, node in nodes.items()}
    assert times["tokenize"][0] < times["convert"][1]

    # The rerun builds only what is missing: the failed branch and its dependants.
    _, states, _ = run_pipeline(tmp_path, "convert.max_abs_diff=1",
                       only=["download", "patch_tokenizer", "convert", "dataset", "tokenize"])
    assert states == {"download": "Cached", "patch_tokenizer": "Cached", "dataset": "Cached",
                      "tokenize": "Cached", "convert": "Completed"}


def test_convert_rejects_a_layout_the_model_cannot_take(tmp_path):
    run_pipeline(tmp_path, until="download")
    state, _, _ = run_pipeline(tmp_path, "convert.tensor_parallel=3", only=["convert"])
    assert state.is_failed()
    assert "tensor_parallel=3 must divide the 4 attention heads and 2 KV groups" in state.message


TRAIN = ["convert.verify=false", "dataset.test_split=0", "train.eval_interval=0",
         "train.global_batch_size=1"]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, prefect_api) -> Path:
    """download, patch_tokenizer, convert and dataset built once with TRAIN's settings; the
    tests below train on copies of it (`clone_workdir`: the store reuses a copied workdir)."""
    work = tmp_path_factory.mktemp("upstream")
    state, _, _ = run_pipeline(work, *TRAIN,
                               only=["download", "patch_tokenizer", "convert", "dataset"])
    assert state.is_completed(), state.message
    return work


def trains_on_upstream(test):
    """A test of copies of the `upstream` workdir: on one process (pytest-xdist), so it is
    built once."""
    return pytest.mark.slow(pytest.mark.xdist_group("upstream")(test))


@trains_on_upstream
def test_from_train_retrains_afresh_keeping_the_old_run_and_a_plain_rerun_reuses(upstream,
                                                                                  tmp_path):
    clone_workdir(upstream, tmp_path)
    state, states, _ = run_pipeline(tmp_path, *TRAIN, until="train")
    assert states == {"download": "Cached", "patch_tokenizer": "Cached", "convert": "Cached",
                      "dataset": "Cached", "tokenize": "Completed", "train": "Completed"}
    first = state.result()["train"]
    work = tmp_path / "scratch" / "train" / first.meta["lineage"]
    old_run = json.loads((first.dir / "run.json").read_text())["run_id"]
    state, states, _ = run_pipeline(tmp_path, *TRAIN, from_stage="train", until="train")
    assert states == {"train": "Completed"}
    again = state.result()["train"]
    log = (again.dir / "train.log").read_text()
    assert "training: steps 0..2" in log and "training: steps 2..2" not in log  # from the start
    assert [json.loads(x)["step"] for x in (again.dir / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2]
    assert json.loads((again.dir / "run.json").read_text())["run_id"] != old_run  # re-exported
    # the old run is set aside whole, not lost
    (aside,) = work.glob("previous-*")
    assert (aside / "checkpoints" / "iter_0000002").is_dir()
    assert json.loads((aside / "run.json").read_text())["run_id"] == old_run
    assert "training: steps 0..2" in (aside / "train.log").read_text()
    assert {p.name for p in work.iterdir() if not p.name.startswith(".")} - {aside.name} == {
        p.name for p in aside.iterdir() if not p.name.startswith(".")}
    # a plain rerun reuses the retrained artifact and sets nothing aside
    state, states, _ = run_pipeline(tmp_path, *TRAIN, until="train")
    assert states["train"] == "Cached" and len(list(work.glob("previous-*"))) == 1


@trains_on_upstream
def test_epochs_train_the_steps_the_tokenized_rows_give(upstream, tmp_path):
    from tasks.train import epoch_steps

    clone_workdir(upstream, tmp_path)
    sets = [*TRAIN, "train.train_iters=null", "train.epochs=0.05", "train.lr_warmup_iters=0"]
    state, states, _ = run_pipeline(tmp_path, *sets, until="train")  # planned after tokenize
    assert state.is_completed(), state.message
    assert states["tokenize"] == "Completed" and states["train"] == "Completed"
    m = state.result()
    rows = json.loads((m["tokenize"].dir / "stats.json").read_text())["splits"]["train"]["rows"]
    steps = epoch_steps(_settings(tmp_path, sets).train, m["tokenize"].dir)
    # 0.05 × rows ÷ global_batch_size 1, rounded up
    assert steps == max(1, -(-rows // 20)) and m["train"].meta["iterations"] == steps
    _, states, _ = run_pipeline(tmp_path, *sets, until="train")  # resolved at plan time now
    assert states["train"] == "Cached"


def _settings(workdir, sets):
    from settings import load_settings

    return load_settings("tiny", [f"workdir={workdir}", *sets])
