"""Outbox configuration from the environment, and payload validation."""

from __future__ import annotations

from typing import Any

import pytest

from backend.domain.outbox import (
    OUTBOX_VARIABLES,
    OutboundMessage,
    OutboxConfig,
    parse_message,
    redact_url,
    stable_message_id,
)
from backend.errors import ConfigError, PermanentJobError

SLACK = "https://hooks.slack.com/services/T000/B000/XXXXsecretXXXX"
SMTP = {"OUTBOX_SMTP_HOST": "smtp.example.com", "OUTBOX_SMTP_FROM": "outbox@example.com"}


# --- configuration ---------------------------------------------------------------------


def test_an_empty_environment_has_the_defaults_and_no_channel() -> None:
    config = OutboxConfig.from_env({})

    assert config == OutboxConfig()
    assert config.channels == ()
    assert (config.smtp_port, config.smtp_tls) == (587, "starttls")
    assert (config.http_timeout_s, config.smtp_timeout_s) == (10.0, 10.0)


def test_every_variable_is_read() -> None:
    config = OutboxConfig.from_env(
        {
            "OUTBOX_WEBHOOK_URL": "https://receiver.example.com/hook?token=abc",
            "OUTBOX_SLACK_WEBHOOK_URL": SLACK,
            "OUTBOX_DISCORD_WEBHOOK_URL": "https://discord.com/api/webhooks/1/abc",
            "OUTBOX_SMTP_HOST": "smtp.example.com",
            "OUTBOX_SMTP_PORT": "2525",
            "OUTBOX_SMTP_USERNAME": "outbox",
            "OUTBOX_SMTP_PASSWORD": "pa55",
            "OUTBOX_SMTP_FROM": "Dragonfly <outbox@example.com>",
            "OUTBOX_SMTP_TLS": "SSL",
            "OUTBOX_HTTP_TIMEOUT_S": "2.5",
            "OUTBOX_SMTP_TIMEOUT_S": "30",
        }
    )

    assert config.channels == ("webhook", "slack", "discord", "email")
    assert config.slack_webhook_url == SLACK
    assert (config.smtp_port, config.smtp_tls, config.smtp_username) == (2525, "ssl", "outbox")
    assert config.smtp_password == "pa55"
    assert (config.http_timeout_s, config.smtp_timeout_s) == (2.5, 30.0)


def test_blank_values_count_as_unset() -> None:
    config = OutboxConfig.from_env({"OUTBOX_SLACK_WEBHOOK_URL": "  ", "OUTBOX_SMTP_PORT": ""})

    assert config == OutboxConfig()


def test_implicit_tls_defaults_to_port_465() -> None:
    assert OutboxConfig.from_env({**SMTP, "OUTBOX_SMTP_TLS": "ssl"}).smtp_port == 465
    assert OutboxConfig.from_env({**SMTP, "OUTBOX_SMTP_TLS": "starttls"}).smtp_port == 587


def test_secrets_stay_out_of_repr_and_describe() -> None:
    config = OutboxConfig.from_env(
        {
            **SMTP,
            "OUTBOX_SLACK_WEBHOOK_URL": SLACK,
            "OUTBOX_SMTP_USERNAME": "outbox",
            "OUTBOX_SMTP_PASSWORD": "pa55-w0rd",
        }
    )

    for text in (repr(config), str(config.describe())):
        assert "XXXXsecretXXXX" not in text
        assert "pa55-w0rd" not in text
    assert config.describe() == {"slack": "https://hooks.slack.com", "email": "smtp://smtp.example.com:587"}


@pytest.mark.parametrize(
    ("env", "variable", "problem"),
    [
        ({"OUTBOX_WEBHOOK_URL": "ftp://example.com/x"}, "OUTBOX_WEBHOOK_URL", "http"),
        ({"OUTBOX_SLACK_WEBHOOK_URL": "hooks.slack.com/services/x"}, "OUTBOX_SLACK_WEBHOOK_URL", "http"),
        ({"OUTBOX_DISCORD_WEBHOOK_URL": "https://discord.com:abc/x"}, "OUTBOX_DISCORD_WEBHOOK_URL", "port"),
        ({**SMTP, "OUTBOX_SMTP_PORT": "smtp"}, "OUTBOX_SMTP_PORT", "not a whole number"),
        ({**SMTP, "OUTBOX_SMTP_PORT": "70000"}, "OUTBOX_SMTP_PORT", "between 1 and 65535"),
        ({**SMTP, "OUTBOX_SMTP_TLS": "tls"}, "OUTBOX_SMTP_TLS", "starttls, ssl or none"),
        ({"OUTBOX_HTTP_TIMEOUT_S": "ten"}, "OUTBOX_HTTP_TIMEOUT_S", "not a number"),
        ({"OUTBOX_HTTP_TIMEOUT_S": "0"}, "OUTBOX_HTTP_TIMEOUT_S", "positive"),
        ({"OUTBOX_SMTP_TIMEOUT_S": "-1"}, "OUTBOX_SMTP_TIMEOUT_S", "positive"),
        ({"OUTBOX_SMTP_TIMEOUT_S": "nan"}, "OUTBOX_SMTP_TIMEOUT_S", "positive"),
        ({"OUTBOX_SMTP_HOST": "smtp.example.com"}, "OUTBOX_SMTP_FROM", "required"),
        ({**SMTP, "OUTBOX_SMTP_FROM": "outbox"}, "OUTBOX_SMTP_FROM", "not an email address"),
        ({**SMTP, "OUTBOX_SMTP_USERNAME": "outbox"}, "OUTBOX_SMTP_PASSWORD", "together"),
        ({**SMTP, "OUTBOX_SMTP_PASSWORD": "pa55"}, "OUTBOX_SMTP_PASSWORD", "together"),
        (
            {**SMTP, "OUTBOX_SMTP_USERNAME": "u", "OUTBOX_SMTP_PASSWORD": "p", "OUTBOX_SMTP_TLS": "none"},
            "OUTBOX_SMTP_TLS",
            "clear text",
        ),
    ],
)
def test_invalid_values_raise_config_error_naming_the_variable(
    env: dict[str, str], variable: str, problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem) as raised:
        OutboxConfig.from_env(env)

    assert raised.value.variable == variable
    assert "XXXXsecretXXXX" not in str(raised.value)


def test_a_bad_url_is_not_echoed_since_it_may_hold_a_token() -> None:
    with pytest.raises(ConfigError) as raised:
        OutboxConfig.from_env({"OUTBOX_SLACK_WEBHOOK_URL": "hooks.slack.com/XXXXsecretXXXX"})

    assert "XXXXsecretXXXX" not in str(raised.value)


def test_a_login_without_tls_is_allowed_to_a_local_server() -> None:
    config = OutboxConfig.from_env(
        {
            "OUTBOX_SMTP_HOST": "localhost",
            "OUTBOX_SMTP_FROM": "outbox@example.com",
            "OUTBOX_SMTP_USERNAME": "u",
            "OUTBOX_SMTP_PASSWORD": "p",
            "OUTBOX_SMTP_TLS": "none",
        }
    )

    assert config.smtp_tls == "none"


def test_the_documented_variables_are_the_ones_read() -> None:
    names = [name for name, _, _ in OUTBOX_VARIABLES]

    assert names == [
        "OUTBOX_WEBHOOK_URL",
        "OUTBOX_SLACK_WEBHOOK_URL",
        "OUTBOX_DISCORD_WEBHOOK_URL",
        "OUTBOX_SMTP_HOST",
        "OUTBOX_SMTP_PORT",
        "OUTBOX_SMTP_USERNAME",
        "OUTBOX_SMTP_PASSWORD",
        "OUTBOX_SMTP_FROM",
        "OUTBOX_SMTP_TLS",
        "OUTBOX_HTTP_TIMEOUT_S",
        "OUTBOX_SMTP_TIMEOUT_S",
    ]
    defaults = {name: default for name, default, _ in OUTBOX_VARIABLES}
    config = OutboxConfig()
    assert defaults["OUTBOX_SMTP_PORT"] == str(config.smtp_port)
    assert defaults["OUTBOX_SMTP_TLS"] == config.smtp_tls
    assert float(defaults["OUTBOX_HTTP_TIMEOUT_S"] or "") == config.http_timeout_s
    assert float(defaults["OUTBOX_SMTP_TIMEOUT_S"] or "") == config.smtp_timeout_s
    assert all(help_text for _, _, help_text in OUTBOX_VARIABLES)


@pytest.mark.parametrize(
    ("url", "safe"),
    [
        (SLACK, "https://hooks.slack.com"),
        ("http://user:pw@127.0.0.1:8080/hook/tok?x=1", "http://127.0.0.1:8080"),
        ("http://[::1]:9000/t", "http://[::1]:9000"),
    ],
)
def test_redact_url_keeps_scheme_and_host_only(url: str, safe: str) -> None:
    assert redact_url(url) == safe


# --- message validation ----------------------------------------------------------------


def test_a_valid_webhook_payload() -> None:
    message = parse_message(
        {"channel": "webhook", "subject": "Writ issued", "body": "Levy scheduled.", "data": {"case": 42}}
    )

    assert message == OutboundMessage(
        channel="webhook", subject="Writ issued", body="Levy scheduled.", data={"case": 42}
    )


def test_a_valid_email_payload() -> None:
    message = parse_message(
        {"channel": "email", "subject": "Notice", "body": "Hello", "to": "Debtor <debtor@example.com>"}
    )

    assert (message.channel, message.to) == ("email", "Debtor <debtor@example.com>")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ("not an object", "must be a JSON object"),
        ({"subject": "s", "body": "b"}, "unknown channel None"),
        ({"channel": "sms", "subject": "s", "body": "b"}, "unknown channel 'sms'"),
        ({"channel": "slack", "body": "b"}, "subject must be a non-empty string"),
        ({"channel": "slack", "subject": 3, "body": "b"}, "subject must be a non-empty string"),
        ({"channel": "slack", "subject": "a\nBcc: x@example.com", "body": "b"}, "one line"),
        ({"channel": "slack", "subject": "s" * 999, "body": "b"}, "longer than 998"),
        ({"channel": "slack", "subject": "s"}, "body must be a non-empty string"),
        ({"channel": "slack", "subject": "s", "body": "  "}, "body must be a non-empty string"),
        ({"channel": "slack", "subject": "s", "body": "b", "data": "x"}, "data must be a JSON object"),
        (
            {"channel": "slack", "subject": "s", "body": "b", "to": "a@example.com"},
            "only for the email channel",
        ),
        ({"channel": "email", "subject": "s", "body": "b"}, "to must be a non-empty string"),
        ({"channel": "email", "subject": "s", "body": "b", "to": "nobody"}, "not one email address"),
        (
            {"channel": "email", "subject": "s", "body": "b", "to": "a@example.com, b@example.com"},
            "not one email address",
        ),
        (
            {"channel": "email", "subject": "s", "body": "b", "to": "a@example.com\r\nBcc: c@x.io"},
            "not one email address",
        ),
        ({"channel": "slack", "subject": "s", "body": "b", "text": "x"}, "unknown field.*text"),
    ],
)
def test_an_invalid_payload_is_permanent_with_a_clear_reason(payload: Any, reason: str) -> None:
    with pytest.raises(PermanentJobError, match=reason):
        parse_message(payload)


def test_the_message_id_is_stable_per_key_and_distinct_between_keys() -> None:
    first = stable_message_id("judgment-42:notice:1")

    assert first == stable_message_id("judgment-42:notice:1")
    assert first != stable_message_id("judgment-42:notice:2")
    assert first.startswith("<") and first.endswith("@dragonfly.outbox>")
    assert len(first) == len("<@dragonfly.outbox>") + 32
