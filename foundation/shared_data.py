"""Where the real slides and tiles for tests and benchmarks are (``../shared/data``; never copied into the repo).

In order: ``$FOUNDATION_TEST_DATA``; ``shared/data`` beside this checkout; ``shared/data`` beside the local checkout
this one was cloned from (``git clone /path/to/checkout DIR`` puts DIR anywhere, its data stays beside the origin).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

DATA_ENV = "FOUNDATION_TEST_DATA"
REPO = Path(__file__).resolve().parents[1]
RELATIVE = Path("shared") / "data"
MARKER = "wsi"  # a data folder holds wsi/ (the slides) and tiles/


def _origin_checkout(repo: Path) -> Path | None:
    """The local folder ``repo`` was cloned from, if its ``origin`` is one."""
    try:
        url = subprocess.run(["git", "-C", str(repo), "config", "--get", "remote.origin.url"], capture_output=True,
                             text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    path = Path(url.removeprefix("file://")) if url and "://" not in url.removeprefix("file://") else None
    return path.resolve() if path is not None and path.is_dir() else None


def candidates(repo: Path = REPO) -> list[Path]:
    """The folders looked at, in order (the environment variable alone when it is set)."""
    if os.environ.get(DATA_ENV):
        return [Path(os.environ[DATA_ENV]).resolve()]
    found = [(repo.parent / RELATIVE).resolve()]
    origin = _origin_checkout(repo)
    if origin is not None:
        found.append((origin.parent / RELATIVE).resolve())
    return found


def shared_data_dir(repo: Path = REPO) -> Path:
    """The first candidate holding the slides, else the first candidate (callers report it as missing)."""
    looked = candidates(repo)
    return next((path for path in looked if (path / MARKER).is_dir()), looked[0])


if __name__ == "__main__":  # tests/run.sh: stop at once, naming the folders looked at, when there is no data
    path = shared_data_dir()
    if not (path / MARKER).is_dir():
        raise SystemExit(f"real test data not found (looked at {', '.join(map(str, candidates()))}): "
                         f"set {DATA_ENV} to the shared data folder")
    print(path)
