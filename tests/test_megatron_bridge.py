"""HF ⇄ Megatron conversion on tiny real models (real vocabulary and tokenizer): logits against
transformers and bit-exact round trips, in one process and under torchrun (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_bridge.__main__ import main as bridge_main
from megatron_bridge.__main__ import verify
from megatron_bridge.convert import hf_to_mcore, mcore_to_hf
from megatron_bridge.models import ARCHITECTURES, Geometry, Kind, to_hf, to_megatron
from tests.conftest import FAMILIES, asking_for, load_folder, tiny_hf


def assert_bit_exact(a_dir: Path, b_dir: Path) -> None:
    a, b = load_folder(a_dir), load_folder(b_dir)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_mapping_kinds_invert_exactly(kind, tp):
    geo = Geometry(num_heads=8, num_query_groups=4, head_dim=4, vocab_size=1000,
                   padded_vocab_size=1024, tp=tp)
    shapes = {Kind.QKV: [(32, 16), (16, 16), (16, 16)], Kind.GATED_MLP: [(24, 16), (24, 16)],
              Kind.VOCAB: [(1000, 16)]}.get(kind, [(24, 16)])
    hf = [torch.randn(s) for s in shapes]
    shards = [to_megatron(kind, hf, geo, r) for r in range(tp)]
    if kind is not Kind.REPLICATED:
        assert sum(s.numel() for s in shards) >= sum(t.numel() for t in hf)
    assert all(torch.equal(x, y) for x, y in zip(to_hf(kind, shards, geo), hf))


def test_qkv_layout_is_megatrons_per_group_interleave():
    geo = Geometry(num_heads=4, num_query_groups=2, head_dim=1, vocab_size=8, padded_vocab_size=8, tp=1)
    q, k, v = torch.tensor([[0.], [1.], [2.], [3.]]), torch.tensor([[10.], [11.]]), torch.tensor([[20.], [21.]])
    fused = to_megatron(Kind.QKV, [q, k, v], geo, 0).flatten().tolist()
    assert fused == [0, 1, 10, 20, 2, 3, 11, 21]  # group 0: q0 q1 k0 v0; group 1: q2 q3 k1 v1


@pytest.mark.parametrize("family, dtype, tied", [
    ("qwen2", torch.float32, False),
    ("qwen2", torch.bfloat16, False),
    ("llama", torch.float32, True),
    ("qwen3", torch.float32, False),
    ("qwen3", torch.bfloat16, True),
])
def test_tp1_logits_match_transformers_and_round_trip_is_bit_exact(tmp_path, family, dtype, tied):
    hf = tiny_hf(tmp_path / "hf", family, dtype, tied)
    meta = hf_to_mcore(hf, tmp_path / "mcore", tp=1, pp=1)
    assert meta["dtype"] == str(dtype).split(".")[-1] and meta["vocab_size"] == 151936
    assert (tmp_path / "mcore/latest_checkpointed_iteration.txt").read_text() == "release"
    report = verify(hf, tmp_path / "mcore", 1, 1)  # both sides in fp32 from the same weights
    assert report["max_abs_diff"] <= 1e-5 and report["top1_agreement"] == 1.0, report
    if dtype == torch.bfloat16:  # in the checkpoint's own precision: kernel noise, same answer
        native = verify(hf, tmp_path / "mcore", 1, 1, dtype="checkpoint")
        assert native["max_abs_diff"] <= 0.05, native
    mcore_to_hf(tmp_path / "mcore", tmp_path / "back", hf_base=hf)
    assert_bit_exact(hf, tmp_path / "back")
    assert json.loads((tmp_path / "back/config.json").read_text())["vocab_size"] == 151936
    assert (tmp_path / "back/tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()


LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_llama3_rope_scaling_is_carried_over_and_others_refused(tmp_path):
    # theta as Llama 3's: half the rotary frequencies fall in the scaled or smoothed bands; large
    # weights make attention position-sensitive, so a missed scaling shows in the logits
    hf = tiny_hf(tmp_path / "hf", "llama", initializer_range=0.5,
                 rope_parameters={**LLAMA31_ROPE, "rope_theta": 500000.0})
    hf_to_mcore(hf, tmp_path / "mcore", tp=1, pp=1)
    report = verify(hf, tmp_path / "mcore", 1, 1)
    assert report["max_abs_diff"] <= 1e-5 and report["top1_agreement"] == 1.0, report
    cfg = json.loads((hf / "config.json").read_text())
    for key in ("rope_parameters", "rope_scaling"):
        cfg.pop(key, None)
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope scaling 'yarn' is not supported by megatron-core"):
        hf_to_mcore(hf, tmp_path / "other", tp=1, pp=1)


def test_sharded_hf_input_and_sharded_export(tmp_path):
    """A multi-shard HF folder (with its index) converts, and the export shards the same way."""
    hf = tiny_hf(tmp_path / "single", "qwen2", torch.bfloat16)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(hf, dtype=torch.bfloat16).save_pretrained(
        tmp_path / "hf", max_shard_size="15MB")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", tp=1, pp=1)
    info = mcore_to_hf(tmp_path / "mcore", tmp_path / "back", max_shard_size="15MB")
    assert info["shards"] > 1 and (tmp_path / "back/model.safetensors.index.json").is_file()
    assert_bit_exact(hf, tmp_path / "back")
    # The weights follow the umask like the rest of the folder (safetensors alone writes 0600).
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "back").iterdir()}
    assert set(modes.values()) == {modes["config.json"]} and modes["config.json"] & 0o044, modes
    with pytest.raises(ValueError, match="already exists and is not empty"):
        mcore_to_hf(tmp_path / "mcore", tmp_path / "back")


def test_every_table_row_is_used_by_some_family(tmp_path):
    from megatron_bridge.build import build_model
    from megatron_bridge.build import param_rows
    from megatron_bridge.parallel import model_parallel

    used: dict[str, set[str]] = {a.name: set() for a in ARCHITECTURES}
    for family in FAMILIES:
        hf = json.loads((tiny_hf(tmp_path / family, family, tied=False) / "config.json").read_text())
        hf["attention_bias"] = True  # exercise the optional bias rows too
        from megatron_bridge.models import architecture_for

        arch = architecture_for(hf)
        with model_parallel(1, 1):
            for _, row, _ in param_rows(build_model(hf), arch, tied=False):
                used[arch.name].add(row.megatron)
        assert used[arch.name] == {p.megatron for p in arch.params}, arch.name


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "-m", "megatron_bridge", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("family, dtype, tied, saved, loaded", [
    ("qwen2", "float32", False, ("--tp", "2"), ("--pp", "2")),
    ("llama", "bfloat16", True, ("--pp", "2"), ("--tp", "2")),
    ("qwen3", "float32", False, ("--pp", "2"), ("--pp", "2")),
])
def test_torchrun_layouts_reshard_and_round_trip(tmp_path, family, dtype, tied, saved, loaded):
    """Convert under torchrun at one layout, verify logits at another (resharding on load), and
    export back bit-exactly."""
    hf = tiny_hf(tmp_path / "hf", family, getattr(torch, dtype), tied, layers=4)
    root = Path(__file__).resolve().parents[1]
    torchrun("hf2mcore", "--hf", str(hf), "--out", str(tmp_path / "mcore"), *saved, cwd=root)
    meta = json.loads((tmp_path / "mcore/rsft_checkpoint.json").read_text())
    assert (meta["tensor_parallel"], meta["pipeline_parallel"]) == (
        2 if saved[0] == "--tp" else 1, 2 if saved[0] == "--pp" else 1)
    torchrun("verify", "--hf", str(hf), "--mcore", str(tmp_path / "mcore"), *loaded,
             "--json", str(tmp_path / "report.json"), cwd=root)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["max_abs_diff"] <= 1e-5 and report["top1_agreement"] == 1.0, report
    assert bridge_main(["mcore2hf", "--mcore", str(tmp_path / "mcore"), "--out",
                        str(tmp_path / "back"), "--hf-base", str(hf)]) == 0
    assert_bit_exact(hf, tmp_path / "back")


def _corrupt(hf: Path) -> None:
    with open(hf / "model.safetensors", "r+b") as f:
        f.truncate(100)


def _missing_shard(hf: Path) -> None:
    names = list(load_file(hf / "model.safetensors"))
    (hf / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "model-00002-of-00002.safetensors" for n in names}}))
    (hf / "model.safetensors").unlink()


def _unknown_arch(hf: Path) -> None:
    cfg = json.loads((hf / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (hf / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("args, damage, message", [
    (["--tp", "3"], None, "tensor_parallel=3 must divide the 4 attention heads and 2 KV groups; use one of [1, 2]"),
    (["--pp", "3"], None, "pipeline_parallel=3 must divide the 2 layers; use one of [1, 2]"),
    ([], _unknown_arch, "architecture ['GPT2LMHeadModel'] is not supported; supported: Qwen2ForCausalLM"),
    ([], _corrupt, "safetensors shard model.safetensors is corrupt"),
    ([], _missing_shard, "safetensors shard model-00002-of-00002.safetensors is missing"),
])
def test_bad_hf_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, damage, message):
    hf = tiny_hf(tmp_path / "hf", "qwen2")
    if damage:
        damage(hf)
    out = tmp_path / "mcore"
    capsys.readouterr()  # drop the fixture's progress bars
    assert bridge_main(["hf2mcore", "--hf", str(hf), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (out / "latest_checkpointed_iteration.txt").exists()


def test_bad_megatron_input_is_one_line(tmp_path, capsys):
    hf = tiny_hf(tmp_path / "hf", "qwen2")
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    assert bridge_main(["mcore2hf", "--mcore", str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert "has no rsft_checkpoint.json" in capsys.readouterr().err
    hf_to_mcore(hf, tmp_path / "mcore", 1, 1)
    (tmp_path / "mcore/latest_checkpointed_iteration.txt").unlink()
    assert bridge_main(["mcore2hf", "--mcore", str(tmp_path / "mcore"), "--out", str(out)]) == 2
    assert "is not a Megatron checkpoint (no latest_checkpointed_iteration.txt)" in capsys.readouterr().err
    (tmp_path / "mcore/latest_checkpointed_iteration.txt").write_text("release")
    other = tiny_hf(tmp_path / "other", "qwen2", layers=4)
    assert bridge_main(["mcore2hf", "--mcore", str(tmp_path / "mcore"), "--out", str(out),
                        "--hf-base", str(other)]) == 2
    assert "is a different model (num_hidden_layers differ" in capsys.readouterr().err
    assert not (out / "model.safetensors").exists()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (hf / name).unlink()
    assert bridge_main(["verify", "--hf", str(hf), "--mcore", str(tmp_path / "mcore")]) == 2
    err = capsys.readouterr().err.strip()
    assert "lacks the model's tokenizer files" in err and len(err.splitlines()) == 1


def test_a_transformer_engine_model_loads_a_checkpoint_written_without_it(tmp_path):
    """TE's attention asks for `core_attention._extra_state` (FP8 metadata), which a checkpoint
    converted on a host without TE lacks (megatron's local attention has none): it starts from
    defaults; any other key a checkpoint lacks is refused."""
    from megatron_bridge import checkpoint
    from megatron_bridge.build import build_model
    from settings.errors import UserError
    from megatron_bridge.parallel import model_parallel

    hf = tiny_hf(tmp_path / "hf", "qwen2")
    hf_to_mcore(hf, tmp_path / "mcore", 1, 1)
    meta = checkpoint.read_metadata(tmp_path / "mcore")

    with model_parallel(1, 1):
        model = asking_for(build_model(meta["hf_config"]),
                           "decoder.layers.self_attention.core_attention._extra_state")
        checkpoint.load(model, tmp_path / "mcore")
        reference = build_model(meta["hf_config"])
        checkpoint.load(reference, tmp_path / "mcore")
        loaded, expected = (dict(m.named_parameters()) for m in (model, reference))
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)
        model = asking_for(build_model(meta["hf_config"]), "decoder.layers.mlp.router.weight")
        with pytest.raises(UserError, match=r"checkpoint lacks \['decoder.layers.mlp.router"):
            checkpoint.load(model, tmp_path / "mcore")
