"""Print the worker lifecycle as a Mermaid state diagram, built from the machine's table.

    python -m scripts.state_diagram                          # print it
    python -m scripts.state_diagram --write docs/ARCHITECTURE.md   # refresh the embedded copy

The diagram lives in ``backend/workers/diagram.py``; ``tests/unit/test_docs.py`` fails
when the copy in ``docs/ARCHITECTURE.md`` is out of date.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from backend.workers.diagram import main, replace_embedded, state_diagram


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.state_diagram", description="The worker lifecycle as a Mermaid diagram."
    )
    parser.add_argument(
        "--write",
        type=Path,
        metavar="DOC",
        help="replace the diagram between the state-diagram markers of DOC",
    )
    args = parser.parse_args(argv)
    if args.write is None:
        main()
        return 0
    try:
        text = args.write.read_text("utf-8")
        updated = replace_embedded(text, state_diagram())
    except (OSError, ValueError) as exc:
        print(f"state_diagram: {args.write}: {exc}", file=sys.stderr)
        return 1
    if updated != text:
        args.write.write_text(updated, "utf-8")
        print(f"updated {args.write}")
    else:
        print(f"{args.write} is up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
