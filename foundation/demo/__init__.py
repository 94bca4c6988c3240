"""The embedded demo data set (``foundation demo-data DIR``): pyramidal H&E and IHC slides + manifest.

``write_demo_dataset(out_dir, cfg.demo) -> manifest path`` is the API; the command is a thin wrapper.
"""

from foundation.demo.command import add_arguments, run
from foundation.demo.dataset import MANIFEST, MANIFEST_COLUMNS, demo_slides, write_demo_dataset
from foundation.demo.spec import DemoSpec

__all__ = ["MANIFEST", "MANIFEST_COLUMNS", "DemoSpec", "add_arguments", "demo_slides", "run", "write_demo_dataset"]
