"""The per-batch comparison script runs this tree's runtime beside another commit's."""

from __future__ import annotations

import re
import sys

import pytest

from scripts import batch_cost


def test_batch_cost_compares_this_tree_with_a_commit(capsys: pytest.CaptureFixture[str]) -> None:
    assert batch_cost.main(["--batches", "5", "--against", "HEAD"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  pgmq loop +\d+\.\d+ ms +1\.00$", out, re.M), out
    assert re.search(r"^  this tree +\d+\.\d+ ms +\d\.\d\d$", out, re.M), out
    assert re.search(r"^this tree / HEAD: \d\.\d{3} of its time per batch$", out, re.M), out
    assert batch_cost.REF_PACKAGE not in sys.modules


def test_batch_cost_runs_the_collectability_handler(capsys: pytest.CaptureFixture[str]) -> None:
    assert batch_cost.main(["--batches", "3", "--handler", "collectability"]) == 0
    out = capsys.readouterr().out
    assert "batch of 100, collectability handler" in out, out
    assert re.search(r"^  this tree +\d+\.\d+ ms +\d\.\d\d$", out, re.M), out
