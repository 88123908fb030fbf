"""The data stages on real data: sources and mixtures (`dataset`), chat-template masks, packing
and Megatron indexed datasets (`tokenize`), checked by decoding what training will see."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_bridge.data.chat import ChatMasker, TemplateError
from megatron_bridge.data.indexed import SFTDataset
from megatron_bridge.data.packing import best_fit_decreasing
from megatron_bridge.data.pipeline import tokenize_split
from settings.errors import UserError
from settings.models import DatasetSettings, DatasetSource, PatchTokenizerSettings, TokenizeSettings
from tasks import dataset
from tasks.tokenize import tokenize_dataset, tokenize_files
from tests.conftest import COMMIT, LOG, R1_TOKENIZER, TRACE_FIELDS, TRACES, build_dataset, make_hf_cache


def rows(parquet: Path) -> list[dict]:
    return pq.read_table(parquet).to_pylist()


def write_jsonl(path: Path, records: list, raw_lines: list[bytes] = ()) -> Path:
    with open(path, "wb") as f:
        for r in records:
            f.write(json.dumps(r).encode() + b"\n")
        for line in raw_lines:
            f.write(line + b"\n")
    return path


# -- dataset: formats ----------------------------------------------------------------------------
def test_formats_normalise_to_the_same_messages(tmp_path):
    expected = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    write_jsonl(tmp_path / "seed.jsonl", [{"instruction": "Q", "output": "A"}])
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": expected}])
    write_jsonl(tmp_path / "sharegpt.jsonl",
                [{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}])
    (tmp_path / "array.json").write_text(json.dumps([{"q": "Q", "a": "A"}]))
    pq.write_table(pa.Table.from_pylist([{"instruction": "Q", "output": "A"}]), tmp_path / "p.parquet")
    # TRL's prompt-completion formats: conversational (lists of messages) and standard (text)
    trl_chat = {"prompt": expected[:1], "completion": expected[1:]}
    write_jsonl(tmp_path / "trl-chat.jsonl", [trl_chat])
    write_jsonl(tmp_path / "trl-text.jsonl", [{"prompt": "Q", "completion": "A"}])
    pq.write_table(pa.Table.from_pylist([{"query": expected[:1], "answer": expected[1:]}]),
                   tmp_path / "trl.parquet")
    for name, fields in [("seed.jsonl", {}), ("chat.jsonl", {}), ("sharegpt.jsonl", {}),
                         ("array.json", {"q": "user", "a": "assistant"}), ("p.parquet", {}),
                         ("trl-chat.jsonl", {}), ("trl-text.jsonl", {}),
                         ("trl.parquet", {"query": "messages", "answer": "messages"})]:
        build_dataset(tmp_path / name.replace(".", "-"),
                      sources=[DatasetSource(path=str(tmp_path / name), fields=fields)])
        (row,) = rows(tmp_path / name.replace(".", "-") / "train.parquet")
        assert row["messages"] == expected, name
        assert row["row"] == 0 and row["source"] == str(tmp_path / name)


def test_instruction_input_and_system_fields(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Sum", "input": "1 2", "output": "3",
                                        "system": "Be brief."}])
    build_dataset(tmp_path / "out", sources=[DatasetSource(path=str(tmp_path / "d.jsonl"))])
    (row,) = rows(tmp_path / "out" / "train.parquet")
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    assert row["messages"][1]["content"] == "Sum\n\n1 2"


def test_hub_dataset_offline_from_the_cache_pins_the_commit(tmp_path, offline_hub):
    src = tmp_path / "src"
    (src / "data").mkdir(parents=True)
    write_jsonl(src / "data" / "train.jsonl", [{"instruction": f"Q{i}", "output": f"A{i}"}
                                               for i in range(5)])
    make_hf_cache(offline_hub, "org/sft", src, names=["data/train.jsonl"], repo_type="dataset")
    s = DatasetSettings(sources=[DatasetSource(path="hf://org/sft")])
    assert dataset.fingerprint(s)["sources"][0] == {"repo": "org/sft", "commit": COMMIT}
    stats = build_dataset(tmp_path / "out", sources=[DatasetSource(path="hf://org/sft")])
    assert stats["train"] == 5
    got = sorted(r["messages"][0]["content"] for r in rows(tmp_path / "out" / "train.parquet"))
    assert got == [f"Q{i}" for i in range(5)]


# -- dataset: mixture ------------------------------------------------------------------------------
def test_mixture_weights_upsampling_and_test_split():
    train, test = dataset.mixture([100, 40], [0.5, 2.5], test_split=10, seed=1)
    assert len(test) == 10
    distinct_train = {tuple(p) for p in train}
    assert not distinct_train & {tuple(p) for p in test}  # carved before upsampling: no leak
    from_a = train[train[:, 0] == 0]
    assert len(from_a) + (test[:, 0] == 0).sum() == 50  # half of source 0, each row once
    assert len({tuple(p) for p in from_a}) == len(from_a)
    b_rows = 40 - (test[:, 0] == 1).sum()
    from_b = train[train[:, 0] == 1]
    assert len(from_b) == 2 * b_rows + round(0.5 * b_rows)  # twice each + a seeded half
    counts = np.unique(from_b[:, 1], return_counts=True)[1]
    assert set(counts) <= {2, 3}
    again = dataset.mixture([100, 40], [0.5, 2.5], test_split=10, seed=1)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)
    other = dataset.mixture([100, 40], [0.5, 2.5], test_split=10, seed=2)
    assert not np.array_equal(other[0], train)
    assert len(dataset.mixture([100], [1.0], test_split=0.1, seed=0)[1]) == 10
    with pytest.raises(UserError, match="leaves no training rows"):
        dataset.mixture([5], [1.0], test_split=5, seed=0)


def test_dataset_stage_counts_per_source_and_hybrid_short_answers(tmp_path):
    stats = build_dataset(
        tmp_path / "out", test_split=4, seed=3,
        sources=[DatasetSource(path="builtin:openmathreasoning-r1-64", fields=TRACE_FIELDS),
                 DatasetSource(path=str(TRACES), fields=TRACE_FIELDS, weight=0.1)],
        hybrid={"enabled": True, "ratio": 0.5, "seed": 0})
    (a, b) = stats["sources"]
    assert (a["records"], a["usable"], b["records"], b["usable"]) == (64, 64, 505, 505)
    assert a["train"] + a["test"] + b["train"] + b["test"] == 64 + round(0.1 * 505)
    train = rows(tmp_path / "out" / "train.parquet")
    shorts = [r for r in train if r["variant"] == "short"]
    longs = {(r["source"], r["row"]): r for r in train if r["variant"] == "original"}
    assert shorts and len(train) == stats["train"]
    for r in shorts:  # kept beside its long form, as `<short>\n` + the text after </think>
        long = longs[(r["source"], r["row"])]["messages"][-1]["content"]
        assert r["messages"][-1]["content"] == "<short>\n" + long.split("</think>", 1)[1].strip()
        assert r["messages"][:-1] == longs[(r["source"], r["row"])]["messages"][:-1]


# -- dataset: bad input --------------------------------------------------------------------------
BAD_LINES = [
    (b'{"instruction": "Q", "output": ', "d.jsonl:2: malformed JSON"),
    (b'{"instruction": "Q"}', "d.jsonl:2: missing field 'output'"),
    (b'{"instruction": "Q", "output": "  "}', "d.jsonl:2: empty assistant answer"),
    (b'{"instruction": "Q\xff", "output": "A"}', "d.jsonl:2: not UTF-8"),
    (b'{"messages": [{"role": "robot", "content": "x"}]}', "d.jsonl:2: unknown role 'robot'"),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_bad_records_are_one_line_errors_or_counted_when_skipped(tmp_path, line, message):
    good = ({"messages": chat("Q", "A")} if b"messages" in line
            else {"instruction": "Q", "output": "A"})  # the first record sets the format
    data = write_jsonl(tmp_path / "d.jsonl", [good], [line])
    with pytest.raises(UserError, match="dataset.sources") as e:
        build_dataset(tmp_path / "out", sources=[DatasetSource(path=str(data))])
    assert message in str(e.value) and "\n" not in str(e.value)
    stats = build_dataset(tmp_path / "skip", on_bad_sample="skip",
                          sources=[DatasetSource(path=str(data))])
    assert stats["train"] == 1 and sum(stats["sources"][0]["bad"].values()) == 1


def test_a_hub_dataset_without_hf_scheme_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"open-r1/Mixture-of-Thoughts does not exist; did you "
                       r"mean hf://open-r1/Mixture-of-Thoughts\?"):
        dataset.fingerprint(DatasetSettings(sources=[DatasetSource(
            path="open-r1/Mixture-of-Thoughts")]))


def test_bad_settings_are_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="seq_length"):
        TokenizeSettings(seq_length=0)
    with pytest.raises(ValidationError, match="nothing to train on"):
        DatasetSource(path="x.jsonl", fields={"q": "user"})
    with pytest.raises(ValidationError, match="a field maps to one of"):
        DatasetSource(path="x.jsonl", fields={"q": "robot"})
    with pytest.raises(ValidationError, match="not both"):
        DatasetSource(path="x.jsonl", fields={"prompt": "messages", "completion": "assistant"})


# -- tokenize: masks on the real traces ------------------------------------------------------------
@pytest.fixture(scope="module")
def traces_parquet(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("traces")
    build_dataset(out, sources=[DatasetSource(path=str(TRACES), fields=TRACE_FIELDS)])
    return out / "train.parquet"


@pytest.mark.xdist_group("traces")  # the 505 traces read and packed once
def test_every_real_trace_masks_exactly_the_prompt_and_supervises_answer_plus_eos(
        patched_tokenizer, traces_parquet):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(patched_tokenizer)
    masker = ChatMasker(patched_tokenizer)
    samples = [r["messages"] for r in rows(traces_parquet)]
    assert len(samples) == 505
    for start in range(0, len(samples), 64):
        batch = samples[start:start + 64]
        for messages, (ids, mask) in zip(batch, masker.encode(batch)):
            assert ids.tolist() == hf.apply_chat_template(messages, tokenize=True,
                                                          return_dict=False)
            cut = int(np.argmax(mask))  # one contiguous supervised span at the end
            assert mask[:cut].sum() == 0 and mask[cut:].all()
            prompt = hf.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
            assert hf.decode(ids[:cut]) == prompt
            assert prompt.endswith("<｜Assistant｜>")  # the patched template forces no mode
            assert hf.decode(ids[cut:]) == messages[1]["content"] + hf.eos_token
            assert ids[-1] == hf.eos_token_id


@pytest.fixture(scope="module")
def packed(patched_tokenizer, traces_parquet, tmp_path_factory) -> tuple[Path, dict]:
    """The 505 real traces tokenized and packed into 4096-token rows by one process."""
    out = tmp_path_factory.mktemp("packed") / "train"
    return out, tokenize_split(traces_parquet, patched_tokenizer, out,
                               TokenizeSettings(seq_length=4096, workers=1))


@pytest.mark.xdist_group("traces")  # the 505 traces read and packed once
def test_packed_rows_keep_boundaries_and_read_back_with_indexed_dataset(
        patched_tokenizer, traces_parquet, packed):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix, stats = packed
    ds = SFTDataset(prefix)
    raw = IndexedDataset(f"{prefix}-tokens")
    assert len(raw.sequence_lengths) == stats["samples_out"] == 505
    assert len(ds) == stats["rows"] < 505  # packed
    masker = ChatMasker(patched_tokenizer)
    expected = {tuple(ids.tolist()): mask for ids, mask in masker.encode(
        [r["messages"] for r in rows(traces_parquet)])}
    seen = 0
    for i in range(len(ds)):
        tokens, mask, lengths = ds.row(i)
        assert lengths.sum() == len(tokens) <= 4096
        for s, n in zip(np.cumsum(lengths) - lengths, lengths):
            sample, sample_mask = tokens[s:s + n], mask[s:s + n]
            assert sample_mask[0] == 0  # a label never crosses into the next sample
            assert sample[0] == 151646  # each sample starts with its own BOS
            assert np.array_equal(expected[tuple(sample.tolist())], sample_mask)
            seen += 1
    assert seen == 505
    assert stats["packing_efficiency"] == pytest.approx(
        stats["tokens"] / (stats["rows"] * 4096))


@pytest.mark.xdist_group("traces")  # the 505 traces read and packed once
def test_output_bytes_do_not_depend_on_the_worker_count(patched_tokenizer, traces_parquet,
                                                        packed, tmp_path):
    one_process, _ = packed
    tokenize_split(traces_parquet, patched_tokenizer, tmp_path / "w2",
                   TokenizeSettings(seq_length=4096, workers=2))
    for suffix in ("-tokens.bin", "-tokens.idx", "-mask.bin", "-mask.idx"):
        assert Path(f"{one_process}{suffix}").read_bytes() == (tmp_path / f"w2{suffix}").read_bytes()


@pytest.mark.xdist_group("traces")  # the 505 traces read and packed once
def test_unpacked_layout_is_one_sample_per_row(patched_tokenizer, traces_parquet, tmp_path):
    stats = tokenize_split(traces_parquet, patched_tokenizer, tmp_path / "t",
                           TokenizeSettings(seq_length=4096, pack=False, workers=1))
    assert stats["rows"] == stats["samples_out"] == len(SFTDataset(tmp_path / "t"))
    assert stats["packing_efficiency"] < 0.5  # the seed's padded layout wastes most of each row


# -- tokenize: policies ----------------------------------------------------------------------------
def small_parquet(tmp_path: Path, conversations: list[list[dict]]) -> Path:
    table = pa.Table.from_pylist([{"messages": m, "source": "t", "row": i, "variant": "original"}
                                  for i, m in enumerate(conversations)], dataset.SCHEMA)
    pq.write_table(table, tmp_path / "small.parquet")
    return tmp_path / "small.parquet"


def chat(*turns: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
            for i, t in enumerate(turns)]


def test_overlong_policies(patched_tokenizer, tmp_path):
    long_answer = "<think>\n" + "word " * 300 + "\n</think>\n\nDone."
    data = small_parquet(tmp_path, [chat("short?", "<think>\nok\n</think>\n\nyes"),
                                    chat("long?", long_answer)])
    dropped = tokenize_split(data, patched_tokenizer, tmp_path / "d",
                             TokenizeSettings(seq_length=64, workers=1))
    assert dropped["dropped"] == {"overlong": 1} and dropped["samples_out"] == 1
    cut = tokenize_split(data, patched_tokenizer, tmp_path / "t",
                         TokenizeSettings(seq_length=64, overlong="truncate", workers=1))
    assert cut["truncated"] == 1 and cut["samples_out"] == 2 and cut["length"]["max"] == 64
    from settings.errors import UserError

    with pytest.raises(UserError, match="t record 1: .* tokens is longer than tokenize.seq_length=64"):
        tokenize_split(data, patched_tokenizer, tmp_path / "e",
                       TokenizeSettings(seq_length=64, overlong="error", workers=1))


def test_multi_turn_and_control_token_settings(patched_tokenizer):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(patched_tokenizer)
    conversation = chat("Hi", "<short>\nHello!", "And 2+2?", "<think>\nfour\n</think>\n\n4")

    def supervised(masker):
        ids, mask = masker.encode([conversation])[0]
        spans, start = [], None
        for i, m in enumerate([*mask.tolist(), 0]):
            if m and start is None:
                start = i
            elif not m and start is not None:
                spans.append(hf.decode(ids[start:i]))
                start = None
        return spans

    eos = hf.eos_token
    assert supervised(ChatMasker(patched_tokenizer)) == ["<short>\nHello!" + eos,
                                                         "<think>\nfour\n</think>\n\n4" + eos]
    assert supervised(ChatMasker(patched_tokenizer, assistant_turns="last")) == [
        "<think>\nfour\n</think>\n\n4" + eos]
    assert supervised(ChatMasker(patched_tokenizer, supervise_control_token=False)) == [
        "\nHello!" + eos, "\nfour\n</think>\n\n4" + eos]


# -- tokenize: bad tokenizers ----------------------------------------------------------------------
def test_unpatched_r1_template_cannot_be_masked(r1_tokenizer_dir):
    with pytest.raises(TemplateError, match="rewrites the assistant answer.*keep_reasoning"):
        ChatMasker(r1_tokenizer_dir).check()


def test_tokenizer_without_chat_template(r1_tokenizer_dir):
    cfg = json.loads((r1_tokenizer_dir / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (r1_tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TemplateError, match="has no chat template"):
        ChatMasker(r1_tokenizer_dir)


def test_template_merging_tokens_across_the_boundary_is_refused(patched_tokenizer, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(patched_tokenizer, folder)
    # A generation prompt ending in a bare word: the answer's first letters merge into it.
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Q: ' + m['content'] }}"
                "{% else %}{{ ' A' + m['content'] + eos_token }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ ' A' }}{% endif %}")
    PatchTokenizerSettings()  # (settings unaffected: the template file is edited directly)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TemplateError, match="merges across the prompt/answer boundary"):
        ChatMasker(folder).encode([chat("x", "nswer is 2")])


# -- the stage and the command ---------------------------------------------------------------------
def test_every_sample_dropped_is_an_error_and_nothing_is_written(patched_tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Q", "output": "A " * 100}])
    out = tmp_path / "out"
    with pytest.raises(UserError, match="every training sample was dropped"):
        tokenize_files(str(data), {}, patched_tokenizer, out, TokenizeSettings(seq_length=16),
                       LOG)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_rsft_tokenize_command(patched_tokenizer, tmp_path, cli_env):
    from tests.conftest import ROOT, rsft

    out = tmp_path / "out"
    proc = rsft("tokenize", "--tokenizer", str(patched_tokenizer), "--data",
                "builtin:openmathreasoning-r1-64", "--field", "problem=user", "--field",
                "generated_solution=assistant", "--out", str(out), "--seq-len", "4096",
                cwd=ROOT, env=cli_env, check=True)
    assert "64 samples in" in proc.stdout
    stats = json.loads((out / "stats.json").read_text())["splits"]["train"]
    assert stats["samples_out"] == 64 and stats["rows"] < 64
    assert (out / "lengths.png").read_bytes()[:4] == b"\x89PNG"
    bad = rsft("tokenize", "--tokenizer", str(R1_TOKENIZER), "--data", "builtin:openmathreasoning-r1-64",
               "--field", "problem=user", "--field", "generated_solution=assistant", "--out",
               str(tmp_path / "bad"), cwd=ROOT, env=cli_env)
    assert bad.returncode == 2 and "keep_reasoning" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_tokenize_dataset_writes_stats_for_both_splits(patched_tokenizer, tmp_path):
    build_dataset(tmp_path / "data", test_split=8,
                  sources=[DatasetSource(path="builtin:openmathreasoning-r1-64",
                                         fields=TRACE_FIELDS)])
    splits = {s: tmp_path / "data" / f"{s}.parquet" for s in ("train", "test")}
    (tmp_path / "tok").mkdir()
    stats = tokenize_dataset(TokenizeSettings(seq_length=4096, workers=1), splits,
                             patched_tokenizer, tmp_path / "tok", LOG)
    assert stats["splits"]["train"]["samples_in"] == 56 and stats["splits"]["test"]["samples_in"] == 8
    assert 0.5 < stats["splits"]["train"]["supervised_fraction"] < 1
    assert SFTDataset(tmp_path / "tok" / "test").rows[-1] == 8
    for split in ("train", "test"):
        length = stats["splits"][split]["length"]
        assert 0 < length["min"] <= length["mean"] <= length["max"], length


def test_best_fit_decreasing_places_every_sample_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 1000, size=5000)
    bins = best_fit_decreasing(lengths, 1024)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(5000))
    assert all(lengths[b].sum() <= 1024 for b in bins)
    assert len(bins) <= 1.05 * np.ceil(lengths.sum() / 1024)
    assert best_fit_decreasing(lengths, 1024) == bins
    with pytest.raises(ValueError, match="does not fit"):
        best_fit_decreasing(np.array([5, 2000]), 1024)
