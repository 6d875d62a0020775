"""Claiming keys in the ledger: the claim itself (``ledger.claim``, one statement, each key
under a try-lock), and what becomes of a message whose key was not claimed
(``classify_unclaimed``, a pure function of the key's ledger state).

Which ``Claimer`` a worker uses is decided at boot: ``SharedKeysClaimer`` only on a schema
before migration 0007, where a key is still unique across queues.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import psycopg

from backend.db import ledger
from backend.db.ledger import DeadLetter, LedgerStatus
from backend.jobs import job_from_envelope
from backend.workers.records import Claims, Outcome, Pending

Conn = psycopg.Connection[Any]
# key -> (its ledger status, seconds left on its lease); a key missing is held by another
# worker's open transaction, which is claiming or running it (``ledger.ledger_status``).
LedgerStates = Mapping[str, tuple[LedgerStatus, float]]

DEAD_KEY_ERROR = "idempotency key already dead-lettered; replay that dead letter"


@dataclass
class Unclaimed:
    """What becomes of the messages whose key was not claimed."""

    completed: list[Pending] = field(default_factory=list)  # deleted without running
    letters: list[DeadLetter] = field(default_factory=list)  # dead again (``DeadKey``)
    expired: list[Pending] = field(default_factory=list)  # run alone, counted
    waits: dict[int, int] = field(default_factory=dict)  # msg id -> seconds its message waits


def classify_unclaimed(unclaimed: Sequence[Pending], states: LedgerStates, *, run_expired: bool) -> Unclaimed:
    """Sort the messages whose key was not claimed by the key's state: ``completed``, deleted
    unrun; ``dead``, dead-lettered again until its letter is replayed; ``processing`` with
    an expired lease and ``run_expired`` (a batch's claim: a run alone that ended with its
    worker gone), run alone again, counted, never merely delayed; anything else (a live
    lease, a backoff, another worker's open transaction) waits until the lease or backoff
    ends, at least a second."""
    out = Unclaimed()
    for p in unclaimed:
        state, lease_left = states.get(p.key, (None, 0.0))
        if state == LedgerStatus.COMPLETED:
            out.completed.append(p)
        elif state == LedgerStatus.DEAD:
            out.letters.append(
                DeadLetter(
                    msg_id=p.msg_id, job_key=p.key, error=DEAD_KEY_ERROR, error_type="DeadKey", attempts=0
                )
            )
        elif state == LedgerStatus.PROCESSING and lease_left <= 0 and run_expired:
            out.expired.append(p)
        else:
            out.waits[p.msg_id] = max(1, int(lease_left) + 1)
    return out


class Claimer:
    """Claims a queue's keys for this worker, keys being unique within their queue."""

    def __init__(self, *, queue: str, worker_id: str, lease_s: int) -> None:
        self.queue = queue
        self.worker_id = worker_id
        self.lease_s = lease_s

    def claim(
        self,
        conn: Conn,
        pending: Sequence[Pending],
        out: Outcome,
        *,
        status: LedgerStatus,
        expired: list[Pending] | None = None,
        delete_claimed: bool = False,
    ) -> Claims:
        """Claim the pending envelopes' keys (``delete_claimed``: their messages deleted with
        the claim, ``ledger.claim``). A message whose key is already dead goes to
        ``out.letters``; given an ``expired`` list (a batch's claim), a ``processing`` claim
        whose lease expired goes there, to run alone."""
        pending, attempts = self._claim_keys(conn, pending, out, status=status, delete_claimed=delete_claimed)
        result = Claims(
            jobs=[
                job_from_envelope(p.envelope, msg_id=p.msg_id, queue_name=self.queue, attempt=attempts[p.key])
                for p in pending
                if p.key in attempts
            ]
        )
        others = [p for p in pending if p.key not in attempts]
        if others:
            states = ledger.ledger_status(conn, self.queue, [p.key for p in others])
            sorted_out = classify_unclaimed(others, states, run_expired=expired is not None)
            result.completed = sorted_out.completed
            result.waits = sorted_out.waits
            out.letters.extend(sorted_out.letters)
            if expired is not None:
                expired.extend(sorted_out.expired)
        return result

    def _claim_keys(
        self,
        conn: Conn,
        pending: Sequence[Pending],
        out: Outcome,
        *,
        status: LedgerStatus,
        delete_claimed: bool,
    ) -> tuple[Sequence[Pending], dict[str, int]]:
        """The pending still to be claimed, and key -> attempt of those claimed."""
        return pending, self._ledger_claim(conn, pending, status=status, delete_claimed=delete_claimed)

    def _ledger_claim(
        self, conn: Conn, pending: Sequence[Pending], *, status: LedgerStatus, delete_claimed: bool
    ) -> dict[str, int]:
        return ledger.claim(
            conn,
            queue=self.queue,
            worker_id=self.worker_id,
            status=status,
            keys=[p.key for p in pending],
            msg_ids=[p.msg_id for p in pending],
            lease_s=self.lease_s,
            delete_claimed=delete_claimed,
        )


class SharedKeysClaimer(Claimer):
    """Claims on a schema before migration 0007, where a key is unique across queues: a key
    another queue holds would make the claim fail, so its message is dead-lettered
    (replayable once 0007 is applied) and the rest of the batch goes on. Once 0007 is seen
    applied, it claims as ``Claimer`` does."""

    def __init__(self, **common: Any) -> None:
        super().__init__(**common)
        self._shared = True

    def _claim_keys(
        self,
        conn: Conn,
        pending: Sequence[Pending],
        out: Outcome,
        *,
        status: LedgerStatus,
        delete_claimed: bool,
    ) -> tuple[Sequence[Pending], dict[str, int]]:
        while True:
            if self._shared:
                pending = self._refuse_shared_keys(conn, pending, out)
            try:
                with conn.transaction() if self._shared else nullcontext():
                    return pending, self._ledger_claim(
                        conn, pending, status=status, delete_claimed=delete_claimed
                    )
            except psycopg.errors.UniqueViolation:
                if not self._shared:
                    raise
                # Another queue claimed one of the keys since they were looked up: its
                # savepoint rolled back, the next look refuses it.

    def _refuse_shared_keys(self, conn: Conn, pending: Sequence[Pending], out: Outcome) -> list[Pending]:
        taken = ledger.keys_on_other_queues(conn, self.queue, [p.key for p in pending])
        if not taken:
            return list(pending)
        if ledger.keys_are_per_queue(conn):  # 0007 was applied since this worker booted
            self._shared = False
            return list(pending)
        for p in pending:
            other = taken.get(p.key)
            if other:
                out.letters.append(
                    DeadLetter(
                        msg_id=p.msg_id,
                        job_key=p.key,
                        error=f"the key is in use on {other}, and keys are unique across queues until"
                        " migration 0007 is applied: run python -m backend.db.migrate once no worker"
                        " older than schema 6 runs, then replay this letter",
                        error_type="KeyInUseOnAnotherQueue",
                        attempts=0,
                    )
                )
        return [p for p in pending if p.key not in taken]
