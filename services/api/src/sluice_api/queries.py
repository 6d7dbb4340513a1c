"""The API's SQL: its reads and writes of workflows, workflow versions, webhooks and runs.

Named ``queries`` rather than ``store``: the API keeps no state of its own, and "store" already
names the engine's ``StepStore`` (a run's step results); these are the statements behind the
endpoints, each one query or one transaction.

Every query is scoped to the calling user: another user's workflow or run is simply not found.
Each create or update of a workflow is stored as an immutable version as well (by a trigger of
migration 0011, whoever writes), and a run executes the version it was queued with.
Each write is one transaction, so a request that fails leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from datetime import datetime
from typing import Any
from uuid import UUID

import dramatiq
from psycopg.types.json import Jsonb

from sluice_common import runstate
from sluice_common.broker import wake
from sluice_common.db import Pool
from sluice_common.errors import ConflictError, NotFoundError
from sluice_common.runs import report_cancelled
from sluice_common.runstate import RunStatus
from sluice_common.settings import Settings
from sluice_common.tracing import trace_id_of
from sluice_common.workflow import WorkflowDefinition

log = logging.getLogger(__name__)

WEBHOOK_PREFIX = "whk_"
PAGE_MAX = 200

_WORKFLOW_COLUMNS = (
    "id, name, description, trigger, steps, settings, status, version, created_at, updated_at, "
    "trigger_type, webhook_secret_hash IS NOT NULL AS has_webhook"
)
_VERSION_COLUMNS = "version, name, description, trigger, steps, settings, created_at"
_RUN_COLUMNS = (
    "id, workflow_id, workflow_version, parent_run_id, status, priority, attempt, max_attempts, trigger_type, "
    "queued_at, not_before, started_at, finished_at, error, cancel_requested"
)


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_webhook_secret() -> str:
    return WEBHOOK_PREFIX + secrets.token_urlsafe(32)


def stored_form(definition: WorkflowDefinition) -> dict[str, Any]:
    """The columns a definition is stored in (camelCase JSON, as the API shows it)."""
    return {
        "name": definition.name,
        "description": definition.description,
        "trigger_type": definition.trigger.type,
        "trigger": Jsonb(definition.trigger.model_dump(by_alias=True, mode="json")),
        "steps": Jsonb([step.model_dump(by_alias=True, mode="json") for step in definition.steps]),
        "settings": Jsonb(definition.settings.model_dump(by_alias=True, mode="json", exclude_none=True)),
        "status": definition.status,
    }


def definition_of(row: dict[str, Any]) -> dict[str, Any]:
    """The editable part of a stored workflow, as a client would send it back."""
    out = {
        "name": row["name"],
        "trigger": row["trigger"],
        "steps": row["steps"],
        "status": row["status"],
        "settings": row["settings"],
    }
    if row["description"] is not None:
        out["description"] = row["description"]
    return out


# Workflows --------------------------------------------------------------------------------------


def create_workflow(pool: Pool, owner: UUID, definition: WorkflowDefinition) -> tuple[dict[str, Any], str | None]:
    """Insert a workflow; returns its row and, for webhook triggers, the new clear secret."""
    secret = new_webhook_secret() if definition.trigger.type == "webhook" else None
    params = stored_form(definition) | {
        "owner": owner,
        "secret": hash_secret(secret) if secret else None,
    }
    with pool.connection() as conn:
        row = conn.execute(
            f"""
            INSERT INTO workflows (owner_id, name, description, trigger_type, trigger, steps, settings, status,
                                   webhook_secret_hash)
            VALUES (%(owner)s, %(name)s, %(description)s, %(trigger_type)s, %(trigger)s, %(steps)s, %(settings)s,
                    %(status)s, %(secret)s)
            RETURNING {_WORKFLOW_COLUMNS}
            """,
            params,
        ).fetchone()
    assert row is not None
    return row, secret


def get_workflow(pool: Pool, owner: UUID, workflow_id: UUID) -> dict[str, Any]:
    with pool.connection() as conn:
        row = conn.execute(
            f"SELECT {_WORKFLOW_COLUMNS} FROM workflows WHERE id = %s AND owner_id = %s AND deleted_at IS NULL",
            (workflow_id, owner),
        ).fetchone()
    if row is None:
        raise NotFoundError("no such workflow")
    return row


def list_workflows(
    pool: Pool,
    owner: UUID,
    *,
    limit: int,
    after: tuple[datetime, UUID] | None,
    status: str | None,
    trigger_type: str | None,
    name_contains: str | None = None,
) -> list[dict[str, Any]]:
    """Up to ``limit + 1`` workflows, newest first (the extra row tells there is a next page)."""
    with pool.connection() as conn:
        return conn.execute(
            f"""
            SELECT {_WORKFLOW_COLUMNS} FROM workflows
            WHERE owner_id = %(owner)s AND deleted_at IS NULL
              AND (%(status)s::text IS NULL OR status = %(status)s)
              AND (%(trigger)s::text IS NULL OR trigger_type = %(trigger)s)
              AND (%(name)s::text IS NULL OR strpos(lower(name), lower(%(name)s)) > 0)
              AND (%(at)s::timestamptz IS NULL OR (created_at, id) < (%(at)s, %(id)s::uuid))
            ORDER BY created_at DESC, id DESC LIMIT %(limit)s
            """,
            {
                "owner": owner,
                "status": status,
                "trigger": trigger_type,
                "name": name_contains,
                "at": after[0] if after else None,
                "id": after[1] if after else None,
                "limit": limit + 1,
            },
        ).fetchall()


def update_workflow(
    pool: Pool, owner: UUID, workflow_id: UUID, definition: WorkflowDefinition, *, expected_version: int | None
) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """Replace a definition and bump its version; returns (old row, new row, new clear secret).

    A workflow that becomes a webhook workflow gets a secret; one that stops being one loses it.
    """
    with pool.connection() as conn, conn.transaction():
        old = conn.execute(
            f"SELECT {_WORKFLOW_COLUMNS} FROM workflows "
            "WHERE id = %s AND owner_id = %s AND deleted_at IS NULL FOR UPDATE",
            (workflow_id, owner),
        ).fetchone()
        if old is None:
            raise NotFoundError("no such workflow")
        if expected_version is not None and old["version"] != expected_version:
            raise ConflictError(
                f"the workflow is at version {old['version']}, not {expected_version}; fetch it and try again"
            )
        secret = None
        keep = "webhook_secret_hash"
        if definition.trigger.type == "webhook" and not old["has_webhook"]:
            secret = new_webhook_secret()
            keep = "%(secret)s"
        elif definition.trigger.type != "webhook":
            keep = "NULL"
        row = conn.execute(
            f"""
            UPDATE workflows SET name = %(name)s, description = %(description)s, trigger_type = %(trigger_type)s,
                   trigger = %(trigger)s, steps = %(steps)s, settings = %(settings)s, status = %(status)s,
                   version = version + 1, updated_at = now(), webhook_secret_hash = {keep}
            WHERE id = %(id)s
            RETURNING {_WORKFLOW_COLUMNS}
            """,
            stored_form(definition) | {"id": workflow_id, "secret": hash_secret(secret) if secret else None},
        ).fetchone()
    assert row is not None
    return old, row, secret


def list_versions(
    pool: Pool, owner: UUID, workflow_id: UUID, *, limit: int, before: int | None
) -> list[dict[str, Any]]:
    """Up to ``limit + 1`` versions of a workflow, newest first (the caller checks the workflow is there)."""
    with pool.connection() as conn:
        return conn.execute(
            f"""
            SELECT {_VERSION_COLUMNS} FROM workflow_versions
            WHERE workflow_id = %(wf)s AND owner_id = %(owner)s
              AND (%(before)s::int IS NULL OR version < %(before)s)
            ORDER BY version DESC LIMIT %(limit)s
            """,
            {"wf": workflow_id, "owner": owner, "before": before, "limit": limit + 1},
        ).fetchall()


def get_version(pool: Pool, owner: UUID, workflow_id: UUID, version: int) -> dict[str, Any]:
    """One version of a live workflow of the owner."""
    with pool.connection() as conn:
        row = conn.execute(
            f"""
            SELECT {_VERSION_COLUMNS} FROM workflow_versions
            WHERE workflow_id = %(wf)s AND owner_id = %(owner)s AND version = %(version)s
              AND EXISTS (SELECT 1 FROM workflows WHERE id = %(wf)s AND deleted_at IS NULL)
            """,
            {"wf": workflow_id, "owner": owner, "version": version},
        ).fetchone()
    if row is None:
        raise NotFoundError("no such workflow version")
    return row


def delete_workflow(pool: Pool, owner: UUID, workflow_id: UUID) -> dict[str, Any]:
    """Soft-delete a workflow (its runs stay readable) and cancel its unfinished runs."""
    with pool.connection() as conn, conn.transaction():
        row = conn.execute(
            "UPDATE workflows SET deleted_at = now(), updated_at = now(), webhook_secret_hash = NULL "
            "WHERE id = %s AND owner_id = %s AND deleted_at IS NULL RETURNING id, trigger_type",
            (workflow_id, owner),
        ).fetchone()
        if row is None:
            raise NotFoundError("no such workflow")
        ended = runstate.ended_by_cancel(conn.execute(runstate.CANCEL_WORKFLOW_RUNS, {"wf": workflow_id}).fetchall())
    report_cancelled(ended)
    return row


def rotate_webhook(pool: Pool, owner: UUID, workflow_id: UUID) -> tuple[dict[str, Any], str]:
    secret = new_webhook_secret()
    with pool.connection() as conn:
        row = conn.execute(
            f"UPDATE workflows SET webhook_secret_hash = %s, updated_at = now() "
            "WHERE id = %s AND owner_id = %s AND deleted_at IS NULL AND trigger_type = 'webhook' "
            f"RETURNING {_WORKFLOW_COLUMNS}",
            (hash_secret(secret), workflow_id, owner),
        ).fetchone()
    if row is None:
        get_workflow(pool, owner, workflow_id)  # raises when it is not there at all
        raise ConflictError("the workflow has no webhook trigger")
    return row, secret


def webhook_hash(secret: str) -> bytes:
    """The stored hash of a webhook secret, or NotFoundError for what cannot be one."""
    if not secret.startswith(WEBHOOK_PREFIX) or len(secret) > 200:
        raise NotFoundError("no such webhook")
    return hash_secret(secret)


def webhook_target(pool: Pool, digest: bytes) -> tuple[UUID, UUID]:
    """(workflow id, owner id) of a webhook secret's hash, or NotFoundError."""
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT id, owner_id FROM workflows WHERE webhook_secret_hash = %s AND deleted_at IS NULL", (digest,)
        ).fetchone()
    if row is None:
        raise NotFoundError("no such webhook")
    return row["id"], row["owner_id"]


# Runs -------------------------------------------------------------------------------------------


def get_run(pool: Pool, owner: UUID, run_id: UUID, *, with_definition: bool = False) -> dict[str, Any]:
    with pool.connection() as conn:
        run = conn.execute(
            f"SELECT {_RUN_COLUMNS}, trigger_data, updated_at, traceparent FROM runs WHERE id = %s AND owner_id = %s",
            (run_id, owner),
        ).fetchone()
        if run is None:
            raise NotFoundError("no such run")
        run["trace_id"] = trace_id_of(run.pop("traceparent"))
        if with_definition:
            # The version the run executes: it outlives an edit and the workflow's deletion.
            run["definition"] = conn.execute(
                f"SELECT {_VERSION_COLUMNS} FROM workflow_versions WHERE workflow_id = %s AND version = %s",
                (run["workflow_id"], run["workflow_version"]),
            ).fetchone()
        run["steps"] = conn.execute(
            "SELECT step_id, position, status, attempt, output, error, started_at, finished_at "
            "FROM run_steps WHERE run_id = %s ORDER BY position, started_at",
            (run_id,),
        ).fetchall()
        run["attempts"] = conn.execute(runstate.ATTEMPTS, {"run": run_id}).fetchall()
    return run


def _newest_per_status(select: str, where: str, status: str | None, limit: str) -> str:
    """``select`` ... ``WHERE where``, newest first, as one index read per run status.

    The run indexes that order by time lead with the status after the owner (or the workflow):
    a query for one status reads its index in order; for every status, one branch per status is
    merged by the outer ORDER BY, each reading at most ``limit`` entries. Status literals come
    from the enum, never from the request, so that each branch matches its index.
    """
    statuses = [RunStatus(status)] if status is not None else list(RunStatus)
    page = f"ORDER BY queued_at DESC, id DESC LIMIT {limit}"
    branches = [f"{select} WHERE {where} AND status = '{s.value}' {page}" for s in statuses]
    return branches[0] if len(branches) == 1 else " UNION ALL ".join(f"({b})" for b in branches) + f" {page}"


def list_runs(
    pool: Pool,
    owner: UUID,
    *,
    limit: int,
    after: tuple[datetime, UUID] | None,
    workflow_id: UUID | None,
    status: str | None,
    since: datetime | None,
    until: datetime | None,
    trigger_type: str | None = None,
) -> list[dict[str, Any]]:
    """Up to ``limit + 1`` runs, newest first.

    The listing indexes lead with the owner (or the workflow, or the owner and the trigger) and
    the status (migrations 0014, 0015): a list of one status reads that status's runs in order,
    and a list of every status merges one such read per status (:func:`_newest_per_status`).
    Either way it reads about a page of index entries per status, however many runs the filters
    pass over.
    """
    where = ["owner_id = %(owner)s"]
    if workflow_id is not None:
        where.append("workflow_id = %(wf)s")
    if trigger_type is not None:
        where.append("trigger_type = %(trigger)s::run_trigger")
    if since is not None:
        where.append("queued_at >= %(since)s")
    if until is not None:
        where.append("queued_at < %(until)s")
    if after is not None:
        where.append("(queued_at, id) < (%(at)s, %(id)s::uuid)")
    query = _newest_per_status(f"SELECT {_RUN_COLUMNS} FROM runs", " AND ".join(where), status, "%(limit)s")
    with pool.connection() as conn:
        return conn.execute(
            query,
            {
                "owner": owner,
                "wf": workflow_id,
                "trigger": trigger_type,
                "since": since,
                "until": until,
                "at": after[0] if after else None,
                "id": after[1] if after else None,
                "limit": limit + 1,
            },
        ).fetchall()


def last_runs(pool: Pool, owner: UUID, workflow_ids: list[UUID]) -> dict[UUID, dict[str, Any]]:
    """The newest run of each of these workflows (one index probe per status each), by workflow id."""
    if not workflow_ids:
        return {}
    with pool.connection() as conn:
        rows = conn.execute(
            """
            SELECT w.id AS workflow_id, r.id, r.status, r.queued_at, r.finished_at
            FROM unnest(%(ids)s::uuid[]) AS w(id)
            CROSS JOIN LATERAL ({newest}) r
            """.format(
                newest=_newest_per_status(
                    "SELECT id, status, queued_at, finished_at FROM runs",
                    "workflow_id = w.id AND owner_id = %(owner)s",
                    None,
                    "1",
                )
            ),
            {"ids": workflow_ids, "owner": owner},
        ).fetchall()
    return {row["workflow_id"]: row for row in rows}


def retry_run(pool: Pool, broker: dramatiq.Broker, settings: Settings, owner: UUID, run_id: UUID) -> str:
    """Queue a failed run again for a new series of attempts; completed steps are not repeated.

    Attempt numbers keep counting (the earlier attempts stay on record); the run gets as many new
    attempts as its version of the workflow allows, and runs that same version again (its
    checkpoints belong to it).
    """
    with pool.connection() as conn, conn.transaction():
        runstate.retry(
            conn, run_id, owner, max_attempts=settings.max_attempts, aging_step=settings.priority_aging_seconds
        )
    wake(broker, str(run_id))
    return "queued"
