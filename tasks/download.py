"""Stage `download`: the base model as an HF folder, from the Hub, a local directory or a built-in.

Hub downloads go through huggingface_hub's cache (resumable; works offline with
`HF_HUB_OFFLINE=1`), pinned to the commit a branch or tag resolved to when the run was planned,
then copied into the artifact. Only safetensors, JSON, tokenizer and text files are taken: pickle
weights are refused unless `allow_pickle` (they can execute code when loaded). Files are copied
byte for byte, so the source dtype is kept.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
from pathlib import Path
from typing import Any

from settings.errors import UserError
from settings.models import HF_SOURCE, DownloadSettings
from tasks.artifacts import ensure_free_space, progress
from tasks.retry import is_network_error
from tasks.builtin_models import build_builtin, builtin_config, builtin_fingerprint
from tasks.stage import BuildContext, Stage

SAFE_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja",
                 "*.md", "LICENSE*"]
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.pkl"]
SKIP_DIRS = ["original/*"]  # Llama's consolidated.*.pth copies of the weights
COMMIT = re.compile(r"^[0-9a-f]{40}$")


def source_kind(source: str) -> str:
    if source.startswith("hf://"):
        return "hub"
    if source.startswith("builtin:"):
        return "builtin"
    return "local"


def hf_token(settings: DownloadSettings) -> str | None:
    """The token from a Prefect Secret block if one is named, else huggingface_hub's own lookup."""
    return read_secret(settings.hf_token_secret, "download.hf_token_secret")


def read_secret(name: str | None, field: str) -> str | None:
    """A Prefect Secret block's value (None when no block is named)."""
    if not name:
        return None
    from prefect.blocks.system import Secret

    try:
        return Secret.load(name).get()
    except ValueError as e:
        raise UserError(f"{field}: no Prefect Secret block named '{name}' ({e}); create it or "
                        "unset the field to use HF_TOKEN") from None


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def resolve_revision(repo: str, revision: str, token: str | None, repo_type: str = "model",
                     field: str = "download.source") -> str:
    """A branch/tag → its current commit (offline: from the local cache's refs). `field` names
    the setting in error messages."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import errors as hf_errors

    if COMMIT.match(revision):
        return revision
    what = "model" if repo_type == "model" else "dataset"
    try:
        if hub_offline():
            return Path(snapshot_download(repo, revision=revision, repo_type=repo_type,
                                          local_files_only=True)).name
        return HfApi(token=token).repo_info(repo, revision=revision, repo_type=repo_type).sha
    except hf_errors.GatedRepoError:
        raise UserError(f"{field}: hf://{repo} is gated; accept its terms on the Hub and "
                        "set HF_TOKEN (or download.hf_token_secret)") from None
    except hf_errors.RepositoryNotFoundError:
        raise UserError(f"{field}: no Hub {what} hf://{repo} (or it is private: set "
                        "HF_TOKEN); check the name") from None
    except hf_errors.RevisionNotFoundError:
        raise UserError(f"{field}: hf://{repo} has no revision '{revision}'") from None
    except hf_errors.LocalEntryNotFoundError:
        raise UserError(f"{field}: hf://{repo}@{revision} is not in the local Hugging Face "
                        "cache and the Hub is offline; download it once online or unset "
                        "HF_HUB_OFFLINE") from None
    except Exception as e:
        if not is_network_error(e):
            raise
        raise UserError(f"{field}: cannot reach the Hugging Face Hub to resolve "
                        f"hf://{repo}@{revision} ({type(e).__name__}: {e}); check the network, pin "
                        "a commit, or set HF_HUB_OFFLINE=1 to use the local cache") from None


def hub_hint(source: str) -> str:
    """`org/name` that is no local path reads like a Hub repo written without `hf://`."""
    if (HF_SOURCE.match(f"hf://{source}") and not source.startswith((".", "~"))
            and not Path(source).expanduser().exists()):
        return f"; did you mean hf://{source}?"
    return ""


def local_dir(source: str) -> Path:
    path = Path(source).expanduser().resolve()
    if not path.is_dir():
        raise UserError(f"download.source: local model directory {path} does not exist"
                        + hub_hint(source))
    if not (path / "config.json").is_file():
        raise UserError(f"download.source: {path} is not a Hugging Face model folder "
                        "(no config.json)")
    return path


def fingerprint(settings: DownloadSettings) -> dict[str, Any]:
    kind = source_kind(settings.source)
    if kind == "builtin":
        return builtin_fingerprint(settings.source.removeprefix("builtin:"))
    if kind == "hub":
        m = HF_SOURCE.match(settings.source)
        assert m, "validated by DownloadSettings"
        repo, revision = m["repo"], m["revision"] or "main"
        return {"repo": repo, "commit": resolve_revision(repo, revision, hf_token(settings))}
    root = local_dir(settings.source)
    return {"dir": str(root), "files": sorted((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                            for p in root.rglob("*") if p.is_file())}


def known_config(settings: DownloadSettings, artifact: Path | None) -> dict[str, Any] | None:
    """The model's config.json before anything is downloaded, when it is cheap to know: a
    built-in's, a local folder's, or the download artifact's (`artifact`, when intact); None for
    a Hub model not downloaded yet."""
    kind = source_kind(settings.source)
    if kind == "builtin":
        return builtin_config(settings.source.removeprefix("builtin:"))
    if kind == "local":
        return json.loads((local_dir(settings.source) / "config.json").read_text())
    if artifact is not None and (artifact / "config.json").is_file():
        return json.loads((artifact / "config.json").read_text())
    return None


def _matches(rel: str, patterns: list[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(rel, p) for p in patterns)


def select_files(root: Path, allow_pickle: bool, source: str) -> list[str]:
    """The files to take from a model folder; refuses pickle-only weights unless allowed."""
    rel = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                 if p.is_file() and ".cache" not in p.relative_to(root).parts)
    rel = [r for r in rel if not _matches(r, SKIP_DIRS)]
    patterns = SAFE_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    chosen = [r for r in rel if _matches(r, patterns)]
    has_safetensors = any(r.endswith(".safetensors") for r in chosen)
    pickles = [r for r in rel if _matches(r, PICKLE_PATTERNS)]
    if not has_safetensors and pickles and not allow_pickle:
        raise UserError(f"download.source: {source} has only pickle weights ({pickles[0]}…); "
                        "set download.allow_pickle=true to accept them (they can run code on load)")
    if not has_safetensors and not pickles:
        raise UserError(f"download.source: {source} has no model weights (*.safetensors)")
    return chosen


def copy_files(root: Path, files: list[str], out: Path) -> None:
    needed = sum((root / rel).stat().st_size for rel in files)
    ensure_free_space(out, needed, f"the model files from {root}")
    with progress(needed, "copying model files") as bar:
        for rel in files:
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rel, dest)  # follows the HF cache's symlinks to the blobs
            bar.update(dest.stat().st_size)


def download_hub(repo: str, commit: str, allow_pickle: bool, token: str | None) -> Path:
    from huggingface_hub import snapshot_download

    patterns = SAFE_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    offline = hub_offline()
    path = snapshot_download(repo, revision=commit, allow_patterns=patterns,
                             ignore_patterns=SKIP_DIRS, token=token, local_files_only=offline)
    snapshot = Path(path)
    if not any(snapshot.rglob("*.safetensors")) and not allow_pickle and not offline:
        # Tell pickle-only repos apart from weightless ones without downloading the pickles.
        from huggingface_hub import HfApi

        listed = HfApi(token=token).list_repo_files(repo, revision=commit)
        if any(_matches(f, PICKLE_PATTERNS) for f in listed):
            raise UserError(f"download.source: hf://{repo} has only pickle weights; set "
                            "download.allow_pickle=true to accept them (they can run code on load)")
    return snapshot


def build(ctx: BuildContext) -> None:
    settings: DownloadSettings = ctx.settings
    kind = source_kind(settings.source)
    if kind == "builtin":
        ctx.meta.update(build_builtin(settings.source.removeprefix("builtin:"), ctx.out))
    else:
        if kind == "hub":
            repo, commit = ctx.fingerprint["repo"], ctx.fingerprint["commit"]
            root = download_hub(repo, commit, settings.allow_pickle, hf_token(settings))
            ctx.meta.update(repo=repo, commit=commit)
        else:
            root = local_dir(settings.source)
            ctx.meta.update(local_dir=str(root))
        files = select_files(root, settings.allow_pickle, settings.source)
        ctx.log.info("download: copying %d files from %s", len(files), root)
        copy_files(root, files, ctx.out)
    config = json.loads((ctx.out / "config.json").read_text())
    ctx.meta.update(source=settings.source, architectures=config.get("architectures"),
                    dtype=config.get("torch_dtype") or config.get("dtype"))


STAGE = Stage(
    name="download", version="1", settings=lambda s: s.download, build=build,
    fingerprint=fingerprint, network=True,
    description="the base HF model folder (hub, local dir or built-in)",
)
