"""Retry delays honour a receiver's Retry-After, within WORKER_RETRY_MAX_S; the outbox's
own defaults ride out a ten-minute receiver outage."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from backend.backoff import retry_delay_s
from backend.config import load_settings
from backend.domain.outbox.webhooks import _retry_after
from backend.workers.outbox_processor import OutboxWorker


def test_the_delay_is_the_longer_of_the_backoff_and_the_ask_capped_by_the_maximum() -> None:
    rng = random.Random(1)
    assert retry_delay_s(1, base_s=1, max_s=300, rng=rng, at_least_s=60) == 60
    assert retry_delay_s(1, base_s=1, max_s=300, rng=rng, at_least_s=0.2) == 1  # the backoff is longer
    assert retry_delay_s(1, base_s=1, max_s=30, rng=rng, at_least_s=3600) == 30
    assert retry_delay_s(1, base_s=1, max_s=300, rng=rng, at_least_s=None) == 1


@pytest.mark.parametrize(
    ("header", "expected"), [("120", 120.0), ("0", 0.0), ("-5", None), ("soon", None), ("", None)]
)
def test_retry_after_in_seconds(header: str, expected: float | None) -> None:
    assert _retry_after(header) == expected


def test_retry_after_as_an_http_date() -> None:
    now = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
    header = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert _retry_after(header, now=now) == 90.0
    assert _retry_after(format_datetime(now - timedelta(seconds=90), usegmt=True), now=now) == 0.0


def test_the_outbox_s_defaults_ride_out_ten_minutes_before_the_dead_letter() -> None:
    settings = load_settings({"SUPABASE_MODE": "dev"}, defaults=OutboxWorker.defaults)
    waits = [
        min(settings.retry_max_s, settings.retry_base_s * 2 ** (attempt - 1)) / 2  # jitter's least
        for attempt in range(1, settings.max_attempts)
    ]
    assert settings.max_attempts == 10 and sum(waits) >= 600, (settings.max_attempts, sum(waits))
    env = {"SUPABASE_MODE": "dev", "WORKER_MAX_ATTEMPTS": "3"}
    assert load_settings(env, defaults=OutboxWorker.defaults).max_attempts == 3  # the environment wins
    assert load_settings({"SUPABASE_MODE": "dev"}).max_attempts == 5  # other workers keep theirs
