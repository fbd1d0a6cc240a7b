"""CI smoke runs: ``--expect`` checks on the report, and a JUnit XML summary.

An expectation is ``FIELD=VALUE`` (also ``>=``, ``<=``) on a top-level field
of the report (``collected=10000``, ``lost=0``, ``status=completed``), or on
a key of a map in it (``per_consumer.0>=1``).  A field no report has, or a
comparison no value could meet, is refused before the run starts.
"""

from __future__ import annotations

import difflib
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import files
from .errors import UsageError
from .report import FIELDS

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
            wanted = _number(self.value)
            if _is_number(found) and wanted is not None:
                ok = found == wanted  # 1e4 and 10000.0 are 10000
            else:
                ok = str(found) == self.value
        else:
            try:
                number, wanted = float(found), float(self.value)
            except (TypeError, ValueError):
                return f"expected {self}, got {found!r} (not a number)"
            ok = number >= wanted if self.op == ">=" else number <= wanted
        return None if ok else f"expected {self}, got {self.field}={found}"


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse(items: list[str] | None) -> list[Expectation]:
    """The expectations; a usage error, before any run, for one that no
    report could meet."""
    expectations = []
    for item in items or ():
        found = _EXPECT.match(item.strip())
        if not found:
            raise UsageError(
                f"--expect {item!r}: use FIELD=VALUE, FIELD>=VALUE or FIELD<=VALUE, "
                "e.g. --expect collected=10000"
            )
        expectation = Expectation(found["field"], found["op"], found["value"])
        problem = _problem(expectation)
        if problem is not None:
            raise UsageError(f"--expect {item!r}: {problem}")
        expectations.append(expectation)
    return expectations


def _problem(expectation: Expectation) -> str | None:
    top, dotted, _ = expectation.field.partition(".")
    kind = FIELDS.get(top)
    if kind is None:
        close = difflib.get_close_matches(top, sorted(FIELDS), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"the report has no field {top!r}{hint}"
    if dotted and kind != "map":
        maps = ", ".join(name for name, of in FIELDS.items() if of == "map")
        return f"{top!r} is not a map; a dotted key reaches into one of {maps}"
    if expectation.op in (">=", "<=") and kind not in ("number", "map"):
        return f"{top!r} is not a number, so it has no order"
    numeric = expectation.op in (">=", "<=") or (kind == "number" and not dotted)
    wanted = _number(expectation.value)
    if numeric and (wanted is None or math.isnan(wanted)):
        return f"{expectation.value!r} is not a number"
    return None


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
    text = ET.tostring(root, encoding="unicode", xml_declaration=True)
    files.write_text(path, text + "\n")
