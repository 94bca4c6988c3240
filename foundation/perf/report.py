"""Terminal tables, JSON files and optional TensorBoard scalars for the benches."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from foundation.fileio import atomic_write_text


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain text table of ``rows`` with (key, header) ``columns``."""
    cells = [[header for _, header in columns]] + [[fmt(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    """Atomically: a sweep killed while it rewrites its JSON keeps the previous complete file."""
    return atomic_write_text(path, json.dumps(payload, indent=1, default=str) + "\n")


def write_tensorboard(directory: Path, rows: Sequence[Mapping[str, Any]], name_key: str) -> None:
    """One scalar per numeric figure, tagged ``<row name>/<figure>``."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(directory))
    try:
        for row in rows:
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(f"{row[name_key]}/{key}", value, 0)
    finally:
        writer.close()
