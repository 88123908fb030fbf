from pathlib import Path

import pytest
from pydantic import BaseModel

from settings import UserError, load_settings, preset_names
from settings.docs import settings_reference
from settings.models import DatasetSource, PipelineSettings, TokenRename


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
    assert len(lines) == 3 and all(line.startswith("tiny.yaml: ") for line in lines)


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
