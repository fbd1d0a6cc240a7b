"""``orchestrator init``: a new pipeline that runs as it is written.

Two files: ``pipeline.toml`` and a stage module with a source, a worker and
a sink, each a plain function with a docstring that says what it may
return.  The endpoints are ipc:// files named after the pipeline and its
directory, so a new pipeline never collides with the default one (tcp ports
5557/5558) or with another new one.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from pathlib import Path

from .errors import UsageError, WouldOverwrite

MODULE = "my_stages"

# Unix socket paths are limited to 107 bytes; a long directory name must not
# make the endpoints unusable.
_MAX_NAME = 40

_STAGES = '''\
"""The stages of pipeline {name}.  Edit them, then run: orchestrator run

A stage is a plain function; its role comes from the wiring in pipeline.toml.
Records are any value msgpack can carry: dicts, lists, strings, numbers.
Parameters come from [stages.NAME.params] as keyword arguments.
See docs/stages.md in the orchestrator's repository.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from orchestrator import StageContext


def generate(ctx: StageContext, count: int = 1000) -> Iterator[dict[str, int]]:
    """Source: yield (or return) the records that enter the pipeline."""
    for n in range(count):
        yield {{"n": n}}


def transform(record: dict[str, int], ctx: StageContext) -> dict[str, int] | None:
    """Worker: return None to drop a record, a record, or a list of records."""
    n = record["n"]
    if n % 3 == 0:
        return None
    return {{"n": n, "square": n * n, "replica": ctx.replica}}


def summarize(records: Iterable[dict[str, Any]], ctx: StageContext) -> dict[str, Any]:
    """Sink: consume every record; what it returns goes into the report."""
    count = 0
    total = 0
    for record in records:
        count += 1
        total += record["square"]
    ctx.log.info("%d records, sum of squares %d", count, total)
    return {{"records": count, "sum_of_squares": total}}
'''

_PIPELINE = """\
# Pipeline {name}, written by `orchestrator init`.
#
#   orchestrator check      validate it and print the plan
#   orchestrator run        run it and print the report
#
# Reference: docs/pipeline-toml.md and docs/stages.md.

[pipeline]
name = "{name}"

[stages.generate]
call = "{module}:generate"
push = {{ bind = "{work}" }}
params = {{ count = 10000 }}

[stages.transform]
call = "{module}:transform"
replicas = 2
pull = {{ connect = "{work}" }}
push = {{ connect = "{results}" }}

[stages.summarize]
call = "{module}:summarize"
pull = {{ bind = "{results}" }}
"""


def pipeline_name(directory: Path) -> str:
    """A valid pipeline name from the directory's name."""
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "-", directory.resolve().name).strip("-.")
    return name[:_MAX_NAME] or "pipeline"


def files(directory: Path) -> dict[Path, str]:
    """The files ``init`` writes into ``directory``, with their text."""
    name = pipeline_name(directory)
    digest = hashlib.sha1(str(directory.resolve()).encode()).hexdigest()[:6]
    prefix = f"ipc://{tempfile.gettempdir()}/orchestrator-{name}-{digest}"
    pipeline = _PIPELINE.format(
        name=name,
        module=MODULE,
        work=f"{prefix}-work.sock",
        results=f"{prefix}-results.sock",
    )
    return {
        directory / "pipeline.toml": pipeline,
        directory / f"{MODULE}.py": _STAGES.format(name=name),
    }


def init(directory: Path, force: bool = False) -> list[Path]:
    """Write a new pipeline into ``directory``; never overwrite without ``force``."""
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory} is not a directory; name a directory to init")
    wanted = files(directory)
    existing = [path for path in wanted if path.exists()]
    if existing and not force:
        raise WouldOverwrite(existing)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for path, text in wanted.items():
            path.write_text(text, encoding="utf-8")
    except OSError as exc:  # a file on the way, no permission, a full disk
        where = exc.filename or directory
        raise UsageError(f"cannot write {where}: {exc.strerror or exc}") from exc
    return list(wanted)
