"""`rsft` as a user runs it: separate processes, their own ephemeral Prefect API."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import COMMIT, make_hf_cache, rsft


@pytest.mark.parametrize("args, message", [
    (["run", "nosuchpreset"], "unknown preset 'nosuchpreset'"),
    (["run", "--set", "train.lrr=1"], "train.lrr = 1: unknown setting"),
    (["run", "--set", "train.lr=fast"], "train.lr = 'fast': Input should be a valid number"),
    (["run", "--only", "nosuchstage"], "--only nosuchstage: no such stage"),
    # what the model's config decides, before any stage (tokenize would rebuild first)
    (["run", "--set", "tokenize.seq_length=262144"], "tokenize.seq_length 262144 is above the "
     "model's max_position_embeddings 131072 (builtin:tiny-qwen2); lower tokenize.seq_length"),
    (["run", "--set", "train.train_iters=2"], "--set train: Value error, lr_warmup_iters (4) "
     "must not exceed train_iters (2): the learning rate would never reach its peak"),
    (["run", "--set", "download.source=/no/such/model"], "local model directory /no/such/model does not exist"),
    (["run", "bad.yaml"], "bad.yaml line 2, column 1: invalid YAML"),
    (["stages", "missing.yaml"], "settings file missing.yaml does not exist"),
    (["settings", "show", "--set", "x"], "--set 'x': expected KEY=VALUE"),
    (["kubernetes", "manifest", "--set", "train.kubernetes.volume_claim=c"],
     "train.kubernetes.image is not set"),
    (["run", "--set", "download.source=org/name"],
     "local model directory {tmp}/org/name does not exist; did you mean hf://org/name?"),
    (["run", "--set", "train.lr", "2e-5"], "--set 'train.lr': expected KEY=VALUE (write --set "
     "train.lr=2e-5)"),
    (["run", "--set", "learning_rate=2e-5"],
     "--set learning_rate = '2e-5': unknown setting; did you mean train.lr?"),
    (["run", "theirs.yaml"], "theirs.yaml: per_device_train_batch_size = 4: unknown setting; did "
     "you mean train.micro_batch_size?"),
    # `rsft eval` takes the same keys as `rsft run` (here they pass: the missing model is next)
    (["eval", "--model", "m", "--out", "o", "--set", "evaluate.max_new_tokens=32"],
     "{tmp}/m is not a Hugging Face model folder"),
    (["eval", "--model", "m", "--out", "o", "--set", "max_new_tokens=32"],
     "error: --set max_new_tokens = 32: unknown setting; did you mean evaluate.max_new_tokens?"),
    (["eval", "--model", "m", "--out", "o", "--tasks", "aime24_local=x"],
     "--tasks: samples = 'x': Input should be a valid integer"),
    (["settings", "import-open-r1", "mixture.yaml"],
     "mixture.yaml: not readable as an open-r1 SFT recipe (KeyError: 'id')"),
])
def test_user_mistakes_print_one_line_and_exit_2(tmp_path, cli_env, args, message):
    (tmp_path / "bad.yaml").write_text("train: [1\n")
    (tmp_path / "theirs.yaml").write_text("per_device_train_batch_size: 4\n")
    (tmp_path / "mixture.yaml").write_text("dataset_mixture:\n  datasets:\n    - config: x\n")
    proc = rsft(*args, cwd=tmp_path, env=cli_env)
    assert proc.returncode == 2, proc.stderr
    assert message.format(tmp=tmp_path) in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "rsft-work" / "artifacts").exists()


def test_unpatchable_tokenizer_exits_2_without_traceback(tmp_path, cli_env, tiny_model_dir):
    src = tmp_path / "model"
    shutil.copytree(tiny_model_dir, src)
    tj = json.loads((src / "tokenizer.json").read_text())
    next(t for t in tj["added_tokens"] if t["id"] == 151650)["content"] = "<|other|>"
    (src / "tokenizer.json").write_text(json.dumps(tj))
    proc = rsft("run", "--set", f"download.source={src}", "--until", "patch_tokenizer",
                cwd=tmp_path, env=cli_env)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: patch_tokenizer: token 151650 in tokenizer.json is "
                      "'<|other|>', expected '<|quad_start|>' (to patch) or '<short>' (already "
                      "patched): this is not the tokenizer the renames were written for; fix "
                      "patch_tokenizer.renames or download.source"]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not list((tmp_path / "rsft-work/artifacts/patch_tokenizer").glob("[!.]*"))
    # The console says it once (Prefect's own lines would repeat it thrice, plus a stray
    # `NoneType: None`); the Prefect UI's log keeps the task's failure with its message.
    assert (proc.stdout + proc.stderr).count("token 151650 in tokenizer.json is '<|other|>'") == 1
    assert "NoneType: None" not in proc.stdout + proc.stderr
    logs = httpx.post(f"{cli_env['PREFECT_API_URL']}/logs/filter",
                      json={"limit": 200, "sort": "TIMESTAMP_DESC"}).json()
    assert any("Finished in state Failed(" in x["message"] and "<|other|>" in x["message"]
               for x in logs)


def test_settings_show_and_stages(tmp_path, cli_env):
    shown = rsft("settings", "show", "thinkless-warmup-1.5b", "--set", "train.lr=2e-5",
                 cwd=tmp_path, env=cli_env, check=True).stdout
    assert "lr: 2.0e-05" in shown and "seq_length: 16384" in shown
    docs = rsft("settings", "show", "--docs", cwd=tmp_path, env=cli_env, check=True).stdout
    assert "patch_tokenizer.generation_prompt_suffix" in docs
    docs = rsft("settings", "show", "thinkless-warmup-1.5b", "--docs", cwd=tmp_path, env=cli_env,
                check=True).stdout
    assert "  tokenize.seq_length (int, default 16384)" in docs  # the preset's value
    assert "  train.lr (float, thinkless-warmup-1.5b: 1e-05; default 0.001)" in docs
    table = rsft("stages", cwd=tmp_path, env={**cli_env, "COLUMNS": "200"}, check=True).stdout
    assert "download" in table and "patch_tokenizer" in table and "not built" in table


OPEN_R1_RECIPE = """\
# Model arguments
model_name_or_path: Qwen/Qwen2.5-Math-7B
model_revision: v3.0
torch_dtype: bfloat16
attn_implementation: flash_attention_2

# Data training arguments
chat_template: "{%- for message in messages %}{{ '<|im_start|>' + message.role + '\\n' + \\
  message.content + '<|im_end|>\\n' }}{%- endfor %}"
dataset_mixture:
  datasets:
    - id: open-r1/Mixture-of-Thoughts
      config: math
      split: train
      columns:
        - messages
      weight: 0.5
  seed: 42
  test_split_size: 0.02
dataset_num_proc: 12
eos_token: <|im_end|>

# SFT trainer config
bf16: true
do_eval: false
eval_strategy: 'no'
gradient_accumulation_steps: 8
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
hub_model_id: OpenR1-Distill-7B
hub_strategy: every_save
learning_rate: 4.0e-05
log_level: info
logging_steps: 1
logging_strategy: steps
lr_scheduler_type: cosine_with_min_lr
lr_scheduler_kwargs:
  min_lr_rate: 0.1
packing: false
max_grad_norm: 0.2
max_length: 32768
max_steps: -1
num_train_epochs: 5
output_dir: data/OpenR1-Distill-7B
overwrite_output_dir: true
per_device_eval_batch_size: 1
per_device_train_batch_size: 2
push_to_hub: true
report_to:
- wandb
save_strategy: epoch
save_total_limit: 1
seed: 42
use_liger_kernel: true
warmup_ratio: 0.03
weight_decay: 0.0
wandb_entity: huggingface
wandb_project: open-r1
"""


def test_an_open_r1_recipe_imports_to_settings_rsft_accepts(tmp_path, cli_env):
    from settings.models import TrainSettings

    (tmp_path / "config_distill.yaml").write_text(OPEN_R1_RECIPE)
    proc = rsft("settings", "import-open-r1", "config_distill.yaml", "--gpus", "8", cwd=tmp_path,
                env=cli_env, check=True)
    lines = proc.stdout.splitlines()
    assert lines[-1] == ("wrote config_distill.rsft.yaml and "
                         "config_distill.rsft.chat_template.jinja")
    not_mapped = {line.split(": ")[1] for line in lines if line.startswith("not mapped: ")}
    assert {"torch_dtype", "attn_implementation", "eos_token", "do_eval", "eval_strategy",
            "hub_strategy", "overwrite_output_dir", "save_strategy", "use_liger_kernel",
            "warmup_ratio", "wandb_entity", "wandb_project"} <= not_mapped
    pending = {"num_train_epochs": "epochs", "report_to": "report_to"}  # another change's keys
    for theirs, ours in pending.items():
        assert (theirs in not_mapped) == (ours not in TrainSettings.model_fields)
    shown = yaml.safe_load(rsft("settings", "show", "config_distill.rsft.yaml", cwd=tmp_path,
                                env=cli_env, check=True).stdout)
    assert shown["download"]["source"] == "hf://Qwen/Qwen2.5-Math-7B@v3.0"
    assert shown["workdir"] == "data/OpenR1-Distill-7B"
    assert shown["dataset"]["sources"][0]["path"] == "hf://open-r1/Mixture-of-Thoughts"
    assert shown["tokenize"]["seq_length"] == 32768 and shown["tokenize"]["pack"] is False
    train = shown["train"]
    assert (train["lr"], train["min_lr"], train["lr_decay_style"]) == (4e-5, 4e-6, "cosine")
    assert (train["micro_batch_size"], train["global_batch_size"]) == (2, 2 * 8 * 8)
    assert (train["precision"], train["recompute"]) == ("bf16", "full")
    template = tmp_path / shown["patch_tokenizer"]["chat_template_file"]
    assert template.read_text().startswith("{%- for message in messages %}")


@pytest.mark.slow
def test_interrupted_training_resumes_and_the_finished_run_says_where_everything_is(tmp_path,
                                                                                  cli_env):
    """One workdir, interrupted twice while it trains, then run to the end:
    1. Ctrl-C (SIGINT to `rsft run`'s process group, as a terminal sends it), on Prefect's
       ephemeral API server (which the Ctrl-C stops too): exit 130 within 10 s, one line naming
       the step reached and the one to resume from, no process left;
    2. the rerun resumes there; kill -9 once it saved a further checkpoint: no train artifact;
    3. the rerun of the same key continues from that checkpoint (no step before it is redone);
    4. the whole run prints its summary at 80 columns with every path whole on one line; a
       failed run still says where things are and how to go on."""
    import psutil

    work = tmp_path / ("a-workdir-whose-name-alone-makes-every-artifact-path-longer-than-eighty"
                       "-columns")
    quick = ["--set", f"workdir={work}", "--set", "train.train_iters=6", "--set",
             "train.save_interval=1", "--set", "train.keep_last=2", "--set",
             "train.global_batch_size=1", "--set", "evaluate.max_new_tokens=16", "--set",
             "convert.verify=false", "--set", "export.verify=false"]
    args = ["run", *quick, "--until", "train"]
    checkpoint = "scratch/train/*/checkpoints/latest_checkpointed_iteration.txt"

    def saved() -> int:
        return max((int(p.read_text()) for p in work.glob(checkpoint)), default=0)

    def start(env: dict[str, str], name: str) -> tuple[subprocess.Popen, Path, Path]:
        out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with out.open("w") as o, err.open("w") as e:
            return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=tmp_path,
                                    env=env, stdout=o, stderr=e, start_new_session=True), out, err

    # 1. Ctrl-C once a checkpoint is saved and the next step ran
    ephemeral = {k: v for k, v in cli_env.items() if k != "PREFECT_API_URL"}
    ephemeral["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    proc, out, err = start(ephemeral, "ctrl-c")
    deadline = time.time() + 600
    while not (saved() and len(_lines(work.glob("scratch/train/*/metrics.jsonl"))) >= 2):
        assert proc.poll() is None and time.time() < deadline, err.read_text()[-3000:]
        time.sleep(0.1)
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    assert any("megatron_bridge.training" in " ".join(p.cmdline()) for p in tree)
    seen = {f: f.stat().st_size for f in (out, err)}
    began = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        code = proc.wait(timeout=10)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 130 and time.monotonic() - began < 10
    _, alive = psutil.wait_procs(tree, timeout=2)
    assert not alive, [p.cmdline() for p in alive]
    after = [line for f, size in seen.items()
             for line in f.read_bytes()[size:].decode(errors="replace").splitlines()]
    (line,) = [x for x in after if "| INFO" not in x]  # a step's log line may race it
    reached = len(_lines(work.glob("scratch/train/*/metrics.jsonl")))
    first = saved()
    assert line == f"interrupted at step {reached}; `rsft run` resumes from step {first}"
    assert first < 5, "training ran past the point this test needs to interrupt it again"

    # 2. resumed there; kill -9 once it saved a further checkpoint
    proc, out, err = start(cli_env, "killed")
    while saved() <= first:
        assert proc.poll() is None and time.time() < deadline, err.read_text()[-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert f"training: steps {first}..6" in out.read_text() + err.read_text()
    second = saved()
    assert first < second < 6 and not list(work.glob("artifacts/train/[!.]*"))

    # 3. the rerun continues from the last checkpoint
    rerun = rsft(*args, cwd=tmp_path, env=cli_env, check=True, timeout=900)
    assert "resuming in" in rerun.stdout + rerun.stderr
    assert f"training: steps {second}..6" in rerun.stdout + rerun.stderr
    (metrics,) = work.glob("artifacts/train/[!.]*/metrics.jsonl")
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]

    # 4. to the end, at 80 columns
    env = {**cli_env, "COLUMNS": "80"}
    out = rsft("run", *quick, cwd=tmp_path, env=env, check=True, timeout=1200).stdout
    lines = out.splitlines()
    (export,) = work.glob("artifacts/export/[!.]*")
    assert len(str(export)) > 80
    assert f"export    {export}" in lines
    last = json.loads(metrics.read_text().splitlines()[-1])
    assert any(ln.startswith(f"train     loss {last['loss']:.4f} at step 6 (from ") for ln in lines)
    assert any(ln.startswith("scores    math_500_local pass@k:k=1&n=2 = ") for ln in lines)
    assert any(ln.startswith("          aime24_local pass@k:k=1&n=2 = ") for ln in lines)
    nexts = lines[lines.index("next:") + 1:]
    assert nexts[0].startswith(f"  rsft eval --model {export} --out eval-")
    assert nexts[1].startswith(f"  rsft run --set workdir={work} ") and \
        "--from export --set export.iteration=5   #" in nexts[1]
    assert nexts[2].startswith('  python -c "import sys; from transformers import') and \
        f'" {export}   # load it with transformers' in nexts[2]
    assert "Traceback" not in out
    # a failed run: the error on stderr, what it built and the rerun on stdout
    failed = rsft("run", *quick, "--only", "export", "--set", "export.iteration=7",
                  cwd=tmp_path, env=env)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr + failed.stdout
    assert [ln for ln in failed.stderr.splitlines() if ln.startswith("error:")] == [
        "error: export: export.iteration 7: no checkpoint of that iteration (kept: 5, 6); choose "
        "one of them, or null for the final one (raise train.keep_last to keep more)"]
    lines = failed.stdout.splitlines()
    assert any(ln.startswith("run tiny-") and ln.endswith(": failed") for ln in lines), failed.stdout
    assert any(ln.startswith(f"train     loss {last['loss']:.4f} at step 6") for ln in lines)
    assert f"  rsft run {' '.join(quick)} --set export.iteration=7 --only export   # after " \
           "fixing the error: built stages are reused" in lines


def _lines(paths) -> list[str]:
    return [line for p in paths for line in p.read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_mid_stage_never_leaves_a_trusted_artifact(tmp_path, cli_env):
    """Kill -9 `rsft run` while each stage is building; the rerun completes and every artifact
    matches an uninterrupted run."""
    work = tmp_path / "work"
    for stage in ("download", "patch_tokenizer"):
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--set", f"workdir={work}",
                                 "--until", "patch_tokenizer"],
                                cwd=tmp_path, env=cli_env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        stage_dir = work / "artifacts" / stage
        deadline = time.time() + 240
        while time.time() < deadline and not list(stage_dir.glob(".tmp-*")):
            assert proc.poll() is None, f"rsft ended before {stage} started building"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert list(stage_dir.glob(".tmp-*")), f"never caught {stage} mid-build"
        assert not list(stage_dir.glob("*/manifest.json"))  # nothing a later run would trust
    listing = rsft("stages", "--set", f"workdir={work}", cwd=tmp_path,
                   env={**cli_env, "COLUMNS": "300"}, check=True).stdout
    from tasks import STAGE_NAMES

    # download finished in the 2nd run; the rest never did
    assert listing.count("not built") == len(STAGE_NAMES) - 1
    rsft("run", "--set", f"workdir={work}", "--until", "patch_tokenizer", cwd=tmp_path,
         env=cli_env, check=True)
    assert not list(work.glob("artifacts/*/.tmp-*"))  # the dead builders' leftovers are swept
    # The uninterrupted run (the whole pipeline from an isolated copy is in
    # tests/test_operations_e2e.py; the crash drills of every stage in tests/test_chaos.py).
    clean = tmp_path / "clean"
    rsft("run", "--set", f"workdir={clean}", "--until", "patch_tokenizer", cwd=tmp_path,
         env=cli_env, check=True)
    for stage in ("download", "patch_tokenizer"):
        a = next((work / "artifacts" / stage).glob("*/manifest.json")).read_text()
        b = next((clean / "artifacts" / stage).glob("*/manifest.json")).read_text()
        assert json.loads(a)["content_hash"] == json.loads(b)["content_hash"]


@pytest.mark.slow
def test_hub_download_offline_through_the_cli(tmp_path, cli_env, tiny_model_dir):
    cache = tmp_path / "hf-cache"
    make_hf_cache(cache, "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", tiny_model_dir)
    env = {**cli_env, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "COLUMNS": "300"}
    args = ["--set", "download.source=hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B@main",
            "--set", f"workdir={tmp_path / 'work'}", "--until", "patch_tokenizer"]
    proc = rsft("run", *args, cwd=tmp_path, env=env, check=True)
    assert "Cached" not in proc.stdout + proc.stderr
    manifest = next((tmp_path / "work/artifacts/download").glob("*/manifest.json")).read_text()
    assert COMMIT in manifest
    again = rsft("run", *args, cwd=tmp_path, env=env, check=True)
    assert (again.stdout + again.stderr).count("Finished in state Cached") == 2
    # the downloaded config is known now: a sequence length above its positions is refused
    # before planning anything (a Hub model not downloaded yet is checked in `train`)
    longer = rsft("stages", *args[:4], "--set", "tokenize.seq_length=262144", cwd=tmp_path,
                  env=env)
    assert longer.returncode == 2 and "above the model's max_position_embeddings 131072" in \
        longer.stderr, longer.stderr


@pytest.mark.slow
def test_convert_and_verify_commands(tmp_path, cli_env, tiny_model_dir):
    bad = rsft("convert", "hf2mcore", "--hf", str(tiny_model_dir), "--out", str(tmp_path / "m"),
               "--tp", "3", cwd=tmp_path, env=cli_env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "error: tensor_parallel=3 must divide the 4 attention heads and 2 KV groups; use one of [1, 2]"]
    rsft("convert", "hf2mcore", "--hf", str(tiny_model_dir), "--out", str(tmp_path / "m"),
         "--tp", "2", cwd=tmp_path, env=cli_env, check=True)
    report = json.loads(rsft("verify", "--hf", str(tiny_model_dir), "--mcore", str(tmp_path / "m"),
                             "--json", cwd=tmp_path, env=cli_env, check=True).stdout)
    assert report["top1_agreement"] >= 0.99 and len(report["prompts"]) == 3
    rsft("convert", "mcore2hf", "--mcore", str(tmp_path / "m"), "--out", str(tmp_path / "back"),
         "--hf-base", str(tiny_model_dir), cwd=tmp_path, env=cli_env, check=True)
    for f in ("model.safetensors", "tokenizer.json"):
        assert (tmp_path / "back" / f).read_bytes() == (tiny_model_dir / f).read_bytes()
