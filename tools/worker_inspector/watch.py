"""``watch``: the inspector's report, refreshed every few seconds, like ``top``.

At a terminal it draws with curses (the standard library's terminal library): the verdict,
the queues, the workers, dead letters and stuck claims, with the reasons; ``q`` or Ctrl-C
quits (exit 0). Through a pipe it prints the plain text report again at each refresh.
Read-only, one short snapshot per refresh, so it works through the transaction pooler.
"""

from __future__ import annotations

import curses
import sys
import time
from collections.abc import Callable

from tools.worker_inspector.model import Report, duration
from tools.worker_inspector.render import job_cells, render_report

Build = Callable[[], Report]


def watch(build: Build, interval_s: float) -> int:
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return _plain(build, interval_s)
    return curses.wrapper(_screen, build, interval_s)


def _plain(build: Build, interval_s: float) -> int:
    try:
        while True:
            print(render_report(build()), flush=True)
            print(flush=True)
            time.sleep(interval_s)
    except KeyboardInterrupt:
        return 0


def _screen(stdscr: curses.window, build: Build, interval_s: float) -> int:
    curses.curs_set(0)
    stdscr.timeout(100)  # getch waits this long: keys are read while waiting to refresh
    next_at = 0.0
    while True:
        if time.monotonic() >= next_at:
            _draw(stdscr, build(), interval_s)
            next_at = time.monotonic() + interval_s
        try:
            key = stdscr.getch()
        except KeyboardInterrupt:
            return 0
        if key in (ord("q"), ord("Q"), 27):
            return 0


def _draw(stdscr: curses.window, report: Report, interval_s: float) -> None:
    height, width = stdscr.getmaxyx()
    lines = screen_lines(report, interval_s)
    stdscr.erase()
    for y, line in enumerate(lines[: height - 1]):
        stdscr.addnstr(y, 0, line, max(0, width - 1))
    stdscr.refresh()


def screen_lines(report: Report, interval_s: float) -> list[str]:
    """What one screen shows, as text lines (also what a test reads)."""
    now = report.generated_at.strftime("%H:%M:%S")
    lines = [
        f"worker inspector watch  {report.verdict.upper()}  {now}Z  every {duration(interval_s)}  (q quits)",
        "",
        f"{'QUEUE':<22}{'DEPTH':>8}{'VISIBLE':>9}{'IN FLIGHT':>11}{'DELAYED':>9}{'OLDEST':>9}{'DEAD':>6}"
        f"{'WORKERS':>9}",
    ]
    for q in report.queues:
        lines.append(
            f"{q.queue_name:<22}{q.depth:>8}{q.visible:>9}{q.in_flight:>11}{q.delayed:>9}"
            f"{duration(q.oldest_age_s) if q.oldest_age_s is not None else '-':>9}"
            f"{q.dead_letters:>6}{q.workers_alive:>9}"
        )
    lines += [
        "",
        f"{'WORKER':<40}{'STATE':<10}{'VERDICT':<9}{'JOBS':>8}{'FAILED':>8}{'RSS MB':>8}{'BEAT':>7}"
        f"{'JOB AGE':>9}  JOB",
    ]
    for w in report.workers:
        key, age = job_cells(w.job)
        lines.append(
            f"{w.worker_id[:39]:<40}{w.status:<10}{w.verdict:<9}{w.jobs_processed:>8}{w.jobs_failed:>8}"
            f"{w.rss_mb if w.rss_mb is not None else '-':>8}{duration(w.heartbeat_age_s):>7}"
            f"{age or '-':>9}  {key or '-'}"
        )
    lines += [
        "",
        f"stuck claims: {report.stuck_total}   dead letters: {sum(g.count for g in report.dead_letters)}",
    ]
    for finding in report.reasons:
        lines.append(f"! {finding.message}")
    for finding in report.warnings:
        lines.append(f"  {finding.message}")
    return lines
