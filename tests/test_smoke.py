"""--expect parsing and checking, and the JUnit XML summary."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from orchestrator import smoke
from orchestrator.errors import UsageError

REPORT: dict[str, Any] = {
    "pipeline": "classic",
    "status": "completed",
    "produced": 20000,
    "collected": 10000,
    "lost": 0,
    "restarts": 0,
    "per_consumer": {"0": 5000, "1": 5000},
    "duration_s": 0.5,
}


def test_expectations_compare_equal_at_least_and_at_most() -> None:
    expectations = smoke.parse(
        ["collected=10000", "lost<=0", "per_consumer.1>=4000", "status=completed"]
    )
    assert smoke.check(REPORT, expectations) == {}


def test_mismatch_says_what_was_found() -> None:
    expectations = smoke.parse(["collected=999", "produced>=30000", "per_consumer.7=1"])
    assert smoke.check(REPORT, expectations) == {
        "collected=999": "expected collected=999, got collected=10000",
        "produced>=30000": "expected produced>=30000, got produced=20000",
        "per_consumer.7=1": (
            "expected per_consumer.7=1, but the report has no 'per_consumer.7'"
        ),
    }


def test_numbers_are_compared_as_numbers() -> None:
    same = smoke.parse(["collected=10000.0", "collected=1e4", "per_consumer.0=5e3"])
    assert smoke.check(REPORT, same) == {}
    assert smoke.check(REPORT, smoke.parse(["collected=10000.5"])) != {}


@pytest.mark.parametrize("bad", ["collected", "=3", "collected>3"])
def test_unreadable_expectation_is_a_usage_error(bad: str) -> None:
    with pytest.raises(UsageError, match="FIELD=VALUE"):
        smoke.parse([bad])


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("nosuch=1", "the report has no field 'nosuch'"),
        ("collectd=1", "did you mean 'collected'?"),
        ("collected=abc", "'abc' is not a number"),
        ("lost<=none", "'none' is not a number"),
        ("per_consumer.0>=x", "'x' is not a number"),
        ("collected.x=1", "'collected' is not a map"),
        ("status>=1", "'status' is not a number, so it has no order"),
        ("collected=nan", "'nan' is not a number"),
    ],
)
def test_expectation_no_report_could_meet_is_a_usage_error(
    bad: str, reason: str
) -> None:
    with pytest.raises(UsageError, match=re.escape(reason)):
        smoke.parse([bad])


def test_dotted_keys_into_maps_and_text_fields_stay_allowed() -> None:
    expectations = smoke.parse(
        ["per_consumer.0>=1", "summary.words=3", "status=completed", "failure=None"]
    )
    assert [str(e) for e in expectations] == [
        "per_consumer.0>=1",
        "summary.words=3",
        "status=completed",
        "failure=None",
    ]


def test_junit_has_one_case_for_the_run_and_one_per_expectation(
    tmp_path: Path,
) -> None:
    expectations = smoke.parse(["collected=999", "lost=0"])
    failed = dict(REPORT, status="timeout", failure="the run did not finish")
    target = tmp_path / "junit.xml"

    smoke.write_junit(target, failed, expectations, smoke.check(failed, expectations))

    suite = ET.parse(target).getroot().find("testsuite")
    assert suite is not None
    assert suite.get("tests") == "3" and suite.get("failures") == "2"
    cases = {c.get("name"): c.find("failure") for c in suite.iter("testcase")}
    assert cases["run completes"] is not None
    assert "timeout" in (cases["run completes"].get("message") or "")
    assert cases["expect collected=999"] is not None
    assert cases["expect lost=0"] is None
