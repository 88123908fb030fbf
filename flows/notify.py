"""Telling people a run failed: the flow's `on_failure` / `on_crashed` hook sends through a Prefect
notification block named in `notify.block`, and `rsft deploy --notify BLOCK` adds the server-side
automation of `deployments/automations.yaml`, which also covers runs whose process died outright
(kill -9, a lost node) and so never ran a hook."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from settings.errors import UserError

AUTOMATIONS_FILE = Path(__file__).resolve().parents[1] / "deployments" / "automations.yaml"
log = logging.getLogger("rsft.notify")


def load_block(slug: str):
    """A notification block from `type-slug/name`; one line if it does not exist."""
    from prefect.blocks.core import Block

    try:
        block = Block.load(slug)
    except (ValueError, KeyError) as e:
        raise UserError(f"notify.block: no Prefect block '{slug}' ({e}); create it in the UI "
                        "(Blocks → e.g. Slack Webhook) or with Python, then use 'type-slug/name'"
                        ) from None
    if not hasattr(block, "notify"):
        raise UserError(f"notify.block: '{slug}' is not a notification block")
    return block


def message(flow_name: str, run_name: str, run_id: Any, state_name: str,
            state_message: str | None) -> tuple[str, str]:
    from prefect.settings import PREFECT_UI_URL

    subject = f"rsft: {flow_name} run {run_name} {state_name}"
    body = f"{subject}: {state_message or 'no message'}"
    if PREFECT_UI_URL.value():
        body += f"\n{PREFECT_UI_URL.value()}/runs/flow-run/{run_id}"
    return subject, body


def on_run_failed(flow, flow_run, state) -> None:
    """Flow hook (failed or crashed): notify through the run's `notify.block`, if any. A broken
    notification is logged, never raised: it must not hide the run's own failure."""
    if flow_run.parent_task_run_id:  # a subflow: its parent run reports the failure
        return
    settings = flow_run.parameters.get("settings") or {}
    notify = settings.get("notify") if isinstance(settings, dict) else settings.notify.model_dump()
    slug = (notify or {}).get("block")
    if not slug:
        return
    subject, body = message(flow.name, flow_run.name, flow_run.id, state.name, state.message)
    try:
        load_block(slug).notify(body, subject=subject)
        log.info("notified %s: %s", slug, subject)
    except Exception as e:  # noqa: BLE001 - see docstring
        log.error("could not notify %s: %s", slug, e)


def automations(block_document_id: str) -> list[dict[str, Any]]:
    """deployments/automations.yaml with the notification block filled in."""
    spec = yaml.safe_load(AUTOMATIONS_FILE.read_text())
    for automation in spec["automations"]:
        for action in automation["actions"]:
            if action.get("type") == "send-notification":
                action["block_document_id"] = block_document_id
    return spec["automations"]


def ensure_automations(slug: str) -> list[str]:
    """Create the automations that do not exist yet (by name); returns the names created."""
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore

    block = load_block(slug)
    created = []
    with get_client(sync_client=True) as client:
        for spec in automations(str(block._block_document_id)):
            if client.read_automations_by_name(spec["name"]):
                continue
            client.create_automation(AutomationCore.model_validate(spec))
            created.append(f"automation {spec['name']} → {slug}")
    return created
