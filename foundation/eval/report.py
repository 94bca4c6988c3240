"""The results of an eval run as a markdown table (printed, and written next to the JSON) and as JSON."""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _cell(stat: Mapping[str, float]) -> str:
    mean, std = stat["mean"], stat["std"]
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}"


def markdown_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]], metrics: Sequence[str],
                   row_key: str = "protocol") -> str:
    """One row per (encoder, ``row_key``) with ``mean ± std`` of each metric; ``results[encoder][row]["summary"]``."""
    header = f"| encoder | {row_key} | " + " | ".join(metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 2)]
    for encoder, rows in results.items():
        for row, result in rows.items():
            cells = [_cell(result["summary"][m]) for m in metrics]
            lines.append(f"| {encoder} | {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _clean(value: Any) -> Any:
    """NaN -> None (strict JSON)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_report(json_path: str | Path, payload: Mapping[str, Any], table: str) -> tuple[Path, Path]:
    """Write ``payload`` (plus the table) as strict JSON and the table as ``<json stem>.md``."""
    json_path = Path(json_path)
    if json_path.suffix != ".json":
        raise ValueError(f"--out {json_path}: the report must be a .json file")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(_clean({**payload, "table": table}), indent=2, allow_nan=False) + "\n")
    md_path = json_path.with_suffix(".md")
    md_path.write_text(table)
    return json_path, md_path


def publish_report(out: str | Path, table: str, task: Mapping[str, Any], weights: str, sources: Mapping[str, Any],
                   results: Mapping[str, Any], settings: Mapping[str, Any]) -> tuple[Path, Path]:
    """Print ``table`` and write the run's report (:func:`write_report`): the task, the weights, each encoder's
    ``describe()``, the results and the eval settings."""
    sys.stdout.write(table)
    payload = {"task": dict(task), "weights": weights,
               "sources": {name: src.describe() for name, src in sources.items()},
               "results": results, "settings": settings}
    json_path, md_path = write_report(out, payload, table)
    log.info("wrote %s and %s", json_path, md_path)
    return json_path, md_path
