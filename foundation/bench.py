"""``foundation bench KIND``: throughput benchmarks, one module per kind.

Each kind's module exposes ``add_arguments(parser)`` and ``run(args) -> int`` like a command; add a kind with one
line in :data:`BENCHES`. Kind modules keep heavy imports inside ``run`` so that parsing stays fast.
"""

from __future__ import annotations

import argparse
import importlib

# kind -> (module, one-line help)
BENCHES: dict[str, tuple[str, str]] = {
    "data": ("foundation.data.bench", "crops/s of the DALI data pipeline against a plain torch DataLoader"),
    "step": ("foundation.perf.step", "our training step against a plain-PyTorch reference step: img/s, TFLOP/s, MFU"),
    "e2e": ("foundation.perf.e2e", "the full training loop on real slides: img/s, share of time waiting for data"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="KIND", required=True)
    for name, (module, help_text) in BENCHES.items():
        kind = sub.add_parser(name, help=help_text, description=help_text)
        kind.set_defaults(_bench_module=module)
        importlib.import_module(module).add_arguments(kind)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(args._bench_module).run(args) or 0)
