"""The runtime's one exception base and the errors an operator can act on."""

from __future__ import annotations


class WorkerError(Exception):
    """Base of every error raised by the worker runtime."""


class ConfigError(WorkerError):
    """The environment is invalid; the message names the variable and what to set."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


class BootError(WorkerError):
    """The worker cannot start (database unreachable, schema missing or too old)."""


class PermanentJobError(WorkerError):
    """A job that can never succeed: it is dead-lettered at once, never retried."""


class InvalidEnvelope(PermanentJobError):
    """A message body that is not a valid job envelope."""


class PayloadTooLarge(InvalidEnvelope):
    """A body over ``WORKER_MAX_PAYLOAD_BYTES``: dead-lettered from the server's copy, never
    read into the worker."""


class UndecodableMessage(InvalidEnvelope):
    """A body the JSON decoder rejects (nesting too deep, a number too long): dead-lettered
    with its text."""
