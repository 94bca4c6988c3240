"""``python -m foundation.train [--config PRESET] [key=value ...]``: ``foundation train`` as a module, for launchers.

``deepspeed --module foundation.train ...`` and ``torchrun -m foundation.train ...`` start it once per rank.
"""

import sys

from foundation.cli import entry

entry(["train", *sys.argv[1:]])
