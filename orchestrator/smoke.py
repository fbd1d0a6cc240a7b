"""CI smoke runs: ``--expect`` checks on the report, and a JUnit XML summary.

An expectation is ``FIELD=VALUE`` (also ``>=``, ``<=``) on a top-level field
of the report (``collected=10000``, ``lost=0``, ``status=completed``), or on
a key of a map in it (``per_consumer.0>=1``).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError

_EXPECT = re.compile(r"^(?P<field>[\w.]+)\s*(?P<op>>=|<=|==|=)\s*(?P<value>.+)$")


@dataclass(frozen=True)
class Expectation:
    field: str
    op: str
    value: str

    def __str__(self) -> str:
        return f"{self.field}{self.op}{self.value}"

    def check(self, report: dict[str, Any]) -> str | None:
        """None when the report meets it; otherwise what it found instead."""
        found: Any = report
        for part in self.field.split("."):
            if not isinstance(found, dict) or part not in found:
                return f"expected {self}, but the report has no {self.field!r}"
            found = found[part]
        if self.op in ("=", "=="):
            ok = str(found) == self.value
        else:
            try:
                number, wanted = float(found), float(self.value)
            except (TypeError, ValueError):
                return f"expected {self}, got {found!r} (not a number)"
            ok = number >= wanted if self.op == ">=" else number <= wanted
        return None if ok else f"expected {self}, got {self.field}={found}"


def parse(items: list[str] | None) -> list[Expectation]:
    expectations = []
    for item in items or ():
        found = _EXPECT.match(item.strip())
        if not found:
            raise UsageError(
                f"--expect {item!r}: use FIELD=VALUE, FIELD>=VALUE or FIELD<=VALUE, "
                "e.g. --expect collected=10000"
            )
        expectations.append(Expectation(found["field"], found["op"], found["value"]))
    return expectations


def check(report: dict[str, Any], expectations: list[Expectation]) -> dict[str, str]:
    """The mismatches, by expectation, in the order given."""
    found = {str(e): e.check(report) for e in expectations}
    return {k: v for k, v in found.items() if v is not None}


def write_junit(
    path: Path,
    report: dict[str, Any],
    expectations: list[Expectation],
    mismatches: dict[str, str],
) -> None:
    """One test suite per run: the run itself, then one case per expectation."""
    suite = ET.Element(
        "testsuite",
        name=f"orchestrator.{report['pipeline']}",
        tests=str(1 + len(expectations)),
        failures="0",
        errors="0",
        time=f"{report.get('duration_s') or 0:.3f}",
    )
    failures = 0
    run = ET.SubElement(
        suite, "testcase", classname=report["pipeline"], name="run completes"
    )
    if report["status"] != "completed":
        failures += 1
        failure = ET.SubElement(
            run, "failure", message=f"{report['status']}: {report.get('failure')}"
        )
        failure.text = str(report.get("failed_stage") or report.get("failure") or "")
    for expectation in expectations:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=report["pipeline"],
            name=f"expect {expectation}",
        )
        if str(expectation) in mismatches:
            failures += 1
            ET.SubElement(case, "failure", message=mismatches[str(expectation)])
    suite.set("failures", str(failures))
    out = ET.SubElement(suite, "system-out")
    out.text = (
        f"produced {report['produced']} collected {report['collected']} "
        f"lost {report['lost']} restarts {report['restarts']} "
        f"duration {report.get('duration_s')} s"
    )
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
