"""The report's grid: ``python scripts/reproduce.py ARGS`` is ``python -m hbt_ray.reproduce ARGS`` (see there)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hbt_ray.config import note_terminal  # noqa: E402
from hbt_ray.reproduce.__main__ import main  # noqa: E402

if __name__ == "__main__":
    note_terminal()
    raise SystemExit(main())
