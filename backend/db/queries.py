"""The runtime's statements on pgmq's messages, as thin named functions (the ledger's are in
``backend.db.ledger``, heartbeats and retention in ``backend.db.upkeep``).

pgmq is used through what 1.4.4 has (``send``, ``metrics``) and through its queue tables'
columns that every version has (``msg_id``, ``read_ct``, ``vt``, ``message``): messages are
taken with pgmq's ``read`` written as one statement against the queue table (with the size
check on the server), and deletions and visibility changes are one set-based statement
each. Timestamps come from ``clock_timestamp()``: the moment of the change, not the start
of a long transaction.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

# What boot asks of the server lives in its own module; its callers still find it here.
from backend.db.probes import notifications_available as notifications_available
from backend.db.probes import notify_channel as notify_channel
from backend.db.probes import queue_exists as queue_exists
from backend.db.probes import read_only as read_only
from backend.db.probes import session_named as session_named

Conn = psycopg.Connection[Any]


class Message(NamedTuple):
    """One delivery of a pgmq message: its body's JSON text, unless over the size limit
    (then only a prefix of it), the text's size in bytes, and whether an earlier delivery
    ended without an outcome (its worker died, froze or was cut off; or it failed and is
    retried): such a message runs alone, its attempt counted first.

    A named tuple, not a frozen dataclass: a hundred are built per batch, at a third of the
    cost."""

    msg_id: int
    text: str | None
    size: int
    delivered_before: bool
    trace: str | None = None  # from the message's pgmq headers (``_TRACE``), if any

    def too_large(self, max_bytes: int) -> bool:
        return self.size > max_bytes


# --- pgmq -------------------------------------------------------------------------------


def queue_identifier(queue: str) -> sql.Identifier:
    """``queue``'s pgmq table (pgmq lowercases queue names)."""
    return sql.Identifier("pgmq", "q_" + queue.lower())


def queue_table(queue: str) -> str:
    """The quoted name of ``queue``'s pgmq table as text (a ``regclass`` parameter, DDL)."""
    return queue_identifier(queue).as_string()


@functools.cache
def for_queue(statement: str, queue: str) -> str:
    """``statement`` with its ``{table}`` the queue's table (``sql.Identifier``), composed
    once per queue: the hot path sends a ready string."""
    return sql.SQL(statement).format(table=queue_identifier(queue)).as_string()


_BOUND = (
    "SELECT set_config('idle_in_transaction_session_timeout', %(ms)s, true),"
    " set_config('statement_timeout', %(ms)s, true)"
)
# How much of an oversized body is fetched, to name it in the dead letter.
PREFIX_CHARS = 200
# The body as text, once, and its size: the size is checked on the server, so an oversized
# body never reaches the worker. OFFSET 0 keeps the planner from inlining the subquery.
_BODY = f"CASE WHEN b.size <= %(max)s THEN b.text ELSE left(b.text, {PREFIX_CHARS}) END, coalesce(b.size, 0)"
_BODY_OF = sql.SQL("""LATERAL (SELECT x.text, octet_length(x.text) AS size
                 FROM (SELECT {row}.message::text AS text OFFSET 0) AS x) AS b""")
# pgmq 1.5+ keeps headers: a W3C ``traceparent`` (its trace-id field), else ``x-trace-id``,
# read in a column of its own; the worker fills an envelope's missing trace_id with it
# (``sorting``). Merged into the body here instead, the expression cost 1.1 µs a row (an
# eighth of the lock statement) even when every message had no headers.
_TRACE = sql.SQL(r"""coalesce(nullif(substring({row}.headers ->> 'traceparent'
                                  FROM '^[0-9a-f]{{2}}-([0-9a-f]{{32}})-[0-9a-f]{{16}}-[0-9a-f]{{2}}'),
                        '00000000000000000000000000000000'), {row}.headers ->> 'x-trace-id')""")


def detect_headers(conn: Conn, queue: str) -> bool:
    """Whether ``queue``'s table has pgmq's headers (1.5+): boot asks once, and the worker's
    reads (``lock_messages``, ``fetch_messages``) take them from then on."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s)"
        " AND attname = 'headers' AND NOT attisdropped) AS ok",
        (queue_table(queue),),
    ).fetchone()
    return bool(row and row["ok"])


def _body_and_trace(row: str, headers: bool) -> dict[str, sql.Composable]:
    """The lateral ``b`` (the body of alias ``row`` as text and its size) and the trace id
    from its headers, NULL when the table has none."""
    alias = sql.Identifier(row)
    trace = _TRACE.format(row=alias) if headers else sql.SQL("NULL::text")
    return {"body": _BODY_OF.format(row=alias), "trace": trace}


_LOCK_MESSAGES = sql.SQL(f"""
SELECT m.msg_id, {_BODY},
       -- a hashed subplan: the records' ids are read into one hash table per statement
       m.msg_id IN (SELECT unnest(msg_ids) FROM workers.deliveries WHERE queue_name = %(queue)s),
       {{trace}}
FROM ({_BOUND}) AS bound,
     (SELECT {{columns}} FROM {{table}} WHERE vt <= clock_timestamp()
      ORDER BY msg_id LIMIT %(qty)s FOR UPDATE SKIP LOCKED) AS m
CROSS JOIN {{body}}""")


@functools.cache
def _lock_sql(queue: str, headers: bool) -> str:
    columns = "msg_id, message, headers" if headers else "msg_id, message"
    return _LOCK_MESSAGES.format(
        columns=sql.SQL(columns), table=queue_identifier(queue), **_body_and_trace("m", headers)
    ).as_string()


def lock_messages(
    conn: Conn, queue: str, *, qty: int, max_bytes: int, limit_ms: int, headers: bool = False
) -> list[Message]:
    """Bound this transaction (``bound_transaction``, in the same statement: it is the first
    of a batch's transaction) and lock up to ``qty`` visible messages, oldest first.

    The same selection as ``pgmq.read`` without its update: the row locks are the lease
    (every reader skips locked rows), and they end with the transaction, at once when its
    worker dies, or when the server ends the transaction of a frozen one. A message found in
    ``workers.deliveries`` was in a batch whose worker never finished it. ``headers``: the
    table has pgmq's headers (``detect_headers``), and each message's trace id is read.
    """
    with conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(
            _lock_sql(queue, headers),
            {"qty": qty, "max": max_bytes, "queue": queue, "ms": str(limit_ms)},
        ).fetchall()
    rows.sort()  # oldest first, as locked; sorting here costs less than on the server
    return list(map(Message._make, rows))


# The commit of a delivery record need not wait for the disk: after a server crash the worst
# is a delivery uncounted, a message run in a batch as if for the first time. Local to the
# statement's own transaction, so it holds behind the transaction pooler too.
_NO_FLUSH = "no_flush AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true))"


# Sent through libpq's asynchronous calls by ``workers.deliveries.DeliveryLog`` (overlapping
# the batch's claim), with the ids as an array literal (``int_array``).
RECORD_DELIVERY = (
    f"WITH {_NO_FLUSH} INSERT INTO workers.deliveries (worker_id, queue_name, msg_ids)"
    " SELECT $1, $2, $3::bigint[] FROM no_flush ON CONFLICT (worker_id) DO UPDATE"
    " SET msg_ids = EXCLUDED.msg_ids, updated_at = clock_timestamp()"
).encode()
# A worker's record goes when its batch ended with an outcome it saw itself.
FORGET_DELIVERIES = b"DELETE FROM workers.deliveries WHERE worker_id = $1"


def int_array(values: Sequence[int]) -> str:
    """A bigint[] literal: for the ids of a batch, sent and parsed in less time than
    psycopg's adaptation of a list (about 20 us less per statement of 100 ids)."""
    return "{" + ",".join(map(str, values)) + "}"


# The bound of the housekeeping thread's transactions when none is given: a third of the
# default lease (``HousekeepingPlan.maintenance_limit_ms`` says why a third).
MAINTENANCE_LIMIT_MS = 10_000


_PRUNE_DELIVERIES = (
    "DELETE FROM workers.deliveries AS d WHERE queue_name = %(q)s AND NOT EXISTS"
    " (SELECT 1 FROM {table} AS m WHERE m.msg_id = ANY(d.msg_ids))"
)


def prune_deliveries(conn: Conn, queue: str, *, limit_ms: int = MAINTENANCE_LIMIT_MS) -> int:
    """Delete the delivery records of ``queue`` none of whose messages is left, in a
    transaction bounded by ``limit_ms`` (``execute_bounded``)."""
    return execute_bounded(
        conn, for_queue(_PRUNE_DELIVERIES, queue), {"q": queue}, limit_ms=limit_ms
    ).rowcount


_FETCH_MESSAGES = sql.SQL(f"""
WITH picked AS (
    SELECT msg_id FROM {{table}} WHERE {{which}}
    ORDER BY msg_id LIMIT %(qty)s FOR UPDATE SKIP LOCKED
), taken AS (
    UPDATE {{table}} AS q SET vt = clock_timestamp() + make_interval(secs => %(vt)s),
           read_ct = q.read_ct + 1
    FROM picked WHERE q.msg_id = picked.msg_id
    RETURNING q.msg_id, q.read_ct, q.message{{headers}}
)
SELECT t.msg_id, {_BODY}, t.read_ct, {{trace}}
FROM taken AS t CROSS JOIN {{body}}
ORDER BY t.msg_id""")


@functools.cache
def _fetch_sql(queue: str, by_id: bool, headers: bool) -> str:
    which = "msg_id = %(id)s AND vt <= clock_timestamp()" if by_id else "vt <= clock_timestamp()"
    return _FETCH_MESSAGES.format(
        table=queue_identifier(queue),
        which=sql.SQL(which),
        headers=sql.SQL(", q.headers" if headers else ""),
        **_body_and_trace("t", headers),
    ).as_string()


def fetch_messages(
    conn: Conn, queue: str, *, qty: int, vt_s: int, max_bytes: int, headers: bool = False
) -> list[Message]:
    """Take up to ``qty`` visible messages, oldest first, leased for ``vt_s`` and counted.

    One autocommit statement, pgmq's ``read`` written against the queue table: each message
    becomes invisible for ``vt_s`` (a lease that outlives the transaction and ends on its
    own) and its ``read_ct`` is incremented before any handler runs. ``headers`` as for
    ``lock_messages``.
    """
    with conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(
            _fetch_sql(queue, False, headers),
            {"qty": qty, "vt": vt_s, "max": max_bytes, "id": None},
        ).fetchall()
    return [Message(m, t, n, d > 1, trace) for m, t, n, d, trace in rows]


def take_message(conn: Conn, queue: str, msg_id: int, *, vt_s: int) -> bool:
    """Lease one message by id for ``vt_s``, as ``fetch_messages`` does; False when it is
    gone, invisible, or locked by another worker."""
    with conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(
            _fetch_sql(queue, True, False), {"qty": 1, "vt": vt_s, "max": 0, "id": msg_id}
        ).fetchall()
    return bool(rows)


_DELETE_MESSAGES = "DELETE FROM {table} WHERE msg_id = ANY(%s::bigint[])"


def delete_messages(conn: Conn, queue: str, msg_ids: Sequence[int]) -> None:
    if msg_ids:
        conn.execute(for_queue(_DELETE_MESSAGES, queue), (int_array(msg_ids),))


_SET_VISIBILITY = (
    "UPDATE {table} AS q SET vt = clock_timestamp() + make_interval(secs => t.d)"
    " FROM unnest(%b::bigint[], %b::int[]) AS t(m, d) WHERE q.msg_id = t.m"
)


def set_visibility(conn: Conn, queue: str, msg_ids: Sequence[int], delays_s: Sequence[int]) -> None:
    """Make each message visible again after its delay (0: at once)."""
    if msg_ids:
        conn.execute(for_queue(_SET_VISIBILITY, queue), (list(msg_ids), list(delays_s)))


_RELEASE_MESSAGES = (
    "UPDATE {table} SET vt = clock_timestamp(), read_ct = greatest(read_ct - 1, 0)"
    " WHERE msg_id = ANY(%b::bigint[])"
)


def release_messages(conn: Conn, queue: str, msg_ids: Sequence[int]) -> None:
    """Give back messages taken but never started (a drain): visible at once, and this
    delivery uncounted, so they are not mistaken for jobs that took their worker down."""
    if msg_ids:
        conn.execute(for_queue(_RELEASE_MESSAGES, queue), (list(msg_ids),))


def bound_transaction(conn: Conn, limit_ms: int) -> None:
    """Bound the open transaction by the lease: no statement, and no pause between
    statements, may last longer than ``limit_ms``. The server ends a frozen, hung or
    cut-off worker's transaction after that, releasing its locks; set per transaction, so it
    holds behind the transaction pooler too."""
    conn.execute(_BOUND, {"ms": str(limit_ms)})


def execute_bounded(
    conn: Conn, query: str, params: Mapping[str, Any], *, limit_ms: int
) -> psycopg.ClientCursor[Any]:
    """Run one statement in a transaction of its own, bounded as ``bound_transaction``
    bounds a batch's; the cursor is on its result. ``conn`` must be in autocommit mode.

    The bound and the statement go in one message (the parameters bound client-side, as
    the simple-query protocol wants): PostgreSQL runs them as one transaction and commits it
    without waiting for the client, so a worker frozen or cut off once it sent the message
    holds no lock after the statement ends; and a statement that waits on a lock, or runs
    long, is ended after ``limit_ms`` (the timeout applies to each statement of a message)."""
    cur = psycopg.ClientCursor(conn)
    cur.execute(f"{_BOUND};\n{query}", {**params, "ms": str(limit_ms)})
    cur.nextset()
    return cur


_SLOT = "to_timestamp(floor(extract(epoch FROM now()) / %(i)s) * %(i)s)"
# Counting stops here: the housekeeping thread also extends leases and writes heartbeats,
# so a count never scans more; past it, the planner's estimate of the table stands in.
_COUNT_CAP = 100_000
_DEPTH = """(SELECT CASE WHEN c.n > %(cap)s
                    THEN greatest(c.n, (SELECT reltuples::bigint FROM pg_class WHERE oid = %(t)s::regclass))
                    ELSE c.n END
             FROM (SELECT count(*) AS n FROM (SELECT 1 FROM {table} LIMIT %(cap)s + 1) AS m) AS c)"""
_SAMPLE = f"""
INSERT INTO workers.queue_samples (queue_name, sampled_at, depth, in_flight, oldest_age_s)
SELECT %(q)s, {_SLOT}, {_DEPTH},
       (SELECT count(*) FROM (SELECT 1 FROM {{table}} WHERE vt > now() AND read_ct > 0
                              LIMIT %(cap)s + 1) AS f),
       (SELECT extract(epoch FROM now() - enqueued_at)::float8 FROM {{table}} ORDER BY msg_id LIMIT 1)
-- One statement, and nothing scanned when a replica sampled this interval already.
WHERE NOT EXISTS (SELECT 1 FROM workers.queue_samples WHERE queue_name = %(q)s AND sampled_at = {_SLOT})
ON CONFLICT DO NOTHING
RETURNING 1 AS wrote
"""
_QUEUE_DEPTH = f"SELECT {_DEPTH} AS n"
_HAS_VISIBLE = "SELECT EXISTS (SELECT 1 FROM {table} WHERE vt <= clock_timestamp()) AS ok"


def sample_queue(conn: Conn, queue: str, interval_s: float, *, limit_ms: int = MAINTENANCE_LIMIT_MS) -> bool:
    """Record the queue's depth, in-flight messages and oldest age for the current interval
    unless a replica did already; True when this call wrote the sample. Counts stop at
    ``_COUNT_CAP``: a larger queue gets the planner's estimate of its depth. A transaction
    bounded by ``limit_ms`` (``execute_bounded``)."""
    table = queue_table(queue)
    params = {"q": queue, "i": interval_s, "t": table, "cap": _COUNT_CAP}
    row = execute_bounded(conn, for_queue(_SAMPLE, queue), params, limit_ms=limit_ms).fetchone()
    return row is not None


def queue_depth(conn: Conn, queue: str) -> int:
    """Messages in the queue, visible or not: exact up to ``_COUNT_CAP``, the planner's
    estimate above it (for progress lines, every few seconds while jobs flow)."""
    table = queue_table(queue)
    row = conn.execute(for_queue(_QUEUE_DEPTH, queue), {"t": table, "cap": _COUNT_CAP}).fetchone()
    return int(row["n"]) if row else 0


def has_visible(conn: Conn, queue: str) -> bool:
    """Whether a message of ``queue`` is visible now (one indexed lookup on ``vt``)."""
    row = conn.execute(for_queue(_HAS_VISIBLE, queue)).fetchone()
    return bool(row and row["ok"])
