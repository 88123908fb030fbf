"""Stage `patch_tokenizer`: settings-driven edits of the tokenizer files, verified with transformers.

A tokenizer without a chat template gets ChatML (as open-r1 gives it), with `<|im_start|>` and
`<|im_end|>` added as special tokens when it lacks them. The Thinkless warm-up needs three edits
of the DeepSeek-R1-Distill tokenizer:
- id 151650 `<|quad_start|>` becomes the non-special control token `<short>` (in tokenizer.json,
  and in tokenizer_config.json's `added_tokens_decoder` / special-token lists when present);
- assistant turns keep their full `<think>…</think>` reasoning (the R1 template cut it away);
- the generation prompt no longer forces `<think>\\n`, so the model chooses its mode.
Every edit is then checked by behaviour, not by text: transformers loads the patched folder,
encodes, decodes and renders the chat template. Patching a patched tokenizer changes nothing.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from settings.errors import UserError
from settings.models import PatchTokenizerSettings
from tasks.artifacts import Manifest
from tasks.stage import BuildContext, Stage

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json",
                   "merges.txt", "tokenizer.model")
# `{% set content = content.split('</think>')[-1] %}` and its variants: drops the reasoning.
REASONING_CUT = re.compile(
    r"\{%-?\s*set\s+\w+\s*=\s*[^%]*?\.split\(\s*['\"]</think>['\"]\s*\)\s*\[\s*-1\s*\][^%]*?-?%\}"
)
THINK_PROMPT = re.compile(r"<think>(\\n|\n)")


# -- token renames -----------------------------------------------------------------------------
def _rename_entry(entry: dict[str, Any], rename, where: str) -> bool:
    """Edit one added-token entry in place; True if it changed."""
    if entry["content"] not in (rename.original, rename.content):
        raise UserError(
            f"token {rename.id} in {where} is {entry['content']!r}, expected "
            f"{rename.original!r} (to patch) or {rename.content!r} (already patched): this is not "
            "the tokenizer the renames were written for; fix patch_tokenizer.renames or "
            "download.source"
        )
    before = dict(entry)
    entry["content"] = rename.content
    entry["special"] = rename.special
    return entry != before


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def rename_tokens(folder: Path, settings: PatchTokenizerSettings) -> list[str]:
    tj = _read_json(folder / "tokenizer.json")
    if tj is None:
        raise UserError(f"{folder} has no tokenizer.json (a fast tokenizer is "
                        "required); check download.source")
    configs = {name: data for name in ("tokenizer_config.json", "special_tokens_map.json")
               if (data := _read_json(folder / name)) is not None}
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    vocab = tj.get("model", {}).get("vocab", {})
    changes: list[str] = []
    for r in settings.renames:
        if r.id not in added:
            raise UserError(f"token id {r.id} is not an added token of this "
                            "tokenizer; fix patch_tokenizer.renames or download.source")
        clash = [i for i, t in added.items() if t["content"] == r.content and i != r.id]
        if clash or (isinstance(vocab, dict) and vocab.get(r.content, r.id) != r.id):
            raise UserError(f"{r.content!r} already exists as another token; "
                            "choose another name in patch_tokenizer.renames")
        if _rename_entry(added[r.id], r, "tokenizer.json"):
            changes.append(f"tokenizer.json: {r.id} {r.original!r} -> {r.content!r} "
                           f"(special={r.special})")
        decoder = configs.get("tokenizer_config.json", {}).get("added_tokens_decoder", {})
        if str(r.id) in decoder and _rename_entry(decoder[str(r.id)], r, "tokenizer_config.json"):
            changes.append(f"tokenizer_config.json: added_tokens_decoder[{r.id}] -> {r.content!r}")
        for name, data in configs.items():
            listed = data.get("additional_special_tokens")
            if isinstance(listed, list) and r.original in listed:
                data["additional_special_tokens"] = [t for t in listed if t != r.original] + (
                    [r.content] if r.special else [])
                changes.append(f"{name}: additional_special_tokens no longer lists {r.original!r}")
    _write_json(folder / "tokenizer.json", tj)
    for name, data in configs.items():
        _write_json(folder / name, data)
    return changes


# -- chat template -----------------------------------------------------------------------------
def _jinja_literal(text: str) -> str:
    """`text` escaped for use inside a single-quoted Jinja string literal."""
    return text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


def read_template(folder: Path) -> tuple[str | None, str]:
    """The chat template and where it lives (`chat_template.jinja` or tokenizer_config.json)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(), "chat_template.jinja"
    template = (_read_json(folder / "tokenizer_config.json") or {}).get("chat_template")
    if isinstance(template, list):
        raise UserError("this tokenizer has several named chat templates; "
                        "set patch_tokenizer.chat_template_file to the one to train with")
    return template, "tokenizer_config.json"


def write_template(folder: Path, template: str, where: str) -> None:
    if where == "chat_template.jinja":
        (folder / where).write_text(template)
        return
    config = _read_json(folder / "tokenizer_config.json") or {}
    config["chat_template"] = template
    _write_json(folder / "tokenizer_config.json", config)


def edit_template(template: str, settings: PatchTokenizerSettings) -> tuple[str, list[str]]:
    changes = []
    if settings.keep_reasoning and REASONING_CUT.search(template):
        template = REASONING_CUT.sub("", template)
        changes.append("assistant turns keep their <think>…</think> reasoning")
    if settings.generation_prompt_suffix is not None:
        at = template.rfind("add_generation_prompt")
        tail = template[at:] if at >= 0 else ""
        if m := THINK_PROMPT.search(tail):
            new_tail = tail[: m.start()] + _jinja_literal(settings.generation_prompt_suffix) + tail[
                m.end():]
            template = template[:at] + new_tail
            changes.append(f"generation prompt ends with {settings.generation_prompt_suffix!r} "
                           "after the assistant tag (was <think>\\n)")
    return template, changes


# open-r1 (and TRL's `setup_chat_format`) give a model without a chat template ChatML, whose
# `<|im_end|>` closes every turn: the token the model learns to stop on.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def add_special_tokens(folder: Path, contents: tuple[str, ...]) -> dict[str, int]:
    """Make each of `contents` a special added token unless the tokenizer has it; returns the
    ids of those added (after every existing id, so the embedding may have to grow)."""
    tj = _read_json(folder / "tokenizer.json")
    if tj is None:
        raise UserError(f"{folder} has no tokenizer.json (a fast tokenizer is "
                        "required); check download.source")
    config = _read_json(folder / "tokenizer_config.json") or {}
    vocab = tj.get("model", {}).get("vocab", {})
    vocab = vocab if isinstance(vocab, dict) else {}
    known = {t["content"] for t in tj.get("added_tokens", [])} | set(vocab)
    next_id = 1 + max([*vocab.values(), *(t["id"] for t in tj.get("added_tokens", []))], default=-1)
    added = {}
    for content in contents:
        if content in known:
            continue
        entry = {"content": content, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True}
        tj.setdefault("added_tokens", []).append({"id": next_id, **entry})
        # A config's `added_tokens_decoder`, when it has one, is the whole list to transformers
        # (which then ignores tokenizer.json's): keep it complete, never start one.
        if isinstance(config.get("added_tokens_decoder"), dict):
            config["added_tokens_decoder"][str(next_id)] = entry
        added[content] = next_id
        next_id += 1
    if added:
        _write_json(folder / "tokenizer.json", tj)
        if "added_tokens_decoder" in config:
            _write_json(folder / "tokenizer_config.json", config)
    return added


def patch_folder(folder: Path, settings: PatchTokenizerSettings) -> list[str]:
    """Apply every configured edit to the tokenizer files in `folder`, in place."""
    changes = rename_tokens(folder, settings)
    template, where = read_template(folder)
    if settings.chat_template_file is not None:
        path = Path(settings.chat_template_file)
        if not path.is_file():
            raise UserError(f"patch_tokenizer.chat_template_file: {path} does not exist")
        template = path.read_text()
        changes.append(f"chat template replaced by {path.name}")
    if template is None:
        template = CHATML
        added = add_special_tokens(folder, CHATML_TOKENS)
        changes.append("no chat template: ChatML (open-r1's default), <|im_end|> closes a turn"
                       + "".join(f"; added special token {t} = {i}" for t, i in added.items()))
    template, edits = edit_template(template, settings)
    write_template(folder, template, where)
    return changes + edits


# -- verification ------------------------------------------------------------------------------
PROBE_USER = "What is 1 + 1?"
PROBE_ANSWER = "<think>\nOne plus one makes two.\n</think>\n\nThe answer is $\\boxed{2}$."


def verify_folder(folder: Path, settings: PatchTokenizerSettings) -> dict[str, str]:
    """Check the patched tokenizer by behaviour with transformers; UserError on any failure."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    checks: dict[str, str] = {}

    def check(name: str, ok: bool, detail: str) -> None:
        if not ok:
            raise UserError(f"patch_tokenizer check failed: {name}: {detail}")
        checks[name] = detail

    for r in settings.renames:
        ids = tok.encode(r.content, add_special_tokens=False)
        check(f"{r.content} is token {r.id}", ids == [r.id], f"encodes to {ids}")
        in_text = tok.encode(f"a{r.content}\nb", add_special_tokens=False)
        check(f"{r.content} is one token in text", r.id in in_text, f"'a{r.content}\\nb' -> {in_text}")
        shown = tok.decode([r.id], skip_special_tokens=True)
        expect = "" if r.special else r.content
        check(f"{r.content} with skip_special_tokens", shown == expect,
              f"decode([{r.id}], skip_special_tokens=True) = {shown!r}")
    if template_is_chatml(folder):
        for text in CHATML_TOKENS:
            ids = tok.encode(text, add_special_tokens=False)
            check(f"{text} is one token", len(ids) == 1, f"encodes to {ids}")
    for text in settings.single_tokens:
        ids = tok.encode(text, add_special_tokens=False)
        check(f"{text} is one token", len(ids) == 1, f"encodes to {ids}")

    user = [{"role": "user", "content": PROBE_USER}]
    turn = user + [{"role": "assistant", "content": PROBE_ANSWER}]
    user_only = tok.apply_chat_template(user, tokenize=False)
    full = tok.apply_chat_template(turn, tokenize=False)
    if settings.keep_reasoning:
        check("assistant turn keeps full reasoning", PROBE_ANSWER in full,
              "the rendered assistant turn contains the whole <think>…</think> trace"
              if PROBE_ANSWER in full else f"rendered {full!r}; set "
              "patch_tokenizer.chat_template_file to a template that keeps the reasoning")
    if settings.generation_prompt_suffix is not None:
        if not full.startswith(user_only) or PROBE_ANSWER[:8] not in full:
            raise UserError("cannot find the assistant tag in the rendered chat "
                            "template; set patch_tokenizer.chat_template_file")
        start = full.index(PROBE_ANSWER[:8], len(user_only))
        assistant_tag = full[len(user_only):start]
        prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        expected = user_only + assistant_tag + settings.generation_prompt_suffix
        check("generation prompt", prompt == expected,
              f"ends with {prompt[len(user_only):]!r}" if prompt == expected else
              f"ends with {prompt[len(user_only):]!r}, expected {expected[len(user_only):]!r}; "
              "set patch_tokenizer.chat_template_file or generation_prompt_suffix: null")
    return checks


def template_is_chatml(folder: Path) -> bool:
    return read_template(folder)[0] == CHATML


def embedding_growth(folder: Path, model_vocab: int) -> str | None:
    """What the model must do for token ids beyond its `model_vocab` embedding rows (tokens this
    patch added), in words; None when every id fits."""
    tj = _read_json(folder / "tokenizer.json") or {}
    beyond = sorted(t["id"] for t in tj.get("added_tokens", []) if t["id"] >= model_vocab)
    if not beyond:
        return None
    return (f"token ids {', '.join(map(str, beyond))} are beyond the model's {model_vocab} "
            f"embedding rows: train grows the embedding (and output layer) to {beyond[-1] + 1} "
            f"rows, the new ones starting at zero, and export writes vocab_size {beyond[-1] + 1}")


def build(ctx: BuildContext) -> None:
    source = ctx.upstream["download"].dir
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, ctx.out / name)
    changes = patch_folder(ctx.out, ctx.settings)
    checks = verify_folder(ctx.out, ctx.settings)
    model_vocab = (_read_json(source / "config.json") or {}).get("vocab_size")
    if model_vocab and (growth := embedding_growth(ctx.out, model_vocab)):
        changes.append(growth)
    for line in changes or ["nothing to change (already patched)"]:
        ctx.log.info("patch_tokenizer: %s", line)
    ctx.meta.update(changes=changes, checks=checks)


def report(manifest: Manifest) -> list[dict[str, str]]:
    return [{"check": name, "result": detail} for name, detail in manifest.meta["checks"].items()]


STAGE = Stage(
    name="patch_tokenizer", version="1", settings=lambda s: s.patch_tokenizer, build=build,
    upstream=("download",), description="tokenizer files with control tokens and chat template",
    report=report,
)
