"""What a bench run leaves: the line that says what was measured, the table and the notes,
``bench.json`` and the chart ``bench.png`` (when matplotlib is installed)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from scripts.bench.figures import percentile, print_table
from scripts.bench.plan import DEFAULT_BATCH, Collected, Plan
from scripts.bench.profiling import print_profile
from scripts.harness.process import ROOT


def run_meta(
    *, version: str, plan: Plan, started: float, load_before: tuple[float, float, float], embedded: bool
) -> dict[str, Any]:
    """Where, when and on what the figures were measured (``meta`` of bench.json)."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "server": version,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "duration_s": round(time.monotonic() - started, 1),
        "embedded": embedded,
        "code": code_state(),
        "plan": asdict(plan),
    }


def code_state() -> dict[str, Any]:
    """The commit measured, and whether the runtime had uncommitted changes."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": git("rev-parse", "--short", "HEAD") or "unknown (not a git checkout)",
        "runtime_changes": git("status", "--porcelain", "--", "backend").splitlines(),
    }


def print_report(meta: dict[str, Any], rows: list[dict[str, Any]], out: Collected, plan: Plan) -> None:
    """What was measured, the table, the notes and the profile."""
    code, load_before = meta["code"], meta["load_before"]
    dirty = f", {len(code['runtime_changes'])} uncommitted runtime file(s)" if code["runtime_changes"] else ""
    print(
        f"\n{meta['server']}; commit {code['commit']}{dirty}; {meta['cpus']} CPUs;"
        f" load {load_before[0]:.2f} -> {meta['load_after'][0]:.2f}; {meta['duration_s']:.0f} s;"
        f" {plan.repeat} run(s) per figure\n"
    )
    print_table(rows)
    for note in out.notes:
        print(f"note: {note}")
    if out.profile:
        print_profile(out.profile)


def write_results(
    out_dir: Path, meta: dict[str, Any], rows: list[dict[str, Any]], out: Collected, plan: Plan
) -> None:
    """``bench.json``, and ``bench.png`` when matplotlib is installed; says what it wrote."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "figures": rows,
                "samples": out.samples,
                "latencies_ms": out.latencies,
                "runs": out.runs,
                "notes": out.notes,
                "profile": out.profile,
            },
            indent=2,
            default=str,
        )
    )
    try:
        draw_chart(out_dir / "bench.png", rows, out, plan)
        print(f"\nwrote {out_dir / 'bench.json'} and {out_dir / 'bench.png'}")
    except ModuleNotFoundError:
        print(
            f"\nwrote {out_dir / 'bench.json'}; no chart: matplotlib is missing"
            " (.venv/bin/pip install -e '.[bench]')"
        )


def draw_chart(path: Path, rows: list[dict[str, Any]], out: Collected, plan: Plan) -> None:
    """Throughput by batch size and the pickup latency distributions, as a PNG (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key = {r["key"]: r for r in rows}
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    sizes = list(plan.batch_sizes)
    for prefix, label, color in (
        ("baseline_rate", "plain pgmq loop (baseline)", "tab:gray"),
        ("locking_rate", "plain locking loop", "tab:olive"),
        ("worker_rate", "no-op worker (real process)", "tab:blue"),
    ):
        series = [by_key[f"{prefix}_{b}"] for b in sizes]
        med = [r["median"] or 0 for r in series]
        err = [
            [m - (r["min"] or m) for m, r in zip(med, series, strict=True)],
            [(r["max"] or m) - m for m, r in zip(med, series, strict=True)],
        ]
        left.errorbar(sizes, med, yerr=err, marker="o", capsize=4, label=label, color=color)
    score = by_key["collectability_rate"]
    if score["median"]:
        left.plot(
            [DEFAULT_BATCH],
            [score["median"]],
            marker="s",
            color="tab:green",
            linestyle="none",
            label="collectability worker",
        )
    left.axhline(15_000, color="tab:red", linestyle="--", linewidth=1, label="target 15,000 jobs/s")
    left.set(
        xscale="log",
        xticks=sizes,
        xlabel="batch size (messages per read)",
        ylabel="jobs per second",
        title="Throughput (median, min-max)",
    )
    left.set_xticklabels([str(b) for b in sizes])
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    for mode, color in (("notifications", "tab:blue"), ("polling", "tab:orange")):
        values = sorted(out.latencies.get(mode, []))
        if values:
            ys = [(i + 1) / len(values) for i in range(len(values))]
            right.step(
                values,
                ys,
                where="post",
                color=color,
                label=f"{mode} (p50 {percentile(values, 50):.1f} ms, p99 {percentile(values, 99):.1f} ms)",
            )
    for limit, label in (
        (5, "p50 target, notifications"),
        (20, "p99 target, notifications"),
        (60, "p50 target, polling"),
    ):
        right.axvline(limit, linestyle=":", linewidth=1, color="gray")
        right.text(limit, 0.02, f" {label}", rotation=90, fontsize=7, color="gray", va="bottom")
    right.set(
        xscale="log",
        xlabel="enqueue to handler start (ms)",
        ylabel="fraction of messages",
        title=f"Pickup latency of an idle worker ({len(out.latencies.get('polling', []))} messages per mode)",
    )
    right.legend(fontsize=8, loc="upper left")
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
