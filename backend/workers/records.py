"""The records passed between the processing steps: the tunables, a valid message waiting
to be claimed, a sorted delivery, a claim's answer and a delivery's outcome. Values only:
nothing here reads the database or logs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from backend.config import DEFAULTS
from backend.db.ledger import DeadLetter, Failure
from backend.jobs import Job


@dataclass(frozen=True, kw_only=True)
class ProcessingOptions:
    """The tunables of processing, with the contract's defaults (``backend.config.TUNABLES``)."""

    batch_size: int = DEFAULTS["WORKER_BATCH_SIZE"]
    visibility_timeout_s: int = DEFAULTS["WORKER_VISIBILITY_TIMEOUT_S"]
    max_attempts: int = DEFAULTS["WORKER_MAX_ATTEMPTS"]
    retry_base_s: float = DEFAULTS["WORKER_RETRY_BASE_S"]
    retry_max_s: float = DEFAULTS["WORKER_RETRY_MAX_S"]
    max_payload_bytes: int = DEFAULTS["WORKER_MAX_PAYLOAD_BYTES"]
    # Give back at once the claims of workers whose process is gone (``rescue.rescue_orphans``);
    # off when this worker's sessions are not named by its worker id (a pooler): decided at boot.
    rescue_orphans: bool = True

    @property
    def transaction_limit_ms(self) -> int:
        return self.visibility_timeout_s * 1000


class Pending(NamedTuple):
    """A valid envelope waiting to be claimed: its key, its message id, the envelope."""

    key: str
    msg_id: int
    envelope: dict[str, Any]


@dataclass
class Delivery:
    """The messages of one delivery, sorted (``sorting.sort_delivery``)."""

    together: list[Pending] = field(default_factory=list)  # run in one transaction
    alone: list[Pending] = field(default_factory=list)  # delivered before, or external
    letters: list[DeadLetter] = field(default_factory=list)
    copies: dict[str, list[int]] = field(default_factory=dict)  # later messages of a key: key -> ids


@dataclass
class Outcome:
    """What a delivery's handlers did, to be written in one go (``Outcomes.settle``)."""

    done: list[Job] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)


@dataclass
class Claims:
    """A claim's answer: jobs claimed (with their attempt), the pending whose key is already
    completed (their messages are deleted unrun), and msg id -> seconds to wait for keys
    someone else holds."""

    jobs: list[Job] = field(default_factory=list)
    completed: list[Pending] = field(default_factory=list)
    waits: dict[int, int] = field(default_factory=dict)
