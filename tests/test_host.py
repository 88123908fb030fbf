"""Host capabilities → kernel and spec choices (`megatron_bridge/host.py`), for every kind of GPU
host, checked on the CPU: the decisions with the probes each kind would return, and a training
step with exactly the configuration of each kind whose modules exist here (megatron-core's local
spec and its compiled fusions), which is what a GPU's first run would otherwise find out."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_bridge.host import Host, Kernels, decide
from settings.errors import UserError
from settings.models import KernelSettings
from tests.conftest import ROOT, asking_for, job

NONE = dict(cuda=False, transformer_engine=False, te_fused_rope=False, compiler=False,
            softmax_kernels=False, grad_accumulation_kernel=False,
            persist_layer_norm_kernel=False)
KINDS = {
    "cpu": Host(**{**NONE, "compiler": True}),
    # the lent device machine, and any `pip install` without Transformer Engine: torch + Triton
    "gpu": Host(**{**NONE, "cuda": True, "compiler": True, "device_name": "NVIDIA H100 80GB HBM3"}),
    "gpu+te": Host(**{**NONE, "cuda": True, "compiler": True, "transformer_engine": True,
                      "te_fused_rope": True}),
    "ngc": Host(cuda=True, transformer_engine=True, te_fused_rope=True, compiler=True,
                softmax_kernels=True, grad_accumulation_kernel=True,
                persist_layer_norm_kernel=True),
}
COMPILED = {"bias_activation_fusion", "bias_dropout_fusion"}
# What each kind trains a Qwen2 on packed rows with: the spec and the flags that are on.
TRAINING = {
    "cpu": set(),
    "gpu": COMPILED,
    "gpu+te": {"transformer_engine", *COMPILED, "apply_rope_fusion"},
    "ngc": {"transformer_engine", *COMPILED, "apply_rope_fusion", "gradient_accumulation_fusion"},
}
QWEN2 = {"normalization": "RMSNorm", "activation_func": F.silu, "gated_linear_unit": True}


def on(kernels: Kernels) -> set[str]:
    flags = {"transformer_engine": kernels.transformer_engine, **kernels.config()}
    return {name for name, value in flags.items() if value}


@pytest.mark.parametrize("kind", KINDS)
def test_each_host_kind_trains_with_the_kernels_it_has(kind):
    kernels = decide(KINDS[kind], QWEN2, training=True)
    assert on(kernels) == TRAINING[kind], kernels.why
    assert set(kernels.why) == {"transformer_engine", *kernels.config()} - TRAINING[kind]
    if kind == "gpu":  # the device machine: every off flag says which kernel it lacks
        assert "scaled_masked_softmax_cuda" in kernels.why["masked_softmax_fusion"]
        assert "torch.nn.RMSNorm" in kernels.why["persist_layer_norm"]
        assert "fused_weight_gradient_mlp_cuda" in kernels.why["gradient_accumulation_fusion"]
        assert "transformer_engine.pytorch" in kernels.why["transformer_engine"]
    if kind == "cpu":
        assert kernels.why["bias_activation_fusion"].startswith("auto: compiling on the CPU")


def test_the_decisions_follow_the_model_the_data_and_the_job():
    apex_only = Host(**{**NONE, "cuda": True, "compiler": True, "softmax_kernels": True,
                        "grad_accumulation_kernel": True, "persist_layer_norm_kernel": True})
    # The fused causal softmax ignores a packed row's block-diagonal mask: only unpacked rows.
    packed = decide(apex_only, QWEN2, training=True, document_mask=True)
    assert not packed.masked_softmax_fusion
    assert "attend across boundaries" in packed.why["masked_softmax_fusion"]
    assert decide(apex_only, QWEN2, training=True, document_mask=False).masked_softmax_fusion
    # Persistent LayerNorm: LayerNorm models on the local spec only.
    assert not packed.persist_layer_norm
    layer_norm = {**QWEN2, "normalization": "LayerNorm", "activation_func": F.gelu}
    assert decide(apex_only, layer_norm).persist_layer_norm
    assert not decide(KINDS["ngc"], layer_norm).persist_layer_norm  # TE's norms
    # Gradient-accumulation fusion needs gradients; the compiled activation fusion gelu/silu.
    assert packed.gradient_accumulation_fusion
    assert not decide(apex_only, QWEN2).gradient_accumulation_fusion
    assert not decide(apex_only, {**QWEN2, "activation_func": F.relu}).bias_activation_fusion
    # THD needs TE *and* CUDA: TE importable without a GPU gives the local spec.
    assert not decide(Host(**{**NONE, "transformer_engine": True}), QWEN2).transformer_engine


def test_this_host_is_probed_as_the_cpu_kind():
    host = Host.probe()
    assert not host.cuda and not host.transformer_engine and not host.softmax_kernels
    assert on(decide(host, QWEN2, training=True)) == TRAINING["cpu"]


@pytest.mark.parametrize("flag, kernel", [
    ("transformer_engine", "transformer_engine.pytorch"),
    ("masked_softmax_fusion", "scaled_masked_softmax_cuda"),
    ("apply_rope_fusion", "Transformer Engine's fused RoPE"),
    ("gradient_accumulation_fusion", "fused_weight_gradient_mlp_cuda"),
    ("persist_layer_norm", "torch.nn.RMSNorm"),
])
def test_a_flag_forced_on_without_its_kernel_is_refused_naming_it(flag, kernel):
    with pytest.raises(UserError) as e:
        decide(KINDS["gpu"], QWEN2, training=True, forced=KernelSettings(**{flag: "on"}))
    assert kernel in str(e.value) and f"train.kernels.{flag}: auto" in str(e.value)
    assert "\n" not in str(e.value)


def test_forcing_works_where_the_kernel_exists():
    off = decide(KINDS["ngc"], QWEN2, training=True,
                 forced=KernelSettings(transformer_engine="off", bias_activation_fusion="off"))
    assert not off.transformer_engine and not off.bias_activation_fusion
    assert off.why["transformer_engine"] == "train.kernels.transformer_engine: off"
    assert off.bias_dropout_fusion and off.apply_rope_fusion  # the others stay auto
    cpu = decide(KINDS["cpu"], QWEN2, forced=KernelSettings(bias_dropout_fusion="on"))
    assert cpu.bias_dropout_fusion  # torch.compile builds C++ kernels on the CPU


@pytest.mark.parametrize("kind", [k for k in KINDS if not KINDS[k].transformer_engine])
def test_a_training_step_with_the_kinds_configuration_runs_on_the_cpu(converted, data, tmp_path,
                                                                      kind):
    """bf16, 256-token rows, 4 heads: the shapes for which a fused-softmax flag imports its CUDA
    kernel and a persistent-norm flag asserts in the local spec — both crashed the first GPU
    build. The step must also compute what the unfused CPU configuration computes."""
    from megatron_bridge import checkpoint
    from megatron_bridge.data.indexed import SFTDataset
    from megatron_bridge.parallel import model_parallel
    from megatron_bridge.training.batches import pack_rows
    from megatron_bridge.training.trainer import build_stepper

    meta = checkpoint.read_metadata(converted)
    arch_kwargs = {"normalization": "RMSNorm", "activation_func": F.silu}
    results = {}
    for name in dict.fromkeys(["cpu", kind]):
        kernels = decide(KINDS[name], arch_kwargs, training=True)
        with model_parallel(1, 1, seed=0):
            stepper = build_stepper(job(converted, data, tmp_path / name, precision="bf16"),
                                    meta, None, kernels)
            assert {f: getattr(stepper.module.config, f) for f in kernels.config()} == \
                kernels.config()
            ds = SFTDataset(data / "train")
            results[name] = stepper.step([pack_rows(ds, np.array([i]), 256) for i in (0, 1)],
                                         lr=1e-3)
    ours, plain = results[kind], results["cpu"]
    assert np.isfinite(ours["loss"]) and ours["grad_norm"] > 0
    assert abs(ours["loss"] - plain["loss"]) <= 1e-2 * plain["loss"], results
    assert abs(ours["grad_norm"] - plain["grad_norm"]) <= 5e-2 * plain["grad_norm"], results


def test_a_forced_kernel_the_host_lacks_stops_the_trainer_before_any_step(converted, data,
                                                                          tmp_path):
    """`device: auto` landed on a host without the kernel (a cpu job is refused earlier, by the
    settings)."""
    j = job(converted, data, tmp_path / "save", metrics=str(tmp_path / "metrics.jsonl"))
    j.model_copy(update={"train": j.train.model_copy(update={
        "device": "auto", "kernels": KernelSettings(masked_softmax_fusion="on")})}).write(
        tmp_path / "job.json")
    proc = subprocess.run([sys.executable, "-m", "megatron_bridge.training",
                           str(tmp_path / "job.json")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "train.kernels.masked_softmax_fusion is on" in errors[0]
    assert "scaled_masked_softmax_cuda" in errors[0], errors
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "save").exists()


def test_a_run_resumes_across_hosts_with_and_without_transformer_engine(converted, data,
                                                                        tmp_path):
    """A checkpoint saved without Transformer Engine resumes on a TE host (whose layers ask for
    `_extra_state`, their FP8 metadata), and one saved with TE resumes without it; a key other
    than `_extra_state` that the checkpoint lacks is still refused."""
    import io

    from megatron_bridge import checkpoint
    from megatron_bridge.parallel import model_parallel
    from megatron_bridge.training import state
    from megatron_bridge.training.trainer import build_stepper, run, trained_metadata

    extra = "decoder.layers.self_attention.core_attention._extra_state"
    plain_job = job(converted, data, tmp_path / "plain", train_iters=2, save_interval=2)
    run(plain_job)
    meta = checkpoint.read_metadata(converted)

    def params(stepper):
        return {n: p.detach().clone() for n, p in stepper.module.named_parameters()}

    with model_parallel(1, 1, seed=0):
        resumed = params(build_stepper(plain_job, meta, 2))
        te_host = build_stepper(plain_job, meta, None)
        asking_for(te_host.module, extra)
        state.load(tmp_path / "plain", 2, te_host, meta)  # no _extra_state in the checkpoint
        assert params(te_host).keys() == resumed.keys()
        assert all(torch.equal(params(te_host)[k], resumed[k]) for k in resumed)

        asking_for(te_host.module, extra, io.BytesIO(b"fp8 metadata"))
        state.save(tmp_path / "te", 2, te_host, trained_metadata(meta, plain_job.train), 1)
        local = build_stepper(plain_job, meta, None)
        state.load(tmp_path / "te", 2, local, meta)  # _extra_state in the checkpoint, unasked
        assert all(torch.equal(params(local)[k], resumed[k]) for k in resumed)

        other = build_stepper(plain_job, meta, None)
        asking_for(other.module, "decoder.layers.mlp.router.weight")
        with pytest.raises(UserError, match=r"checkpoint lacks \['decoder.layers.mlp.router"):
            state.load(tmp_path / "plain", 2, other, meta)


def test_the_transformer_engine_extras_pin_what_megatron_core_supports():
    """Unpinned, pip takes a TE megatron-core 0.16 never ran with, and a binary-only resolution
    the empty `transformer-engine==0.0.0`; without a `core_cu*` extra TE's CUDA libraries are
    missing."""
    import tomllib
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    theirs = next(Requirement(r) for r in requires("megatron-core")
                  if Requirement(r).name == "transformer-engine")
    pins = {name: Requirement(r) for name, reqs in extras.items() for r in reqs
            if Requirement(r).name == "transformer-engine"}
    assert set(pins) == {"te-cu12", "te-cu13"}, pins
    for name, ours in pins.items():
        assert ours.extras == {"pytorch", f"core_{name[3:]}"}, ours
        for candidate in ("0.0.0", "2.8.0", "2.9.0", "2.11.0", "2.11.9", "2.12.0", "2.20.2"):
            if ours.specifier.contains(candidate):
                assert theirs.specifier.contains(candidate, prereleases=True), (ours, candidate)
        assert ours.specifier.contains("2.11.0") and not ours.specifier.contains("0.0.0")


def test_yaml_on_off_and_a_cuda_only_kernel_forced_on_a_cpu_job(tmp_path):
    from settings import load_settings
    from settings.models import TrainSettings

    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  device: cuda\n  kernels:\n    transformer_engine: off\n"
                    "    bias_dropout_fusion: on\n")
    kernels = load_settings(str(path)).train.kernels
    assert (kernels.transformer_engine, kernels.bias_dropout_fusion) == ("off", "on")
    with pytest.raises(ValueError, match="kernels.apply_rope_fusion: on needs a CUDA device"):
        TrainSettings(device="cpu", kernels={"apply_rope_fusion": "on"})
    assert TrainSettings(device="cpu", kernels={"bias_dropout_fusion": "on"})  # builds on CPU
