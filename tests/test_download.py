"""Stage `download`: built-in, local directory and Hub sources (the Hub offline, from a real
huggingface_hub cache layout)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from settings.errors import UserError
from settings.models import DownloadSettings
from tasks import download
from tasks.artifacts import ArtifactStore, sha256_file
from tasks.builtin_models import build_builtin
from tasks.stage import execute, plan_key
from tests.conftest import COMMIT, make_hf_cache


def run_download(tmp_path: Path, **settings) -> "download.Manifest":
    section = DownloadSettings(**settings)
    plan = plan_key(download.STAGE, section, {})
    return execute(download.STAGE, section, plan, {}, ArtifactStore(tmp_path / "work"))[0]


def test_builtin_is_deterministic_and_loads_with_transformers(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    again = tmp_path / "again"
    again.mkdir()
    build_builtin("tiny-qwen2", again)
    for f in ("model.safetensors", "config.json", "tokenizer.json"):
        assert sha256_file(again / f) == sha256_file(tiny_model_dir / f)
    # The weights follow the umask like the other files (safetensors alone writes 0600).
    modes = {f.name: f.stat().st_mode & 0o777 for f in again.iterdir()}
    assert set(modes.values()) == {modes["config.json"]} and modes["config.json"] & 0o044, modes
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (2, 64, 4, 2, 151936)
    assert config["tie_word_embeddings"] is False
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.dtype == torch.bfloat16  # the R1-Distill source dtype
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2: QKV bias
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.convert_ids_to_tokens(151650) == "<|quad_start|>"  # the real, unpatched tokenizer


def test_local_directory_is_copied_byte_for_byte(tmp_path, tiny_model_dir):
    m = run_download(tmp_path, source=str(tiny_model_dir))
    for f in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json"):
        assert sha256_file(m.dir / f) == sha256_file(tiny_model_dir / f)
    with safe_open(m.dir / "model.safetensors", "pt") as st:
        assert st.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert m.meta["dtype"] == "bfloat16" and m.meta["architectures"] == ["Qwen2ForCausalLM"]


def test_local_directory_key_follows_its_content(tmp_path, tiny_model_dir):
    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir, src)
    section = DownloadSettings(source=str(src))
    before = plan_key(download.STAGE, section, {}).key
    (src / "generation_config.json").write_text('{"temperature": 0.7}')
    assert plan_key(download.STAGE, section, {}).key != before


def test_pickle_weights_are_refused_unless_allowed(tmp_path, tiny_model_dir):
    src = tmp_path / "pickled"
    src.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_model_dir / f, src / f)
    torch.save({"w": torch.zeros(2)}, src / "pytorch_model.bin")
    with pytest.raises(UserError, match="only pickle weights .* download.allow_pickle=true"):
        run_download(tmp_path, source=str(src))
    m = run_download(tmp_path, source=str(src), allow_pickle=True)
    assert (m.dir / "pytorch_model.bin").is_file()


@pytest.mark.parametrize("case, message", [
    ("missing", "local model directory .* does not exist"),
    ("no-config", r"is not a Hugging Face model folder \(no config.json\)"),
    ("no-weights", r"has no model weights \(\*.safetensors\)"),
])
def test_bad_local_sources_fail_clearly_and_publish_nothing(tmp_path, case, message):
    src = tmp_path / case
    if case != "missing":
        src.mkdir()
    if case == "no-weights":
        (src / "config.json").write_text("{}")
    with pytest.raises(UserError, match=message):
        run_download(tmp_path, source=str(src))
    assert not list((tmp_path / "work").glob("artifacts/download/[!.]*"))


def test_a_hub_name_without_hf_scheme_says_so(tmp_path, monkeypatch):
    """`org/name` is read as a local path (it could be one); when none exists, name the fix."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        plan_key(download.STAGE, DownloadSettings(source="deepseek-ai/DeepSeek-R1@main"), {})
    assert str(e.value) == (f"download.source: local model directory "
                            f"{tmp_path}/deepseek-ai/DeepSeek-R1@main does not exist; did you mean "
                            "hf://deepseek-ai/DeepSeek-R1@main?")
    with pytest.raises(UserError) as e:  # a path that cannot be a repo gets no such hint
        plan_key(download.STAGE, DownloadSettings(source="./models/x"), {})
    assert "did you mean" not in str(e.value)


def test_builtin_unknown_name():
    with pytest.raises(UserError, match="unknown built-in model 'builtin:nope'; built-ins: builtin:tiny-qwen2"):
        plan_key(download.STAGE, DownloadSettings(source="builtin:nope"), {})


def test_hub_source_offline_from_a_real_cache_layout(tmp_path, tiny_model_dir, offline_hub):
    make_hf_cache(offline_hub, "tiny-org/tiny-qwen2", tiny_model_dir)
    m = run_download(tmp_path, source="hf://tiny-org/tiny-qwen2@main")
    assert m.meta["commit"] == COMMIT and m.key_material["fingerprint"]["commit"] == COMMIT
    assert sha256_file(m.dir / "model.safetensors") == sha256_file(tiny_model_dir / "model.safetensors")
    assert not (m.dir / "model.safetensors").is_symlink()
    # Pinned by commit gives the same key as the branch that resolved to it.
    pinned = plan_key(download.STAGE, DownloadSettings(source=f"hf://tiny-org/tiny-qwen2@{COMMIT}"), {})
    assert pinned.key == m.key


def test_hub_source_offline_errors(tmp_path, tiny_model_dir, offline_hub):
    with pytest.raises(UserError, match="not in the local Hugging Face cache and the Hub is offline"):
        run_download(tmp_path, source="hf://tiny-org/absent@main")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copyfile(tiny_model_dir / "config.json", pickled / "config.json")
    torch.save({"w": torch.zeros(2)}, pickled / "pytorch_model.bin")
    make_hf_cache(offline_hub, "tiny-org/pickled", pickled)
    with pytest.raises(UserError, match="only pickle weights"):
        run_download(tmp_path, source="hf://tiny-org/pickled")


def test_full_disk_is_refused_before_copying(tiny_model_dir, full_disk):
    section = DownloadSettings(source=str(tiny_model_dir))
    plan = plan_key(download.STAGE, section, {})
    with pytest.raises(UserError, match=r"not enough disk space for the model files .* GB free"):
        execute(download.STAGE, section, plan, {}, ArtifactStore(full_disk))
    assert not list(full_disk.glob("artifacts/download/[!.]*"))


def test_unreachable_hub_is_one_clear_error(monkeypatch):
    """A closed loopback port stands in for a machine without network."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub .* HF_HUB_OFFLINE=1"):
        plan_key(download.STAGE, DownloadSettings(source="hf://org/model@main"), {})
