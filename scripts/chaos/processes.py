"""The replicas' checks: every replica ended as its signal (or a job of its own) says it
must, and a SIGKILL'd one's heartbeat reads as dead."""

from __future__ import annotations

import signal
import statistics
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any

from scripts.chaos.audit import Conn
from scripts.chaos.effects import EXAMPLES

HEARTBEAT_S = 0.5
# The inspector's default verdict: stale after 2 heartbeat intervals, dead after 3 x stale.
DEAD_AFTER_S = 6 * HEARTBEAT_S


@dataclass(frozen=True, kw_only=True)
class ProcessRecord:
    """One replica's story: what it was sent, how it ended, what it logged."""

    kind: str
    slot: int
    pid: int
    worker_id: str | None
    booted: bool
    signal: str | None
    final: bool
    exit_code: int | None
    drain_s: float | None
    spawned_wall: float
    signalled_wall: float | None
    shutdown_logged: bool
    crash: str | None
    outages: int
    bad_lines: tuple[str, ...] = ()
    tail: tuple[str, ...] = ()  # its last output lines, to read when it has a problem
    job_exit: bool = False  # a chaos worker ended by one of its killer jobs (exit 137)
    timed_out_keys: tuple[str, ...] = ()  # its WORKER_CRASH's job_keys, when JobTimedOut

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.slot} pid {self.pid}"

    @property
    def hung_exit(self) -> bool:
        """Ended (exit 1) by a handler that did not give control back at its deadline."""
        return self.exit_code == 1 and bool(self.timed_out_keys)


def load_heartbeats(conn: Conn) -> list[dict[str, Any]]:
    return conn.execute(
        "SELECT worker_id, pid, status, extract(epoch FROM started_at)::float8 AS started,"
        " extract(epoch FROM last_heartbeat_at)::float8 AS beat FROM workers.heartbeats"
    ).fetchall()


def _heartbeat_of(record: ProcessRecord, heartbeats: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    for row in heartbeats:
        if record.worker_id and row["worker_id"] == record.worker_id:
            return row
    # Killed before its boot line: the row, if any, is the one of its pid started after its spawn.
    return next(
        (
            row
            for row in heartbeats
            if row["pid"] == record.pid and row["started"] >= record.spawned_wall - 1.0
        ),
        None,
    )


def _process_problems(
    record: ProcessRecord, heartbeats: Sequence[Mapping[str, Any]], now: float, hung: Set[str]
) -> list[str]:
    problems: list[str] = []
    if record.job_exit:
        pass  # one of its jobs ended it (exit 137), whatever it was sent: a drain runs them too
    elif record.hung_exit:
        # A handler blocked in C past its deadline ends its worker, exit 1, whatever it was
        # sent: right for a hung job (its call may be a batch that holds one), wrong for others.
        if not set(record.timed_out_keys) & hung:
            keys = list(record.timed_out_keys)
            problems.append(f"exited 1 at the deadline of jobs that do not hang: {keys}")
    elif record.signal == "SIGTERM":
        if record.exit_code not in (0, 143):
            problems.append(f"exited {record.exit_code} after SIGTERM (expected 0 or 143)")
        if not record.shutdown_logged:
            problems.append("no WORKER_SHUTDOWN line after SIGTERM")
    elif record.signal == "SIGKILL":
        problems += _sigkill_problems(record, heartbeats, now)
    else:
        problems.append(
            f"exited {record.exit_code} without being signalled"
            + (f": {record.crash}" if record.crash else "")
        )
    problems += [f"bad output line: {line}" for line in record.bad_lines]
    return problems


def _sigkill_problems(
    record: ProcessRecord, heartbeats: Sequence[Mapping[str, Any]], now: float
) -> list[str]:
    problems: list[str] = []
    if record.exit_code != -signal.SIGKILL:
        problems.append(f"exited {record.exit_code} though SIGKILL'd")
    row = _heartbeat_of(record, heartbeats)
    if row is not None:
        if row["status"] not in ("BOOTING", "RUNNING", "DRAINING"):
            problems.append(f"heartbeat row says {row['status']} though SIGKILL'd")
        if record.signalled_wall is not None and row["beat"] > record.signalled_wall + 1.0:
            late = row["beat"] - record.signalled_wall
            problems.append(f"heartbeat advanced {late:.1f} s after SIGKILL")
        if now - row["beat"] <= DEAD_AFTER_S:
            problems.append(f"heartbeat only {now - row['beat']:.1f} s old: not recognisable as dead")
    # No row at all (killed before its first write reached the database, during the
    # outage say) claims nothing: there is nothing to mistake for a live worker.
    return problems


def check_processes(
    records: Sequence[ProcessRecord],
    heartbeats: Sequence[Mapping[str, Any]],
    now: float,
    hung: Set[str] = frozenset(),
) -> dict[str, Any]:
    """Exit codes, shutdown lines and heartbeats of every replica, against what it was sent
    (or what its jobs did: a killer job's exit 137; a ``hung`` job's exit 1)."""
    found = {id(r): _process_problems(r, heartbeats, now, hung) for r in records}
    problems = [
        {"process": r.name, "worker_id": r.worker_id, "problem": p, "last_lines": list(r.tail)}
        for r in records
        for p in found[id(r)]
    ]
    exits: dict[str, Counter[str]] = defaultdict(Counter)
    for r in records:
        cause = (
            "killer job"
            if r.job_exit
            else "hung job"
            if r.hung_exit
            else "final SIGTERM"
            if r.final
            else f"after {r.signal}"
            if r.signal
            else "unsignalled"
        )
        exits[cause][str(r.exit_code)] += 1
    drains = [r.drain_s for r in records if r.signal == "SIGTERM" and r.drain_s is not None]
    killed = [r for r in records if r.signal == "SIGKILL"]
    dead = sum(1 for r in killed if not any("heartbeat" in p for p in found[id(r)]))
    rowless = sum(1 for r in killed if _heartbeat_of(r, heartbeats) is None)
    return {
        "started": len(records),
        "exit_codes": {k: dict(v) for k, v in exits.items()},
        "job_exits": sum(1 for r in records if r.job_exit),
        "hung_exits": sum(1 for r in records if r.hung_exit and set(r.timed_out_keys) & hung),
        "sigkilled": len(killed),
        "recognised_dead": dead,
        "sigkilled_without_heartbeat_row": rowless,
        "outage_logs": sum(r.outages for r in records),
        "drain": {
            "count": len(drains),
            "worst_s": max(drains, default=None),
            "median_s": statistics.median(drains) if drains else None,
        },
        "problems": problems[:EXAMPLES],
        "problem_count": len(problems),
    }


def recovery_s(conn: Conn, started_wall: float | None) -> float | None:
    """Seconds from PostgreSQL's start to the first job completed after it."""
    if started_wall is None:
        return None
    row = conn.execute(
        "SELECT extract(epoch FROM min(at))::float8 AS first FROM chaos.effects"
        " WHERE kind = 'completed' AND at > to_timestamp(%s)",
        (started_wall,),
    ).fetchone()
    return round(row["first"] - started_wall, 3) if row and row["first"] else None
