"""Optional upload of the exported folder to the Hugging Face Hub, one branch per distinct export.

A branch that already holds this export (its card names the same export key) is left as it is; one
holding anything else is refused unless `export.push.overwrite`. `dry_run` lists what would be
uploaded. The token comes from a Prefect Secret block or huggingface_hub's own lookup and is never
logged.
"""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path
from typing import Any

from settings.errors import UserError
from settings.models import HubPushSettings
from tasks.artifacts import Manifest
from tasks.download import read_secret
from tasks.export import NOT_UPLOADED
from tasks.retry import is_transient


def files_to_upload(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
                  and not any(fnmatch.fnmatch(str(p.relative_to(folder)), pat) for pat in NOT_UPLOADED))


def push(export: Manifest, card: str, settings: HubPushSettings, log: logging.Logger) -> dict[str, Any]:
    """Upload `export` with `card` as its README.md. Returns what was (or would be) pushed."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    assert settings.repo
    revision = settings.revision or f"rsft-{export.key}"
    files = files_to_upload(export.dir)
    plan = {"repo": settings.repo, "revision": revision, "files": files,
            "bytes": sum((export.dir / f).stat().st_size for f in files)}
    if settings.dry_run:
        log.info("push (dry run): would upload %d files (%.1f MB) to %s@%s: %s", len(files),
                 plan["bytes"] / 1e6, settings.repo, revision, ", ".join(files))
        return {**plan, "pushed": False}
    token = read_secret(settings.token_secret, "export.push.token_secret")
    api = HfApi(token=token)
    marker = f"- export: `{export.key}`"
    try:
        api.create_repo(settings.repo, private=settings.private, exist_ok=True)
        branches = {b.name for b in api.list_repo_refs(settings.repo).branches}
        if revision in branches:
            readme = api.hf_hub_download(settings.repo, "README.md", revision=revision)
            if marker in Path(readme).read_text():
                log.info("push: %s@%s already holds export %s", settings.repo, revision, export.key)
                return {**plan, "pushed": False}
            if not settings.overwrite:
                raise UserError(f"push: {settings.repo}@{revision} already holds another export; "
                                "set export.push.revision to a new branch or export.push.overwrite")
        else:
            api.create_branch(settings.repo, branch=revision)
        operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(export.dir / f))
                      for f in files if f != "README.md"]
        operations.append(CommitOperationAdd(path_in_repo="README.md",
                                             path_or_fileobj=f"{card}\n{marker}\n".encode()))
        commit = api.create_commit(settings.repo, operations, revision=revision,
                                   commit_message=f"rsft export {export.key}")
    except HfHubHTTPError as e:  # the message never contains the token
        if is_transient(e):
            raise  # retried by the push task
        raise UserError(f"push: the Hub refused {settings.repo}@{revision}: "
                        f"{str(e).splitlines()[0]}") from None
    log.info("push: uploaded %d files to %s", len(files), commit.commit_url)
    return {**plan, "pushed": True, "commit": commit.oid}
