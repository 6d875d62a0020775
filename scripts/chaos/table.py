"""The terminal table of a chaos report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _span(span: Sequence[float] | None) -> str:
    return f", enqueued at {span[0]:.1f} s, done at {span[1]:.1f} s" if span else ""


def _mark(ok: bool) -> str:
    return "ok" if ok else "FAIL"


def render(report: Mapping[str, Any]) -> str:
    """The report as a table for the terminal."""
    k, p, j, e = report["kills"], report["processes"], report["jobs"], report["effects"]
    stall = report["stalls"]
    letters, drain, restart = report["dead_letters"], report["drain"], report["db_restart"]
    exits = "; ".join(
        f"{cause}: " + ", ".join(f"{code} x{n}" for code, n in sorted(codes.items()))
        for cause, codes in sorted(p["exit_codes"].items())
    )
    rows: list[tuple[str, str, str]] = [
        ("seed", str(report["seed"]), ""),
        (
            "kills",
            f"{k['total']} (SIGTERM {k['SIGTERM']}, SIGKILL {k['SIGKILL']}, not fired {k['skipped']};"
            f" {k['inside_external_handler']} inside an outbox handler;"
            f" {k.get('claims_rescued', 0)} claims of killed workers given back at once)",
            _mark(k["SIGTERM"] > 0 and k["SIGKILL"] > 0),
        ),
        ("freezes", f"{report['freezes']['count']} (SIGSTOP longer than the visibility timeout)", ""),
        (
            "killer jobs",
            f"{report['killer_jobs']['count']} jobs that end their worker:"
            f" {report['killer_jobs']['worker_exits']} worker exits",
            "",
        ),
        _hung_row(report["hung_jobs"]),
        (
            "longest stall",
            f"{_seconds(stall['longest_s'])} ({stall['longest_key']}{_span(stall.get('longest_span_s'))};"
            f" p99 {_seconds(stall['p99_s'])}, limit {stall['limit_s']:g} s)",
            _mark(not stall["over_limit"]),
        ),
        ("stall limits", _limits(stall), _mark(not stall["over_limit"])),
        (
            "processes",
            f"{p['started']} started, {p['problem_count']} problem(s)",
            _mark(not p["problem_count"]),
        ),
        ("exit codes", exits, ""),
        (
            "SIGKILL'd heartbeats dead",
            f"{p['recognised_dead']} of {p['sigkilled']}"
            f" ({p['sigkilled_without_heartbeat_row']} never wrote one)",
            _mark(p["recognised_dead"] == p["sigkilled"]),
        ),
        (
            "jobs",
            f"{j['completed']} of {j['expected']} completed ({j['messages_enqueued']} messages, "
            f"{j['copies']} copies, {j['slow']} slow, {j['flaky']} refused once)",
            _mark(j["completed"] == j["expected"]),
        ),
        (
            "effects",
            f"{e['score_rows']} scores, {e['recommendations']} recommendations, "
            f"{e['notifications_enqueued']} notifications enqueued",
            "",
        ),
        (
            "receiver",
            f"{e['receiver_accepted_keys']} keys accepted in {e['receiver_calls']} calls"
            f" ({e['receiver_redelivered_keys']} keys called again,"
            f" {e['receiver_refused_calls']} refused, {e['receiver_callers_gone']} callers killed"
            " while waiting)",
            _mark(not e["receiver_unexpected_keys"]),
        ),
        ("duplicates", str(report["duplicates"]["count"]), _mark(not report["duplicates"]["count"])),
        ("lost", str(report["lost"]["count"]), _mark(not report["lost"]["count"])),
        (
            "dead letters",
            f"{letters['total']} ({letters['matched']} of {letters['poison']} poison, "
            f"{letters['unexpected_count']} unexpected: "
            + ", ".join(f"{kind} x{n}" for kind, n in sorted(letters.get("by_type", {}).items()))
            + ")",
            _mark(letters["matched"] == letters["poison"] == letters["total"]),
        ),
        ("stuck claims", str(report["stuck_claims"]["count"]), _mark(not report["stuck_claims"]["count"])),
        (
            "worst drain (SIGTERM to exit)",
            f"{_seconds(drain['worst_s'])} (median {_seconds(drain['median_s'])}, {drain['count']} drains)",
            "",
        ),
        ("queues drained after chaos", f"{drain['wait_after_chaos_s']:g} s", _mark(drain["queues_drained"])),
    ]
    if restart:
        rows.append(
            (
                "database restart",
                f"{restart['mode']} at {restart['at_s']:g} s, down {restart['down_s']:g} s; first job"
                f" completed {_seconds(restart.get('recovery_s'))} after the start",
                _mark(restart.get("recovery_s") is not None and not restart.get("error")),
            )
        )
    rows.append(("result", "PASS" if report["passed"] else "FAIL: " + "; ".join(report["violations"]), ""))
    width = max(len(r[0]) for r in rows)
    lines = [f"  {label:<{width}}  {mark:<4}  {value}" for label, value, mark in rows]
    for section in ("duplicates", "lost"):
        lines += [f"    {section}: {x['key']}: {', '.join(x['why'])}" for x in report[section]["examples"]]
    lines += [f"    process: {x['process']}: {x['problem']}" for x in report["processes"]["problems"]]
    lines += [f"    dead letter: {x['queue']} {x['key']}: {x['error']}" for x in letters["unexpected"]]
    lines += [f"    hung job: {x}" for x in report["hung_jobs"]["problems"]]
    return "\n".join(lines)


def _hung_row(hung: Mapping[str, Any]) -> tuple[str, str, str]:
    ways = ", ".join(f"{n} {how}" for how, n in hung["by_way"].items())
    letters = ", ".join(f"{kind} x{n}" for kind, n in sorted(hung["dead_letters"].items())) or "none"
    timed = hung["timed_out"]
    return (
        "hung jobs",
        f"{hung['count']} handlers that never return ({ways}): {hung['runs']} runs,"
        f" {timed['interrupted']} interrupted, {timed['not_interrupted']} not (each a worker exit:"
        f" {hung['worker_exits']}); dead letters {letters}; {hung['receiver_calls']} receiver calls;"
        f" {timed.get('dragonfly_workers', 0)} deadlines reached on the Dragonfly workers",
        _mark(not hung["problems"]),
    )


def _limits(stall: Mapping[str, Any]) -> str:
    """The limits (the visibility timeout + 10 s, and the deadline besides where jobs hang),
    the longest stall under each, and how many jobs went over."""
    parts = []
    for label, limit, longest in (
        ("", f"{stall['base_limit_s']:g} s", stall.get("elsewhere")),
        (
            " where jobs hang",
            " and ".join(f"{s:g} s on {q}" for q, s in sorted(stall["limits_s"].items())),
            stall.get("beside_hung"),
        ),
    ):
        if longest:
            parts.append(f"{limit}{label} (longest {_seconds(longest['stall_s'])}, {longest['key']})")
    return "; ".join(parts) + f"; {stall['over_limit']} over"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"
