"""``dead-letters list``, ``replay`` and ``discard``: what an operator does with the jobs
that will not be retried. A letter is open until it is replayed or discarded; only open
letters weigh on the verdict."""

from __future__ import annotations

import argparse
from typing import Any

import psycopg

from tools.worker_inspector import queries
from tools.worker_inspector.model import jsonable
from tools.worker_inspector.render import emit, one_line, render_dead_letters, timestamp

EXIT_DONE, EXIT_FAILED = 0, 1


def list_letters(conn: queries.Conn, args: argparse.Namespace) -> int:
    total, rows = queries.list_dead_letters(
        conn, queue=args.queue, limit=args.limit, include_replayed=args.include_replayed
    )
    document = {"count": total, "items": [jsonable(r) for r in rows]}
    emit(args, document, render_dead_letters(total, rows))
    return EXIT_DONE


def replay_letters(conn: queries.Conn, args: argparse.Namespace) -> int:
    ids = [args.letter_id] if args.letter_id is not None else queries.open_letter_ids(conn, args.queue)
    done: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    lines: list[str] = []
    for letter_id in ids:
        if args.dry_run:
            letter = queries.dead_letter(conn, letter_id)
            if letter is not None and letter["replayed_at"] is None and letter["discarded_at"] is None:
                done.append(jsonable(letter))
                lines.append(
                    f"would replay dead letter {letter_id} "
                    f"(queue {letter['queue_name']}, {_job(letter['job_key'])})"
                )
                continue
        else:
            try:
                replayed = queries.replay(conn, letter_id, limit_ms=_limit_ms(args))
            except psycopg.OperationalError:
                raise
            except psycopg.DatabaseError as exc:
                failed.append({"id": letter_id, "error": one_line(exc)})
                lines.append(f"FAILED dead letter {letter_id}: {one_line(exc)}")
                continue
            if replayed is not None:
                done.append(vars(replayed))
                lines.append(
                    f"replayed dead letter {letter_id} (queue {replayed.queue_name}, "
                    f"{_job(replayed.job_key)}) as msg_id {replayed.msg_id}"
                    + ("; ledger reset to failed with 0 attempts" if replayed.ledger_reset else "")
                )
                continue
        letter = queries.dead_letter(conn, letter_id)
        if letter is None:
            failed.append({"id": letter_id, "error": "no such dead letter"})
            lines.append(f"FAILED dead letter {letter_id}: no such dead letter")
        elif letter["discarded_at"] is not None:
            when = timestamp(letter["discarded_at"])
            skipped.append(
                {"id": letter_id, "reason": "discarded", "discarded_at": jsonable(letter)["discarded_at"]}
            )
            lines.append(f"skipped dead letter {letter_id}: discarded at {when}")
        else:
            when = timestamp(letter["replayed_at"])
            skipped.append(
                {
                    "id": letter_id,
                    "reason": "already replayed",
                    "replayed_at": jsonable(letter)["replayed_at"],
                }
            )
            lines.append(f"skipped dead letter {letter_id}: already replayed at {when}")
    if not ids:
        lines.append(f"no open dead letters in queue {args.queue}")
    verb = "would replay" if args.dry_run else "replayed"
    lines.append(f"{verb} {len(done)}, skipped {len(skipped)}, failed {len(failed)}")
    document = {"dry_run": args.dry_run, "replayed": done, "skipped": skipped, "failed": failed}
    emit(args, document, "\n".join(lines) + "\n")
    return EXIT_FAILED if failed else EXIT_DONE


def _limit_ms(args: argparse.Namespace) -> int:
    """The bound of each write: the command's --timeout."""
    return max(1, int(args.timeout * 1000))


def _job(job_key: str | None) -> str:
    return f"job {job_key}" if job_key else "no job key"


def discard_letters(conn: queries.Conn, args: argparse.Namespace) -> int:
    """Close letters that need no replay (a bad enqueue, a job done by hand): they stop
    weighing on the verdict and keep their body and reason until retention."""
    ids = args.letter_ids or queries.open_letter_ids(conn, args.queue)
    done: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    lines: list[str] = []
    for letter_id in ids:
        letter = queries.dead_letter(conn, letter_id)
        if letter is None or letter["replayed_at"] or letter["discarded_at"]:
            why = "no such dead letter" if letter is None else "already closed"
            skipped.append({"id": letter_id, "reason": why})
            lines.append(f"skipped dead letter {letter_id}: {why}")
            continue
        if not args.dry_run and not queries.discard(conn, letter_id, args.reason, limit_ms=_limit_ms(args)):
            skipped.append({"id": letter_id, "reason": "closed meanwhile"})
            lines.append(f"skipped dead letter {letter_id}: closed meanwhile")
            continue
        done.append({"id": letter_id, "queue_name": letter["queue_name"], "job_key": letter["job_key"]})
        verb = "would discard" if args.dry_run else "discarded"
        lines.append(
            f"{verb} dead letter {letter_id} (queue {letter['queue_name']}, {_job(letter['job_key'])})"
        )
    if not ids:
        lines.append(f"no open dead letters in queue {args.queue}")
    verb = "would discard" if args.dry_run else "discarded"
    lines.append(f"{verb} {len(done)}, skipped {len(skipped)}")
    emit(args, {"dry_run": args.dry_run, "discarded": done, "skipped": skipped}, "\n".join(lines) + "\n")
    return EXIT_DONE
