"""Which failures are worth retrying (a dropped connection, a timeout, HTTP 429/5xx from the Hub)
and the Prefect retry options of the steps that talk to a network. Everything else — a user
mistake, a bug — fails on the first attempt."""

from __future__ import annotations

from typing import Any

from settings.models import RetrySettings

TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}


def is_network_error(e: BaseException) -> bool:
    """Connection failures from whichever HTTP stack huggingface_hub uses."""
    module = type(e).__module__.split(".")[0]
    return isinstance(e, (ConnectionError, TimeoutError)) or module in {
        "httpx", "httpx2", "httpcore", "requests", "urllib3"}


def is_transient(e: BaseException | None) -> bool:
    """A network failure or a retryable HTTP status, anywhere in the exception's cause chain
    (huggingface_hub wraps a refused connection in LocalEntryNotFoundError, for instance)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if is_network_error(e):
            return True
        response = getattr(e, "response", None)
        if getattr(response, "status_code", None) in TRANSIENT_HTTP:
            return True
        e = e.__cause__ or e.__context__
    return False


def retry_transient(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry only transient failures."""
    return is_transient(state.result(raise_on_failure=False))


def retry_options(settings: RetrySettings) -> dict[str, Any]:
    """`Task.with_options` arguments: exponential back-off, transient failures only."""
    return {"retries": settings.attempts,
            "retry_delay_seconds": [settings.delay_seconds * 2**i
                                    for i in range(settings.attempts)] or 0,
            "retry_condition_fn": retry_transient}


def gave_up(step: str, error: BaseException, settings: RetrySettings) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return (f"{step}: network failure after {settings.attempts + 1} attempts "
            f"({type(error).__name__}: {first}); check the network or the Hub's status and rerun "
            "(retries.attempts / retries.delay_seconds set the retries)")
