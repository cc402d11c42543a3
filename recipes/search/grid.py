"""Cut-off grids for Stage 2 (no heavy imports: the CLI parses them before anything loads)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def parse_grid(text: str) -> list[float]:
    """``"0:0.5:0.01"`` (inclusive) or ``"0,0.1,0.2"`` → a validated cut-off grid."""
    text = str(text).strip()
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0:
                raise ValueError(f"grid step must be > 0, got {step}")
            n = int(math.floor((stop - start) / step + 1e-9)) + 1
            grid = [round(start + i * step, 10) for i in range(n)]
        else:
            grid = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ValueError(f"bad cut-off grid {text!r}: {e}") from None
    return validate_grid(grid)


def validate_grid(grid: Sequence[float]) -> list[float]:
    grid = [float(p) for p in grid]
    if not grid:
        raise ValueError("the cut-off grid is empty")
    if any(b <= a for a, b in zip(grid, grid[1:])):
        raise ValueError(f"the cut-off grid must be strictly increasing, got {grid[:6]}...")
    bad = [p for p in grid if not 0.0 <= p <= 50.0]
    if bad:
        raise ValueError(f"cut-offs must lie in [0, 50] percent, got {bad}")
    return grid
