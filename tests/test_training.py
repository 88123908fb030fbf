"""The trainer in one process: megatron-core's DDP, optimizer and schedule on a tiny real model
(built-in Qwen2, real vocabulary), the real R1 traces tokenized with the patched tokenizer —
checked against independent references (rows decoded back to text, gradients of a plain torch
loss, a plain transformers + torch AdamW loop), and bad input caught before any step.
Multi-process layouts and kill/resume: tests/test_training_parallel.py."""

from __future__ import annotations

import json
import shutil
from typing import get_args
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_bridge import compat
from megatron_bridge.training.job import TrainJob
from settings.errors import UserError
from settings.models import HybridSettings, TokenizeSettings, TrainSettings
from tests.conftest import ROOT, SEQ, assert_known_shims, exported, job, metrics, tokenized

# -- the rows the model sees, against the text they came from -------------------------------------
@pytest.fixture(scope="module")
def packed_hybrid(patched_tokenizer, tmp_path_factory) -> Path:
    """Real traces plus Thinkless `<short>` forms of half of them, packed several to a row."""
    return tokenized(tmp_path_factory.mktemp("packed"), patched_tokenizer,
                     TokenizeSettings(seq_length=4096, workers=1), rows=6,
                     hybrid=HybridSettings(enabled=True, ratio=0.5, keep_long=True))


def test_packed_rows_decode_to_exactly_the_answers_with_positions_and_masks_per_sample(
        packed_hybrid, patched_tokenizer):
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from megatron_bridge.data.indexed import SFTDataset
    from megatron_bridge.training.batches import pack_rows

    tok = AutoTokenizer.from_pretrained(patched_tokenizer)
    records = pq.read_table(packed_hybrid.parent / "ds" / "train.parquet").to_pylist()
    # What training must learn for each sample: the answer (from its control token on) + EOS.
    expected = sorted(r["messages"][-1]["content"] + tok.eos_token for r in records)
    assert any(a.startswith("<short>") for a in expected)
    assert any(a.startswith("<think>") for a in expected)
    ds = SFTDataset(packed_hybrid / "train")
    mb = pack_rows(ds, np.arange(len(ds)), 4096)
    assert max(len(lengths) for lengths in mb.lengths) >= 2  # really packed
    seen = []
    mask = mb.attention_mask()
    for row, lengths in enumerate(mb.lengths):
        start = 0
        for n in lengths:
            end = start + n
            assert mb.position_ids[row, start:end].tolist() == list(range(n))
            supervised = mb.loss_mask[row, start:end].bool()
            seen.append(tok.decode(mb.labels[row, start:end][supervised].tolist()))
            start = end
        # Causal within each sample, nothing across samples (True = blocked), from the lengths.
        blocks = [torch.ones(n, n).tril().bool() for n in lengths]
        pad = mb.tokens.shape[1] - start
        allowed = torch.block_diag(*blocks, *([torch.ones(pad, pad).tril().bool()] if pad else []))
        assert torch.equal(mask[row, 0], ~allowed)
        assert not mb.loss_mask[row, start:].any()
    assert sorted(seen) == expected


def test_thd_boundaries_travel_with_the_batch_and_their_longest_comes_from_the_host(packed_hybrid):
    """On a GPU, reading a value of a device tensor waits for the GPU: the THD description of a
    micro-batch on the device is built without one (a value read from a `meta` tensor raises)."""
    from megatron_bridge.data.indexed import SFTDataset
    from megatron_bridge.training.batches import pack_rows

    ds = SFTDataset(packed_hybrid / "train")
    row = max(range(len(ds)), key=lambda i: len(ds.row(i)[2]))
    mb = pack_rows(ds, np.array([row]), 4096)
    lengths = [*mb.lengths[0], 4096 - sum(mb.lengths[0])]
    assert len(lengths) >= 3  # several samples and the padding
    on_device = mb.to(torch.device("meta"))
    params = on_device.packed_seq_params()
    assert params.cu_seqlens_q.device.type == "meta" and params.cu_seqlens_kv is params.cu_seqlens_q
    assert params.max_seqlen_q == params.max_seqlen_kv == max(lengths)
    assert mb.cu_seqlens.tolist() == np.cumsum([0, *lengths]).tolist()


# -- gradients and steps against plain torch / transformers --------------------------------------
@pytest.fixture
def world_of_one():
    from megatron_bridge.parallel import model_parallel

    with model_parallel(1, 1, seed=0):
        yield


def plain_loss(logits: torch.Tensor, micro_batches) -> torch.Tensor:
    """Global per-token mean of the supervised tokens' cross-entropy, written plainly."""
    total = sum(mb.loss_mask.sum() for mb in micro_batches)
    losses = [F.cross_entropy(lg.float().flatten(0, 1), mb.labels.flatten(), reduction="none")
              @ mb.loss_mask.flatten() for lg, mb in zip(logits, micro_batches)]
    return sum(losses) / total


def test_gradients_are_the_plain_global_per_token_mean(converted, data, tmp_path, world_of_one):
    from megatron_bridge import checkpoint
    from megatron_bridge.build import build_model
    from megatron_bridge.data.indexed import SFTDataset
    from megatron_bridge.training.batches import pack_rows
    from megatron_bridge.training.trainer import build_stepper

    meta = checkpoint.read_metadata(converted)
    stepper = build_stepper(job(converted, data, tmp_path / "s"), meta, None)
    ds = SFTDataset(data / "train")
    mbs = [pack_rows(ds, np.array([i]), SEQ) for i in (0, 3, 5)]
    counts = [int(mb.loss_mask.sum()) for mb in mbs]
    assert len(set(counts)) == 3  # unequal micro-batches: a mean of means would differ
    stepper.forward_backward(mbs)
    ours = {n: p.main_grad.clone() for n, p in stepper.module.named_parameters()}

    reference = build_model(meta["hf_config"], 1, 1, torch.float32)
    checkpoint.load(reference, converted)
    logits = [reference(mb.tokens, mb.position_ids, mb.attention_mask()) for mb in mbs]
    plain_loss(logits, mbs).backward()
    for name, p in reference.named_parameters():
        scale = p.grad.abs().max().item()
        assert scale > 0, name
        assert torch.allclose(ours[name], p.grad, rtol=1e-4, atol=1e-6 * scale), name
    assert_known_shims()


def test_packed_samples_score_as_if_alone(converted, data, world_of_one):
    """Two samples in one row (block-diagonal mask, positions restarting) give each the
    per-token losses it gets in a row of its own."""
    from megatron_bridge import checkpoint
    from megatron_bridge.build import build_model
    from megatron_bridge.data.indexed import SFTDataset
    from megatron_bridge.training.batches import MicroBatch, pack_rows
    from megatron_bridge.training.step import per_token_loss

    meta = checkpoint.read_metadata(converted)
    model = build_model(meta["hf_config"], 1, 1, torch.float32)
    checkpoint.load(model, converted)
    ds = SFTDataset(data / "train")
    a, b = (pack_rows(ds, np.array([i]), SEQ) for i in (0, 1))
    na, nb = sum(a.lengths[0]), sum(b.lengths[0])
    packed = MicroBatch(*(torch.cat([getattr(a, f)[:, :na], getattr(b, f)[:, :nb]], 1)
                          for f in ("tokens", "labels", "loss_mask", "position_ids")),
                        segments=torch.cat([torch.zeros(1, na), torch.ones(1, nb)], 1).long(),
                        lengths=[[na, nb]])

    def losses(mb):
        with torch.no_grad():
            logits = model(mb.tokens, mb.position_ids, mb.attention_mask())
        return per_token_loss(logits, mb.labels, meta["vocab_size"])[mb.loss_mask.bool()]

    alone = torch.cat([losses(a), losses(b)])
    together = losses(packed)
    assert torch.allclose(alone, together, atol=1e-5, rtol=0)


def test_no_weight_decay_on_biases_and_norms(converted, data, tmp_path, world_of_one):
    from megatron_bridge import checkpoint
    from megatron_bridge.data.indexed import SFTDataset
    from megatron_bridge.training.batches import pack_rows
    from megatron_bridge.training.trainer import build_stepper

    stepper = build_stepper(job(converted, data, tmp_path / "s", weight_decay=0.1),
                            checkpoint.read_metadata(converted), None)
    stepper.step([pack_rows(SFTDataset(data / "train"), np.array([0]), SEQ)], lr=1e-3)
    names = {id(p): n for n, p in stepper.module.named_parameters()}
    # The inner torch optimizer's groups: fp32 parameters are their own master weights.
    decay = {names[id(p)]: g["weight_decay"] for g in stepper.optimizer.param_groups
             for p in g["params"]}
    no_decay = {f"decoder.layers.{i}.{n}" for i in range(2) for n in (
        "input_layernorm.weight", "pre_mlp_layernorm.weight", "self_attention.linear_qkv.bias")}
    no_decay.add("decoder.final_layernorm.weight")
    assert {n for n, wd in decay.items() if wd == 0.0} == no_decay
    assert {wd for n, wd in decay.items() if n not in no_decay} == {0.1}
    assert set(decay) == set(names.values())


def test_steps_match_a_plain_transformers_and_torch_adamw_loop(tiny_model_dir, converted, data,
                                                                tmp_path):
    """Weight decay, clipping, LR schedule and the global per-token loss, end to end."""
    from transformers import AutoModelForCausalLM

    from megatron_bridge.data.indexed import SFTDataset
    from megatron_bridge.training.batches import Batches
    from megatron_bridge.training.schedule import learning_rate
    from megatron_bridge.training.trainer import run

    j = job(converted, data, tmp_path / "save", train_iters=3, weight_decay=0.1, clip_grad=0.5,
            save_interval=3)
    run(j)
    ours = metrics(j)
    t = j.train

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.endswith(".bias")]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2 or n.endswith(".bias")]
    assert len(rest) == 2 * (2 + 3) + 1  # per layer: 2 norms, q/k/v biases; the final norm
    adam = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": rest, "weight_decay": 0.0}],
                             betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    batches = Batches(SFTDataset(data / "train"), SEQ, t.global_batch_size, 1, 0, 1, t.seed)
    for step, record in enumerate(ours):
        mbs = batches.step(step)
        adam.zero_grad()
        loss = plain_loss([model(mb.tokens).logits for mb in mbs], mbs)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
        for group in adam.param_groups:
            group["lr"] = learning_rate(step, lr=t.lr, min_lr=t.min_lr, warmup=t.lr_warmup_iters,
                                        total=t.train_iters)
        adam.step()
        assert record["loss"] == pytest.approx(loss.item(), rel=1e-5)
        assert record["grad_norm"] == pytest.approx(norm.item(), rel=1e-4)
    theirs = model.state_dict()
    for name, tensor in exported(Path(j.save), tmp_path / "hf").items():
        assert torch.allclose(tensor.float(), theirs[name], atol=2e-5, rtol=0), name
    assert_known_shims()


@pytest.mark.parametrize("distributed", [False, True], ids=["float16-optimizer", "distributed"])
def test_master_weights_are_the_loaded_checkpoint(converted, data, tmp_path, distributed):
    """bf16 training keeps fp32 master weights; a step with learning rate 0 writes them back
    into the model, which must then still be exactly the converted checkpoint."""
    from megatron_bridge.training.trainer import run

    j = job(converted, data, tmp_path / "save", train_iters=1, global_batch_size=1,
            lr_warmup_iters=0, precision="bf16", use_distributed_optimizer=distributed)
    # The settings refuse a learning rate of 0 (no training); here it is the point: set it past
    # their validation.
    j = j.model_copy(update={"train": j.train.model_copy(update={"lr": 0.0, "min_lr": 0.0})})
    run(j)
    before = exported(converted, tmp_path / "before")
    after = exported(Path(j.save), tmp_path / "after")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert_known_shims()


def test_fp16_scales_the_loss_so_gradients_survive(converted, data, tmp_path):
    from megatron_bridge.training.trainer import run

    runs = {}
    for precision, scale in (("fp32", None), ("fp16", 1024.0)):
        j = job(converted, data, tmp_path / precision, train_iters=1, global_batch_size=1,
                precision=precision, loss_scale=scale)
        run(j)
        runs[precision] = metrics(j)[0]
    # Unscaled, fp16 gradients of ~1e-9 underflow; scaled then unscaled they match fp32's.
    assert runs["fp16"]["loss_scale"] == 1024.0 and not runs["fp16"]["skipped"]
    assert runs["fp16"]["grad_norm"] == pytest.approx(runs["fp32"]["grad_norm"], rel=1e-3)
    assert_known_shims()


def test_recomputation_replays_dropout_exactly(converted, data, tmp_path):
    """Recomputed activations must draw the same dropout masks as the forward did: same loss
    and gradients as keeping the activations."""
    from megatron_bridge.training.trainer import run

    first = {}
    for recompute, dropout in (("none", 0.0), ("none", 0.1), ("selective", 0.1), ("full", 0.1)):
        j = job(converted, data, tmp_path / f"{recompute}{dropout}", train_iters=1,
                global_batch_size=2, attention_dropout=2 * dropout, hidden_dropout=dropout,
                recompute=recompute)
        run(j)
        first[recompute if dropout else "no dropout"] = metrics(j)[0]
    assert first["none"]["loss"] != first["no dropout"]["loss"]  # dropout is on
    for recompute in ("selective", "full"):
        assert first[recompute]["loss"] == first["none"]["loss"]
        assert first[recompute]["grad_norm"] == pytest.approx(first["none"]["grad_norm"], rel=1e-6)


def test_a_new_cuda_call_site_is_named():
    with pytest.warns(UserWarning, match=r"unreviewed site \?.*test_training.py:"
                                         r"test_a_new_cuda_call_site_is_named"):
        with compat.cuda_as_cpu():
            t = torch.zeros(2, device="cuda")
    assert t.device.type == "cpu"
    new = [s for s in compat.REDIRECTS if s.endswith("test_a_new_cuda_call_site_is_named")]
    assert new
    del compat.REDIRECTS[new[0]]


def test_learning_rate_schedule():
    from megatron_bridge.training.schedule import learning_rate

    lrs = [learning_rate(s, lr=1.0, min_lr=0.1, warmup=2, total=10) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0] and lrs[-1] == pytest.approx(0.1)
    assert all(x >= y for x, y in zip(lrs[1:], lrs[2:]))


def test_loss_falls_clearly_on_the_real_traces(converted, data, tmp_path):
    from megatron_bridge.training.trainer import run

    j = job(converted, data, tmp_path / "save", train_iters=16, lr=1e-2, min_lr=1e-3,
            lr_warmup_iters=2, save_interval=16)
    run(j)
    m = metrics(j)
    first, last = m[0]["loss"], m[-1]["loss"]
    assert first > 10 and last < 0.6 * first, (first, last)
    assert [r["step"] for r in m] == list(range(1, 17))
    save = Path(j.save)
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "16"
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000016"]


@pytest.mark.parametrize("eval_iters, rows", [(None, 3), (1, 2)], ids=["whole-split", "one-batch"])
def test_validation_loss_is_the_per_token_loss_of_the_held_out_rows(converted, held_out, tmp_path,
                                                                     eval_iters, rows):
    """The logged validation loss of a checkpoint, recomputed plainly: its weights exported to
    transformers, each test sample alone, cross-entropy of the next token where the stored mask
    says the token is a target, summed and divided by the number of targets."""
    from transformers import AutoModelForCausalLM

    from megatron_bridge.data.indexed import SFTDataset
    from megatron_bridge.training.trainer import run

    j = job(converted, held_out, tmp_path / "save", train_iters=2, global_batch_size=2,
            eval_interval=2, eval_iters=eval_iters, save_interval=2, attention_dropout=0.5,
            hidden_dropout=0.5,  # validation runs in eval mode: no dropout
            report_to=[])
    run(j)
    (record,) = [r for r in metrics(j) if "val_loss" in r]
    assert record["step"] == 2
    exported(Path(j.save), tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    test = SFTDataset(held_out / "test")
    assert len(test) == 3
    total, count = 0.0, 0
    for row in range(rows):  # the split's first rows: `eval_iters` global batches of 2
        ids, mask, lengths = test.row(row)
        start = 0
        for n in lengths.tolist():
            sample = torch.from_numpy(ids[start:start + n].astype(np.int64))[None]
            target = torch.from_numpy(mask[start + 1:start + n].astype(bool))
            with torch.no_grad():
                logits = model(sample).logits[0, :-1]
            losses = F.cross_entropy(logits, sample[0, 1:], reduction="none")
            total += losses[target].double().sum().item()
            count += int(target.sum())
            start += n
    assert record["val_tokens"] == count
    assert record["val_loss"] == pytest.approx(total / count, rel=1e-5)


# -- bad input: one line, before any step -----------------------------------------------------------
def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        target = data
        *parents, last = key.split(".")
        for p in parents:
            target = target[p]
        target[last] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("case, message", [
    ("missing", "is not a Megatron checkpoint"),
    ("tokenizer", "the data was tokenized with a tokenizer whose EOS is 1"),
    ("gpu", "train.device is cuda but no GPU is visible"),
    ("seq", "the data's seq_length 256 is above the model's max_position_embeddings 128"),
    # added tokens may grow the embedding (the ChatML test in test_pipeline); a larger base
    # vocabulary is another tokenizer
    ("vocab", "the data's tokenizer has 200010 tokens, the model only 151936: data and model "
     "are not from one tokenizer"),
    ("world", "2 processes were launched for a job of train.nproc_per_node × nnodes = 1 × 1"),
])
def test_bad_input_fails_in_one_line_before_training(converted, data, tmp_path, monkeypatch,
                                                      case, message):
    from megatron_bridge.training.trainer import run

    ckpt, tok = tmp_path / "ckpt", tmp_path / "tok"
    shutil.copytree(converted, ckpt)
    shutil.copytree(data, tok)
    j = job(ckpt, tok, tmp_path / "save", device="cuda" if case == "gpu" else "cpu")
    if case == "missing":
        (ckpt / "latest_checkpointed_iteration.txt").unlink()
    elif case == "tokenizer":
        _edit_json(tok / "stats.json", **{"tokenizer.eos_id": 1})
    elif case == "world":
        monkeypatch.setenv("WORLD_SIZE", "2")
    elif case == "vocab":
        _edit_json(tok / "stats.json", **{"tokenizer.vocab_size": 200010,
                                         "tokenizer.base_vocab_size": 200000})
    elif case == "seq":
        _edit_json(ckpt / "rsft_checkpoint.json", **{"hf_config.max_position_embeddings": 128})
    if case == "tokenizer":  # once through the real entry point: exit 2, one `error:` line
        import subprocess
        import sys

        j.write(tmp_path / "j.json")
        proc = subprocess.run([sys.executable, "-m", "megatron_bridge.training",
                               str(tmp_path / "j.json")], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    else:
        with pytest.raises(UserError) as e:
            run(j)
        assert message in str(e.value) and "\n" not in str(e.value)
    assert not j.metrics_path.exists()  # no step ran


@pytest.mark.parametrize("changes, message", [
    ({"train.global_batch_size": 3, "train.micro_batch_size": 2},
     "global_batch_size (3) must be a multiple of micro_batch_size × data-parallel size (2 × 1)"),
    ({"train.pipeline_parallel": 2}, "cannot hold tensor_parallel × pipeline_parallel = 2"),
    ({"train.precision": "fp16", "train.loss_scale": 1.0},
     "train.loss_scale = 1.0: Input should be greater than 1"),
    ({"train.lr": "fast"}, "train.lr = 'fast'"),
    ({"train.learning_rate": 1e-3}, "train.learning_rate = 0.001: unknown setting"),
    ({"lr": 1e-3}, "lr = 0.001: unknown setting"),
    ({"device": "cuda"}, "device cuda contradicts train.device cpu"),
    ({"device": "auto"}, "device = 'auto': Input should be 'cpu' or 'cuda'"),
], ids=["batch", "layout", "fp16", "type", "unknown-setting", "unknown-field", "device",
        "unresolved"])
def test_a_job_file_with_a_bad_setting_is_refused_in_one_line(tmp_path, changes, message):
    path = tmp_path / "job.json"
    job("ckpt", "tok", tmp_path / "save").write(path)
    assert TrainJob.read(path).train.global_batch_size == 4
    _edit_json(path, **changes)
    with pytest.raises(UserError) as e:
        TrainJob.read(path)
    assert str(e.value).startswith(str(path)) and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_an_unreadable_job_file_is_one_line(tmp_path):
    (tmp_path / "job.json").write_text("{not json")
    for path in (tmp_path / "job.json", tmp_path / "none.json"):
        with pytest.raises(UserError) as e:
            TrainJob.read(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_the_job_carries_the_train_settings_whole_with_their_defaults(tmp_path):
    from megatron_bridge.training.trainer import should_save

    # Nothing of the settings is copied next to them: the one shared name is the device
    # `auto` resolved to, which the settings cannot know.
    assert set(TrainJob.model_fields) & set(TrainSettings.model_fields) == {"device"}
    assert "auto" not in get_args(TrainJob.model_fields["device"].annotation)
    written = TrainJob(train=TrainSettings(), checkpoint="c", data="d", save="s", device="cpu")
    written.write(tmp_path / "job.json")
    read = TrainJob.read(tmp_path / "job.json")
    assert read == written
    assert json.loads((tmp_path / "job.json").read_text())["device"] == "cpu"  # launchers read it
    assert read.train.save_interval == TrainSettings.model_fields["save_interval"].default == 20
    assert [d for d in range(1, 41) if should_save(d, read.train)] == [20, 40]


def test_pipeline_stages_must_divide_the_layers(converted, data):
    meta = json.loads((converted / "rsft_checkpoint.json").read_text())
    stats = json.loads((data / "stats.json").read_text())
    with pytest.raises(UserError, match=r"train.pipeline_parallel=3 must divide the 2 layers; "
                                       r"use one of \[1, 2\]"):
        job(converted, data, Path("x"), pipeline_parallel=3, nproc_per_node=3,
            global_batch_size=3).check(3, meta, stats)
    job(converted, data, Path("x"), pipeline_parallel=2, nproc_per_node=4,
        use_distributed_optimizer=True).check(4, meta, stats)  # PP and dist-opt: fine on CPU


@pytest.mark.parametrize("device, precision, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H100 80GB HBM3", "fp32", 66.9),
    ("NVIDIA H100 PCIe", "fp16", 756.0), ("NVIDIA H200", "bf16", 989.4),
    ("NVIDIA GH200 480GB", "fp32", 66.9), ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA L40", "bf16", 181.0), ("NVIDIA L4", "bf16", 121.0), ("NVIDIA B200", "bf16", 2250.0),
    ("Some Future GPU", "bf16", None), (None, "bf16", None),
])
def test_mfu_divides_by_the_devices_peak_for_the_runs_precision(monkeypatch, device, precision,
                                                                tflops):
    from megatron_bridge.training.mfu import peak_flops

    monkeypatch.delenv("RSFT_PEAK_TFLOPS", raising=False)
    assert peak_flops(device, precision) == (tflops and tflops * 1e12)
    monkeypatch.setenv("RSFT_PEAK_TFLOPS", "100")
    assert peak_flops(device, precision) == 100e12
