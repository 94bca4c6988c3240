"""``python -m foundation``: the ``foundation`` program."""

from foundation.cli import entry

entry()
