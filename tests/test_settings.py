from pathlib import Path

import pytest
from pydantic import BaseModel

from settings import UserError, load_settings, preset_names
from settings.docs import settings_reference
from settings.models import DatasetSource, PipelineSettings, TokenRename, TrainSettings


def test_presets_load_and_tiny_is_default():
    assert {"tiny", "thinkless-warmup-1.5b"} <= set(preset_names())
    assert load_settings().name == "tiny"
    assert load_settings("tiny").download.source == "builtin:tiny-qwen2"


def test_thinkless_preset_is_the_seed_recipe():
    s = load_settings("thinkless-warmup-1.5b")
    t = s.train
    assert s.download.source.startswith("hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")
    assert s.tokenize.seq_length == 16384
    assert (t.lr, t.min_lr, t.lr_warmup_iters, t.train_iters) == (1e-5, 1e-6, 850, 17000)
    assert (t.global_batch_size, t.micro_batch_size, t.nproc_per_node) == (128, 1, 8)
    assert (t.adam_beta1, t.adam_beta2, t.weight_decay, t.clip_grad) == (0.9, 0.95, 0.1, 1.0)
    assert t.precision == "bf16" and t.use_distributed_optimizer and t.save_interval == 1000
    assert t.lr_decay_style == "cosine"


def test_overrides_parse_yaml_values():
    s = load_settings("tiny", ["train.lr=2e-4", "tokenize.pack=false", "convert.tensor_parallel=2",
                               "patch_tokenizer.generation_prompt_suffix=null"])
    assert s.train.lr == 2e-4 and s.tokenize.pack is False and s.convert.tensor_parallel == 2
    assert s.patch_tokenizer.generation_prompt_suffix is None


@pytest.mark.parametrize("overrides, fragment", [
    (["train.lrr=1"], "train.lrr = 1: unknown setting"),
    (["train.lr=abc"], "train.lr = 'abc': Input should be a valid number"),
    (["download.source=hf://nope"], "download.source = 'hf://nope'"),
    (["train.min_lr=1", "train.lr=0.1"], "min_lr (1.0) must not exceed lr (0.1)"),
    (["train.train_iters=2"], "lr_warmup_iters (4) must not exceed train_iters (2)"),
    (["nonsense"], "expected KEY=VALUE"),
    (["train.lr.x=1"], "'train.lr' is not a section"),
    (["train.nproc_per_node=2", "train.global_batch_size=3"],
     "global_batch_size (3) must be a multiple of micro_batch_size × data-parallel size (1 × 2)"),
    (["train.tensor_parallel=2"], "nproc_per_node × nnodes = 1 processes cannot hold"),
    (["train.precision=fp16", "train.loss_scale=1"], "train.loss_scale = 1: Input should be greater than 1"),
    (["train.loss_scale=1024"], "loss_scale applies to precision fp16 only (this is fp32)"),
    (["tokenize.seq_length=0"], "tokenize.seq_length = 0"),
    (["dataset.sources=[]"], "dataset.sources"),
])
def test_bad_overrides_name_the_field(overrides, fragment):
    with pytest.raises(UserError) as e:
        load_settings("tiny", overrides)
    assert fragment in str(e.value)


def test_every_problem_is_one_line():
    with pytest.raises(UserError) as e:
        load_settings("tiny", ["train.lr=abc", "train.bogus=1", "convert.tensor_parallel=0"])
    lines = str(e.value).splitlines()
    assert len(lines) == 3 and all(line.startswith("--set train.") or
                                   line.startswith("--set convert.") for line in lines)


def test_problems_name_what_the_user_wrote(tmp_path: Path):
    """A file's problem names the file as given; an override's says `--set` (never the preset's
    file, which the user did not pass)."""
    f = tmp_path / "mine.yaml"
    f.write_text("train:\n  lr: fast\n")
    with pytest.raises(UserError) as e:
        load_settings(str(f), ["evaluate.max_new_tokens=0"])
    assert str(e.value).splitlines() == [
        f"{f}: train.lr = 'fast': Input should be a valid number, unable to parse string as a "
        "number",
        "--set evaluate.max_new_tokens = 0: Input should be greater than or equal to 1"]
    with pytest.raises(UserError) as e:
        load_settings(None, ["evaluate.evaluate.max_new_tokens=1"])
    assert "tiny.yaml" not in str(e.value) and str(e.value).startswith("--set evaluate.evaluate")


@pytest.mark.parametrize("key, hint", [
    ("learning_rate", "did you mean train.lr?"),
    ("train.learning_rate", "did you mean train.lr?"),
    ("max_length", "did you mean tokenize.seq_length?"),
    ("tokenize.max_seq_length", "did you mean tokenize.seq_length?"),
    ("num_train_epochs", "did you mean train.epochs?"),
    ("per_device_train_batch_size", "did you mean train.micro_batch_size?"),
    ("gradient_accumulation_steps", "did you mean train.global_batch_size? (global_batch_size = "
     "micro_batch_size × accumulation steps × data-parallel size)"),
    ("warmup_ratio", "did you mean train.lr_warmup_iters? (in steps: ratio × train.train_iters)"),
    ("lr_scheduler_type", "did you mean train.lr_decay_style? (cosine, linear or constant; "
     "cosine_with_min_lr is cosine down to train.min_lr)"),
    ("dataset_name", "did you mean dataset.sources[].path? (as hf://org/name)"),
    ("dataset.dataset_mixture", "did you mean dataset.sources? (a list of {path: hf://org/name, "
     "name, split, weight, fields})"),
    ("report_to", "did you mean train.report_to?"),
    ("output_dir", "did you mean workdir? (every stage's artifacts live under it)"),
    ("train.tensor-model-parallel-size", "did you mean train.tensor_parallel?"),
    ("lr", "did you mean train.lr?"),  # ours, in another section
    ("train.seq_length", "did you mean tokenize.seq_length?"),
    ("max_new_tokens", "did you mean evaluate.max_new_tokens?"),
])
def test_other_tools_keys_name_ours(tmp_path: Path, key, hint):
    with pytest.raises(UserError) as e:
        load_settings("tiny", [f"{key}=2"])
    assert str(e.value) == f"--set {key} = 2: unknown setting; {hint}"
    # the same hint from a YAML file
    section, _, leaf = key.rpartition(".")
    f = tmp_path / "theirs.yaml"
    f.write_text(f"{section}:\n  {leaf}: 2\n" if section else f"{leaf}: 2\n")
    with pytest.raises(UserError) as e:
        load_settings(str(f))
    assert str(e.value) == f"{f}: {key} = 2: unknown setting; {hint}"


def test_alias_targets_are_settings():
    from settings.aliases import ALIASES, LEAVES

    # train.epochs and train.report_to are another change's; they land with it.
    pending = {"train.epochs", "train.report_to"}
    targets = {a.key.replace("[]", "") for a in ALIASES.values()} - pending
    known = {k for keys in LEAVES.values() for k in keys} | {
        f"dataset.sources.{f}" for f in DatasetSource.model_fields}
    assert targets <= known, targets - known


def test_a_space_for_the_equals_sign_says_so():
    """`--set train.lr 2e-5` leaves `2e-5` where the preset goes."""
    with pytest.raises(UserError) as e:
        load_settings("2e-5", ["train.lr"])
    assert str(e.value) == "--set 'train.lr': expected KEY=VALUE (write --set train.lr=2e-5)"


def test_unknown_preset_and_files(tmp_path: Path):
    with pytest.raises(UserError, match="unknown preset 'nope'; presets: .*tiny"):
        load_settings("nope")
    with pytest.raises(UserError, match="does not exist"):
        load_settings(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1\n")
    with pytest.raises(UserError, match=r"bad.yaml line \d+, column \d+: invalid YAML"):
        load_settings(str(bad))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_settings(str(scalar))


def test_user_file_overrides_defaults(tmp_path: Path):
    f = tmp_path / "mine.yaml"
    f.write_text("name: mine\ntrain:\n  lr: 0.01\n")
    s = load_settings(str(f))
    assert s.name == "mine" and s.train.lr == 0.01 and s.download.source == "builtin:tiny-qwen2"


def test_rsft_workdir_pins_the_workdir_unless_the_settings_give_one(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("RSFT_WORKDIR", raising=False)
    assert load_settings("tiny").workdir == Path("rsft-work")
    monkeypatch.setenv("RSFT_WORKDIR", str(tmp_path / "pinned"))
    for preset in preset_names():
        assert load_settings(preset).workdir == tmp_path / "pinned"
    assert load_settings("tiny", ["workdir=mine"]).workdir == Path("mine")
    f = tmp_path / "mine.yaml"
    f.write_text("workdir: from-file\n")
    assert load_settings(str(f)).workdir == Path("from-file")


def test_docs_show_the_chosen_presets_values():
    reference = settings_reference(load_settings("thinkless-warmup-1.5b", ["train.seed=7"]))
    assert "  train.lr (float, thinkless-warmup-1.5b: 1e-05; default 0.001)\n" in reference
    assert "  train.seed (int, thinkless-warmup-1.5b: 7; default 1234)\n" in reference
    assert "  train.adam_beta1 (float, default 0.9)\n" in reference  # the preset keeps it
    assert "  tokenize.seq_length (int, tiny: 2048; default 16384)" in settings_reference(
        load_settings("tiny"))


def _fields(model: type[BaseModel], prefix=""):
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _fields(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


@pytest.mark.parametrize("model", [PipelineSettings, TokenRename, DatasetSource])
def test_every_field_is_documented(model):
    undocumented = [path for path, info in _fields(model) if not (info.description or "").strip()]
    assert not undocumented
    reference = settings_reference()
    for path, _ in _fields(PipelineSettings):
        assert f"  {path} (" in reference


# -- open-r1 recipes -------------------------------------------------------------------------------
OPEN_R1_RECIPE = {  # shaped like open-r1's recipes/<model>/sft/config_*.yaml
    "model_name_or_path": "Qwen/Qwen2.5-1.5B-Instruct", "model_revision": "main",
    "torch_dtype": "bfloat16", "attn_implementation": "flash_attention_2",
    "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
    "dataset_name": "open-r1/OpenR1-Math-220k", "dataset_config": "default",
    "dataset_num_proc": 4, "bf16": True, "do_eval": False, "gradient_accumulation_steps": 4,
    "gradient_checkpointing": True, "hub_model_id": "org/Qwen-Distill", "push_to_hub": True,
    "learning_rate": 5.0e-5, "logging_steps": 5, "lr_scheduler_type": "cosine_with_min_lr",
    "lr_scheduler_kwargs": {"min_lr_rate": 0.1}, "packing": True, "max_grad_norm": 0.2,
    "max_length": 16384, "max_steps": 1000, "output_dir": "data/Qwen-Distill",
    "per_device_train_batch_size": 2, "report_to": ["wandb"], "save_steps": 100,
    "save_total_limit": 2, "seed": 42, "use_liger_kernel": True, "warmup_ratio": 0.05,
    "weight_decay": 0.0, "wandb_project": "open-r1",
}


def test_an_open_r1_recipe_maps_to_our_settings():
    from settings.open_r1 import import_recipe

    imported = import_recipe(OPEN_R1_RECIPE, "distill", gpus=8, template_file="t.jinja")
    s = PipelineSettings.model_validate(imported.settings)
    t = s.train
    assert s.download.source == "hf://Qwen/Qwen2.5-1.5B-Instruct@main"
    assert s.workdir == Path("data/Qwen-Distill") and s.export.push.repo == "org/Qwen-Distill"
    assert [(x.path, x.name) for x in s.dataset.sources] == [("hf://open-r1/OpenR1-Math-220k",
                                                             "default")]
    assert (s.tokenize.seq_length, s.tokenize.pack, s.tokenize.workers) == (16384, True, 4)
    assert str(s.patch_tokenizer.chat_template_file) == "t.jinja"
    assert imported.chat_template == OPEN_R1_RECIPE["chat_template"]
    assert (t.lr, t.min_lr, t.lr_decay_style) == (5e-5, 5e-6, "cosine")
    assert (t.train_iters, t.lr_warmup_iters) == (1000, 50)  # 0.05 × max_steps
    assert (t.micro_batch_size, t.global_batch_size, t.nproc_per_node) == (2, 64, 8)
    assert (t.precision, t.recompute, t.clip_grad, t.weight_decay) == ("bf16", "full", 0.2, 0.0)
    assert (t.save_interval, t.keep_last, t.log_interval, t.seed) == (100, 2, 5, 42)
    assert t.adam_beta2 == 0.999  # TRL's default: the recipe leaves it out
    not_mapped = dict(imported.not_mapped)
    assert {"torch_dtype", "attn_implementation", "do_eval", "use_liger_kernel",
            "wandb_project"} <= set(not_mapped)
    if "report_to" in TrainSettings.model_fields:  # added by another change; lands with it
        assert t.report_to == ["wandb"]
    else:
        assert not_mapped["report_to"] == "train.report_to is not a setting of this version"


def test_an_open_r1_recipe_without_max_steps_says_what_it_cannot_compute():
    from settings.open_r1 import import_recipe

    recipe = {**OPEN_R1_RECIPE, "max_steps": -1, "num_train_epochs": 3,
              "lr_scheduler_type": "cosine", "lr_scheduler_kwargs": {}}
    imported = import_recipe(recipe, "distill")
    not_mapped = dict(imported.not_mapped)
    assert not_mapped["warmup_ratio"].startswith("0.05 of the steps, which are not known")
    s = PipelineSettings.model_validate(imported.settings)
    assert s.train.min_lr == 0.0 and s.train.global_batch_size == 8  # 2 × 4 × 1 GPU
    if "epochs" in TrainSettings.model_fields:  # added by another change; lands with it
        assert s.train.epochs == 3
    else:
        assert not_mapped["num_train_epochs"] == "train.epochs is not a setting of this version"


def test_run_label_says_what_differs_from_the_named_preset(tmp_path: Path):
    from settings.naming import MAX_DIFF, run_label

    def label(*overrides: str, config: str = "tiny") -> str:
        return run_label(load_settings(config, list(overrides)))

    assert label() == "tiny"
    assert label(f"workdir={tmp_path}") == "tiny"  # where artifacts live is no experiment
    # the example; the best-known knobs first, whatever the order of the --set options
    assert label("train.train_iters=20", "train.lr=2e-5", "train.min_lr=0") == \
        "tiny-lr2e-5-iters20-minlr0"
    assert label("tokenize.pack=false", "train.precision=bf16") == "tiny-bf16-nopack"
    assert label("train.lr=2e-5", "train.min_lr=0", config="thinkless-warmup-1.5b") == \
        "thinkless-warmup-1.5b-lr2e-5-minlr0"
    sources = label("dataset.sources=[{path: a.jsonl}]")
    assert sources.startswith("tiny-data") and sources == label("dataset.sources=[{path: a.jsonl}]")
    assert sources != label("dataset.sources=[{path: b.jsonl}]")
    # capped, and two long diffs that share their start still differ
    many = [f"train.{k}={v}" for k, v in [("lr", 3e-4), ("train_iters", 200),
            ("global_batch_size", 16), ("micro_batch_size", 2), ("min_lr", 1e-6),
            ("lr_warmup_iters", 10), ("weight_decay", 0.01)]]
    a, b = label(*many), label(*many, "train.seed=7")
    assert a != b and a.startswith("tiny-lr3e-4-iters200-gbs16-mbs2") and "-etc" in a
    assert len(a) <= len("tiny-") + MAX_DIFF + len("-etc1234")
    # a file whose name is no preset: nothing to compare with
    custom = tmp_path / "mine.yaml"
    custom.write_text("name: my-experiment\ntrain: {lr: 2.0e-4}\n")
    assert run_label(load_settings(str(custom))) == "my-experiment"
