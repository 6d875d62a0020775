"""Outbox deliveries against a real local HTTP server and a real local SMTP server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from backend.domain.outbox import (
    DeliveryError,
    OutboundMessage,
    OutboxConfig,
    deliver,
    deliver_job,
    parse_message,
    stable_message_id,
)
from backend.errors import PermanentJobError
from backend.jobs import Job
from scripts.harness.receivers import HttpRecorder, Reply, key_counts, read_log
from scripts.harness.smtp import SmtpRecorder

# Webhook paths carry tokens, as Slack's and Discord's do; errors must never show them.
TOKEN = "T0KEN-s3cret-path"
KEY = "judgment-42:notice:1"


def http_config(http: HttpRecorder, **extra: str) -> OutboxConfig:
    return OutboxConfig.from_env(
        {
            "OUTBOX_WEBHOOK_URL": http.url_for(f"/hooks/{TOKEN}"),
            "OUTBOX_SLACK_WEBHOOK_URL": http.url_for(f"/services/T000/B000/{TOKEN}"),
            "OUTBOX_DISCORD_WEBHOOK_URL": http.url_for(f"/api/webhooks/1/{TOKEN}"),
            **extra,
        }
    )


def smtp_config(smtp: SmtpRecorder, **extra: str) -> OutboxConfig:
    return OutboxConfig.from_env(
        {
            "OUTBOX_SMTP_HOST": smtp.host,
            "OUTBOX_SMTP_PORT": str(smtp.port),
            "OUTBOX_SMTP_TLS": "none",
            "OUTBOX_SMTP_FROM": "Dragonfly <outbox@dragonfly.example>",
            "OUTBOX_SMTP_TIMEOUT_S": "5",
            **extra,
        }
    )


def message(channel: str, **fields: Any) -> OutboundMessage:
    payload = {"channel": channel, "subject": "Writ issued", "body": "Levy scheduled.", **fields}
    return parse_message(payload)


def job(payload: dict[str, Any], key: str = KEY) -> Job:
    return Job(
        msg_id=7,
        queue_name="q_outbox_processor",
        idempotency_key=key,
        entity_type="judgment",
        entity_id="J-42",
        org_id="org-1",
        payload=payload,
    )


# --- HTTP channels ---------------------------------------------------------------------


def test_webhook_delivers_the_full_message_with_the_key(http: HttpRecorder) -> None:
    payload = {
        "channel": "webhook",
        "subject": "Writ issued",
        "body": "Levy scheduled.",
        "data": {"amount_cents": 125000},
    }

    receipt = deliver_job(job(payload), config=http_config(http))

    [request] = http.requests
    assert request.method == "POST"
    assert request.path == f"/hooks/{TOKEN}"
    assert request.idempotency_key == KEY
    assert request.header("Content-Type") == "application/json"
    assert request.json() == {
        "idempotency_key": KEY,
        "message_id": stable_message_id(KEY),
        "channel": "webhook",
        "subject": "Writ issued",
        "body": "Levy scheduled.",
        "data": {"amount_cents": 125000},
        "entity_type": "judgment",
        "entity_id": "J-42",
        "org_id": "org-1",
    }
    assert receipt.status == 200
    assert receipt.destination == http.url
    assert TOKEN not in repr(receipt)


def test_slack_gets_text_and_the_key(http: HttpRecorder) -> None:
    receipt = deliver(message("slack"), idempotency_key=KEY, config=http_config(http))

    [request] = http.requests
    assert request.path == f"/services/T000/B000/{TOKEN}"
    assert request.json() == {"text": "*Writ issued*\nLevy scheduled."}
    assert request.idempotency_key == KEY
    assert (receipt.channel, receipt.status) == ("slack", 200)


def test_discord_gets_content_within_its_limit_and_the_key(http: HttpRecorder) -> None:
    deliver(message("discord"), idempotency_key=KEY, config=http_config(http))
    deliver(message("discord", body="x" * 5000), idempotency_key="long", config=http_config(http))

    short, long = http.requests
    assert short.json()["content"] == "**Writ issued**\nLevy scheduled."
    assert short.json()["allowed_mentions"] == {"parse": []}
    assert short.idempotency_key == KEY
    assert len(long.json()["content"]) == 2000
    assert long.json()["content"].startswith("**Writ issued**\nxxx")


def test_a_repeated_key_is_sent_again_with_the_same_key(http: HttpRecorder) -> None:
    # The receiver deduplicates by key; the sender must send the same one on every attempt.
    config = http_config(http)
    for _ in range(2):
        deliver(message("webhook"), idempotency_key=KEY, config=config)

    assert http.total_calls == 2
    assert http.distinct_keys() == {KEY}
    assert http.duplicates() == {KEY: 2}


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 422])
def test_4xx_is_permanent(http: HttpRecorder, status: int) -> None:
    http.reply(status, body=b"invalid_payload")

    with pytest.raises(PermanentJobError, match=f"HTTP {status}") as raised:
        deliver(message("slack"), idempotency_key=KEY, config=http_config(http))

    assert "invalid_payload" in str(raised.value)
    assert TOKEN not in str(raised.value)
    assert http.total_calls == 1


@pytest.mark.parametrize("status", [500, 502, 503, 408, 429])
def test_5xx_408_and_429_are_retryable(http: HttpRecorder, status: int) -> None:
    http.reply(status, headers={"Retry-After": "7"})

    with pytest.raises(DeliveryError, match=f"HTTP {status}") as raised:
        deliver(message("webhook"), idempotency_key=KEY, config=http_config(http))

    assert not isinstance(raised.value, PermanentJobError)
    # Retry-After says when to come back only on a 429 or a 503 (RFC 9110)
    assert raised.value.retry_after_s == (7.0 if status in (429, 503) else None)
    assert TOKEN not in str(raised.value)


def test_a_retry_after_failure_delivers(http: HttpRecorder) -> None:
    http.script(Reply(status=503))
    config = http_config(http)

    with pytest.raises(DeliveryError):
        deliver(message("webhook"), idempotency_key=KEY, config=config)
    receipt = deliver(message("webhook"), idempotency_key=KEY, config=config)

    assert receipt.status == 200
    assert http.key_counts() == {KEY: 2}
    assert http.key_counts(accepted_only=True) == {KEY: 1}


def test_a_slow_receiver_times_out_as_retryable(http: HttpRecorder) -> None:
    http.reply(200, delay_s=5)

    with pytest.raises(DeliveryError, match=r"no answer within 0\.2s") as raised:
        deliver(
            message("webhook"), idempotency_key=KEY, config=http_config(http, OUTBOX_HTTP_TIMEOUT_S="0.2")
        )

    assert TOKEN not in str(raised.value)
    assert http.total_calls == 1


def test_a_redirect_is_not_followed(http: HttpRecorder) -> None:
    http.reply(302, headers={"Location": f"{http.url}/elsewhere/{TOKEN}"})

    with pytest.raises(PermanentJobError, match="OUTBOX_WEBHOOK_URL") as raised:
        deliver(message("webhook"), idempotency_key=KEY, config=http_config(http))

    assert TOKEN not in str(raised.value)
    assert http.total_calls == 1


def test_a_closed_port_is_retryable() -> None:
    with HttpRecorder() as gone:
        url = gone.url_for(f"/hooks/{TOKEN}")
    config = OutboxConfig.from_env({"OUTBOX_WEBHOOK_URL": url})

    with pytest.raises(DeliveryError, match="a later attempt may succeed") as raised:
        deliver(message("webhook"), idempotency_key=KEY, config=config)

    assert TOKEN not in str(raised.value)


# --- configuration and validation at delivery ------------------------------------------


@pytest.mark.parametrize(
    ("channel", "variable"),
    [
        ("webhook", "OUTBOX_WEBHOOK_URL"),
        ("slack", "OUTBOX_SLACK_WEBHOOK_URL"),
        ("discord", "OUTBOX_DISCORD_WEBHOOK_URL"),
        ("email", "OUTBOX_SMTP_HOST"),
    ],
)
def test_an_unconfigured_channel_is_permanent_and_names_the_variable(
    http: HttpRecorder, channel: str, variable: str
) -> None:
    extra = {"to": "debtor@example.com"} if channel == "email" else {}

    with pytest.raises(PermanentJobError, match=f"channel {channel} is not configured: set {variable}"):
        deliver(message(channel, **extra), idempotency_key=KEY, config=OutboxConfig())

    assert http.total_calls == 0


def test_an_unknown_channel_is_permanent(http: HttpRecorder) -> None:
    with pytest.raises(PermanentJobError, match="unknown channel 'sms'"):
        deliver_job(job({"channel": "sms", "subject": "s", "body": "b"}), config=http_config(http))

    assert http.total_calls == 0


@pytest.mark.parametrize(
    "payload",
    [
        {"subject": "s", "body": "b"},
        {"channel": "webhook", "body": "b"},
        {"channel": "webhook", "subject": "s", "body": ""},
        {"channel": "webhook", "subject": "s", "body": "b", "data": [1, 2]},
        {"channel": "email", "subject": "s", "body": "b"},
        {"channel": "email", "subject": "s", "body": "b", "to": "not an address"},
    ],
)
def test_an_invalid_payload_is_permanent_and_sends_nothing(
    http: HttpRecorder, smtp: SmtpRecorder, payload: dict[str, Any]
) -> None:
    config = OutboxConfig.from_env(
        {
            "OUTBOX_WEBHOOK_URL": http.url_for("/hook"),
            "OUTBOX_SMTP_HOST": smtp.host,
            "OUTBOX_SMTP_PORT": str(smtp.port),
            "OUTBOX_SMTP_TLS": "none",
            "OUTBOX_SMTP_FROM": "outbox@dragonfly.example",
        }
    )

    with pytest.raises(PermanentJobError):
        deliver_job(job(payload), config=config)

    assert http.total_calls == 0
    assert smtp.records == []


def test_a_key_that_cannot_travel_in_a_header_is_permanent(http: HttpRecorder) -> None:
    with pytest.raises(PermanentJobError, match="Idempotency-Key"):
        deliver(message("webhook"), idempotency_key="a\r\nX-Injected: 1", config=http_config(http))

    assert http.total_calls == 0


# --- email -----------------------------------------------------------------------------


def test_email_arrives_with_a_stable_message_id(smtp: SmtpRecorder) -> None:
    config = smtp_config(smtp)
    mail = message("email", to="Debtor <debtor@example.com>")

    first = deliver(mail, idempotency_key=KEY, config=config)
    second = deliver(mail, idempotency_key=KEY, config=config)
    other = deliver(mail, idempotency_key="another-key", config=config)

    one, two, three = smtp.messages
    assert one.message_id == two.message_id == stable_message_id(KEY) == first.message_id
    assert second.message_id == first.message_id
    assert three.message_id == other.message_id != one.message_id
    assert one.idempotency_key == KEY
    assert one.mail_from == "outbox@dragonfly.example"
    assert one.rcpt_tos == ("debtor@example.com",)
    assert one.message["Subject"] == "Writ issued"
    assert one.message.get_content().strip() == "Levy scheduled."
    assert (first.status, first.channel) == (250, "email")
    assert "accepted" in first.response
    assert first.destination == f"smtp://{smtp.host}:{smtp.port}"


def test_email_logs_in_when_credentials_are_set() -> None:
    with SmtpRecorder(credentials=("outbox", "pa55-w0rd")) as smtp:
        config = smtp_config(smtp, OUTBOX_SMTP_USERNAME="outbox", OUTBOX_SMTP_PASSWORD="pa55-w0rd")
        deliver(message("email", to="debtor@example.com"), idempotency_key=KEY, config=config)

        [mail] = smtp.messages
        assert mail.login == "outbox"


def test_email_with_a_wrong_password_is_permanent_and_hides_it() -> None:
    with SmtpRecorder(credentials=("outbox", "right")) as smtp:
        config = smtp_config(smtp, OUTBOX_SMTP_USERNAME="outbox", OUTBOX_SMTP_PASSWORD="wrong-pa55")
        with pytest.raises(PermanentJobError, match="SMTP 535") as raised:
            deliver(message("email", to="debtor@example.com"), idempotency_key=KEY, config=config)

        assert "wrong-pa55" not in str(raised.value)
        assert "wrong-pa55" not in repr(config)
        assert smtp.records == []


def test_smtp_5xx_is_permanent(smtp: SmtpRecorder) -> None:
    smtp.reply("554 5.7.1 Message rejected")

    with pytest.raises(PermanentJobError, match="SMTP 554"):
        deliver(message("email", to="debtor@example.com"), idempotency_key=KEY, config=smtp_config(smtp))

    assert smtp.messages == []


def test_smtp_4xx_is_retryable(smtp: SmtpRecorder) -> None:
    smtp.reply("451 4.3.0 Try again later")

    with pytest.raises(DeliveryError, match="SMTP 451") as raised:
        deliver(message("email", to="debtor@example.com"), idempotency_key=KEY, config=smtp_config(smtp))

    assert not isinstance(raised.value, PermanentJobError)
    assert len(smtp.records) == 1


def test_an_unreachable_smtp_server_is_retryable() -> None:
    with SmtpRecorder() as gone:
        config = smtp_config(gone)

    with pytest.raises(DeliveryError, match="a later attempt may succeed"):
        deliver(message("email", to="debtor@example.com"), idempotency_key=KEY, config=config)


# --- the recorder as a process (used by chaos tests) -----------------------------------


def test_the_http_recorder_runs_as_a_process_and_logs_each_request(tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "scripts.harness.receivers", "http", "--port", "0", "--log", str(log)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    try:
        assert process.stdout is not None
        ready = json.loads(process.stdout.readline())
        config = OutboxConfig.from_env({"OUTBOX_WEBHOOK_URL": ready["url"] + "/hook"})
        for key in ("a", "a", "b"):
            deliver(message("webhook"), idempotency_key=key, config=config)
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
        if process.stdout is not None:
            process.stdout.close()

    lines = read_log(log)
    assert len(lines) == 3
    assert key_counts(lines) == {"a": 2, "b": 1}
    assert json.loads(lines[0]["body"])["idempotency_key"] == "a"
