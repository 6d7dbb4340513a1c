"""How the API talks to the cron scheduler without importing it.

The API holds a :class:`SchedulerLink`. With Redis, the link publishes trigger changes and refresh
requests on Redis and reads the leader's status from Redis; in standalone mode the composition
root passes a link to the scheduler running in the same process.
"""

from __future__ import annotations

from typing import Protocol


class SchedulerLink(Protocol):
    def trigger_changed(self, workflow_id: str) -> None:
        """A workflow was created, changed, paused, resumed or deleted: reload its trigger."""

    def refresh(self) -> None:
        """Reload every cron trigger from the database (the seeds' manual refresh)."""

    def status(self) -> dict[str, object]:
        """``{"initialized": bool, "scheduledWorkflows": int}`` as the queue stats show it."""
