"""Writing the files a run leaves behind (its report, a JUnit summary)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader never sees half of it.

    A regular file (or a new one) is replaced in one step by a file written
    next to it; a symlink is followed, so its target is what changes.  What
    is not a regular file (``/dev/stdout``, a FIFO, a device) is written
    directly: replacing it would put a plain file in its place.  Nothing
    partial is left behind when the write fails (a full disk).
    """
    target = path.resolve()
    if target.exists() and not target.is_file():
        with open(target, "w", encoding="utf-8") as out:
            out.write(text)
        return
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        partial.write_text(text, encoding="utf-8")
        partial.replace(target)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
