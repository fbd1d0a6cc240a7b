"""`orchestrator logs`: the replicas' log files, merged in time order.

Each replica's output goes to ``logs/<stage>.<replica>.log`` (rotated by
size by the supervisor), one ``YYYY-MM-DD HH:MM:SS,mmm line`` per line.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ?(.*)$")
# How often `logs -f` looks for new lines, new replicas and rotated files.
FOLLOW_POLL_S = 0.2


@dataclass(order=True)
class Line:
    stamp: str
    name: str = field(compare=False)
    text: str = field(compare=False)

    @property
    def time(self) -> str:
        return self.stamp[11:19]


def select(logs_dir: Path, which: str | None) -> list[Path]:
    """The log files of every replica, of one stage, or of one replica.

    The daemon's own log (``supervisor``: starts, exits, restarts, scaling)
    is merged in when no stage is named.
    """
    files = sorted(logs_dir.glob("*.log"))
    own = logs_dir.parent / "supervisor.log"
    if which == "supervisor" or (which is None and own.exists()):
        files.append(own)
    if which is None or which == "supervisor":
        return files if which is None else [own]
    if "." in which:
        return [f for f in files if f.stem == which]
    return [f for f in files if f.stem.rsplit(".", 1)[0] == which]


def check_selection(logs_dir: Path, which: str | None) -> list[Path]:
    files = select(logs_dir, which)
    if not files and which is not None:
        known = sorted({f.stem.rsplit(".", 1)[0] for f in select(logs_dir, None)})
        raise UsageError(
            f"no logs for {which!r} in {logs_dir} "
            f"(stages with logs: {', '.join(known) or 'none'})"
        )
    return files


def parse(name: str, text: str, last_stamp: str = "") -> Iterator[Line]:
    stamp = last_stamp
    for raw in text.splitlines():
        found = _STAMP.match(raw)
        if found:
            stamp = found[1]
            yield Line(stamp, name, found[2])
        else:  # a line written without our formatter: keep it, in place
            yield Line(stamp, name, raw)


def read(files: list[Path], tail: int | None = None) -> list[Line]:
    """Every line of ``files`` in time order (the last ``tail`` of them)."""
    lines: list[Line] = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        lines.extend(parse(path.stem, text))
    lines.sort()  # stable: lines of one replica keep their order
    return lines[-tail:] if tail else lines


@dataclass
class _Followed:
    inode: int
    offset: int
    partial: str = ""


def follow(
    logs_dir: Path,
    which: str | None,
    emit: Callable[[Line], None],
    start_at_end: bool = True,
    until: Callable[[], bool] = lambda: False,
) -> None:
    """Print lines as they are written, like ``tail -F``, until ``until()``.

    New replicas (after a scale) are picked up; a rotated file is read again
    from its start.
    """
    state: dict[Path, _Followed] = {}
    for path in select(logs_dir, which):
        st = path.stat()
        state[path] = _Followed(st.st_ino, st.st_size if start_at_end else 0)
    while not until():
        for path in select(logs_dir, which):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            seen = state.get(path)
            if seen is None or seen.inode != st.st_ino or st.st_size < seen.offset:
                seen = state[path] = _Followed(st.st_ino, 0)
            if st.st_size == seen.offset:
                continue
            with open(path, "rb") as fh:
                fh.seek(seen.offset)
                data = fh.read()
            seen.offset += len(data)
            text = seen.partial + data.decode("utf-8", "replace")
            complete, _, seen.partial = text.rpartition("\n")
            for line in parse(path.stem, complete) if complete else ():
                emit(line)
        time.sleep(FOLLOW_POLL_S)
