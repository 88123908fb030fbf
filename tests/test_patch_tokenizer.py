"""The tokenizer patch on the real DeepSeek-R1-Distill-Qwen tokenizer: every check, by behaviour."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from settings.errors import UserError
from settings.models import PatchTokenizerSettings
from tasks.patch_tokenizer import patch_folder, verify_folder
from tests.conftest import R1_TOKENIZER


QUESTION = [{"role": "user", "content": "Hello, world!"}]
TRACE = "<think>\nLet me think. 2+2=4.\n</think>\n\nThe answer is 4."


def patched(folder: Path, **kw) -> AutoTokenizer:
    settings = PatchTokenizerSettings(**kw)
    patch_folder(folder, settings)
    verify_folder(folder, settings)
    return AutoTokenizer.from_pretrained(folder)


def test_original_tokenizer_is_what_the_seed_patched(r1_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(r1_tokenizer_dir)
    assert tok.convert_ids_to_tokens(151650) == "<|quad_start|>"
    assert len(tok.encode("<short>", add_special_tokens=False)) == 3
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=True)
    assert list(ids["input_ids"]) == [151646, 151644, 9707, 11, 1879, 0, 151645, 151648, 198]


def test_short_is_one_non_special_token_in_both_files(r1_tokenizer_dir):
    tok = patched(r1_tokenizer_dir)
    assert tok.encode("<short>", add_special_tokens=False) == [151650]
    assert tok.convert_ids_to_tokens(151650) == "<short>"
    ids = tok.encode("<short>\nThe answer is 4.", add_special_tokens=False)
    assert ids[0] == 151650
    assert tok.decode(ids, skip_special_tokens=True) == "<short>\nThe answer is 4."
    entry = next(t for t in json.loads((r1_tokenizer_dir / "tokenizer.json").read_text())["added_tokens"]
                 if t["id"] == 151650)
    assert entry["content"] == "<short>" and entry["special"] is False
    tok.save_pretrained(r1_tokenizer_dir / "resaved")  # transformers' own added_tokens_decoder
    decoder = json.loads((r1_tokenizer_dir / "resaved/tokenizer_config.json").read_text()).get(
        "added_tokens_decoder", {})
    if "151650" in decoder:
        assert decoder["151650"]["content"] == "<short>" and decoder["151650"]["special"] is False


def test_think_tokens_stay_single(r1_tokenizer_dir):
    tok = patched(r1_tokenizer_dir)
    assert tok.encode("<think>", add_special_tokens=False) == [151648]
    assert tok.encode("</think>", add_special_tokens=False) == [151649]


def test_assistant_turn_keeps_the_full_trace(r1_tokenizer_dir):
    original = AutoTokenizer.from_pretrained(r1_tokenizer_dir)
    convo = QUESTION + [{"role": "assistant", "content": TRACE}]
    assert TRACE not in original.apply_chat_template(convo, tokenize=False)  # R1 cut it away
    tok = patched(r1_tokenizer_dir)
    text = tok.apply_chat_template(convo, tokenize=False)
    assert text.endswith("<｜Assistant｜>" + TRACE + "<｜end▁of▁sentence｜>")


@pytest.mark.parametrize("suffix, ending", [
    ("", "<｜Assistant｜>"),             # Thinkless default: the model picks <think> or <short>
    ("\n", "<｜Assistant｜>\n"),         # the seed's template, byte for byte
    (None, "<｜Assistant｜><think>\n"),  # left as R1 had it
])
def test_generation_prompt_ends_as_configured(r1_tokenizer_dir, suffix, ending):
    tok = patched(r1_tokenizer_dir, generation_prompt_suffix=suffix)
    prompt = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert prompt == "<｜begin▁of▁sentence｜><｜User｜>Hello, world!" + ending


def test_patch_is_idempotent(r1_tokenizer_dir):
    settings = PatchTokenizerSettings()
    assert patch_folder(r1_tokenizer_dir, settings)
    first = {p.name: p.read_bytes() for p in r1_tokenizer_dir.iterdir()}
    assert patch_folder(r1_tokenizer_dir, settings) == []
    assert {p.name: p.read_bytes() for p in r1_tokenizer_dir.iterdir()} == first


def test_real_test_vectors_unchanged_by_the_patch(r1_tokenizer_dir):
    vectors = Path(__file__).resolve().parents[2] / "shared/assets/tokenizers/test-vectors"
    if not vectors.is_dir():
        pytest.skip("../shared/assets test vectors not present")
    # Each string is followed by the separator, so the last split is the empty remainder.
    texts = (vectors / "deepseek-r1-qwen.inp").read_text().split("\n__ggml_vocab_test__\n")[:-1]
    expected = [[int(x) for x in line.split()] for line in
                (vectors / "deepseek-r1-qwen.out").read_text().split("\n")[:len(texts)]]
    tok = patched(r1_tokenizer_dir)
    assert len(texts) == len(expected) == 46
    for text, ids in zip(texts, expected):
        assert tok.encode(text, add_special_tokens=False) == ids, text


def test_refuses_a_tokenizer_where_the_id_is_something_else(r1_tokenizer_dir):
    path = r1_tokenizer_dir / "tokenizer.json"
    data = json.loads(path.read_text())
    next(t for t in data["added_tokens"] if t["id"] == 151650)["content"] = "<|other|>"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"token 151650 in tokenizer.json is '<\|other\|>', expected"):
        patch_folder(r1_tokenizer_dir, PatchTokenizerSettings())


def test_refuses_unknown_id_and_name_clash(r1_tokenizer_dir):
    with pytest.raises(UserError, match="token id 999999 is not an added token"):
        patch_folder(r1_tokenizer_dir, PatchTokenizerSettings(
            renames=[{"id": 999999, "original": "x", "content": "y"}]))
    with pytest.raises(UserError, match="'<think>' already exists as another token"):
        patch_folder(r1_tokenizer_dir, PatchTokenizerSettings(
            renames=[{"id": 151650, "original": "<|quad_start|>", "content": "<think>"}]))


def test_added_tokens_decoder_and_special_lists_are_patched_too(r1_tokenizer_dir):
    cfg_path = r1_tokenizer_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # As published tokenizer configs written by transformers 4.x have it: every added token.
    added = json.loads((r1_tokenizer_dir / "tokenizer.json").read_text())["added_tokens"]
    cfg["added_tokens_decoder"] = {str(t.pop("id")): t for t in added}
    cfg["additional_special_tokens"] = ["<|quad_start|>", "<|quad_end|>"]
    cfg_path.write_text(json.dumps(cfg))
    tok = patched(r1_tokenizer_dir)
    cfg = json.loads(cfg_path.read_text())
    assert cfg["added_tokens_decoder"]["151650"]["content"] == "<short>"
    assert cfg["added_tokens_decoder"]["151650"]["special"] is False
    assert cfg["additional_special_tokens"] == ["<|quad_end|>"]
    assert tok.decode([151650], skip_special_tokens=True) == "<short>"


def test_special_control_token_vanishes_when_configured(r1_tokenizer_dir):
    tok = patched(r1_tokenizer_dir, renames=[
        {"id": 151650, "original": "<|quad_start|>", "content": "<short>", "special": True}])
    assert tok.decode([151650], skip_special_tokens=True) == ""


def test_template_file_replaces_the_template(r1_tokenizer_dir, tmp_path):
    template = tmp_path / "chatml.jinja"
    template.write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
    tok = patched(r1_tokenizer_dir, chat_template_file=template)
    prompt = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHello, world!<|im_end|>\n<|im_start|>assistant\n"


def test_unmaskable_template_fails_its_check(r1_tokenizer_dir, tmp_path):
    template = tmp_path / "cuts.jinja"
    template.write_text("{% for m in messages %}{{ m['content'][-5:] }}{% endfor %}")
    with pytest.raises(UserError, match="patch_tokenizer check failed: assistant turn keeps full"):
        patched(r1_tokenizer_dir, chat_template_file=template)
    with pytest.raises(UserError, match="chat_template_file: .* does not exist"):
        patched(r1_tokenizer_dir, chat_template_file=tmp_path / "missing.jinja")


def test_a_tokenizer_without_template_gets_chatml_once(r1_tokenizer_dir):
    """ChatML with `<|im_end|>` closing each turn, its two tokens added as special tokens after
    every existing id; patching the patched folder changes nothing."""
    config = json.loads((r1_tokenizer_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (r1_tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(config))
    tok = patched(r1_tokenizer_dir)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [151665, 151666]
    assert len(tok) == 151667 and tok.convert_tokens_to_ids("<short>") == 151650
    turn = tok.apply_chat_template(QUESTION + [{"role": "assistant", "content": TRACE}],
                                   tokenize=False)
    assert turn == (f"<|im_start|>user\n{QUESTION[0]['content']}<|im_end|>\n"
                    f"<|im_start|>assistant\n{TRACE}<|im_end|>\n")
    assert tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True
                                   ).endswith("<|im_end|>\n<|im_start|>assistant\n")
    files = {f.name: f.read_bytes() for f in r1_tokenizer_dir.iterdir()}
    assert patch_folder(r1_tokenizer_dir, PatchTokenizerSettings()) == []
    assert files == {f.name: f.read_bytes() for f in r1_tokenizer_dir.iterdir()}


def test_shipped_tokenizer_matches_shared_assets():
    shared = Path(__file__).resolve().parents[2] / "shared/assets/tokenizers/deepseek-r1-distill-qwen-1.5b"
    if not shared.is_dir():
        pytest.skip("../shared/assets not present")
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (R1_TOKENIZER / f).read_bytes() == (shared / f).read_bytes()
