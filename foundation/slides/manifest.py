"""The slide manifest: a CSV with one slide per row.

Columns: ``path`` (required; relative paths resolve against ``root``, by default the manifest's
folder), ``stain``, ``marker``, ``group`` (patient/case, for splits), ``mpp`` (µm/px, overrides the
file), ``slide_id`` (default: the path as written, without its extension). Other columns are
ignored. Stain and marker names go through the stain vocabulary; an unknown name, a bad ``mpp`` or a
duplicate ``slide_id`` is an error naming the manifest, the row and the value.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePath

from stain.vocabulary import StainVocabulary

COLUMNS = ("path", "stain", "marker", "group", "mpp", "slide_id")


class ManifestError(ValueError):
    """The manifest itself is malformed; the message names the file, the row and the value."""


@dataclass(frozen=True)
class ManifestRow:
    """One slide of the manifest, with its stain resolved to vocabulary ids."""

    line: int  # line number in the CSV (the header is line 1)
    path: Path  # resolved
    path_text: str  # as written in the manifest
    slide_id: str
    stain: str  # canonical vocabulary name
    stain_id: int
    marker: str
    marker_id: int
    group: str
    mpp: float | None


def _parse_mpp(text: str, where: str) -> float | None:
    if not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        raise ManifestError(f"{where}: mpp {text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise ManifestError(f"{where}: mpp must be a positive number of µm/px, got {text!r}")
    return value


def read_manifest(path: str | os.PathLike, vocabulary: StainVocabulary | None = None,
                  root: str | os.PathLike | None = None) -> list[ManifestRow]:
    """Parse and validate a manifest CSV (files are not opened here: a missing slide is reported later)."""
    path = Path(path)
    vocabulary = vocabulary or StainVocabulary()
    base = Path(root) if root is not None else path.resolve().parent
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        if "path" not in fields:
            raise ManifestError(f"{path}: no 'path' column (columns: {fields}; expected some of {list(COLUMNS)})")
        rows: list[ManifestRow] = []
        seen_ids: dict[str, int] = {}
        seen_paths: dict[Path, int] = {}
        for raw in reader:
            line = reader.line_num
            where = f"{path} line {line}"
            record = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            text = record.get("path", "")
            if not text:
                raise ManifestError(f"{where}: empty path")
            stain, marker = record.get("stain", ""), record.get("marker", "")
            try:
                label = vocabulary.label(stain, marker)
            except (KeyError, ValueError) as err:
                raise ManifestError(f"{where}: {err.args[0]}") from None
            resolved = Path(text) if Path(text).is_absolute() else base / text
            resolved = Path(os.path.normpath(resolved))
            slide_id = record.get("slide_id") or PurePath(text).with_suffix("").as_posix()
            if resolved in seen_paths:
                raise ManifestError(f"{where}: path {text!r} already listed on line {seen_paths[resolved]}")
            if slide_id in seen_ids:
                raise ManifestError(f"{where}: slide_id {slide_id!r} already used on line {seen_ids[slide_id]}")
            seen_ids[slide_id] = line
            seen_paths[resolved] = line
            rows.append(ManifestRow(
                line=line, path=resolved, path_text=text, slide_id=slide_id,
                stain=vocabulary.stain_name(label.stain_id), stain_id=label.stain_id,
                marker=vocabulary.marker_name(label.marker_id), marker_id=label.marker_id,
                group=record.get("group", ""), mpp=_parse_mpp(record.get("mpp", ""), where),
            ))
    if not rows:
        raise ManifestError(f"{path}: no slides listed")
    return rows
