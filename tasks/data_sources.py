"""Reading SFT records from their sources and normalising them to chat messages.

Sources: local JSON / JSONL / Parquet files or folders, Hub datasets (`hf://org/name@rev`, pinned
to a commit and read through the local HF cache with `datasets`), and `builtin:` examples.
Records become `[{"role", "content"}, …]` through a field map or by format detection
(`messages` / `conversations` columns incl. ShareGPT `from`/`value`, TRL's `prompt`/`completion`
as lists of messages or as text, or the seed's `instruction`/`input`/`output`). A record that cannot be used raises `BadRecord` with its
location (`file:line`); the caller decides whether that stops the run or is counted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from settings.errors import UserError
from settings.models import BUILTIN_SOURCE, HF_SOURCE, DatasetSource

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
BUILTIN_DATASETS = {"openmathreasoning-r1-64": EXAMPLES / "openmathreasoning_r1_64.jsonl"}
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
HUB_PATTERNS = ["*.jsonl", "*.json", "*.parquet", "*.md"]
# ShareGPT and other common spellings of the three roles.
ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
                "gpt": "assistant", "model": "assistant"}


class BadRecord(UserError):
    """One unusable record: `reason` is a short category for the statistics."""

    def __init__(self, where: str, reason: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.where, self.reason = where, reason


# -- where the files are -------------------------------------------------------------------------
def hub_repo(path: str) -> tuple[str, str]:
    m = HF_SOURCE.match(path)
    assert m, "validated by DatasetSource"
    return m["repo"], m["revision"] or "main"


def local_files(path: str, field: str) -> list[Path]:
    """The data files of a local file or folder (sorted, recursive)."""
    if m := BUILTIN_SOURCE.match(path):
        if m["name"] not in BUILTIN_DATASETS:
            raise UserError(f"{field}: unknown built-in dataset '{path}'; built-ins: "
                            + ", ".join(f"builtin:{n}" for n in BUILTIN_DATASETS))
        return [BUILTIN_DATASETS[m["name"]]]
    root = Path(path).expanduser().resolve()
    if root.is_file():
        if root.suffix not in FILE_SUFFIXES:
            raise UserError(f"{field}: {root} is not a .jsonl, .json or .parquet file")
        return [root]
    if not root.is_dir():
        from tasks.download import hub_hint

        raise UserError(f"{field}: {root} does not exist" + hub_hint(path))
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise UserError(f"{field}: {root} has no .jsonl, .json or .parquet files")
    return files


def fingerprint(source: DatasetSource, field: str, token: str | None = None) -> dict[str, Any]:
    """Plan-time identity of a source: the pinned commit, or the files' sizes and mtimes."""
    if source.path.startswith("hf://"):
        from tasks.download import resolve_revision

        repo, revision = hub_repo(source.path)
        return {"repo": repo, "commit": resolve_revision(repo, revision, token, "dataset", field)}
    return {"files": [(str(f), f.stat().st_size, f.stat().st_mtime_ns)
                      for f in local_files(source.path, field)]}


# -- raw records ---------------------------------------------------------------------------------
def _json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, BadRecord(where, "not_utf8", f"not UTF-8 ({e.reason} at byte "
                                       f"{e.start}); re-encode the file as UTF-8")
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as e:
                yield where, BadRecord(where, "malformed_json",
                                       f"malformed JSON ({e.msg} at column {e.colno})")


def _json_file(path: Path) -> Iterator[tuple[str, Any]]:
    """A `.json` file: a JSON array of records, or JSON Lines under a .json name."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        yield from _json_lines(path)
        return
    try:
        records = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}); re-encode it") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); fix the file or convert "
                        "it to JSON Lines") from None
    for i, record in enumerate(records):
        yield f"{path}[{i}]", record


def _parquet_file(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for damaged files
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None
    row = 0
    for batch in reader.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield f"{path}:row {row}", record
            row += 1


def read_file(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, record or BadRecord) for every record of one file, streaming."""
    if path.suffix == ".parquet":
        return _parquet_file(path)
    if path.suffix == ".json":
        return _json_file(path)
    return _json_lines(path)


def hub_snapshot(repo: str, commit: str, token: str | None) -> Path:
    from huggingface_hub import snapshot_download

    from tasks.download import hub_offline

    return Path(snapshot_download(repo, repo_type="dataset", revision=commit, token=token,
                                  allow_patterns=HUB_PATTERNS, local_files_only=hub_offline()))


def read_source(source: DatasetSource, fingerprint: dict[str, Any], field: str,
                token: str | None = None) -> Iterator[tuple[str, Any]]:
    """Every raw record of a source, in a stable order."""
    if "commit" in fingerprint:
        import datasets

        snapshot = hub_snapshot(fingerprint["repo"], fingerprint["commit"], token)
        try:  # `datasets` knows the Hub's layouts (data/ dirs, configs in the README)
            ds = datasets.load_dataset(str(snapshot), name=source.name, split=source.split,
                                       streaming=True)
        except (ValueError, FileNotFoundError) as e:
            raise UserError(f"{field}: cannot read hf://{fingerprint['repo']} "
                            f"(name={source.name}, split={source.split}): {e}") from None
        for i, record in enumerate(ds):
            yield f"hf://{fingerprint['repo']}@{fingerprint['commit'][:8]}:{i}", record
        return
    for path in local_files(source.path, field):
        yield from read_file(path)


# -- normalisation -------------------------------------------------------------------------------
def _text(record: dict[str, Any], key: str, where: str) -> str:
    if key not in record or record[key] is None:
        raise BadRecord(where, "missing_field", f"missing field '{key}' (fields: "
                        f"{', '.join(sorted(record))}); fix the data or dataset.sources[].fields")
    value = record[key]
    if not isinstance(value, str):
        raise BadRecord(where, "not_text", f"field '{key}' is {type(value).__name__}, not text")
    return value


def _chat(turns: Any, where: str) -> list[dict[str, str]]:
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            raise BadRecord(where, "not_chat", "chat column is a string, not a list of turns") from None
    if not isinstance(turns, list) or not turns:
        raise BadRecord(where, "not_chat", "chat column is not a non-empty list of turns")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise BadRecord(where, "not_chat", f"a turn is {type(turn).__name__}, not an object")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in ROLE_ALIASES:
            raise BadRecord(where, "unknown_role", f"unknown role {role!r}; expected one of "
                            f"{', '.join(ROLE_ALIASES)}")
        if not isinstance(content, str):
            raise BadRecord(where, "not_text", f"a {role} turn has no text content")
        messages.append({"role": ROLE_ALIASES[role], "content": content})
    return messages


SEED_FIELDS = {"instruction": "user", "output": "assistant"}


def detect_fields(record: Any, where: str) -> dict[str, str]:
    """The field map of a source, from its first record: a `messages`/`conversations` chat
    column, TRL's `prompt`/`completion` (conversational: lists of messages, joined; standard:
    text, the user's and the assistant's), or the seed's `instruction`/`output` (+ optional
    `input`, `system`)."""
    if isinstance(record, dict):
        for column in ("messages", "conversations"):
            if column in record:
                return {column: "messages"}
        if "prompt" in record and "completion" in record:
            if isinstance(record["prompt"], str):
                return {"prompt": "user", "completion": "assistant"}
            return {"prompt": "messages", "completion": "messages"}
        if "instruction" in record and "output" in record:
            return dict(SEED_FIELDS)
    keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
    raise UserError(f"{where}: unknown record format (has: {keys}); expected `messages`, "
                    "`conversations`, `prompt`+`completion` or `instruction`+`output`, or set "
                    "dataset.sources[].fields")


def to_messages(record: Any, fields: dict[str, str], where: str) -> list[dict[str, str]]:
    """One raw record → chat messages through a field map (raises BadRecord)."""
    if isinstance(record, BadRecord):
        raise record
    if not isinstance(record, dict):
        raise BadRecord(where, "not_object", f"record is {type(record).__name__}, not an object")
    chat = [k for k, role in fields.items() if role == "messages"]
    if chat:
        messages = []
        for column in chat:  # TRL's prompt + completion: one conversation
            value = record.get(column)
            if value is None:
                _text(record, column, where)  # raises "missing field"
            messages += _chat(value, where)
    else:
        by_role: dict[str, list[str]] = {}
        for key, role in fields.items():
            by_role.setdefault(role, []).append(_text(record, key, where))
        if fields == SEED_FIELDS:  # the seed's optional columns
            if isinstance(record.get("input"), str) and record["input"].strip():
                by_role["user"].append(record["input"])
            if isinstance(record.get("system"), str) and record["system"].strip():
                by_role["system"] = [record["system"]]
        messages = [{"role": role, "content": "\n\n".join(by_role[role])}
                    for role in ("system", "user", "assistant") if role in by_role]
    assistants = [m for m in messages if m["role"] == "assistant"]
    if not assistants:
        raise BadRecord(where, "no_assistant", "no assistant turn: nothing to train on")
    if any(not m["content"].strip() for m in assistants):
        raise BadRecord(where, "empty_answer", "empty assistant answer")
    return messages
