"""What becomes of a message whose key was not claimed, by the key's ledger state: every
branch of ``classify_unclaimed``, with no database."""

from __future__ import annotations

from backend.db.ledger import LedgerStatus
from backend.workers.claims import classify_unclaimed
from backend.workers.records import Pending


def pending(key: str, msg_id: int) -> Pending:
    return Pending(key, msg_id, {"idempotency_key": key})


def test_a_completed_key_is_deleted_without_running() -> None:
    p = pending("done", 1)
    out = classify_unclaimed([p], {"done": (LedgerStatus.COMPLETED, 0.0)}, run_expired=True)
    assert out.completed == [p]
    assert (out.letters, out.expired, out.waits) == ([], [], {})


def test_a_dead_key_is_dead_lettered_again_until_its_letter_is_replayed() -> None:
    out = classify_unclaimed([pending("dead", 2)], {"dead": (LedgerStatus.DEAD, 0.0)}, run_expired=True)
    [letter] = out.letters
    assert (letter.msg_id, letter.job_key, letter.error_type, letter.attempts) == (2, "dead", "DeadKey", 0)
    assert "replay" in letter.error
    assert (out.completed, out.expired, out.waits) == ([], [], {})


def test_an_expired_processing_claim_runs_alone_from_a_batch_claim() -> None:
    p = pending("gone", 3)
    out = classify_unclaimed([p], {"gone": (LedgerStatus.PROCESSING, 0.0)}, run_expired=True)
    assert out.expired == [p]
    assert (out.completed, out.letters, out.waits) == ([], [], {})


def test_an_expired_processing_claim_waits_a_second_when_not_run_alone() -> None:
    out = classify_unclaimed(
        [pending("gone", 3)], {"gone": (LedgerStatus.PROCESSING, 0.0)}, run_expired=False
    )
    assert out.waits == {3: 1}
    assert (out.completed, out.letters, out.expired) == ([], [], [])


def test_a_live_lease_is_waited_out_rounded_up() -> None:
    out = classify_unclaimed(
        [pending("live", 4)], {"live": (LedgerStatus.PROCESSING, 12.3)}, run_expired=True
    )
    assert out.waits == {4: 13}
    assert out.expired == []


def test_a_failed_key_in_its_backoff_waits_until_the_backoff_ends() -> None:
    out = classify_unclaimed([pending("retry", 5)], {"retry": (LedgerStatus.FAILED, 4.0)}, run_expired=True)
    assert out.waits == {5: 5}


def test_a_key_held_by_another_open_transaction_waits_a_second() -> None:
    out = classify_unclaimed([pending("held", 6)], {}, run_expired=True)
    assert out.waits == {6: 1}
    assert (out.completed, out.letters, out.expired) == ([], [], [])


def test_each_message_is_sorted_by_its_own_key() -> None:
    states = {
        "done": (LedgerStatus.COMPLETED, 0.0),
        "dead": (LedgerStatus.DEAD, 0.0),
        "gone": (LedgerStatus.PROCESSING, 0.0),
        "live": (LedgerStatus.PROCESSING, 2.5),
    }
    ps = [pending(k, i) for i, k in enumerate(["done", "dead", "gone", "live", "held"], start=1)]
    out = classify_unclaimed(ps, states, run_expired=True)
    assert [p.key for p in out.completed] == ["done"]
    assert [d.job_key for d in out.letters] == ["dead"]
    assert [p.key for p in out.expired] == ["gone"]
    assert out.waits == {4: 3, 5: 1}
