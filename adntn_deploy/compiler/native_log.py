"""Keep TVM's native (C++) messages out of the user's terminal: into a log, with one summary line.

TVM's C++ code writes warnings straight to file descriptor 2 (the main job printed 24 lines of "Fast mode
segfaults when there are out-of-bounds indices" from its gather legalisation), where no Python logging
setting reaches them. :class:`NativeLog` points descriptor 2 at a temporary file around the TVM calls that
print, then keeps the text for ``build.log`` and a summary. Python's own writes to stderr in those windows
are caught too: callers report progress between windows, not inside them.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterator

# "[04:06:30] /project/include/tvm/topi/transform.h:1261: Warning: Fast mode segfaults ..."
_TVM_LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] \S+:\d+: (?:(\w+): )?(.*)$")
#: messages TVM prints as warnings that report our own bookkeeping: every compile that applies records
#: opens them as a JSONDatabase in a temporary folder, and TVM says so
_ROUTINE = re.compile(r"^Creating JSONDatabase\b")


class NativeLog:
    """What TVM printed to stderr during :meth:`capture` windows (all of it passes through when ``verbose``)."""

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        self.text = ""

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Redirect file descriptor 2 into this log for the duration of the block (nothing when verbose)."""
        if self.verbose:
            yield
            return
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile(mode="w+b") as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                sink.seek(0)
                self.text += sink.read().decode("utf-8", errors="replace")

    @property
    def lines(self) -> list[str]:
        """The captured lines that say something to the user (not the routine ones: :data:`_ROUTINE`)."""
        return [line for line in self.text.splitlines() if line.strip() and not _routine(line)]

    @property
    def count(self) -> int:
        """Number of captured lines."""
        return len(self.lines)

    def summary(self, log_path: str | os.PathLike | None, show: str = "-v shows them") -> str:
        """One line: how many messages of which kinds, the most frequent one, where they all are (``log_path``,
        or nowhere when None) and how to see them (``show``)."""
        kinds: Counter[str] = Counter()
        levels: Counter[str] = Counter()
        for line in self.lines:
            match = _TVM_LINE.match(line)
            kinds[(match.group(2) if match else line).strip()[:100]] += 1
            if match:
                levels[(match.group(1) or "message").lower()] += 1
        what = ", ".join(f"{n} {level}{'s' if n != 1 else ''}" for level, n in levels.most_common()) or f"{self.count} lines"
        top, times = kinds.most_common(1)[0]
        where = f"all in {Path(log_path)} " if log_path is not None else ""
        return f"note: TVM printed {what} ({len(kinds)} distinct; most often {times}x: {top!r}); {where}({show})"


def _routine(line: str) -> bool:
    match = _TVM_LINE.match(line)
    return bool(match and _ROUTINE.match(match.group(2)))
