"""Redaction replaces secrets inside text values, so a secret never corrupts a line."""

from __future__ import annotations

import json
import logging

from backend.logs import RedactingJsonFormatter


def _line(secret: str, data: dict[str, object]) -> dict[str, object]:
    formatter = RedactingJsonFormatter(secrets=[secret], fmt=["levelname", "message"], timestamp=True)
    record = logging.LogRecord("dragonfly.events", logging.INFO, __file__, 1, "EVT", None, None)
    record.event = "EVT"
    record.data = data
    parsed: dict[str, object] = json.loads(formatter.format(record))
    return parsed


def test_a_secret_made_of_digits_leaves_numbers_and_json_intact() -> None:
    line = _line("2384", {"pid": 2384, "error": "login 2384 refused", "nested": {"list": ["x2384y"]}})
    assert line["data"] == {"pid": 2384, "error": "login *** refused", "nested": {"list": ["x***y"]}}


def test_a_one_character_secret_still_gives_valid_json() -> None:
    line = _line('"', {"error": 'say "hi"', "pid": 7})
    assert line["data"] == {"error": "say ***hi***", "pid": 7}
