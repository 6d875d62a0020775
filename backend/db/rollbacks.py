"""Which releases a schema still allows.

Each migration is an expand step (every older release keeps working) or a contract step
(``-- migrate: after every live worker runs schema N``: code older than schema N breaks on
it). When a contract step is applied, ``workers.schema_migrations.requires_schema``
(migration 0009) records that N; a release whose schema is below it refuses to boot, in
one line, before it touches a message. After a contract step the way back is forward: a
release of schema N or later.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row, tuple_row

from backend.errors import BootError

_HAS_COLUMN = (
    "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('workers.schema_migrations')"
    " AND attname = 'requires_schema' AND NOT attisdropped)"
)


class ReleaseTooOld(BootError):
    """The database has a contract step applied that this code predates."""


@dataclass(frozen=True, kw_only=True)
class ContractStep:
    """An applied migration that breaks code older than ``requires_schema``."""

    version: int
    name: str
    requires_schema: int


def records_requirements(conn: psycopg.Connection[Any]) -> bool:
    """Whether the schema records what each contract step requires (0009 applied)."""
    row = conn.cursor(row_factory=tuple_row).execute(_HAS_COLUMN).fetchone()
    return bool(row and row[0])


def predating_step(conn: psycopg.Connection[Any], schema: int) -> ContractStep | None:
    """The applied contract step that requires the newest code, if code of ``schema`` is
    older than what it requires."""
    if not records_requirements(conn):
        return None  # no schema_migrations yet, or a schema from before 0009: nothing known
    row = (
        conn.cursor(row_factory=dict_row)
        .execute(
            "SELECT version, name, requires_schema FROM workers.schema_migrations"
            " WHERE requires_schema > %s ORDER BY requires_schema DESC, version DESC LIMIT 1",
            (schema,),
        )
        .fetchone()
    )
    return None if row is None else ContractStep(**row)


def refuse_predating(conn: psycopg.Connection[Any], schema: int) -> None:
    """Raise ``ReleaseTooOld`` when code of ``schema`` predates an applied contract step."""
    step = predating_step(conn, schema)
    if step is not None:
        raise ReleaseTooOld(
            f"this release (schema {schema}) predates contract step {step.version} ({step.name}),"
            f" applied to the database, which breaks code older than schema {step.requires_schema}:"
            f" roll forward: deploy a release of schema {step.requires_schema} or later"
            " (a rollback past a contract step is never safe)"
        )


def backfill_requirements(conn: psycopg.Connection[Any], requires: Mapping[int, int]) -> None:
    """Record, from their directives, what the contract steps applied before the schema
    could record it require (``requires``: version -> schema)."""
    if not requires or not records_requirements(conn):
        return
    conn.execute(
        "UPDATE workers.schema_migrations m SET requires_schema = r.schema"
        " FROM unnest(%s::int[], %s::int[]) AS r(version, schema)"
        " WHERE m.version = r.version AND m.requires_schema IS NULL",
        (list(requires), list(requires.values())),
    )
