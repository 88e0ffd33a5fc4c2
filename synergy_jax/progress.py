"""Progress that suits where it goes: a live tqdm bar on a terminal; anywhere else (a log file, a pipe, notebook
output) one plain line every `LINE_SECONDS` and at the end, with the same fields (count, elapsed < ETA, rate, and
the caller's postfix such as the loss), and never a carriage-return frame.

A 750-step demo run logged to a file thus writes a handful of lines instead of hundreds of redrawn frames.
"""

from __future__ import annotations

import io
import sys
from typing import TextIO

LINE_SECONDS = 30.0
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _Lines(io.TextIOBase):
    """A tqdm output that turns each frame tqdm draws into a line of its own, except a repeat of the line before
    (a bar that starts complete, such as a rerun that finds every row done, draws the same frame twice)."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> int:
        for frame in text.replace("\r", "\n").split("\n"):
            if frame.strip() and frame.rstrip() != self.last:
                self.last = frame.rstrip()
                self.stream.write(self.last + "\n")
        self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def bar(total: int | None, desc: str, unit: str, initial: int = 0, disable: bool = False, stream: TextIO | None = None):
    """A tqdm progress bar for `stream` (default stderr): live on a terminal, timed lines elsewhere."""
    from tqdm import tqdm

    stream = stream or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, file=stream, dynamic_ncols=True)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, file=_Lines(stream),
                mininterval=LINE_SECONDS, maxinterval=LINE_SECONDS, bar_format=LINE_FORMAT)  # fmt: skip
