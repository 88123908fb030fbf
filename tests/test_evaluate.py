"""The evaluate stage's parts: lighteval's real scoring on the shipped MATH-500 copy (answer
models in place of a generator), hybrid metrics against a hand-counted details file, and bad
input failing with one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import rsft
from settings.errors import UserError
from settings.models import EvaluateSettings, EvalTask
from tasks.evaluation.local_tasks import EVAL_DATA

MATH500 = [json.loads(line) for line in (EVAL_DATA / "math500" / "test.jsonl").read_text().splitlines()]
PROBLEMS = 12


def answer_model(name: str, answer, cache: Path):
    """A lighteval model whose response to each problem is `answer(problem row, index)`; the
    problem is found by its text in lighteval's prompt (the model never sees the gold)."""
    from lighteval.models.dummy.dummy_model import DummyModel, DummyModelConfig
    from lighteval.models.model_output import ModelResponse

    class AnswerModel(DummyModel):
        def greedy_until(self, docs):
            out = []
            for doc in docs:
                k, row = next((k, r) for k, r in enumerate(MATH500) if r["problem"] in doc.query)
                text = answer(row, k)
                out.append(ModelResponse(text=[text], output_tokens=[list(range(len(text.split())))],
                                         input_tokens=[]))
            return out

    return AnswerModel(DummyModelConfig(model_name=name, cache_dir=str(cache)))


def _run(tmp_path: Path, name: str, answer) -> dict:
    from settings.models import EvalTask, EvaluateSettings
    from tasks.evaluation.runner import EvalJob, run

    out = tmp_path / name
    out.mkdir()
    settings = EvaluateSettings(tasks=[EvalTask(name="math_500_local")], max_problems=PROBLEMS)
    job = EvalJob(evaluate=settings, model=name, output_dir=str(out), backend="transformers")
    return run(job, model=answer_model(name, answer, tmp_path / f"cache-{name}"))


def test_lighteval_scores_gold_answers_100_and_wrong_answers_0(tmp_path):
    # Gold solutions (half of them as <short> answers, half after a <think> trace)
    def gold(row, k):
        return (f"<short>\n{row['solution']}" if k % 2 else
                f"<think>\nLet me work it out.\n</think>\n\n{row['solution']}")

    results = _run(tmp_path, "gold", gold)
    assert results["scores"]["math_500_local"]["pass@k:k=1&n=1"] == 1.0
    hybrid = results["hybrid"]["math_500_local"]
    assert hybrid["think"]["samples"] + hybrid["short"]["samples"] == PROBLEMS
    assert hybrid["think"]["accuracy"] == hybrid["short"]["accuracy"] == 1.0
    details = pd.read_parquet(tmp_path / "gold" / "details" / "math_500_local.parquet")
    assert len(details) == PROBLEMS

    wrong = _run(tmp_path, "wrong", lambda row, k: "<short>\nThe answer is $\\boxed{-987654321}$.")
    assert wrong["scores"]["math_500_local"]["pass@k:k=1&n=1"] == 0.0
    assert wrong["hybrid"]["math_500_local"] == {
        "short": {"samples": PROBLEMS, "share": 1.0, "mean_tokens": 5.0, "accuracy": 0.0}}


def test_hybrid_metrics_match_a_hand_counted_details_file(tmp_path):
    from tasks.evaluation.hybrid import hybrid_metrics, sample_scorer
    from tasks.evaluation.local_tasks import local_task

    row = MATH500[0]  # gold: (3, π/2)
    right = f"<think>\nhmm\n</think>\n\n$\\boxed{{{row['answer']}}}$"
    doc = {"query": row["problem"], "choices": [f"ANSWER: {row['solution']}"], "gold_index": 0}
    samples = [  # (raw text, post-processed text as lighteval stores it, output tokens)
        (right, f"\n\n$\\boxed{{{row['answer']}}}$", 7),          # think, right
        ("<think>\nno\n</think>\n\n$\\boxed{5}$", "\n\n$\\boxed{5}$", 5),  # think, wrong
        (f"<short>\n$\\boxed{{{row['answer']}}}$", None, 2),      # short, right
        ("  <short>\n$\\boxed{7}$", None, 4),                      # short (leading space), wrong
        ("<short>\n$\\boxed{8}$", None, 6),                        # short, wrong
        ("the answer is 3", None, 3),                              # other, wrong
    ]
    frame = pd.DataFrame([{
        "doc": doc, "metric": {"pass@k:k=1&n=3": 0.5},
        "model_response": {
            "text": [t for t, _, _ in group],
            "text_post_processed": [p if p is not None else t for t, p, _ in group],
            "output_tokens": [list(range(n)) for _, _, n in group]}}
        for group in (samples[:3], samples[3:])])
    path = tmp_path / "details.parquet"
    frame.to_parquet(path)

    metrics = hybrid_metrics(path, sample_scorer(local_task("math_500_local", 3)))
    # counted by hand from the list above
    assert metrics == {
        "think": {"samples": 2, "share": 2 / 6, "mean_tokens": 6.0, "accuracy": 0.5},
        "short": {"samples": 3, "share": 3 / 6, "mean_tokens": 4.0, "accuracy": 1 / 3},
        "other": {"samples": 1, "share": 1 / 6, "mean_tokens": 3.0, "accuracy": 0.0},
    }


@pytest.fixture
def hf_folder(tmp_path, tiny_model_dir, patched_tokenizer) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(patched_tokenizer / name, folder / name)
    return folder


@pytest.mark.parametrize("case", ["no-tokenizer", "no-chat-template", "vllm-without-gpu"])
def test_bad_evaluation_input_is_refused_before_lighteval_runs(case, hf_folder, tmp_path):
    from tasks.evaluate import evaluate_model

    settings = EvaluateSettings(tasks=[EvalTask(name="math_500_local")])
    if case == "no-tokenizer":
        for f in hf_folder.glob("tokenizer*"):
            f.unlink()
        expected = "has no tokenizer files"
    elif case == "no-chat-template":
        config = json.loads((hf_folder / "tokenizer_config.json").read_text())
        del config["chat_template"]
        (hf_folder / "tokenizer_config.json").write_text(json.dumps(config))
        expected = "has no chat template"
    else:
        settings.backend = "vllm"
        expected = "vllm needs a CUDA GPU"
    with pytest.raises(UserError, match=expected) as err:
        evaluate_model(settings, hf_folder, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_rsft_eval_runs_lighteval_on_a_folder_and_refuses_unknown_tasks(hf_folder, tmp_path, cli_env):
    config = json.loads((hf_folder / "generation_config.json").read_text())
    del config["do_sample"]  # a folder that does not ask for sampling is still sampled
    (hf_folder / "generation_config.json").write_text(json.dumps(config))
    out = tmp_path / "eval"
    quick = ["--set", "evaluate.max_problems=2", "--set", "evaluate.max_new_tokens=8"]
    proc = rsft("eval", "--model", str(hf_folder), "--out", str(out), "--tasks", "math_500_local=2",
                *quick, cwd=tmp_path, env=cli_env, timeout=600, check=True)
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == {"math_500_local": 2} and results["backend"] == "transformers"
    assert "pass@k:k=1&n=2" in results["scores"]["math_500_local"]
    details = pd.read_parquet(out / "details" / "math_500_local.parquet")
    assert len(details) == 2 and all(len(r["text"]) == 2 for r in details["model_response"])
    assert all(len(t) <= 8 for r in details["model_response"] for t in r["output_tokens"])
    assert all(r["text"][0] != r["text"][1] for r in details["model_response"])  # sampled
    assert "math_500_local" in proc.stdout and "mode" in proc.stdout
    # sampled, yet reproducible: the same seed gives the same samples in a new process
    rsft("eval", "--model", str(hf_folder), "--out", str(tmp_path / "again"), "--tasks",
         "math_500_local=2", *quick, cwd=tmp_path,
         env=cli_env, timeout=600, check=True)
    again = pd.read_parquet(tmp_path / "again" / "details" / "math_500_local.parquet")
    assert [list(r["text"]) for r in again["model_response"]] == \
        [list(r["text"]) for r in details["model_response"]]

    bad = rsft("eval", "--model", str(hf_folder), "--out", str(tmp_path / "bad"), "--tasks",
               "no_such_task", cwd=tmp_path, env=cli_env, timeout=600)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown task 'no_such_task'" in lines[0], bad.stderr[-2000:]


def test_vllm_settings_reach_lightevals_vllm_config(tmp_path):
    """The GPU path's configuration, built without a GPU (vLLM itself is imported only to run)."""
    from settings.models import EvalTask, EvaluateSettings, VllmSettings
    from tasks.evaluation.runner import EvalJob, model_config

    settings = EvaluateSettings(
        tasks=[EvalTask(name="aime24", samples=64)], max_new_tokens=32768,
        vllm=VllmSettings(max_model_length=32768, data_parallel=8, gpu_memory_utilization=0.85))
    job = EvalJob(evaluate=settings, model="m", output_dir=str(tmp_path), backend="vllm")
    config = model_config(job, tmp_path / "cache")
    assert type(config).__name__ == "VLLMModelConfig"
    assert (config.dtype, config.max_model_length, config.data_parallel_size,
            config.gpu_memory_utilization, config.add_special_tokens) == (
        "bfloat16", 32768, 8, 0.85, False)
    g = config.generation_parameters
    assert (g.temperature, g.top_p, g.max_new_tokens) == (0.6, 0.95, 32768)


def test_the_eval_job_carries_the_evaluate_settings_whole(tmp_path):
    from pydantic import ValidationError

    from tasks.evaluation.runner import EvalJob

    assert set(EvalJob.model_fields) & set(EvaluateSettings.model_fields) == {"backend"}
    job = EvalJob(evaluate=EvaluateSettings(), model="m", output_dir="o", backend="transformers")
    read = EvalJob.model_validate_json(job.model_dump_json())
    assert read == job and read.evaluate.max_problems == 4  # the settings' default
    assert read.tasks == {"math_500_local": 2, "aime24_local": 2}
    with pytest.raises(ValidationError, match="backend transformers contradicts evaluate.backend vllm"):
        EvalJob(evaluate=EvaluateSettings(backend="vllm"), model="m", output_dir="o",
                backend="transformers")
