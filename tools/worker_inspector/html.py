"""The HTML report: one self-contained file (inline SVG and CSS, no script, no network),
charts of the window's history and the inspector's current verdict and tables."""

from __future__ import annotations

import html
from datetime import UTC, datetime
from typing import Any

from tools.worker_inspector.history import History, Point
from tools.worker_inspector.model import Report, duration
from tools.worker_inspector.render import render_report

W, H, PAD_L, PAD_R, PAD_T, PAD_B = 960, 220, 64, 150, 28, 34
COLOURS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563")
STATUS_COLOURS = {
    "RUNNING": "#16a34a",
    "BOOTING": "#16a34a",
    "DRAINING": "#ca8a04",
    "STOPPED": "#64748b",
    "CRASHED": "#dc2626",
    "killed": "#7f1d1d",
}

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #111827; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 28px 0 6px; }
.verdict { display: inline-block; padding: 2px 10px; border-radius: 4px; color: #fff; font-weight: 600; }
.healthy { background: #16a34a; } .unhealthy { background: #dc2626; }
.meta { color: #4b5563; } svg { background: #fafafa; border: 1px solid #e5e7eb; }
svg text { font: 11px system-ui, sans-serif; fill: #374151; } .empty { fill: #9ca3af; }
pre { background: #f3f4f6; padding: 12px; overflow-x: auto; font-size: 12px; }
"""


def render_html(report: Report, history: History) -> str:
    """The whole document."""
    generated = report.generated_at.strftime("%Y-%m-%d %H:%M:%SZ")
    start, end = shown_window(history)
    charts = [
        ("Jobs completed per bucket", "jobs", history.completed),
        ("Keys failing or dead-lettered, by their last attempt", "keys", history.failing),
        ("Queue depth", "messages", history.depth),
        ("Age of the oldest message", "seconds", history.oldest_age),
        ("Dead letters per bucket", "letters", history.dead_letters),
    ]
    body = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Dragonfly workers: {html.escape(report.verdict)} at {generated}</title>",
        f"<style>{_CSS}</style></head><body>",
        f'<h1>Dragonfly workers <span class="verdict {report.verdict}">{report.verdict.upper()}</span></h1>',
        f'<p class="meta">{html.escape(report.database)} &middot; generated {generated} &middot;'
        f" the last {duration(history.since_s)}, buckets of {duration(history.bucket_s)};"
        f" the charts show {_stamp(start)} to {_stamp(end)}, where its data is</p>",
    ]
    if report.reasons:
        body.append("<ul>" + "".join(f"<li>{html.escape(r.message)}</li>" for r in report.reasons) + "</ul>")
    for title, unit, series in charts:
        body.append(f"<h2>{html.escape(title)}</h2>")
        body.append(line_chart(series, start, end, unit, title, gap_s=history.bucket_s))
    body.append("<h2>Worker instances</h2>")
    verdicts = {w.worker_id: w.verdict for w in report.workers}
    jobs = {w.worker_id: f"{w.job.label()} for {duration(w.job.age_s)}" for w in report.workers if w.job}
    body.append(timeline(history, verdicts, report.options.dead_after_s, jobs, window=(start, end)))
    body.append("<h2>The inspector now</h2>")
    body.append(f"<pre>{html.escape(render_report(report))}</pre>")
    body.append("</body></html>")
    return "\n".join(body)


def shown_window(history: History) -> tuple[float, float]:
    """The part of the window that has data, a bucket before its first point: a few
    minutes of data over a 24 h window fill the chart instead of one dot at its edge."""
    firsts = [pts[0][0] for series in _all_series(history) for pts in series.values() if pts]
    firsts += [r["started"] for r in history.instances]
    if not firsts:
        return history.start, history.end
    start = max(history.start, min(firsts) - history.bucket_s)
    return start, max(history.end, start + history.bucket_s)


def _all_series(history: History) -> list[dict[str, list[Point]]]:
    return [history.completed, history.failing, history.depth, history.oldest_age, history.dead_letters]


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%m-%d %H:%M")


def _runs(pts: list[Point], gap_s: float) -> list[list[Point]]:
    """The points split where buckets are missing: no line is drawn across an empty bucket."""
    runs: list[list[Point]] = []
    for t, v in pts:
        if runs and t - runs[-1][-1][0] <= gap_s * 1.5:
            runs[-1].append((t, v))
        else:
            runs.append([(t, v)])
    return runs


def _x(t: float, start: float, end: float) -> float:
    return PAD_L + (t - start) / max(end - start, 1e-9) * (W - PAD_L - PAD_R)


def _axes(start: float, end: float, top: float, unit: str) -> list[str]:
    parts = [
        f'<line x1="{PAD_L}" y1="{H - PAD_B}" x2="{W - PAD_R}" y2="{H - PAD_B}" stroke="#9ca3af"/>',
        f'<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{H - PAD_B}" stroke="#9ca3af"/>',
    ]
    for i in range(5):
        value = top * i / 4
        y = H - PAD_B - (H - PAD_T - PAD_B) * i / 4
        parts.append(f'<line x1="{PAD_L}" y1="{y:.1f}" x2="{W - PAD_R}" y2="{y:.1f}" stroke="#e5e7eb"/>')
        parts.append(f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end">{_num(value)}</text>')
    for i in range(5):
        t = start + (end - start) * i / 4
        label = datetime.fromtimestamp(t, UTC).strftime("%m-%d %H:%M")
        parts.append(f'<text x="{_x(t, start, end):.1f}" y="{H - 12}" text-anchor="middle">{label}</text>')
    parts.append(f'<text x="8" y="{PAD_T - 10}">{html.escape(unit)}</text>')
    return parts


def line_chart(
    series: dict[str, list[Point]], start: float, end: float, unit: str, title: str, *, gap_s: float
) -> str:
    """One line per series; ``data-points`` counts what was drawn (0: an empty chart)."""
    points = sum(len(v) for v in series.values())
    top = max((v for pts in series.values() for _, v in pts), default=0.0) or 1.0
    top = _nice(top)
    parts = [
        f'<svg class="chart" role="img" aria-label="{html.escape(title)}" width="{W}" height="{H}"'
        f' viewBox="0 0 {W} {H}" data-series="{len(series)}" data-points="{points}">',
        *_axes(start, end, top, unit),
    ]
    if not points:
        parts.append(
            f'<text class="empty" x="{W / 2}" y="{H / 2}" text-anchor="middle">no data in the window</text>'
        )
    for n, (name, pts) in enumerate(sorted(series.items())):
        colour = COLOURS[n % len(COLOURS)]
        for run in _runs([(t, v) for t, v in pts if t >= start], gap_s):
            coords = " ".join(
                f"{_x(t, start, end):.1f},{H - PAD_B - (H - PAD_T - PAD_B) * v / top:.1f}" for t, v in run
            )
            if len(run) == 1:
                x, y = coords.split(",")
                parts.append(f'<circle cx="{x}" cy="{y}" r="3" fill="{colour}"/>')
            else:
                parts.append(
                    f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.6"/>'
                )
        ly = PAD_T + 14 * n
        parts.append(f'<rect x="{W - PAD_R + 12}" y="{ly - 8}" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{W - PAD_R + 26}" y="{ly + 1}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def timeline(
    history: History,
    verdicts: dict[str, str],
    dead_after_s: float,
    jobs: dict[str, str],
    *,
    window: tuple[float, float] | None = None,
) -> str:
    """A bar per worker instance, boot to stop or last heartbeat, coloured by how it ended;
    its title names the job in hand (``jobs``: worker id -> text). The labels are whole:
    the picture widens for the longest."""
    rows = history.instances
    lane_h = 16
    height = PAD_T + PAD_B + max(1, len(rows)) * lane_h
    start, end = window or (history.start, history.end)
    labels = [_label(r, verdicts, dead_after_s) for r in rows]
    width = max(W, W - PAD_R + 12 + int(6.5 * max((len(label) for label in labels), default=0)))
    parts = [
        f'<svg class="chart timeline" role="img" aria-label="Worker instances"'
        f' width="{width}" height="{height}"'
        f' viewBox="0 0 {width} {height}" data-series="1" data-points="{len(rows)}">'
    ]
    if not rows:
        parts.append(
            f'<text class="empty" x="{W / 2}" y="{height / 2}" text-anchor="middle">'
            "no worker in the window</text>"
        )
    for i, r in enumerate(rows):
        alive = r["status"] in ("BOOTING", "RUNNING", "DRAINING")
        killed = alive and (verdicts.get(r["worker_id"]) == "dead" or r["age_s"] > dead_after_s)
        status = "killed" if killed else verdicts.get(r["worker_id"], r["status"]).upper()
        status = status if status in STATUS_COLOURS or status == "FROZEN" else r["status"]
        x0 = _x(max(r["started"], start), start, end)
        x1 = _x(end if alive and not killed else min(r["ended"], end), start, end)
        y = PAD_T + i * lane_h
        ended = f"{status.lower()}" + (f" ({r['error_type']})" if r.get("error_type") else "")
        job = jobs.get(r["worker_id"])
        held = f"; job {job}" if job else ""
        parts.append(
            f'<rect x="{x0:.1f}" y="{y}" width="{max(x1 - x0, 2):.1f}" height="{lane_h - 4}"'
            f' fill="{STATUS_COLOURS.get(status, "#64748b")}"><title>{html.escape(r["worker_id"])}'
            f" pid {r['pid']} on {html.escape(r['hostname'])}: {html.escape(ended + held)}</title></rect>"
        )
        parts.append(f'<text x="{W - PAD_R + 6}" y="{y + 10}">{html.escape(labels[i])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _label(r: dict[str, Any], verdicts: dict[str, str], dead_after_s: float) -> str:
    alive = r["status"] in ("BOOTING", "RUNNING", "DRAINING")
    killed = alive and (verdicts.get(r["worker_id"]) == "dead" or r["age_s"] > dead_after_s)
    status = "killed" if killed else verdicts.get(r["worker_id"], r["status"])
    return f"{r['queue_name'].removeprefix('q_')} {status.lower()}"


def _nice(value: float) -> float:
    """The next round number above ``value``, for the top of an axis."""
    magnitude = float(10 ** max(0, len(str(int(value))) - 1))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return value


def _num(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 or value == int(value) else f"{value:g}"
