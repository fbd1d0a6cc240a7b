"""Word frequency over a text file, as a pipeline.

``lines`` reads the file line by line, ``words`` splits each line into
words, ``tally`` counts them and writes one JSON object (word -> count).
A word is what ``re.findall(r"\\w+", line.lower())`` finds, so the result is
identical to this single-process count::

    counts = collections.Counter()
    with open(path, encoding="utf-8", errors="replace") as text:
        for line in text:
            counts.update(re.findall(r"\\w+", line.lower()))
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from orchestrator import StageContext

WORD = re.compile(r"\w+")


def lines(ctx: StageContext, path: str) -> Iterator[str]:
    """Each line of the file at ``path`` ("-": standard input), as UTF-8.

    Undecodable bytes become U+FFFD, which is not a word character.  The file
    is opened now, not when the first line is read: a source that raises
    before it returns fails the run at once (a missing file will not appear
    by restarting), instead of being restarted until it gives up.
    """
    # Standard input cannot be read twice: if this source is restarted, the
    # lines already read are gone (see "Sources" in docs/stages.md).
    source: str | int = 0 if path == "-" else path
    # Closed by _read when the stream ends (or the process does).
    text = open(  # noqa: SIM115
        source, encoding="utf-8", errors="replace", closefd=path != "-"
    )
    return _read(text)


def _read(text: TextIO) -> Iterator[str]:
    with text:
        yield from text


def words(line: str, ctx: StageContext) -> list[str]:
    """The words of one line, lower-cased."""
    return WORD.findall(line.lower())


def tally(records: Iterable[str], ctx: StageContext, output: str) -> dict[str, Any]:
    """Count the words and write them to ``output`` as one JSON object."""
    counts = Counter(records)
    target = Path(output).resolve()
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(partial, "w", encoding="utf-8") as out:
        json.dump(counts, out, ensure_ascii=False)
    os.replace(partial, target)  # never leave half a file where one is expected
    return {"output": str(target), "words": counts.total(), "distinct": len(counts)}
