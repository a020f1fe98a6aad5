"""Run and delivery statuses in words for people: the CLI's tables and summaries, and the errors that name a
status (`run 1 is completed; it cannot be set to paused` read 批次 1 的状态是 completed in Chinese). JSON, the API's
`status` fields and its `code`s keep the English value."""

from __future__ import annotations

from engine.i18n import N_, tr

STATUS_NAMES = {
    "pending": N_("pending"),
    "claimed": N_("claimed"),
    "sending": N_("sending"),
    "submitted": N_("submitted"),
    "sent": N_("sent"),
    "failed": N_("failed"),
    "skipped": N_("skipped"),
    "unknown": N_("unknown"),
    "running": N_("running"),
    "paused": N_("paused"),
    "completed": N_("completed"),
    "cancelled": N_("cancelled"),
}


def status_name(status: str) -> str:
    """A delivery or run status in words, in the language in force (anything else as it is)."""
    return tr(STATUS_NAMES[status]) if status in STATUS_NAMES else status
