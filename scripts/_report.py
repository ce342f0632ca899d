"""The report every benchmark and check script prints as it goes and, with ``--out``, also writes."""

from __future__ import annotations

import io
from pathlib import Path


class Report:
    """``say(line)`` prints a line at once and keeps it; ``save(path)`` writes what was said (None: nothing)."""

    def __init__(self) -> None:
        self._text = io.StringIO()

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self._text.write(line + "\n")

    def save(self, path: str | None) -> None:
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(self._text.getvalue(), encoding="utf-8")
