"""The runtime's one exception base, the errors an operator can act on, and how any
exception is told in one line."""

from __future__ import annotations

_MAX_TEXT = 2000


def describe(exc: BaseException | None, limit: int = _MAX_TEXT) -> str:
    """The exception's message on one line (its type's name when it has none), capped.

    A NUL cannot be stored in a text column: one in a message must not stop the failure
    from being recorded."""
    if exc is None:
        return ""
    text = " ".join(str(exc).replace("\x00", "\\0").split()) or type(exc).__name__
    return text[:limit]


class WorkerError(Exception):
    """Base of every error raised by the worker runtime."""


class ConfigError(WorkerError):
    """The environment is invalid; the message names the variable and what to set."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


class BootError(WorkerError):
    """The worker cannot start (database unreachable, schema missing or too old)."""


class RetryableError(WorkerError):
    """A failure that may succeed later; ``retry_after_s`` is how long the other side asked
    to wait (an HTTP ``Retry-After``), if it did: the retry waits at least that long, up to
    ``WORKER_RETRY_MAX_S``."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PermanentJobError(WorkerError):
    """A job that can never succeed: it is dead-lettered at once, never retried."""


class TenantMismatch(PermanentJobError):
    """A job whose entity belongs to another organisation than its envelope's ``org_id``:
    dead-lettered, nothing written, nothing sent."""


class InvalidEnvelope(PermanentJobError):
    """A message body that is not a valid job envelope."""


class PayloadTooLarge(InvalidEnvelope):
    """A body over ``WORKER_MAX_PAYLOAD_BYTES``: dead-lettered from the server's copy, never
    read into the worker."""


class UndecodableMessage(InvalidEnvelope):
    """A body the JSON decoder rejects (nesting too deep, a number too long): dead-lettered
    with its text."""


class JobTimedOut(WorkerError):
    """A handler call ran past its deadline (``WORKER_JOB_TIMEOUT_S``): the attempt fails,
    and after the last one the job is dead-lettered with this type."""
