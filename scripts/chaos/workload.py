"""The chaos run's workload, seeded: ``build_plan`` turns a seed and the seeded ids into
waves of messages: collectability jobs, escalation jobs (each enqueues its own
notification), direct notifications (some slow, some refused once), re-enqueued copies of
some keys, jobs for the chaos workers of ``scripts/chaos/worker.py`` (a transactional one, a
few of whose jobs end its process, and an external one), hung jobs for both (handlers that
never return), and poison messages (malformed, undecodable, oversized)."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from backend.enqueue import build_envelope

ORG_ID = "org-chaos"
COPY_SHARE, SLOW_SHARE, FLAKY_SHARE = 0.03, 0.02, 0.02
# The chaos worker (scripts/chaos/worker.py) and its queue: a transactional worker some of
# whose jobs end its process, as a crashing extension or the OOM killer would.
CHAOS_WORKER, CHAOS_QUEUE = "chaos_worker", "q_chaos_worker"
# Its external twin, which sends each job to the receiver with its key, as the outbox does.
CHAOS_EXTERNAL, CHAOS_EXTERNAL_QUEUE = "chaos_external", "q_chaos_external"
KILLERS, CHAOS_JOBS_SHARE = 3, 0.05
# Hung jobs: handlers that never return, a Python loop (interrupted at the deadline) or a
# socket read (blocked in C: the worker exits 1), on each chaos worker.
HANGS = ("recv", "loop")  # the longer-lived first
# The hung jobs of a queue arrive evenly over this share of the waves: so far apart that few
# are alive at once (each holds a replica for its deadline per attempt), all done in the run.
HUNG_SPREAD = 0.6
HUNG_QUEUES = (CHAOS_QUEUE, CHAOS_EXTERNAL_QUEUE)
SLOW_MAX_S = 2.5


@dataclass(frozen=True, kw_only=True)
class Item:
    """One message to enqueue: a job envelope, or a malformed body (``key`` None; ``raw``:
    JSON text to send as it is, for bodies Python's own encoder would not write)."""

    queue: str
    body: Any
    key: str | None
    raw: str | None = None

    @property
    def text(self) -> str:
        """The body as JSON text."""
        return self.raw if self.raw is not None else json.dumps(self.body)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """The seeded workload: what is enqueued in which wave, and what each job must leave."""

    scores: Mapping[str, int]  # job key -> judgment id
    escalations: Mapping[str, int]  # job key -> case id
    notes: tuple[str, ...]  # direct notifications
    poison: tuple[Item, ...]
    waves: tuple[tuple[Item, ...], ...]
    copies: int
    slow: tuple[str, ...]
    flaky: tuple[str, ...]
    chaos_jobs: tuple[str, ...] = ()  # the chaos worker's jobs that must complete
    killers: tuple[str, ...] = ()  # the chaos worker's jobs that end its process
    external_jobs: tuple[str, ...] = ()  # the external chaos worker's jobs that must complete
    hung: Mapping[str, str] = field(default_factory=dict)  # hung job key -> its queue

    @property
    def receiver_keys(self) -> set[str]:
        """Keys the receiver must accept: the outbox's deliveries, the external chaos jobs."""
        return self.deliveries | set(self.external_jobs)

    @property
    def deliveries(self) -> set[str]:
        """Keys the receiver must accept: the notes and each recommendation's notification."""
        return set(self.notes) | {notify_key(k) for k in self.escalations}

    @property
    def expected_keys(self) -> set[str]:
        """Every key that must end completed in the ledger."""
        return set(self.scores) | set(self.escalations) | self.receiver_keys | set(self.chaos_jobs)

    @property
    def messages(self) -> int:
        return sum(len(wave) for wave in self.waves)


def notify_key(escalation_key: str) -> str:
    """The key of the notification an escalation job enqueues (``record_recommendation``)."""
    return f"{escalation_key}:notify"


def split_jobs(jobs: int) -> tuple[int, int, int]:
    """How many collectability, escalation and direct outbox jobs make ``jobs``."""
    scores, escalations = round(jobs * 0.45), round(jobs * 0.25)
    return scores, escalations, jobs - scores - escalations


def build_plan(
    *,
    seed: int,
    judgment_ids: Sequence[int],
    case_ids: Sequence[int],
    notes: int,
    waves: int,
    hung_each: int = 1,
    slow_max_s: float = SLOW_MAX_S,
) -> Plan:
    """The workload for the seeded ids; the same seed and ids give the same plan.
    ``hung_each``: hung jobs of each way on each chaos worker; ``slow_max_s``: the longest
    slow reply (shorter than the outbox's deadline)."""
    rng = random.Random(f"{seed}:workload")
    note_keys = [f"note:{i}" for i in range(1, notes + 1)]
    webhook = [k for k in note_keys if rng.random() < 0.8]
    webhook_keys = set(webhook)
    # A dozen at least, so that even a short run has kills inside a slow delivery.
    hinted = rng.sample(webhook, min(len(webhook), max(12, round(notes * (SLOW_SHARE + FLAKY_SHARE)))))
    slow, flaky = hinted[: len(hinted) // 2], hinted[len(hinted) // 2 :]
    hints: dict[str, dict[str, Any]] = {k: {"delay_s": round(rng.uniform(0.5, slow_max_s), 2)} for k in slow}
    hints.update({k: {"fail_first": 1} for k in flaky})
    items = [_job("q_collectability", "judgment", j, f"score:{j}") for j in judgment_ids]
    items += [
        _job(
            "q_escalation",
            "enforcement_case",
            c,
            f"escalate:{c}",
            payload={"notify_channel": "slack"} if rng.random() < 0.2 else {},
        )
        for c in case_ids
    ]
    items += [
        _note(k, channel="webhook" if k in webhook_keys else "slack", chaos=hints.get(k)) for k in note_keys
    ]
    chaos_count = max(20, round(len(items) * CHAOS_JOBS_SHARE))
    chaos_keys = [f"chaos:{i}" for i in range(1, chaos_count + 1)]
    external_keys = [f"external:{i}" for i in range(1, chaos_count + 1)]
    items += [_job(CHAOS_QUEUE, "chaos", i, key) for i, key in enumerate(chaos_keys)]
    items += [_job(CHAOS_EXTERNAL_QUEUE, "chaos", i, key) for i, key in enumerate(external_keys)]
    rng.shuffle(items)
    slices: list[list[Item]] = [items[i::waves] for i in range(waves)]
    copies = rng.sample(range(len(items)), round(len(items) * COPY_SHARE))
    for index in copies:
        # A producer that sends a job again: at once or later, never before the original.
        slices[rng.randrange(index % waves, waves)].append(items[index])
    poison = _poison(max(judgment_ids, default=0) + 1_000_000, max(case_ids, default=0) + 1_000_000)
    for item in poison:
        slices[rng.randrange(waves)].append(item)
    # Killers arrive in the middle waves, among the chaos worker's other jobs.
    killers = tuple(
        _job(CHAOS_QUEUE, "chaos", 0, f"chaos:killer:{i}", payload={"exit_code": 137})
        for i in range(1, KILLERS + 1)
    )
    for item in killers:
        slices[rng.randrange(waves // 4, max(waves // 4 + 1, 3 * waves // 4))].append(item)
    hung = []
    for queue in HUNG_QUEUES:
        ways = [(i, how) for i in range(1, hung_each + 1) for how in HANGS]
        for j, (i, how) in enumerate(ways):
            item = _job(queue, "chaos", 0, f"{queue[2:]}:hung-{how}:{i}", payload={"hang": how})
            slices[int(j * HUNG_SPREAD * waves / len(ways))].append(item)
            hung.append(item)
    for wave in slices:
        rng.shuffle(wave)
    return Plan(
        scores={f"score:{j}": j for j in judgment_ids},
        escalations={f"escalate:{c}": c for c in case_ids},
        notes=tuple(note_keys),
        poison=poison + killers + tuple(hung),
        waves=tuple(tuple(w) for w in slices),
        copies=len(copies),
        slow=tuple(slow),
        flaky=tuple(flaky),
        chaos_jobs=tuple(chaos_keys),
        killers=tuple(str(k.key) for k in killers),
        external_jobs=tuple(external_keys),
        hung={str(h.key): h.queue for h in hung},
    )


def _job(
    queue: str, entity_type: str, entity_id: int, key: str, *, payload: Mapping[str, Any] | None = None
) -> Item:
    body = build_envelope(
        entity_type=entity_type, entity_id=str(entity_id), org_id=ORG_ID, idempotency_key=key, payload=payload
    )
    return Item(queue=queue, body=body, key=key)


def _note(key: str, *, channel: str, chaos: Mapping[str, Any] | None = None) -> Item:
    payload: dict[str, Any] = {"channel": channel, "subject": f"Chaos {key}", "body": f"Body of {key}."}
    if chaos:
        payload["data"] = {"chaos": dict(chaos)}  # read by the receiver: delay or refuse
    body = build_envelope(
        entity_type="notification", entity_id=key, org_id=ORG_ID, idempotency_key=key, payload=payload
    )
    return Item(queue="q_outbox_processor", body=body, key=key)


def _poison(missing_judgment: int, missing_case: int) -> tuple[Item, ...]:
    """Messages that must end as dead letters, and only these: malformed envelopes, bodies
    Python's decoder rejects, bodies over the size limit, jobs that can never succeed."""
    head = '{"idempotency_key": "poison:%s", "entity_type": "judgment", "entity_id": "1", "org_id": "o",'
    return (
        Item(queue="q_collectability", body=None, key=None, raw="[" * 5000 + "]" * 5000),
        Item(
            queue="q_escalation",
            body=None,
            key=None,
            raw=head % "huge-number" + ' "payload": {"n": ' + "7" * 5000 + "}}",
        ),
        Item(
            queue="q_outbox_processor",
            body=None,
            key=None,
            raw=head % "oversized" + ' "payload": {"blob": "' + "x" * 300_000 + '"}}',
        ),
        Item(queue="q_collectability", body="not a job envelope", key=None),
        Item(queue="q_escalation", body={"hello": "world"}, key=None),
        Item(
            queue="q_outbox_processor", body={"idempotency_key": 42, "entity_type": "notification"}, key=None
        ),
        _job("q_collectability", "judgment", missing_judgment, "poison:missing-judgment"),
        _job("q_escalation", "enforcement_case", missing_case, "poison:missing-case"),
        _note("poison:discord", channel="discord"),  # no Discord webhook configured
    )
