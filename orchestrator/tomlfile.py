"""Reading a pipeline file: parse it, find the line of any key, apply overrides.

``tomllib`` gives values but no positions, and a validation message without
a line number sends the user hunting.  :class:`KeyLines` recovers positions
with a line scanner that understands the subset of TOML a pipeline file uses
(tables, dotted keys, inline tables); when a key cannot be placed exactly,
the line of its nearest enclosing table is used instead.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, Problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

KeyPath = tuple[str, ...]

_HEADER = re.compile(r"^\s*\[\[?\s*(?P<name>[^\]]+?)\s*\]\]?\s*(?:#.*)?$")
_ASSIGN = re.compile(r"^\s*(?P<key>[A-Za-z0-9_\-.\"' ]+?)\s*=")
_INLINE_KEY = re.compile(r"[{,]\s*(?P<key>[A-Za-z0-9_\-\"']+)\s*=")
_POSITION = re.compile(r"\(at line (?P<line>\d+), column \d+\)")


def _split_dotted(text: str) -> KeyPath:
    return tuple(part.strip().strip("\"'") for part in text.split("."))


class KeyLines:
    """Maps key paths of one TOML text to the line they are written on."""

    def __init__(self, text: str) -> None:
        self._lines: dict[KeyPath, int] = {}
        self.duplicates: list[tuple[KeyPath, int, int]] = []  # path, first, again
        table: KeyPath = ()
        for number, line in enumerate(text.splitlines(), start=1):
            header = _HEADER.match(line)
            if header:
                table = _split_dotted(header["name"])
                if table in self._lines and not line.lstrip().startswith("[["):
                    self.duplicates.append((table, self._lines[table], number))
                self._lines.setdefault(table, number)
                continue
            assign = _ASSIGN.match(line)
            if not assign:
                continue
            path = table + _split_dotted(assign["key"])
            self._lines.setdefault(path, number)
            rest = line[assign.end() :]
            for inner in _INLINE_KEY.finditer(rest):
                self._lines.setdefault(path + (inner["key"].strip("\"'"),), number)

    def line_of(self, path: KeyPath) -> int | None:
        """The line of ``path``, or of its closest ancestor that is written."""
        for end in range(len(path), 0, -1):
            line = self._lines.get(path[:end])
            if line is not None:
                return line
        return None


@dataclass
class PipelineSource:
    """The parsed document plus what is needed to point at its parts."""

    path: Path
    data: dict[str, Any]
    lines: KeyLines
    overrides: dict[KeyPath, str] = field(default_factory=dict)

    def problem(self, path: KeyPath, message: str) -> Problem:
        key = ".".join(path)
        for overridden, text in self.overrides.items():
            if path[: len(overridden)] == overridden:
                return Problem(f"--set {text}", None, key, message)
        return Problem(str(self.path), self.lines.line_of(path), key, message)


def read(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineSource:
    """Parse ``path`` and apply ``--set KEY=VALUE`` overrides to it."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [Problem(str(path), None, "", "cannot read: not UTF-8 text")]
        ) from exc
    except OSError as exc:
        raise ConfigError(
            [Problem(str(path), None, "", f"cannot read: {exc.strerror}")]
        ) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        duplicates = KeyLines(text).duplicates
        if duplicates:  # say it in the user's words, not the parser's
            raise ConfigError(
                Problem(
                    str(path),
                    again,
                    ".".join(table),
                    f"declared twice (first at line {first})"
                    + (": duplicate stage name" if table[0] == "stages" else ""),
                )
                for table, first, again in duplicates
            ) from exc
        raise ConfigError([_decode_problem(path, exc)]) from exc

    source = PipelineSource(path, data, KeyLines(text))
    problems = [p for item in overrides if (p := _apply(source, item))]
    if problems:
        raise ConfigError(problems)
    return source


def _decode_problem(path: Path, exc: tomllib.TOMLDecodeError) -> Problem:
    message = str(exc)
    found = _POSITION.search(message)
    line = int(found["line"]) if found else None
    message = _POSITION.sub("", message).strip()
    return Problem(str(path), line, "", f"not valid TOML: {message}")


def parse_value(text: str) -> Any:
    """A TOML value; text that is not one is taken as a plain string.

    ``--set stages.words.params.path=/tmp/a.txt`` is what people type, and
    insisting on quotes around every path would only produce errors.
    """
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _apply(source: PipelineSource, item: str) -> Problem | None:
    key, sep, raw = item.partition("=")
    path = _split_dotted(key.strip())
    if not sep or not all(path):
        return Problem(f"--set {item}", None, key, "expected KEY=VALUE")
    node: Any = source.data
    for depth, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(path[: depth + 1])
            return Problem(f"--set {item}", None, key, f"{where} is not a table")
        node = child
    node[path[-1]] = parse_value(raw.strip())
    source.overrides[path] = item
    return None
