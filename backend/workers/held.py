"""What a worker holds while it works: shared by the processor that takes messages, the
housekeeping thread that extends leases, and the runtime that gives them back on abandon."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from backend.db import ledger
from backend.db import queries as q
from backend.errors import describe
from backend.events import Event
from backend.logs import log_event


@dataclass
class Counters:
    """Jobs completed and attempts failed by this process (read by the heartbeat)."""

    processed: int = 0
    failed: int = 0


@dataclass
class HeldJobs:
    """Every message taken and not settled (given back at once when the worker abandons
    them), and the external job in hand, whose message and claim leases the housekeeping
    thread extends."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    taken: set[int] = field(default_factory=set)
    in_hand: tuple[int, str] | None = None

    def leased(self) -> tuple[list[int], list[str]]:
        """The message ids and keys whose leases are extended while their handler runs."""
        with self.lock:
            return ([self.in_hand[0]], [self.in_hand[1]]) if self.in_hand else ([], [])

    def snapshot(self) -> tuple[list[int], list[str]]:
        """Every message taken and not settled, and the key of the job in hand."""
        with self.lock:
            return sorted(self.taken), [self.in_hand[1]] if self.in_hand else []

    def take(self, msg_ids: Sequence[int]) -> None:
        with self.lock:
            self.taken.update(msg_ids)

    def hold(self, msg_id: int, key: str) -> None:
        with self.lock:
            self.in_hand = (msg_id, key)

    def put_down(self) -> None:
        with self.lock:
            self.in_hand = None

    def clear(self) -> None:
        with self.lock:
            self.taken.clear()
            self.in_hand = None


def give_back(held: HeldJobs, pool: ConnectionPool[Any], *, queue: str, worker_id: str) -> None:
    """Give back what abandoned work held, so other workers need not wait out the leases;
    bounded, since the abandoned transaction may still lock some of it."""
    msg_ids, keys = held.snapshot()
    if not (msg_ids or keys):
        return
    try:
        with pool.connection(timeout=1) as conn, conn.transaction():
            q.bound_transaction(conn, 1000)
            q.set_visibility(conn, queue, msg_ids, [0] * len(msg_ids))
            ledger.release_claims(conn, queue, worker_id, keys)
    except psycopg.Error as exc:
        log_event(
            Event.RELEASE_FAILED,
            {
                "worker_id": worker_id,
                "messages": len(msg_ids),
                "claims": len(keys),
                "error": describe(exc),
                "error_type": type(exc).__name__,
                "consequence": "they return when their leases end",
            },
            logging.WARNING,
        )
