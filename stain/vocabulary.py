"""Stain vocabulary: stain types and IHC markers with stable integer ids and aliases.

Ids are part of a trained model (they index the stain-token table), so the built-in order below
must never change: append new entries at the end, or add them from config
(``stain.extra_stains`` / ``stain.extra_markers``), which places them after the built-ins.

A tile is labelled by a :class:`StainLabel`: its stain id and, for IHC, a marker id. Id 0 of
both tables is ``unknown``: the model's token for unlabelled data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

UNKNOWN = "unknown"


@dataclass(frozen=True)
class Entry:
    """One vocabulary entry: canonical name, kind, and the aliases it is recognised by."""

    name: str
    kind: str
    aliases: tuple[str, ...] = ()


# kind: "unknown" | "he" | "ihc" | "special"
BUILTIN_STAINS: tuple[Entry, ...] = (
    Entry(UNKNOWN, "unknown", ("", "na", "n/a", "none", "unlabelled", "unlabeled", "?")),
    Entry("H&E", "he", ("he", "h&e", "h and e", "h+e", "hematoxylin-eosin", "haematoxylin-eosin",
                        "hematoxylin and eosin", "haematoxylin and eosin", "hne")),
    Entry("IHC", "ihc", ("ihc", "immunohistochemistry", "dab", "ihc-dab", "h-dab", "hdab")),
    Entry("PAS", "special", ("pas", "periodic acid-schiff", "periodic acid schiff")),
    Entry("Masson trichrome", "special", ("masson", "trichrome", "masson's trichrome", "mt")),
    Entry("Giemsa", "special", ("giemsa",)),
    Entry("Congo red", "special", ("congo", "congo red")),
    Entry("Reticulin", "special", ("reticulin", "silver", "gomori")),
    Entry("Jones silver", "special", ("jones", "jones silver", "pams", "methenamine silver")),
    Entry("Elastic van Gieson", "special", ("evg", "elastic van gieson", "verhoeff", "vvg")),
    Entry("Alcian blue", "special", ("alcian", "alcian blue", "ab")),
    Entry("Perls iron", "special", ("perls", "prussian blue", "iron")),
    Entry("Ziehl-Neelsen", "special", ("zn", "ziehl-neelsen", "afb", "acid-fast")),
    Entry("Grocott", "special", ("gms", "grocott", "grocott methenamine silver")),
    Entry("Toluidine blue", "special", ("toluidine", "toluidine blue")),
    Entry("Mucicarmine", "special", ("mucicarmine",)),
)

BUILTIN_MARKERS: tuple[Entry, ...] = (
    Entry(UNKNOWN, "marker", ("", "na", "n/a", "none", "?")),
    Entry("DAB", "marker", ("dab", "generic", "generic dab", "ihc")),
    Entry("Ki67", "marker", ("ki67", "ki-67", "mib1", "mib-1")),
    Entry("HER2", "marker", ("her2", "her-2", "erbb2", "her2/neu", "cerbb2")),
    Entry("ER", "marker", ("er", "estrogen receptor", "oestrogen receptor", "esr1", "er-alpha")),
    Entry("PR", "marker", ("pr", "pgr", "progesterone receptor")),
    Entry("CD3", "marker", ("cd3",)),
    Entry("CD8", "marker", ("cd8",)),
    Entry("CD20", "marker", ("cd20", "ms4a1")),
    Entry("CD68", "marker", ("cd68",)),
    Entry("PD-L1", "marker", ("pd-l1", "pdl1", "cd274", "22c3", "sp263", "sp142")),
    Entry("p53", "marker", ("p53", "tp53")),
    Entry("pan-CK", "marker", ("pan-ck", "panck", "ck", "cytokeratin", "pancytokeratin", "ae1/ae3")),
    Entry("CD4", "marker", ("cd4",)),
    Entry("CD45", "marker", ("cd45", "lca")),
    Entry("FOXP3", "marker", ("foxp3",)),
    Entry("p16", "marker", ("p16", "cdkn2a")),
    Entry("CK7", "marker", ("ck7",)),
    Entry("CK20", "marker", ("ck20",)),
    Entry("TTF-1", "marker", ("ttf-1", "ttf1", "nkx2-1")),
    Entry("ALK", "marker", ("alk",)),
    Entry("MLH1", "marker", ("mlh1",)),
    Entry("MSH2", "marker", ("msh2",)),
    Entry("MSH6", "marker", ("msh6",)),
    Entry("PMS2", "marker", ("pms2",)),
)


def normalise(text: str) -> str:
    """Case-, space- and punctuation-insensitive key for matching names and aliases."""
    text = text.strip().lower().replace("_", " ")
    return re.sub(r"\s+", " ", text)


def _compact(text: str) -> str:
    return re.sub(r"[\s\-/]", "", normalise(text))


@dataclass(frozen=True)
class StainLabel:
    """What a slide or tile is stained with: stain id and marker id (0 = unknown)."""

    stain_id: int
    marker_id: int = 0


@dataclass
class _Table:
    entries: list[Entry] = field(default_factory=list)
    lookup: dict[str, int] = field(default_factory=dict)

    def add(self, entry: Entry, what: str) -> int:
        idx = len(self.entries)
        for key in {entry.name, *entry.aliases}:
            for form in {normalise(key), _compact(key)}:
                owner = self.lookup.get(form)
                if owner is not None and owner != idx:
                    raise ValueError(
                        f"{what} alias {key!r} of {entry.name!r} already names {self.entries[owner].name!r}"
                    )
                self.lookup[form] = idx
        self.entries.append(entry)
        return idx

    def find(self, text: str) -> int | None:
        for form in (normalise(text), _compact(text)):
            if form in self.lookup:
                return self.lookup[form]
        return None


class StainVocabulary:
    """Stain and marker tables with stable ids; built-ins first, then config extensions."""

    def __init__(self, extra_stains: Iterable[Mapping[str, Any]] = (),
                 extra_markers: Iterable[Mapping[str, Any]] = ()) -> None:
        self._stains = _Table()
        self._markers = _Table()
        for entry in BUILTIN_STAINS:
            self._stains.add(entry, "stain")
        for entry in BUILTIN_MARKERS:
            self._markers.add(entry, "marker")
        for spec in extra_stains:
            self._stains.add(_entry_from_config(spec, default_kind="special"), "stain")
        for spec in extra_markers:
            self._markers.add(_entry_from_config(spec, default_kind="marker"), "marker")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> StainVocabulary:
        """Build from the ``stain`` section of the config (``None`` gives the built-ins)."""
        cfg = cfg or {}
        return cls(cfg.get("extra_stains") or (), cfg.get("extra_markers") or ())

    @property
    def num_stains(self) -> int:
        return len(self._stains.entries)

    @property
    def num_markers(self) -> int:
        return len(self._markers.entries)

    def stain_id(self, name: str) -> int:
        """Id of a stain name or alias; raises ``KeyError`` naming the value if unknown."""
        idx = self._stains.find(name)
        if idx is None:
            raise KeyError(f"unknown stain {name!r}; known: {[e.name for e in self._stains.entries]} "
                           "(add it under stain.extra_stains)")
        return idx

    def marker_id(self, name: str) -> int:
        """Id of an IHC marker name or alias; raises ``KeyError`` naming the value if unknown."""
        idx = self._markers.find(name)
        if idx is None:
            raise KeyError(f"unknown IHC marker {name!r}; known: {[e.name for e in self._markers.entries]} "
                           "(add it under stain.extra_markers)")
        return idx

    def stain_name(self, idx: int) -> str:
        return self._stains.entries[idx].name

    def marker_name(self, idx: int) -> str:
        return self._markers.entries[idx].name

    def stain_kind(self, idx: int) -> str:
        """``he``, ``ihc``, ``special`` or ``unknown``: selects the augmentation policy."""
        return self._stains.entries[idx].kind

    def label(self, stain: str | None, marker: str | None = None) -> StainLabel:
        """Label for a manifest row. A marker alone implies IHC; a marker on a non-IHC stain is an error."""
        stain = stain or ""
        marker = marker or ""
        marker_id = self.marker_id(marker) if marker.strip() else 0
        if not stain.strip() and marker_id:
            stain_id = self.stain_id("IHC")
        else:
            stain_id = self.stain_id(stain)
        if marker_id and self.stain_kind(stain_id) != "ihc":
            raise ValueError(f"marker {marker!r} given for non-IHC stain {self.stain_name(stain_id)!r}")
        return StainLabel(stain_id, marker_id)

    def requested_label(self, stain: str | None, marker: str | None) -> StainLabel:
        """Label named on a command line: like :meth:`label`, with ``None`` and ``unknown`` for either part."""
        stain = "" if stain is None or normalise(stain) == UNKNOWN else stain
        marker = "" if marker is None or normalise(marker) == UNKNOWN else marker
        return self.label(stain, marker)

    def describe(self, label: StainLabel) -> str:
        name = self.stain_name(label.stain_id)
        return f"{name}/{self.marker_name(label.marker_id)}" if label.marker_id else name

    def to_dict(self) -> dict[str, Any]:
        """Serialisable form, saved next to exported weights so ids can be decoded later."""
        return {
            "stains": [{"id": i, "name": e.name, "kind": e.kind} for i, e in enumerate(self._stains.entries)],
            "markers": [{"id": i, "name": e.name} for i, e in enumerate(self._markers.entries)],
        }


def _entry_from_config(spec: Mapping[str, Any], default_kind: str) -> Entry:
    if "name" not in spec:
        raise ValueError(f"vocabulary extension {dict(spec)!r} has no 'name'")
    kind = str(spec.get("kind", default_kind))
    allowed = {"he", "ihc", "special"} if default_kind != "marker" else {"marker"}
    if kind not in allowed:
        raise ValueError(f"vocabulary extension {spec['name']!r}: kind {kind!r} not in {sorted(allowed)}")
    return Entry(str(spec["name"]), kind, tuple(str(a) for a in spec.get("aliases", ())))
